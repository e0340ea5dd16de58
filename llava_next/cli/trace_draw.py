"""``llava-next trace --png DIR``: the figures of one traced request, as PNG (Pillow) or SVG / PDF (matplotlib).

    llava-next trace --video clip.mp4 --query last,question --png out/ --format svg --vmin 0 --vmax 0.05 "..."

What is drawn: per video and query group, the frame heatmaps (mean over the requested layers) on the crops the
model sees and on the whole original frames with the crop outlined, and the layer x frame chart (a reduced
request adds its kept map); per image and query group, the base and AnyRes grid maps
on its original pixels; once, the logit-lens grid. The first ``--query`` group's files keep the plain names
(``video0_frames.png``); every further group's add ``_{group}`` (``video0_frames_question.png``).

Options (``add_figure_flags``): ``--format png|svg|pdf`` (svg / pdf: research/vector.py, needs the
``figures`` extra), ``--vmin`` / ``--vmax`` (the ends of the colour scale of the maps of attention per token,
frames and images; default 0 and the largest value, stated on each colour bar; the layer x frame chart of
shares keeps one scale of its own, 0 to its largest cell), ``--scale global|frame`` (frame heatmaps: one
scale for all frames, or one per frame).
Every file carries the reproducibility record: a PNG text chunk "llava-next", SVG / PDF metadata.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

FORMATS = ("png", "svg", "pdf")


def add_figure_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, default="png",
                   help="--png figures as png (Pillow), svg or pdf (vector, matplotlib: pip install "
                        "'llava-next[figures]'); default png")
    p.add_argument("--vmin", type=float, default=None,
                   help="--png maps of attention per token: the value drawn darkest (default 0, or the smallest if "
                        "negative)")
    p.add_argument("--vmax", type=float, default=None,
                   help="--png maps of attention per token: the value drawn brightest (default the largest)")
    p.add_argument("--scale", choices=("global", "frame"), default="global",
                   help="--png frame heatmaps: one colour scale for all frames (global, default) or one per frame")


def check_figure_flags(args: argparse.Namespace, user_error) -> None:
    """Before any loading: the figure flags need --png, an ordered scale, and matplotlib for svg / pdf."""
    given = [f for f, on in (("--format", args.format != "png"), ("--vmin", args.vmin is not None),
                             ("--vmax", args.vmax is not None), ("--scale", args.scale != "global")) if on]
    if given and not args.png:
        raise user_error(f"{', '.join(given)}: these set how --png draws its figures; add --png DIR")
    if args.vmin is not None and args.vmax is not None and not args.vmin < args.vmax:
        raise user_error(f"--vmin {args.vmin:g} --vmax {args.vmax:g}: vmin must be below vmax")
    if args.format != "png":
        from ..research import vector

        try:
            vector.require()
        except ImportError as e:
            raise user_error(f"--format {args.format}: {e}") from None


def painter(args: argparse.Namespace):
    """The module that draws: research/plots.py (png) or research/vector.py (svg, pdf); same functions."""
    if args.format == "png":
        from ..research import plots

        return plots
    from ..research import vector

    return vector


def save(args: argparse.Namespace, fig, stem: str, record: dict) -> str:
    """``fig`` (a PIL image or a matplotlib figure) as DIR/stem.FORMAT with the reproducibility ``record``."""
    path = os.path.join(args.png, f"{stem}.{args.format}")
    if args.format == "png":
        from PIL.PngImagePlugin import PngInfo

        from ..research.plots import PNG_LEVEL

        meta = PngInfo()
        meta.add_text("llava-next", json.dumps(record))
        fig.save(path, format="PNG", pnginfo=meta, compress_level=PNG_LEVEL)
    else:
        from ..research import vector

        vector.save(fig, path, json.dumps(record))
    return path


def draw(args, request, prov, attention, lens, tokenizer, layers, user_error, n_layers, record: dict) -> list[str]:
    """The --png figures into args.png (the module docstring lists them); their paths."""
    try:
        os.makedirs(args.png, exist_ok=True)
    except OSError as e:
        raise user_error(f"--png {args.png}: cannot create the directory ({e.strerror or e})") from None
    span = f"layer {layers[0]}" if len(layers) == 1 else f"mean of layers {', '.join(map(str, layers))}" \
        if len(layers) <= 6 else f"mean of {len(layers)} layers"
    out = []

    def put(fig, stem):
        out.append(save(args, fig, stem, record))

    for g, group in enumerate(args.query):
        suffix = "" if g == 0 else f"_{group}"
        # the mean over the requested layers; a key a reduced layer no longer has (NaN) receives no attention
        # there: 0, so every cell is averaged over the same layers and the mean is a distribution (sums to 1)
        mean_w = torch.stack([attention[layer][group] for layer in layers]).nan_to_num(0.0).mean(0)
        for m in prov.media_info:
            if m.kind == "video":
                _draw_video(args, request, prov, m, attention, mean_w, group, span, layers, put, suffix)
                if g == 0 and (prov.fates is not None or args.reduce):  # a reduced request: what reached which layer
                    _draw_fates(args, prov, m, _clip(request, m), put, n_layers)
            else:
                _draw_image(args, prov, m, mean_w, group, span, put, suffix)
    if lens:
        _draw_lens(args, prov, lens, tokenizer, put)
    return out


def _clip(request, m):
    # Interleave sends a video as its frames, one <image> each: its clip is in request.frame_clips
    return (request.frame_clips if m.as_images else request.videos)[m.kind_index]


def _covered(m) -> float:
    """The fraction of the crop the pooled cells cover (floor pooling drops the last rows / columns)."""
    st = m.plan.stride * m.plan.pooled_hw[0] / m.plan.patch_grid_hw[0] if m.plan.mode != "bilinear" else 1.0
    return min(1.0, st)


def _draw_video(args, request, prov, m, attention, mean_w, group: str, span: str, layers, put, suffix: str) -> None:
    """One video and query group: which frame gets attention (heatmaps), the share per frame and layer."""
    draw = painter(args)
    clip = _clip(request, m)
    F = m.plan.num_frames
    grids = [prov.to_grid(mean_w, m.index, frame=f).numpy() for f in range(F)]
    sums = [prov.where(media=m.index, frame=f) for f in range(F)]
    put(draw.frame_heatmaps(clip.frames, grids, list(m.timestamps), list(m.frame_indices),
                            title=f"{m.name}: which frame gets attention? query '{group}', {span}",
                            frame_sums=[float(mean_w[p].nansum()) for p in sums], covered=_covered(m),
                            norm=args.scale, vmin=args.vmin, vmax=args.vmax),
        f"video{m.kind_index}_frames{suffix}")
    draw_original(args, prov, m, clip, mean_w, f"{m.name}: query '{group}' attention, {span}", put,
                   f"video{m.kind_index}_original{suffix}")
    shares = np.array([[float(attention[layer][group][p].nansum()) for p in sums] for layer in layers])
    extra = {name: np.array([float(attention[layer][group][pos].nansum()) for layer in layers])
             for name, pos in prov.segments().items() if name in ("system", "question", "template")}
    # its own scale (shares of the whole distribution, not --vmin / --vmax's attention per token): 0 .. largest
    put(draw.layer_frame_chart(shares, layers, list(m.timestamps), extra=extra,
                               title=f"{m.name}: share of query '{group}' attention per frame and layer"),
        f"video{m.kind_index}_layers{suffix}")


def draw_original(args, prov, m, clip, values, title: str, put, stem: str) -> None:
    """One video's sampled frames whole, as the file stores them, with ``values`` (T,) on their pixels and the
    model's crop outlined (the box around the frame's token footprints)."""
    from ..inputs.video import original_frames

    F = m.plan.num_frames
    pictures = original_frames(clip.path, list(m.frame_indices))
    maps = [prov.to_pixels(values, m.index, frame=f) for f in range(F)]
    crops = []
    for f in range(F):
        boxes = prov.box[prov.where(media=m.index, frame=f, kind="video")].numpy()  # (n, 4) x0 y0 x1 y1
        crops.append((*np.nanmin(boxes[:, :2], 0), *np.nanmax(boxes[:, 2:], 0)))
    sums = [float(values[prov.where(media=m.index, frame=f)].nansum()) for f in range(F)]
    put(painter(args).original_frames(pictures, maps, crops, list(m.timestamps), list(m.frame_indices), title=title,
                                      frame_sums=sums, vmin=args.vmin, vmax=args.vmax, norm=args.scale), stem)


def _draw_image(args, prov, m, mean_w, group: str, span: str, put, suffix: str) -> None:
    """One image and query group: the attention on its base tile and its AnyRes grid, over its original pixels."""
    from ..inputs.image import load_image

    path = args.image[m.kind_index]
    image = load_image(path, max_pixels=args.max_image_pixels)
    base = prov.to_pixels(mean_w, m.index, part="base")
    untiled = m.plan.aspect != "anyres"  # "resize" / "pad": one tile, no AnyRes grid
    grid = None if untiled else prov.to_pixels(mean_w, m.index, part="grid")
    how = "padded to a square" if m.plan.aspect == "pad" else "squashed"
    put(painter(args).anyres_overlay(
        image, base, grid, title=f"{os.path.basename(path)}: query '{group}' attention, {span}",
        tile_boxes=prov.tile_boxes(m.index), base_label=f"one tile ({how})" if untiled else None,
        base_sum=float(mean_w[prov.where(media=m.index, tile='base')].sum()),
        grid_sum=float(mean_w[prov.where(media=m.index, kind='image_grid')].sum()), vmin=args.vmin, vmax=args.vmax),
        f"image{m.kind_index}_anyres{suffix}")


def _draw_fates(args, prov, m, clip, put, n_layers: int) -> None:
    """Per-frame maps of a reduced request: each pooled cell's fate (kept, merged with an arrow to where,
    pruned, dropped before the decoder) and the layer it left at; with DyCoke the share of decode steps whose
    deep layers read each token."""
    from ..research.fates import fate_grids

    draw = painter(args)
    F = m.plan.num_frames
    fates, removed, arrows = fate_grids(prov, m)
    put(draw.kept_map(clip.frames, fates, removed, arrows, list(m.timestamps), list(m.frame_indices),
                      covered=_covered(m), title=f"{m.name}: what token reduction did to each token ({n_layers} "
                                                 f"decoder layers)"),
        f"video{m.kind_index}_kept")
    reads = prov.decode_reads()
    if reads is not None:
        grids = [prov.to_grid(reads, m.index, frame=f).numpy() for f in range(F)]
        put(draw.frame_heatmaps(clip.frames, grids, list(m.timestamps), list(m.frame_indices), covered=_covered(m),
                                title=f"{m.name}: share of decode steps whose layers >= {prov.fates.decode_layer} "
                                      f"read each token (DyCoke)", value="share of decode steps reading it",
                                bar_label="share of decode steps", vmin=0, vmax=1),
            f"video{m.kind_index}_decode_reads")


def _draw_lens(args, prov, lens, tokenizer, put) -> None:
    """The logit-lens grid: every lens position (rows) at every traced layer (columns), whole tokens."""
    ordered = sorted(lens)
    positions = lens[ordered[0]].positions.tolist()
    tokens = [[piece(tokenizer, int(lens[layer].ids[0, i, 0])) for i in range(len(positions))] for layer in ordered]
    probs = np.array([[float(lens[layer].probs[0, i, 0]) for i in range(len(positions))] for layer in ordered])
    labels = [_label(prov, p, tokenizer) for p in positions]
    put(painter(args).logit_lens_grid(tokens, probs, ordered, labels,
                                      title="logit lens: top-1 token per layer at the chosen positions"),
        "logit_lens")


def _label(prov, p: int, tokenizer) -> str:
    kind = prov.kind_name(p)
    if kind in ("text", "generated"):
        return f"{p}:{piece(tokenizer, int(prov.token_id[p]))}"
    if kind == "video":
        return f"{p}:f{int(prov.frame[p])} {int(prov.row[p])},{int(prov.col[p])}"
    return f"{p}:{kind}"


def piece(tokenizer, idx: int) -> str:
    """A token's text as decoded alone, or its vocabulary piece (e.g. "<0x0A>", "▁") when that is blank or
    a partial UTF-8 character."""
    text = tokenizer.decode([idx], False)
    if not text.strip() or "\ufffd" in text:
        piece = tokenizer.backend.id_to_token(idx)
        return piece if piece is not None else text
    return text
