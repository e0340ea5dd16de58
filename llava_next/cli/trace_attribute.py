"""``llava-next trace --attribute METHOD``: gradient attribution of the traced request, as JSON and pictures.

    llava-next trace --model tiny-random --image photo.jpg --max-new-tokens 3 --attribute relevancy --json --png out/ "?"

Methods (llava_next/research/attribution.py, relevancy.py): ``input_x_grad``, ``integrated_gradients`` (onto
``--attribute-space tokens``, the decoder's input embeddings, or ``pixels``, the tower's input; ``--baseline``,
``--ig-steps``, ``--ig-rule``), ``rollout`` and ``relevancy`` (Chefer et al.; both build the decoder's attention
probabilities dense, T x T per layer: for small inputs; ``relevancy --attribute-space pixels`` carries the
decoder's map on through the vision tower's own relevancy onto each tile's / frame's patches). The target is the
log-probability of the generated answer (``--max-new-tokens N``: all N tokens, teacher-forced) or, without one,
of the model's top-1 next token.

``--json`` adds ``attribution``: ``method``, ``space``, ``target``, ``f`` (the target's value), ``baseline`` /
``f_baseline`` / ``delta`` (integrated gradients' completeness error), ``queries`` (the positions whose logits
the target reads), ``scores`` (one per position, 0 where a method gives nothing), ``sums`` (per segment, frame
and tile, as the attention's), ``time_s`` and ``reproducibility`` (package version, commit, torch version, dtype,
device, seed, checkpoint hash of a local directory, switches; eval/records.py). ``--png DIR`` adds, per image,
``image{k}_{method}.png`` (base and AnyRes grid maps on the original pixels) and per video
``video{k}_{method}.png`` (each frame's map); the PNGs carry the reproducibility record as a text chunk.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

METHODS = ("input_x_grad", "integrated_gradients", "rollout", "relevancy")


def add_attribute_flags(p: argparse.ArgumentParser) -> None:
    from . import options

    p.add_argument("--attribute", choices=METHODS, default=None,
                   help="gradient attribution of the answer (or the top-1 next token) onto the positions and the "
                        "original pixels: " + ", ".join(METHODS))
    p.add_argument("--attribute-space", choices=("tokens", "pixels"), default=None,
                   help="input_x_grad / integrated_gradients / relevancy: the decoder's input embeddings (tokens, "
                        "default) or the tower's pixels (relevancy: carried through the vision tower's attention)")
    p.add_argument("--baseline", choices=("zeros", "black"), default=None,
                   help="integrated gradients' baseline: zeros (visual embeddings or normalised pixels, default) or "
                        "black (pixels only)")
    p.add_argument("--ig-steps", type=options.positive, default=None,
                   help="integrated gradients' path points (default 32)")
    p.add_argument("--ig-rule", choices=("riemann", "trapezoid"), default=None,
                   help="integrated gradients' rule (default riemann: midpoints)")

def check_attribute(args: argparse.Namespace, user_error) -> None:
    """The --attribute flags checked before any loading (each acts with the method it belongs to, or is
    refused), then their defaults filled in."""
    ig = {"--baseline": args.baseline, "--ig-steps": args.ig_steps, "--ig-rule": args.ig_rule}
    given = [k for k, v in {"--attribute-space": args.attribute_space, **ig}.items() if v is not None]
    if args.attribute is None and given:
        raise user_error(f"{', '.join(given)}: these act with --attribute METHOD; add it (e.g. --attribute "
                         f"integrated_gradients)")
    if args.attribute == "rollout" and args.attribute_space is not None:
        raise user_error("--attribute-space: rollout scores positions from attention (tokens only); drop it, or "
                         "use --attribute relevancy / input_x_grad / integrated_gradients")
    if args.attribute not in (None, "integrated_gradients") and any(v is not None for v in ig.values()):
        raise user_error(f"{', '.join(k for k, v in ig.items() if v is not None)}: these act with --attribute "
                         f"integrated_gradients, not {args.attribute}")
    if args.attribute is None:
        return
    if args.reduce or getattr(args, "select_frames", None):
        raise user_error("--attribute runs the whole model: drop --reduce / --select-frames (attribution of a "
                         "reduced model is not implemented)")
    if getattr(args, "quantize", None) or args.adapter or getattr(args, "activations", "float") != "float":
        raise user_error("--attribute loads the float model without prepacking (a gradient must pass every "
                         "layer): drop --quantize / --activations / --adapter, or merge the adapter into a "
                         "checkpoint first")
    if args.baseline == "black" and args.attribute_space != "pixels":
        raise user_error("--baseline black is a pixel baseline: add --attribute-space pixels (in token space the "
                         "baseline is zeros)")
    args.attribute_space = args.attribute_space or "tokens"
    args.baseline, args.ig_steps, args.ig_rule = args.baseline or "zeros", args.ig_steps or 32, args.ig_rule or "riemann"

def load(model_id: str, args: argparse.Namespace, dtype):
    """The pipeline with the model as training loads it (train/sft.py): float, not prepacked for oneDNN, so a
    gradient passes every linear (a prepacked copy keeps no plain weight for the backward)."""
    from ..runtime.loading import load as load_pipeline
    from ..train.sft import materialize_trainable

    return load_pipeline(model_id, dtype=dtype, device=args.device, cache_dir=args.cache_dir,
                         progress=not (args.json or args.quiet), materialize=materialize_trainable)


def attribute(args: argparse.Namespace, pipe, result) -> dict:
    """Run the method on the traced request (prompt + generated answer); its --json object."""
    from ..research import Inputs, Target, input_x_gradient, integrated_gradients, relevancy, rollout

    request, generated = result.request, result.generated
    inputs = Inputs(torch.tensor([request.input_ids + generated]), list(request.images),
                    [c.pixel_values for c in request.videos])
    target = Target(answer=len(generated)) if generated else None
    decoder = pipe.model.language_model
    previous, decoder.rope_scaling_factor = decoder.rope_scaling_factor, request.plan.factor
    t0 = time.perf_counter()
    try:
        if args.attribute == "input_x_grad":
            a = input_x_gradient(pipe.model, inputs, target, space=args.attribute_space)
        elif args.attribute == "integrated_gradients":
            a = integrated_gradients(pipe.model, inputs, target, space=args.attribute_space, baseline=args.baseline,
                                     steps=args.ig_steps, rule=args.ig_rule)
        elif args.attribute == "relevancy":
            a = relevancy(pipe.model, inputs, target, space=args.attribute_space)
        else:
            a = rollout(pipe.model, inputs, target)
    finally:
        decoder.rope_scaling_factor = previous
    out = a.to_dict()
    out.update(sums=result.provenance.sums(a.scores), time_s=time.perf_counter() - t0,
               reproducibility=reproducibility(args, pipe))
    out["_attribution"] = a  # taken out before printing: the drawing reads it
    return out


def reproducibility(args: argparse.Namespace, pipe) -> dict:
    """eval/records.py's record: versions, commit, dtype, device, seed, checkpoint hash, the trace's switches
    (every ``trace`` output carries it: --json, each --png's text chunk, each --inputs shard)."""
    from ..eval.records import provenance

    names = ("attribute", "attribute_space", "baseline", "ig_steps", "ig_rule", "max_new_tokens", "frames", "template",
             "layers", "query", "lens", "reduce", "select_frames", "sampling", "quantize", "activations", "adapter",
             "rope_scale")
    switches = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    directory = args.model if os.path.isdir(str(args.model)) else None
    return provenance(model=str(args.model), checkpoint_dir=directory, dtype=pipe.model.dtype,
                      device=pipe.model.device, seed=args.seed, switches=switches)


def draw(args: argparse.Namespace, request, prov, report: dict) -> list[str]:
    """The attribution's maps on the original pixels: per image (base and grid), per video (each frame as the
    model sees it, and each whole frame with the model's crop outlined), in --format with the --vmin / --vmax /
    --scale colour scale (cli/trace_draw.py)."""
    from ..inputs.image import load_image
    from . import trace_draw

    draw_ = trace_draw.painter(args)
    a, method = report["_attribution"], report["method"]
    scores = a.scores
    what = f"{method} ({a.space}), target {_target_words(a)}"
    scale = {"vmin": args.vmin, "vmax": args.vmax}
    out = []
    for m in prov.media_info:
        if m.kind == "video":
            clip = (request.frame_clips if m.as_images else request.videos)[m.kind_index]
            F = m.plan.num_frames
            grids = [prov.to_grid(scores, m.index, frame=f).numpy() for f in range(F)]
            sums = [float(scores[prov.where(media=m.index, frame=f)].sum()) for f in range(F)]
            img = draw_.frame_heatmaps(clip.frames, grids, list(m.timestamps), list(m.frame_indices),
                                       title=f"{m.name}: {what}", frame_sums=sums, sum_format="sum {:.4g}",
                                       value="attribution", bar_label="attribution per token", norm=args.scale,
                                       **scale)
            name = f"video{m.kind_index}_{method}"
            # the same scores on each whole frame as the file stores it, the model's crop outlined
            trace_draw.draw_original(args, prov, m, clip, scores, f"{m.name}: {what}",
                                      lambda fig, stem: out.append(trace_draw.save(args, fig, stem,
                                                                                   report["reproducibility"])),
                                      f"video{m.kind_index}_{method}_original")
        else:
            image = load_image(args.image[m.kind_index], max_pixels=args.max_image_pixels)
            untiled = m.plan.aspect != "anyres"
            img = draw_.anyres_overlay(
                image, prov.to_pixels(scores, m.index, part="base"),
                None if untiled else prov.to_pixels(scores, m.index, part="grid"), title=f"{m.name}: {what}",
                base_sum=float(scores[prov.where(media=m.index, tile="base")].sum()),
                grid_sum=float(scores[prov.where(media=m.index, kind="image_grid")].sum()),
                bar_label="attribution per token", **scale)
            name = f"image{m.kind_index}_{method}"
        out.append(trace_draw.save(args, img, name, report["reproducibility"]))
    return out


def _target_words(a) -> str:
    if a.target.answer:
        return f"log p(the {a.target.answer}-token answer)"
    return f"log p(next token {a.target.token})"


def finish(report: dict) -> dict:
    """The --json object without the Python result."""
    report = dict(report)
    report.pop("_attribution", None)
    return report


def summary(report: dict) -> str:
    s = report["sums"]["segments"]
    line = ", ".join(f"{k} {v:.4g}" for k, v in s.items() if v)
    extra = f", completeness delta {report['delta']:.3g}" if report.get("delta") is not None else ""
    return f"attribution {report['method']} ({report['space']}): f = {report['f']:.4f}{extra}; per segment: {line}"

