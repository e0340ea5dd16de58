"""``llava-next trace``: look inside one request — token provenance, exact attention, logit lens, pictures.

    llava-next trace --video clip.mp4 --frames 8 --layers 0,15,31 --query last,question --json "What happens?"
    llava-next trace --image photo.jpg --png out/ "What is in the picture?"

Same model, media and prompt flags as ``run`` (its parser is reused as the parent of this one). It parses
its flags, loads and prepares as ``run`` does, calls ``Pipeline.trace`` (runtime/tracing.py) and prints or
draws the result. What that does: prepare the request (no generation unless ``--max-new-tokens N``: then the greedy answer is generated first
and traced with the prompt), build its token provenance (research/provenance.py), run ONE forward of the
whole sequence under ``research.trace`` with exact attention statistics (research/attention.py: rows of the
chosen queries, query chunk by query chunk, from the layer's own post-RoPE q and k; the model itself keeps
its SDPA attention) and a streaming logit lens, then report.

``--json`` prints one object:
- ``positions``: one object per position: ``kind``, ``segment``, ``media``, ``frame``, ``time``, ``tile``
  ("base" or [tile row, tile col]), ``row``, ``col``, ``grid``, ``box`` (source pixels in the original
  image / frame), ``token_id``; null where a field does not apply. ``media``: what each media index is.
- ``attention``: ``{layer: {query group: {"queries": [positions], "weights": [T floats], "sums": {...}}}}``
  with the head-averaged attention weights of the group's queries over all T positions (the mean of their
  rows, so the weights sum to 1), and their sums per segment, per video frame and per image tile. Query
  groups (``--query``): ``last`` (the last prompt position: FastV's query), ``question``, ``generated``,
  ``all`` (every position; from the per-key mass summed over all queries, divided by T).
- ``logit_lens``: ``{layer: {"positions": [...], "ids": [[top-k]], "tokens": [[...]], "probs": [[...]]}}``
  for the ``--lens`` positions.
``--png DIR`` draws (cli/trace_draw.py; research/plots.py, or research/vector.py with ``--format svg|pdf``): per
video and query group, per-frame heatmaps (mean over the requested layers) and the layer x frame chart; per
image and query group, the base and AnyRes grid maps on its original pixels; the logit-lens grid. ``--vmin`` /
``--vmax`` / ``--scale`` set the colour scale. Without ``--json`` a summary goes to stdout.

With ``--select-frames`` / ``--reduce`` (docs/reduction.md, "Tracing a reduced model"): the frames are
selected and DyCoke's temporal pruning applied as ``run`` does; an in-decoder method (fastv, framefusion,
dycoke) runs the prompt through the reduced prefill and replays each generated token through the reduced
decode (one decoder call per token), so every number is what the reduced model computed, in ORIGINAL prompt
positions: ``positions[i].reduction`` = its fate (kept / pruned at a layer / merged into a position, the
decode steps that read it), weights null at the keys a layer no longer has, ``reduction.before_decoder``
the pooled cells each frame kept; ``--png`` adds ``video{k}_kept.png`` (layers each token reached, per frame)
and, with dycoke, ``video{k}_decode_reads.png``.

``--attribute METHOD`` (input_x_grad, integrated_gradients, rollout, relevancy) adds gradient attribution of the
answer: ``attribution`` in the JSON and its maps in ``--png`` (cli/trace_attribute.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ..runtime.tracing import LENS_GROUPS, QUERY_GROUPS
from . import trace_attribute, trace_draw, trace_jobs
from .trace_draw import piece as _piece


def _names(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list of {', '.join(allowed)}; got {value!r}")
    return list(dict.fromkeys(names))


def _layers(value: str) -> list[int] | None:
    if value == "all":
        return None
    try:
        layers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes 'all' or comma-separated layer numbers (negative from "
                                         f"the end), got {value!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("--layers needs at least one layer")
    return layers


def add_trace(sub, *, user_error) -> None:
    from . import options
    from .run import add_run

    scratch = argparse.ArgumentParser(add_help=False).add_subparsers()
    add_run(scratch, user_error=user_error)  # run's parser: model, media, plan, prompt, sampling and dtype flags
    p = sub.add_parser("trace", parents=[scratch.choices["run"]], conflict_handler="resolve",
                       help="token provenance, exact attention and logit lens of one request (JSON, PNG)",
                       description="Run one request through the model under a trace and report where every "
                                   "position came from, the exact head-averaged attention of chosen queries "
                                   "(without T x T maps or eager attention) and a logit lens. Takes run's "
                                   "model, media, token-plan and prompt options.")
    p.add_argument("--layers", type=_layers, default=None, metavar="all|I,J,...",
                   help="decoder layers to report (default all; negative counts from the end)")
    p.add_argument("--query", type=lambda v: _names(v, QUERY_GROUPS, "--query"), default=["last"],
                   metavar="GROUPS", help=f"query groups, comma-separated: {', '.join(QUERY_GROUPS)} (default last)")
    p.add_argument("--lens", type=lambda v: _names(v, LENS_GROUPS, "--lens"), default=["question", "last", "generated"],
                   metavar="GROUPS", help=f"logit-lens positions: {', '.join(LENS_GROUPS)} (default "
                                          f"question,last,generated)")
    p.add_argument("--lens-top-k", type=options.positive, default=5, help="logit lens: top-k tokens kept (default 5)")
    p.add_argument("--max-new-tokens", type=options.nonnegative, default=0,
                   help="generate this many tokens first and trace them with the prompt (default 0: prompt only)")
    p.add_argument("--json", action="store_true", help="print one JSON object (positions, attention, logit_lens)")
    p.add_argument("--png", metavar="DIR", default=None, help="draw heatmaps, charts and the logit-lens grid into DIR")
    trace_draw.add_figure_flags(p)  # --format png|svg|pdf, --vmin, --vmax, --scale (cli/trace_draw.py)
    trace_attribute.add_attribute_flags(p)  # --attribute METHOD and its options (cli/trace_attribute.py)
    trace_jobs.add_job_flags(p)  # --inputs JOBS.jsonl --out DIR: a dataset into shards (cli/trace_jobs.py)
    p.set_defaults(func=lambda args: _trace(args, user_error))


def _trace(args: argparse.Namespace, user_error) -> int:
    from . import options

    t0 = time.perf_counter()
    trace_jobs.check_jobs(args, user_error)
    if args.inputs is not None:
        options.finish(args, needs_prompt=False)  # a PROMPT, if given, is the items' default
        return trace_jobs.run_jobs(args, user_error)
    reduction, quantization = _check(args, user_error)
    pipe = _load(args, quantization, user_error)
    request = _prepare(pipe, args, reduction, user_error)
    t1 = time.perf_counter()
    result = pipe.trace(request, layers=args.layers, queries=args.query, lens=args.lens, lens_top_k=args.lens_top_k,
                        template=args.template,
                        image_names=[os.path.basename(p) for p in args.image], max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        compile_step={"auto": None, "on": True, "off": False}[args.compile_step])
    report = _report(args, pipe.tokenizer, result, load_and_prepare_s=t1 - t0)
    report["reproducibility"] = trace_attribute.reproducibility(args, pipe)
    attribution = trace_attribute.attribute(args, pipe, result) if args.attribute else None
    pngs = []
    if args.png:
        pngs = trace_draw.draw(args, request, result.provenance, result.attention, result.logit_lens,
                               pipe.tokenizer, result.layers, user_error, result.num_layers, report["reproducibility"])
        if attribution is not None:
            pngs += trace_attribute.draw(args, request, result.provenance, attribution)
        report["png"] = pngs
    if attribution is not None:
        report["attribution"] = trace_attribute.finish(attribution)
    if args.json:
        options.print_json(report)
    else:
        _print_summary(result, pngs)
        if attribution is not None:
            print(trace_attribute.summary(attribution))
    return 0


def _check(args: argparse.Namespace, user_error):
    """The flags checked before any loading: the reduction they ask for (or None), (quantize, group size)."""
    from . import options

    options.finish(args, needs_prompt=True)
    options.adapter_summary(args.adapter)  # a bad adapter fails before any loading
    reduction = options.reduction(args)  # a bad method or value fails before any loading
    trace_attribute.check_attribute(args, user_error)
    reducer = reduction.reducer if reduction is not None else None
    if reducer is not None and reducer.needs != "pooled":
        raise user_error(f"--reduce {reducer.name}: trace does not take this token reducer yet (its tokens are not "
                         f"cells of the video's pooled grid, so they have no provenance); trace takes "
                         f"--select-frames, dycoke-ttm and the in-decoder methods (fastv, framefusion, dycoke)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise user_error("--device cuda: no CUDA device is available; use --device cpu")
    if "generated" in args.query and not args.max_new_tokens:
        raise user_error("--query generated needs generated tokens: add --max-new-tokens N")
    gen_only = options.generation_only(args)
    if gen_only and not args.max_new_tokens:  # they shape the generated tokens, and none are generated
        raise user_error(f"{', '.join(gen_only)}: these act on generated tokens, and trace generates none "
                         f"without --max-new-tokens N; add it (the answer is then generated and traced)")
    quantization = options.quantization(args)
    trace_draw.check_figure_flags(args, user_error)
    if args.png and os.path.exists(args.png) and not os.path.isdir(args.png):
        raise user_error(f"--png {args.png}: exists and is not a directory")
    return reduction, quantization


def _load(args: argparse.Namespace, quantization: tuple, user_error):
    """The pipeline, after the random-weights notice; ``--layers`` checked against its decoder."""
    from ..config import PRESETS
    from ..runtime.pipeline import Pipeline
    from .run import DTYPES, random_weights_notice

    quantize, group_size = quantization
    model_id = PRESETS[args.model].hub_id if args.model in PRESETS else args.model
    notice = random_weights_notice(args.model)  # a built-in model or a copy of one
    if notice:  # said plainly, whatever the output mode: random weights
        print(f"[llava-next] {notice}", file=sys.stderr)
    pipe = Pipeline.from_pretrained(model_id, dtype=DTYPES[args.dtype], device=args.device,
                                    cache_dir=args.cache_dir, progress=not (args.json or args.quiet),
                                    quantize=quantize, group_size=group_size, adapter=args.adapter,
                                    activations=args.activations) \
        if not args.attribute else trace_attribute.load(model_id, args, DTYPES[args.dtype])
    n_layers = len(pipe.model.language_model.layers)
    bad = [layer for layer in args.layers or () if not -n_layers <= layer < n_layers]
    if bad:
        raise user_error(f"--layers {bad}: this decoder has {n_layers} layers (0..{n_layers - 1}, or negative)")
    return pipe


def _prepare(pipe, args: argparse.Namespace, reduction, user_error):
    """The request, as run prepares it; its plan and notes on stderr (not with --json or --quiet)."""
    from .run import prepare_request

    request = prepare_request(pipe, args, reduction, user_error)
    if not (args.json or args.quiet):  # as run: the plan and the notes on stderr (--quiet: none)
        print(f"[llava-next] {request.plan.summary()}", file=sys.stderr)
        for note in request.notes:
            print(f"[llava-next] note: {note}", file=sys.stderr)
    return request


def _report(args: argparse.Namespace, tokenizer, res, *, load_and_prepare_s: float) -> dict:
    """The --json object (the module docstring lists its fields)."""
    prov, request = res.provenance, res.request
    report = {
        "model": str(args.model), "positions_total": len(prov), "prompt_positions": prov.prompt_len,
        "input_ids": request.input_ids + res.generated, "generated": res.generated, "text": res.text,
        "plan": request.to_dict(), "media": [m.to_dict() for m in prov.media_info],
        "positions": prov.to_records(),
        "attention": {str(layer): {g: {"queries": (res.groups[g].tolist() if g != "all" else "all"),
                                       "weights": _json_floats(w), "sums": prov.sums(w.nan_to_num(0.0))}
                                   for g, w in per_group.items()} for layer, per_group in res.attention.items()},
        "logit_lens": {str(layer): {"positions": r.positions.tolist(), "ids": r.ids[0].tolist(),
                                    "tokens": [[_piece(tokenizer, i) for i in row] for row in r.ids[0].tolist()],
                                    "probs": r.probs[0].tolist()} for layer, r in sorted(res.logit_lens.items())},
        "timings": {"load_and_prepare_s": load_and_prepare_s, **res.timings},
    }
    if res.reduction is not None:
        report["reduction"] = res.reduction
    return report


def _print_summary(res, pngs: list[str]) -> None:
    """Without --json: the provenance summary, then per layer and query group the attention per segment and
    per video frame."""
    prov = res.provenance
    print(prov.summary())
    if res.in_decoder:
        print("(a position pruned or merged away at a layer receives no attention there: it counts 0; "
              "'pruned' where a frame has no position left at that layer)")
    for layer in res.layers:
        for g, w in res.attention[layer].items():
            s = prov.sums(w.nan_to_num(0.0))  # NaN: a key this layer no longer has (mass 0)
            segs = ", ".join(f"{k} {v:.3f}" for k, v in s["segments"].items())
            print(f"layer {layer:>3} query {g:<9} {segs}")
            if s["frames"]:
                gone = [bool(w[prov.where(media=f["media"], frame=f["frame"])].isnan().all()) for f in s["frames"]]
                print("    frames: " + " ".join(f"{f['frame']}:{'pruned' if g else format(f['sum'], '.3f')}"
                                                for f, g in zip(s["frames"], gone)))
    for path in pngs:
        print(f"drew {path}")


def _json_floats(w: torch.Tensor) -> list:
    """Weights as JSON numbers; null where a reduced layer no longer had the position (NaN)."""
    return [None if v != v else v for v in w.tolist()]
