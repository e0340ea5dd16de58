"""``llava-next trace``: look inside one request — token provenance, exact attention, logit lens, pictures.

    llava-next trace --video clip.mp4 --frames 8 --layers 0,15,31 --query last,question --json "What happens?"
    llava-next trace --image photo.jpg --png out/ "What is in the picture?"

Same model, media and prompt flags as ``run`` (its parser is reused as the parent of this one). What it does:
prepare the request (no generation unless ``--max-new-tokens N``: then the greedy answer is generated first
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
``--png DIR`` draws (research/plots.py): per video, per-frame heatmaps (first query group, mean over the
requested layers) and the layer x frame chart; per image, the base and AnyRes grid maps on its original
pixels; the logit-lens grid. Without ``--json`` a summary goes to stdout.

With ``--select-frames`` / ``--reduce`` (docs/reduction.md, "Tracing a reduced model"): the frames are
selected and DyCoke's temporal pruning applied as ``run`` does; an in-decoder method (fastv, framefusion,
dycoke) runs the prompt through the reduced prefill and replays each generated token through the reduced
decode (one decoder call per token), so every number is what the reduced model computed, in ORIGINAL prompt
positions: ``positions[i].reduction`` = its fate (kept / pruned at a layer / merged into a position, the
decode steps that read it), weights null at the keys a layer no longer has, ``reduction.before_decoder``
the pooled cells each frame kept; ``--png`` adds ``video{k}_kept.png`` (layers each token reached, per frame)
and, with dycoke, ``video{k}_decode_reads.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

QUERY_GROUPS = ("last", "question", "generated", "all")
LENS_GROUPS = ("last", "question", "generated", "text", "visual", "none")


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
    p.set_defaults(func=lambda args: _trace(args, user_error))


def _trace(args: argparse.Namespace, user_error) -> int:
    from ..config import PRESETS
    from ..research import Attention, LogitLens, Provenance, trace
    from ..research import select as sel
    from ..runtime.pipeline import Pipeline
    from .run import prepare_request
    from . import options
    from .run import DTYPES

    options.finish(args, needs_prompt=True)
    reduction = options.reduction(args)  # a bad method or value fails before any loading
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
    quantize, group_size = options.quantization(args)
    if args.png and os.path.exists(args.png) and not os.path.isdir(args.png):
        raise user_error(f"--png {args.png}: exists and is not a directory")
    t0 = time.perf_counter()
    model_id = PRESETS[args.model].hub_id if args.model in PRESETS else args.model
    from .run import random_weights_notice

    notice = random_weights_notice(args.model)  # a built-in model or a copy of one
    if notice:  # said plainly, whatever the output mode: random weights
        print(f"[llava-next] {notice}", file=sys.stderr)
    pipe = Pipeline.from_pretrained(model_id, dtype=DTYPES[args.dtype], device=args.device,
                                    cache_dir=args.cache_dir, progress=not (args.json or args.quiet),
                                    quantize=quantize, group_size=group_size)
    n_layers = len(pipe.model.language_model.layers)
    layers = list(range(n_layers)) if args.layers is None else args.layers
    bad = [layer for layer in layers if not -n_layers <= layer < n_layers]
    if bad:
        raise user_error(f"--layers {bad}: this decoder has {n_layers} layers (0..{n_layers - 1}, or negative)")
    layers = list(dict.fromkeys(layer % n_layers for layer in layers))
    request = prepare_request(pipe, args, reduction, user_error)
    if not (args.json or args.quiet):  # as run: the plan and the notes on stderr (--quiet: none)
        print(f"[llava-next] {request.plan.summary()}", file=sys.stderr)
        for note in request.notes:
            print(f"[llava-next] note: {note}", file=sys.stderr)
    in_decoder = reduction is not None and reduction.in_decoder
    generated: list[int] = []
    if args.max_new_tokens:
        for _ in pipe.stream(request, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, template=args.template,
                             compile_step={"auto": None, "on": True, "off": False}[args.compile_step]):
            pass
        generated = list(request.tokens)
    model = pipe.model
    with torch.no_grad():  # the video tokens (a token reducer's, with the pooled cell each one is)
        reduced = [reducer.reduce_video(model, c.pixel_values) if reducer is not None else None
                   for c in request.videos]
        video_feats = [r.tokens if r is not None else model.video_features(c.pixel_values)
                       for r, c in zip(reduced, request.videos)]
    prov = Provenance.from_request(request, pipe.config, tokenizer=pipe.tokenizer, question=args.prompt,
                                   template=args.template, image_names=[os.path.basename(p) for p in args.image],
                                   video_tokens=[(r.frame, r.patch) if r is not None else None for r in reduced])
    prov = prov.with_generated(generated)
    T = len(prov)

    selectors = {"last": sel.last_text(), "question": sel.question(), "generated": sel.generated()}
    groups = {g: selectors[g].resolve(prov) for g in args.query if g != "all"}
    lens_groups = {"text": sel.text(), "visual": sel.visual(), **selectors}
    lens_pos = torch.cat([sel.maybe(lens_groups[g]).resolve(prov) for g in args.lens if g != "none"]
                         or [torch.zeros(0, dtype=torch.long)]).unique()

    row_queries = torch.cat(list(groups.values())).unique() if groups else None
    model, decoder = pipe.model, pipe.model.language_model
    ids = torch.tensor([request.input_ids + generated])
    previous = decoder.rope_scaling_factor
    decoder.rope_scaling_factor = request.plan.factor
    t1 = time.perf_counter()
    try:
        with torch.no_grad(), _maybe_all(model, "all" in args.query, layers, prov, trace, Attention) as tr_all, \
                trace(model, provenance=prov,
                      attention=Attention(layers=layers, queries=row_queries, rows=True, heads="mean",
                                          decode=in_decoder)
                      if row_queries is not None else None,
                      logit_lens=LogitLens(positions=lens_pos, top_k=args.lens_top_k,
                                           steps="all" if in_decoder else "prefill")
                      if len(lens_pos) else None) as tr:
            embeds = model.embed(ids, model.image_features(request.images), video_feats)
            if not in_decoder:
                decoder(input_embeds=embeds, last_only=True)
            else:  # the reduced model prunes at prefill and reads its pruned cache while decoding: replay both
                engine = _replay_reduced(decoder, embeds, prov, reduction, generated)
    finally:
        decoder.rope_scaling_factor = previous
    trace_s = time.perf_counter() - t1
    if in_decoder:
        prov = prov.with_fates(tr.fates)
        rep = engine.report  # what the traced (replayed) prefill pruned, as run --json reports it
        request.reduction_report = {"pruned_at_layer": rep.layer, "visual_tokens_after_pruning": rep.visual_after[0],
                                    "kept_positions": rep.kept_positions[0]}

    attention: dict[int, dict[str, dict]] = {}
    for layer in layers:
        per_group = {}
        if groups:
            rows, where = _query_rows(tr, layer, T)
            for g, pos in groups.items():
                per_group[g] = rows[[where[int(p)] for p in pos]].mean(0)
        if tr_all is not None:
            stats = tr_all.attention[layer]  # the mean of the rows of every query the layer has
            per_group["all"] = _pad(stats.key_mass[0].double() / len(stats.queries), T)
        attention[layer] = {g: per_group[g] for g in args.query}

    if not len(lens_pos):
        lens = {}
    elif in_decoder:  # one result per decode step: joined per layer
        lens = _join_lens(tr)
    else:
        lens = {layer: r for layer, r in tr.logit_lens.items()}
    report = {
        "model": str(args.model), "positions_total": T, "prompt_positions": prov.prompt_len,
        "input_ids": request.input_ids + generated, "generated": generated,
        "text": pipe.tokenizer.decode(generated) if generated else "",
        "plan": request.to_dict(), "media": [m.to_dict() for m in prov.media_info],
        "positions": prov.to_records(),
        "attention": {str(layer): {g: {"queries": (groups[g].tolist() if g != "all" else "all"),
                                       "weights": _json_floats(w), "sums": prov.sums(w.nan_to_num(0.0))}
                                   for g, w in per_group.items()} for layer, per_group in attention.items()},
        "logit_lens": {str(layer): {"positions": r.positions.tolist(), "ids": r.ids[0].tolist(),
                                    "tokens": [[_piece(pipe.tokenizer, i) for i in row]
                                               for row in r.ids[0].tolist()],
                                    "probs": r.probs[0].tolist()} for layer, r in sorted(lens.items())},
        "timings": {"load_and_prepare_s": t1 - t0, "trace_s": trace_s},
    }
    if reduction:
        report["reduction"] = {**request.reduction_summary(), "num_layers": n_layers,
                               **({"decode_layer": prov.fates.decode_layer} if in_decoder else {})}
        if reducer is not None:  # the first stage: which pooled cells of each frame entered the decoder
            report["reduction"]["before_decoder"] = [
                {"media": m.index, "cells_per_frame": m.plan.pooled_hw[0] * m.plan.pooled_hw[1],
                 "kept_per_frame": [len(prov.where(media=m.index, frame=f, kind="video"))
                                    for f in range(m.plan.num_frames)]}
                for m in prov.media_info if m.kind == "video"]
    pngs = []
    if args.png:
        pngs = _draw(args, request, prov, attention, lens, pipe.tokenizer, layers, user_error, n_layers)
        report["png"] = pngs
    if args.json:
        print(json.dumps(report))
    else:
        print(prov.summary())
        if in_decoder:
            print("(a position pruned or merged away at a layer receives no attention there: it counts 0; "
                  "'pruned' where a frame has no position left at that layer)")
        for layer in layers:
            for g, w in attention[layer].items():
                s = prov.sums(w.nan_to_num(0.0))  # NaN: a key this layer no longer has (mass 0)
                segs = ", ".join(f"{k} {v:.3f}" for k, v in s["segments"].items())
                print(f"layer {layer:>3} query {g:<9} {segs}")
                if s["frames"]:
                    gone = [bool(w[prov.where(media=f["media"], frame=f["frame"])].isnan().all()) for f in s["frames"]]
                    print("    frames: " + " ".join(f"{f['frame']}:{'pruned' if g else format(f['sum'], '.3f')}"
                                                    for f, g in zip(s["frames"], gone)))
        for path in pngs:
            print(f"drew {path}")
    return 0


def _pad(w: torch.Tensor, T: int) -> torch.Tensor:
    """Weights over the first n positions -> over T (0 for later positions: causally unseen)."""
    return w if len(w) >= T else torch.cat([w, w.new_zeros(T - len(w))])


def _replay_reduced(decoder, embeds: torch.Tensor, prov, reduction, generated: list[int]):
    """The prompt and the generated tokens again through a reduced engine (prefill, then one decode step per
    token), under the caller's trace; returns the engine (its report and fates)."""
    from ..reduce.engine import ReducedEngine
    from ..reduce.stages import Reduction
    from ..research.trace import layout_from_provenance

    P, device = prov.prompt_len, embeds.device
    engine = ReducedEngine(Reduction(pruner=reduction.pruner, decode=reduction.decode), layout_from_provenance(prov))
    engine.setup_caches(decoder, 1, P, len(generated), embeds.dtype, device)
    engine.prefill(decoder, embeds[:, :P], torch.arange(P, device=device)[None], None)
    for s, token in enumerate(generated):
        engine.decode(decoder, torch.tensor([token], device=device), s, torch.tensor([[P + s]], device=device))
    return engine


def _query_rows(tr, layer: int, T: int) -> tuple[torch.Tensor, dict[int, int]]:
    """Head-mean rows (|Q|, T) float64 of every traced query of a layer, from the prefill and (a reduced replay)
    each decode step, and the row of each query position. NaN: a key this layer no longer had."""
    rows, where = [], {}
    for step in tr.steps:
        stats = step.attention.get(layer)
        if stats is None:
            continue
        for i, p in enumerate(stats.query_positions.tolist()):
            where[int(p)] = len(rows)
            rows.append(_pad(stats.rows[0, i].double(), T))
    return torch.stack(rows), where


def _join_lens(tr) -> dict:
    """The logit lens of every step of a reduced replay, one result per layer (positions in order)."""
    from ..research import LensResult

    parts: dict = {}
    for step in tr.steps:
        for layer, r in step.extra.get("logit_lens", {}).items():
            parts.setdefault(layer, []).append(r)
    return {layer: LensResult(torch.cat([r.positions for r in rs]), torch.cat([r.ids for r in rs], 1),
                              torch.cat([r.probs for r in rs], 1), None) for layer, rs in parts.items()}


def _json_floats(w: torch.Tensor) -> list:
    """Weights as JSON numbers; null where a reduced layer no longer had the position (NaN)."""
    return [None if v != v else v for v in w.tolist()]


class _maybe_all:
    """A second, outer trace computing the all-query key mass (only when --query all is asked): its attention
    override wraps the inner one's, so one forward serves both."""

    def __init__(self, model, wanted, layers, prov, trace, Attention) -> None:
        self.tr = trace(model, provenance=prov, attention=Attention(layers=layers, queries="all", rows=False,
                                                                    key_mass=True, heads="mean", decode=False)) \
            if wanted else None

    def __enter__(self):
        return self.tr.__enter__() if self.tr is not None else None

    def __exit__(self, *exc):
        return self.tr.__exit__(*exc) if self.tr is not None else None


def _draw(args, request, prov, attention, lens, tokenizer, layers, user_error, n_layers) -> list[str]:
    from ..inputs.image import load_image
    from ..research import plots

    try:
        os.makedirs(args.png, exist_ok=True)
    except OSError as e:
        raise user_error(f"--png {args.png}: cannot create the directory ({e.strerror or e})") from None
    group = args.query[0]
    # the mean over the requested layers; a key a reduced layer no longer has (NaN) receives no attention there:
    # 0, so every cell is averaged over the same layers and the mean is a distribution (sums to 1) as each layer's
    mean_w = torch.stack([attention[layer][group] for layer in layers]).nan_to_num(0.0).mean(0)
    span = f"layer {layers[0]}" if len(layers) == 1 else f"mean of layers {', '.join(map(str, layers))}" \
        if len(layers) <= 6 else f"mean of {len(layers)} layers"
    out = []

    def save(img, name):
        path = os.path.join(args.png, name)
        img.save(path, format="PNG")
        out.append(path)

    for m in prov.media_info:
        if m.kind == "video":
            # Interleave sends a video as its frames, one <image> each: its clip is in request.frame_clips
            clip = (request.frame_clips if m.as_images else request.videos)[m.kind_index]
            F = m.plan.num_frames
            grids = [prov.to_grid(mean_w, m.index, frame=f).numpy() for f in range(F)]
            sums = [prov.where(media=m.index, frame=f) for f in range(F)]
            st = m.plan.stride * m.plan.pooled_hw[0] / m.plan.patch_grid_hw[0] if m.plan.mode != "bilinear" else 1.0
            save(plots.frame_heatmaps(clip.frames, grids, list(m.timestamps), list(m.frame_indices),
                                      title=f"{m.name}: which frame gets attention? query '{group}', {span}",
                                      frame_sums=[float(mean_w[p].nansum()) for p in sums], covered=min(1.0, st)),
                 f"video{m.kind_index}_frames.png")
            if prov.fates is not None or args.reduce:  # a reduced request: what reached which layer, per frame
                _draw_fates(prov, m, clip, save, n_layers)
            shares = np.array([[float(attention[layer][group][p].nansum()) for p in sums] for layer in layers])
            extra = {name: np.array([float(attention[layer][group][pos].nansum()) for layer in layers])
                     for name, pos in prov.segments().items() if name in ("system", "question", "template")}
            save(plots.layer_frame_chart(shares, layers, list(m.timestamps),
                                         title=f"{m.name}: share of query '{group}' attention per frame and layer",
                                         extra=extra), f"video{m.kind_index}_layers.png")
        else:
            path = args.image[m.kind_index]
            image = load_image(path, max_pixels=args.max_image_pixels)
            base = prov.to_pixels(mean_w, m.index, part="base")
            untiled = m.plan.aspect != "anyres"  # "resize" / "pad": one tile, no AnyRes grid
            grid = None if untiled else prov.to_pixels(mean_w, m.index, part="grid")
            tiles = []
            rows, cols = m.plan.grid_hw
            for ty in range(rows):
                for tx in range(cols):
                    b = prov.box[prov.where(media=m.index, tile=(ty, tx))]
                    if len(b):
                        tiles.append((float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()),
                                      float(b[:, 3].max())))
            how = "padded to a square" if m.plan.aspect == "pad" else "squashed"
            save(plots.anyres_overlay(image, base, grid, title=f"{os.path.basename(path)}: query '{group}' attention, "
                                                             f"{span}", tile_boxes=tiles,
                                      base_label=f"one tile ({how})" if untiled else None,
                                      base_sum=float(mean_w[prov.where(media=m.index, tile='base')].sum()),
                                      grid_sum=float(mean_w[prov.where(media=m.index, kind='image_grid')].sum())),
                 f"image{m.kind_index}_anyres.png")
    if lens:
        ordered = sorted(lens)
        positions = lens[ordered[0]].positions.tolist()[-32:]
        keep = [lens[ordered[0]].positions.tolist().index(p) for p in positions]
        tokens = [[_piece(tokenizer, int(lens[layer].ids[0, i, 0])) for i in keep] for layer in ordered]
        probs = np.array([[float(lens[layer].probs[0, i, 0]) for i in keep] for layer in ordered])
        labels = [_label(prov, p, tokenizer) for p in positions]
        save(plots.logit_lens_grid(tokens, probs, ordered, labels,
                                   title="logit lens: top-1 token per layer at the chosen positions"),
             "logit_lens.png")
    return out


def _draw_fates(prov, m, clip, save, n_layers: int) -> None:
    """Per-frame maps of a reduced request: how many decoder layers each video token reached (the kept /
    pruned map: the darkest cells were pruned or merged first, the brightest reached the last layer), and
    with DyCoke the share of decode steps whose deep layers read each token."""
    from ..research import plots

    F = m.plan.num_frames
    st = m.plan.stride * m.plan.pooled_hw[0] / m.plan.patch_grid_hw[0] if m.plan.mode != "bilinear" else 1.0
    L = n_layers
    reached = prov.layers_reached(n_layers)  # cells a token reducer dropped: no token, drawn as 0 layers
    grids = [prov.to_grid(reached, m.index, frame=f).numpy() for f in range(F)]
    kept = [int((reached[prov.where(media=m.index, frame=f, kind="video")] == L).sum()) for f in range(F)]
    img = plots.frame_heatmaps(clip.frames, [np.where(g == g, g, 0) for g in grids], list(m.timestamps),
                               list(m.frame_indices), frame_sums=kept, covered=min(1.0, st), norm="global",
                               sum_format="{} tokens kept", value="decoder layers reached",
                               bar_label="layers reached",
                               title=f"{m.name}: decoder layers each token reached (of {L}; bright = kept to the "
                                     f"last layer, dark = pruned or merged early, 0 = dropped before the decoder)")
    save(img, f"video{m.kind_index}_kept.png")
    reads = prov.decode_reads()
    if reads is not None:
        grids = [prov.to_grid(reads, m.index, frame=f).numpy() for f in range(F)]
        save(plots.frame_heatmaps(clip.frames, grids, list(m.timestamps), list(m.frame_indices), covered=min(1.0, st),
                                  title=f"{m.name}: share of decode steps whose layers >= {prov.fates.decode_layer} "
                                        f"read each token (DyCoke)", value="share of decode steps reading it",
                                  bar_label="share of decode steps"),
             f"video{m.kind_index}_decode_reads.png")


def _label(prov, p: int, tokenizer) -> str:
    kind = prov.kind_name(p)
    if kind in ("text", "generated"):
        return f"{p}:{_piece(tokenizer, int(prov.token_id[p]))}"
    if kind == "video":
        return f"{p}:f{int(prov.frame[p])} {int(prov.row[p])},{int(prov.col[p])}"
    return f"{p}:{kind}"


def _piece(tokenizer, idx: int) -> str:
    """A token's text as decoded alone, or its vocabulary piece (e.g. "<0x0A>", "▁") when that is blank or
    a partial UTF-8 character."""
    text = tokenizer.decode([idx], False)
    if not text.strip() or "\ufffd" in text:
        piece = tokenizer.backend.id_to_token(idx)
        return piece if piece is not None else text
    return text
