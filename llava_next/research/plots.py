"""Pictures researchers draw by hand today, drawn with Pillow and numpy only (``llava-next trace --png DIR``).

    frame_heatmaps(frames, grids, times, ...)     per-frame attention mass over the sampled frames, timestamps
    original_frames(pictures, maps, crops, ...)   the same on each whole original frame, the model's crop outlined
    layer_frame_chart(shares, layers, ...)        layers x frames: the share of a query group's attention each
                                                  frame receives, text columns beside, visual share per layer
    anyres_overlay(image, base_map, grid_map)     an image's base and AnyRes grid maps on its ORIGINAL pixels
    logit_lens_grid(tokens, probs, layers, ...)   positions x layers: the lens' top-1 token (whole), shaded by
                                                  probability, rows growing down so 32+ positions stay readable

Every function takes plain arrays (computed from token provenance: ``Provenance.to_grid`` / ``to_pixels`` /
``sums``) and returns a PIL image; nothing here runs the model. research/vector.py draws the same figures
with matplotlib (SVG / PDF). Colour scale: a perceptual dark-to-bright ramp (inferno's anchor colours,
linearly interpolated); NaN cells (no token) stay uncoloured. Its ends (``value_range``): ``vmin`` / ``vmax``
when given, else 0 (nothing negative) or the smallest value, and the largest, so a map whose largest cell
holds 5% is not stretched from its own minimum to full contrast; every figure states its range on a colour
bar. Heatmaps over frames share one scale (``norm="global"``, frames comparable) or use one per frame
(``"frame"``: each frame's range under it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BG, FG, DIM = (250, 250, 250), (20, 20, 20), (110, 110, 110)
PAD = 14
# zlib level of every PNG the package writes: a few times faster to write than Pillow's default (6) for files a
# few percent larger (a 32-frame figure: ~2 MB either way), and encoding was a quarter of ``trace --png``'s time
PNG_LEVEL = 3
# inferno, 9 anchors from 0 to 1 (matplotlib's table sampled at 0, 1/8, ..., 1)
_ANCHORS = np.array([[0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85], [227, 89, 51],
                     [249, 140, 10], [249, 201, 50], [252, 255, 164]], dtype=np.float64)


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> uint8 RGB (..., 3)."""
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float64)), 0, 1) * (len(_ANCHORS) - 1)
    i = np.minimum(x.astype(int), len(_ANCHORS) - 2)
    t = (x - i)[..., None]
    return np.round(_ANCHORS[i] * (1 - t) + _ANCHORS[i + 1] * t).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_block(lines: Sequence[str], width: int, size: int = 15) -> Image.Image:
    font, gap = _font(size), 5
    width = max([width] + [int(font.getlength(line)) + 2 * PAD for line in lines])
    img = Image.new("RGB", (width, PAD + len(lines) * (size + gap)), BG)
    d = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        d.text((PAD, PAD // 2 + i * (size + gap)), line, fill=FG if i == 0 else DIM, font=font)
    return img


def _stack(parts: Sequence[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), BG)
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


def value_range(arrays: Sequence[np.ndarray], vmin: float | None = None,
                vmax: float | None = None) -> tuple[float, float]:
    """The colour scale's ends over ``arrays`` (NaN ignored): ``vmin`` if given, else 0 when nothing is negative
    (attention, shares, counts: a 5% cell is not full contrast) or the smallest value; ``vmax`` if given, else
    the largest. Raises ValueError when the ends are not ordered."""
    finite = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays] or [np.zeros(1)])
    finite = finite[np.isfinite(finite)]
    smallest, largest = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    lo = vmin if vmin is not None else min(0.0, smallest)
    hi = vmax if vmax is not None else largest
    if vmin is not None and vmax is not None and not vmin < vmax:
        raise ValueError(f"colour scale: vmin {vmin:g} must be below vmax {vmax:g}")
    if hi <= lo:  # a constant map, or one end given beyond the data: a range of 1 from the given end
        lo, hi = (lo, lo + 1.0) if vmin is not None or vmax is None else (hi - 1.0, hi)
    return lo, hi


def _colorbar(lo: float, hi: float, width: int = 260, label: str = "", clipped: bool = False) -> Image.Image:
    bar = Image.new("RGB", (width + 2 * PAD + 420, 40), BG)
    ramp = colormap(np.linspace(0, 1, width))[None].repeat(12, 0)
    bar.paste(Image.fromarray(ramp), (PAD, 4))
    d = ImageDraw.Draw(bar)
    d.text((PAD, 18), f"{lo:.3g}", fill=DIM, font=_font(12))
    d.text((PAD + width - 40, 18), f"{hi:.3g}", fill=DIM, font=_font(12))
    note = f"{label}: colour scale {lo:.3g} .. {hi:.3g}" + ("; values outside drawn at the ends" if clipped else "")
    d.text((PAD + width + 12, 2), note, fill=DIM, font=_font(12))
    return bar


def _clipped(arrays: Sequence[np.ndarray], lo: float, hi: float) -> bool:
    """Whether any value lies outside the colour scale (a user-set vmin / vmax)."""
    return any(bool(np.any((np.asarray(a) < lo - 1e-12) | (np.asarray(a) > hi + 1e-12))) for a in arrays)


def overlay(rgb: np.ndarray, heat: np.ndarray, lo: float, hi: float, alpha: float = 0.6) -> np.ndarray:
    """(H, W, 3) uint8 picture with an (H, W) heat map blended on top (NaN: picture only, dimmed)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    valid = ~np.isnan(heat)
    scaled = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    colour = colormap(scaled).astype(np.float64)
    out = np.where(valid[..., None], (1 - alpha) * rgb + alpha * colour, 0.45 * rgb)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _upsample(grid: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) cell values -> (H, W) nearest-neighbour (NaN kept)."""
    h, w = grid.shape
    rows = np.minimum((np.arange(size_hw[0]) * h) // size_hw[0], h - 1)
    cols = np.minimum((np.arange(size_hw[1]) * w) // size_hw[1], w - 1)
    return grid[rows][:, cols]


# --------------------------------------------------------------------------------------------------
# Video: per-frame heatmaps and the layer x frame chart
# --------------------------------------------------------------------------------------------------
def frame_heatmaps(frames: np.ndarray, grids: Sequence[np.ndarray], timestamps: Sequence[float],
                   frame_indices: Sequence[int], *, title: str, frame_sums: Sequence[float] | None = None,
                   norm: str = "global", covered: float = 1.0, thumb: int = 224,
                   sum_format: str = "mass {:.4f}", value: str = "attention mass",
                   bar_label: str = "attention per token", vmin: float | None = None,
                   vmax: float | None = None) -> Image.Image:
    """Sampled frames (F, S, S, 3) uint8 as the model sees them, each with its pooled attention grid on top.

    ``grids``: one (h, w) array per frame (``Provenance.to_grid``); ``covered``: the fraction of the crop the
    pooled cells cover (floor pooling drops the last rows/cols when the stride does not divide the patch grid).
    ``value`` / ``bar_label`` name what the cells show, ``sum_format`` the line under each frame; ``vmin`` /
    ``vmax``: the colour scale's ends (``value_range``; with ``norm="frame"`` they bound every frame's).
    """
    if norm not in ("global", "frame"):
        raise ValueError(f"norm must be 'global' or 'frame', got {norm!r}")
    n = len(grids)
    per_row = min(n, 8)
    rows = -(-n // per_row)
    cap = 38
    sheet = Image.new("RGB", (PAD + per_row * (thumb + PAD), rows * (thumb + cap)), BG)
    d = ImageDraw.Draw(sheet)
    glo, ghi = value_range(grids, vmin, vmax)
    side = max(1, round(thumb * covered))
    for k, grid in enumerate(grids):
        x, y = PAD + (k % per_row) * (thumb + PAD), (k // per_row) * (thumb + cap)
        rgb = np.asarray(Image.fromarray(frames[k]).resize((thumb, thumb), Image.BICUBIC))
        heat = np.full((thumb, thumb), np.nan)
        heat[:side, :side] = _upsample(np.asarray(grid, dtype=np.float64), (side, side))
        lo, hi = (glo, ghi) if norm == "global" else value_range([grid], vmin, vmax)
        sheet.paste(Image.fromarray(overlay(rgb, heat, lo, hi)), (x, y))
        label = f"frame {k}  #{frame_indices[k]}  {timestamps[k]:.2f} s"
        d.text((x, y + thumb + 3), label, fill=FG, font=_font(13))
        line = sum_format.format(frame_sums[k]) if frame_sums is not None else ""
        if norm == "frame":
            line += f"{'  ' if line else ''}scale {lo:.3g}..{hi:.3g}"
        d.text((x, y + thumb + 19), line, fill=DIM, font=_font(12))
    scale = "one colour scale for all frames" if norm == "global" else "each frame scaled on its own (range under it)"
    header = _text_block([title, f"{value} per pooled cell, on the {frames.shape[1]}x{frames.shape[2]} "
                                 f"crop each frame is given to the model; {scale}"], sheet.width)
    parts = [header, sheet]
    if norm == "global":
        parts.append(_colorbar(glo, ghi, label=bar_label, clipped=_clipped(grids, glo, ghi)))
    return _stack(parts)


def layer_frame_chart(shares: np.ndarray, layers: Sequence[int], timestamps: Sequence[float], *, title: str,
                      extra: dict[str, np.ndarray] | None = None, cell: int = 40, vmin: float | None = None,
                      vmax: float | None = None) -> Image.Image:
    """(L, F) share of the query group's attention each frame receives, per layer (rows) and frame (columns);
    ``extra`` columns (e.g. text segments) to the right, on the SAME colour scale as the frames (a cell's colour
    compares across the whole table); the visual share per layer as a bar at the far right."""
    shares = np.asarray(shares, dtype=np.float64)
    L, F = shares.shape
    extra = extra or {}
    table = np.concatenate([shares] + [np.asarray(v, dtype=np.float64)[:, None] for v in extra.values()], axis=1)
    cols = table.shape[1]  # (L, F + len(extra))
    lo, hi = value_range([table], vmin, vmax)
    left, top = 70, 70
    bar_w = 160
    note = "cells: share of the group's attention (its rows sum to 1 over all positions); one colour scale for all cells"
    width = max(left + cols * cell + 30 + bar_w + PAD + 40, int(_font(12).getlength(note)) + left + PAD)
    img = Image.new("RGB", (width, top + L * cell + 30), BG)
    d = ImageDraw.Draw(img)
    font = _font(12)
    for j in range(F):
        d.text((left + j * cell + 2, top - 34), f"f{j}", fill=FG, font=font)
        d.text((left + j * cell + 2, top - 18), f"{timestamps[j]:.1f}s", fill=DIM, font=_font(10))
    for j, name in enumerate(extra):
        d.text((left + (F + j) * cell + 2, top - 34 + 16 * (j % 2)), name, fill=FG, font=font)
    for i, layer in enumerate(layers):
        y = top + i * cell
        d.text((8, y + cell // 3), f"layer {layer}", fill=FG, font=font)
        for j, v in enumerate(table[i]):
            scaled = (v - lo) / (hi - lo) if np.isfinite(v) else 0.0
            box = [left + j * cell, y, left + (j + 1) * cell - 2, y + cell - 2]
            d.rectangle(box, fill=tuple(int(c) for c in colormap(scaled)))
            d.text((box[0] + 3, box[1] + cell // 3), f"{v:.2f}"[1:] if 0 <= v < 1 else f"{v:.1f}",
                   fill=(255, 255, 255) if scaled < 0.6 else (0, 0, 0), font=_font(10))
        visual = float(np.nansum(shares[i]))
        bx = left + cols * cell + 30
        d.rectangle([bx, y + 6, bx + bar_w, y + cell - 8], outline=DIM)
        d.rectangle([bx, y + 6, bx + bar_w * min(max(visual, 0), 1), y + cell - 8], fill=(70, 110, 200))
        d.text((bx + bar_w + 6, y + cell // 3), f"{visual:.2f}", fill=FG, font=font)
    d.text((left + cols * cell + 30, top - 34), "all frames", fill=FG, font=font)
    d.text((left, top + L * cell + 8), note, fill=DIM, font=font)
    bar = _colorbar(lo, hi, label="share of attention", clipped=_clipped([table], lo, hi))
    return _stack([_text_block([title], width), img, bar])


def causal_chart(scores: np.ndarray, layers: Sequence[int], units: Sequence[str], *, clean: float, corrupt: float,
                 title: str, vmin: float | None = None, vmax: float | None = None, cell: int = 40) -> Image.Image:
    """(L, U) causal-tracing table (research/causal.py): the metric with unit u restored at layer l, on one
    colour scale from ``vmin`` (default: the corrupted run's value) to ``vmax`` (default: the clean run's), so
    a cell's colour says how much of the clean answer that restoration brings back."""
    scores = np.asarray(scores, dtype=np.float64)
    L, U = scores.shape
    lo = corrupt if vmin is None else vmin
    hi = clean if vmax is None else vmax
    span = hi - lo if hi != lo else 1.0
    left, top = 70, 50
    width = max(left + U * cell + PAD, 420)
    img = Image.new("RGB", (width, top + L * cell + 10), BG)
    d = ImageDraw.Draw(img)
    for j, name in enumerate(units):
        d.text((left + j * cell + 2, top - 18 - 14 * (j % 2)), name[:7], fill=FG, font=_font(10))
    for i, layer in enumerate(layers):
        y = top + i * cell
        d.text((8, y + cell // 3), f"layer {layer}", fill=FG, font=_font(12))
        for j in range(U):
            scaled = (scores[i, j] - lo) / span
            d.rectangle([left + j * cell, y, left + (j + 1) * cell - 2, y + cell - 2],
                        fill=tuple(int(c) for c in colormap(scaled)))
            d.text((left + j * cell + 3, y + cell // 3), f"{scores[i, j]:.2g}",
                   fill=(255, 255, 255) if scaled < 0.6 else (0, 0, 0), font=_font(10))
    note = f"clean run {clean:.3g}, corrupted run {corrupt:.3g}; cell = the metric with that unit restored at that layer"
    return _stack([_text_block([title, note], width), img, _colorbar(lo, hi, label="metric")])


def thumbnails(pictures: Sequence[np.ndarray], maps: Sequence[np.ndarray],
               size: tuple[int, int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(H, W, 3) pictures and their (H, W) maps at ``size`` (width, height) before drawing: pictures resized,
    maps sampled (nearest: a map is constant over a token's cell, many pixels wide), so 32 full-HD frames
    cost what 32 thumbnails do."""
    h, w = pictures[0].shape[:2]
    rows = np.minimum((np.arange(size[1]) * h) // size[1], h - 1)
    cols = np.minimum((np.arange(size[0]) * w) // size[0], w - 1)
    small = [np.asarray(Image.fromarray(np.asarray(p, dtype=np.uint8)).resize(size, Image.BILINEAR)) for p in pictures]
    return small, [np.asarray(m)[rows][:, cols] for m in maps]


def original_frames(pictures: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                    crops: Sequence[tuple[float, float, float, float]], timestamps: Sequence[float],
                    frame_indices: Sequence[int], *, title: str, frame_sums: Sequence[float] | None = None,
                    vmin: float | None = None, vmax: float | None = None, width: int = 300,
                    bar_label: str = "attention per token", norm: str = "global") -> Image.Image:
    """Each sampled frame whole, as the file stores it ((H, W, 3) ``pictures``), its (H, W) map on the original
    pixels (``Provenance.to_pixels``: NaN outside what the model saw, drawn dimmed) and the model's crop
    (``crops``: (x0, y0, x1, y1) px) outlined; one colour scale (``value_range``), or with ``norm="frame"``
    one per frame (its range under it), as ``frame_heatmaps``."""
    if norm not in ("global", "frame"):
        raise ValueError(f"norm must be 'global' or 'frame', got {norm!r}")
    n = len(pictures)
    per_row = min(n, 4)
    h, w = pictures[0].shape[:2]
    size = (width, max(1, round(h * width / w)))  # (width, height) for PIL
    cap = 38
    sheet = Image.new("RGB", (PAD + per_row * (width + PAD), -(-n // per_row) * (size[1] + cap)), BG)
    d = ImageDraw.Draw(sheet)
    pictures, maps = thumbnails(pictures, maps, size)
    glo, ghi = value_range(maps, vmin, vmax)
    s = width / w
    for k in range(n):
        x, y = PAD + (k % per_row) * (width + PAD), (k // per_row) * (size[1] + cap)
        lo, hi = (glo, ghi) if norm == "global" else value_range([maps[k]], vmin, vmax)
        pic = Image.fromarray(overlay(pictures[k], maps[k], lo, hi))
        x0, y0, x1, y1 = crops[k]
        ImageDraw.Draw(pic).rectangle([x0 * s, y0 * s, x1 * s - 1, y1 * s - 1], outline=(0, 220, 255), width=2)
        sheet.paste(pic, (x, y))
        d.text((x, y + size[1] + 3), f"frame {k}  #{frame_indices[k]}  {timestamps[k]:.2f} s", fill=FG, font=_font(13))
        line = f"mass {frame_sums[k]:.4f}" if frame_sums is not None else ""
        if norm == "frame":
            line += f"{'  ' if line else ''}scale {lo:.3g}..{hi:.3g}"
        d.text((x, y + size[1] + 19), line, fill=DIM, font=_font(12))
    scale = "one colour scale" if norm == "global" else "each frame scaled on its own (range under it)"
    note = f"each {h}x{w} px frame whole; cyan: the crop the model is given (dimmed: pixels it never sees); {scale}"
    parts = [_text_block([title, note], sheet.width), sheet]
    if norm == "global":
        parts.append(_colorbar(glo, ghi, label=bar_label, clipped=_clipped(maps, glo, ghi)))
    return _stack(parts)


# (name, RGB) of each kept-map category, in the order of the codes in ``kept_map``'s ``fates``
FATES = (("kept to the last layer", (60, 170, 90)), ("merged (arrow: into)", (60, 120, 220)),
         ("pruned", (220, 60, 60)), ("dropped before the decoder", (150, 150, 150)))


def kept_map(frames: np.ndarray, fates: Sequence[np.ndarray], removed: Sequence[np.ndarray],
             arrows: Sequence[tuple[tuple[int, int, int], tuple[int, int, int]]], timestamps: Sequence[float],
             frame_indices: Sequence[int], *, title: str, covered: float = 1.0, thumb: int = 224) -> Image.Image:
    """What token reduction did to each pooled cell, on the frames as the model sees them: ``fates`` one (h, w)
    code grid per frame (0 kept, 1 merged, 2 pruned, 3 dropped before the decoder; ``FATES``), ``removed`` the
    layer each cell left at (written in the cell), ``arrows`` (frame, row, col) -> (frame, row, col): each
    merged cell to the cell FrameFusion averaged it into, drawn across frames."""
    n = len(fates)
    per_row = min(n, 8)
    cap = 24
    sheet = Image.new("RGB", (PAD + per_row * (thumb + PAD), -(-n // per_row) * (thumb + cap)), BG)
    d = ImageDraw.Draw(sheet, "RGBA")
    side = thumb * covered

    def centre(f, r, c):
        h, w = fates[f].shape
        return (PAD + (f % per_row) * (thumb + PAD) + (c + 0.5) * side / w, (f // per_row) * (thumb + cap)
                + (r + 0.5) * side / h)

    for k, codes in enumerate(fates):
        x, y = PAD + (k % per_row) * (thumb + PAD), (k // per_row) * (thumb + cap)
        sheet.paste(Image.fromarray(frames[k]).resize((thumb, thumb), Image.BICUBIC), (x, y))
        h, w = codes.shape
        for (r, c), code in np.ndenumerate(codes):
            box = [x + c * side / w, y + r * side / h, x + (c + 1) * side / w - 1, y + (r + 1) * side / h - 1]
            d.rectangle(box, fill=FATES[int(code)][1] + (150,), outline=(255, 255, 255, 160))
            if int(code) in (1, 2):
                d.text((box[0] + 2, box[1] + 1), f"L{int(removed[k][r, c])}", fill=(255, 255, 255), font=_font(10))
        d.text((x, y + thumb + 4), f"frame {k}  #{frame_indices[k]}  {timestamps[k]:.2f} s", fill=FG, font=_font(13))
    for src, dst in arrows:
        _arrow(d, centre(*src), centre(*dst))
    legend = Image.new("RGB", (sheet.width, 30), BG)
    ld = ImageDraw.Draw(legend)
    x = PAD
    for name, colour in FATES:
        ld.rectangle([x, 8, x + 14, 22], fill=colour)
        ld.text((x + 20, 8), name, fill=FG, font=_font(12))
        x += 40 + int(_font(12).getlength(name))
    header = _text_block([title, "each pooled cell's fate; Ln: the first decoder layer without it"], sheet.width)
    return _stack([header, sheet, legend])


def _arrow(d: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float]) -> None:
    """An arc from ``a`` to ``b`` (bulging up by a fifth of its length, so arrows along one row of cells stay
    apart) with a filled head at ``b``."""
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    v = b_ - a_
    length = float(np.hypot(*v)) or 1.0
    n = np.array([v[1], -v[0]]) / length  # a normal; pointing up for a right-to-left arrow
    n = n if n[1] <= 0 else -n
    ctrl = (a_ + b_) / 2 + 0.2 * length * n
    t = np.linspace(0, 1, 24)[:, None]
    pts = (1 - t) ** 2 * a_ + 2 * (1 - t) * t * ctrl + t ** 2 * b_  # (24, 2) quadratic Bezier
    d.line([tuple(p) for p in pts], fill=(255, 230, 0, 190), width=1)
    u = (b_ - pts[-3]) / (float(np.hypot(*(b_ - pts[-3]))) or 1.0)
    side = np.array([-u[1], u[0]])
    d.polygon([tuple(b_), tuple(b_ - 7 * u + 3 * side), tuple(b_ - 7 * u - 3 * side)], fill=(255, 230, 0, 255))


# --------------------------------------------------------------------------------------------------
# Images: base and AnyRes grid maps on the original pixels
# --------------------------------------------------------------------------------------------------
def anyres_overlay(image: Image.Image, base_map: np.ndarray, grid_map: np.ndarray | None, *, title: str,
                   base_sum: float, grid_sum: float, tile_boxes: Sequence[tuple[float, float, float, float]] = (),
                   max_side: int = 480, base_label: str | None = None, bar_label: str = "attention per token", vmin: float | None = None,
                   vmax: float | None = None) -> Image.Image:
    """The original image twice: the base tokens' map and the AnyRes grid tokens' map (both
    ``Provenance.to_pixels``: each pixel gets the value of the token whose source box holds it), one colour
    scale; ``tile_boxes``: the 336 px tiles' footprints on the original image, outlined. ``grid_map`` None:
    an untiled image (one tile, "resize" / "pad"), drawn once, captioned ``base_label``."""
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    maps = (base_map,) if grid_map is None else (base_map, grid_map)
    lo, hi = value_range(maps, vmin, vmax)
    s = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    panels = []
    parts = [(base_label or "base (whole image squashed to one tile)", base_map, base_sum)]
    if grid_map is not None:
        parts.append(("AnyRes grid (tiles, unpadded)", grid_map, grid_sum))
    for name, m, total in parts:
        pic = Image.fromarray(overlay(rgb, m, lo, hi)).resize(size, Image.BILINEAR)
        d = ImageDraw.Draw(pic)
        if "grid" in name:
            for x0, y0, x1, y1 in tile_boxes:
                d.rectangle([x0 * s, y0 * s, x1 * s - 1, y1 * s - 1], outline=(255, 200, 0), width=2)
        cap = Image.new("RGB", (size[0], 40), BG)
        cd = ImageDraw.Draw(cap)
        cd.text((2, 4), name, fill=FG, font=_font(13))
        cd.text((2, 21), f"mass {total:.4f}", fill=DIM, font=_font(12))
        panels.append(_stack([pic, cap]))
    body = Image.new("RGB", ((len(panels) + 1) * PAD + len(panels) * size[0], panels[0].height), BG)
    for i, panel in enumerate(panels):
        body.paste(panel, ((i + 1) * PAD + i * size[0], 0))
    header = _text_block([title, f"{h}x{w} px original; grey: pixels no token of that part covers (unpadding "
                                 f"drops them); yellow: tiles"], body.width)
    return _stack([header, body, _colorbar(lo, hi, label=bar_label, clipped=_clipped(maps, lo, hi))])


# --------------------------------------------------------------------------------------------------
# Logit lens
# --------------------------------------------------------------------------------------------------
def visible(token: str) -> str:
    """A token as the figure shows it, whole: newlines and tabs escaped, SentencePiece's word mark as "_" (the
    font has no "▁"), control characters (not allowed in SVG's XML) and characters outside Latin (the default
    font has no glyph for them) as \\uXXXX."""
    text = token.replace("\n", "\\n").replace("\t", "\\t").replace("\u2581", "_")
    return "".join(c if 0x20 <= ord(c) < 0x7f or 0xa0 <= ord(c) < 0x250 else f"\\u{ord(c):04x}" for c in text)


def logit_lens_grid(tokens: Sequence[Sequence[str]], probs: np.ndarray, layers: Sequence[int],
                    labels: Sequence[str], *, title: str, cell_h: int = 22) -> Image.Image:
    """(L, P) top-1 tokens of the lens drawn transposed: one row per position (``labels``: what each position
    is, whole), one column per layer (the last one is the model's output), so 32+ positions grow the figure
    down, not across; every token whole, columns as wide as their longest; shade: the top-1 probability on a
    0..1 colour bar."""
    probs = np.asarray(probs, dtype=np.float64)
    L, P = probs.shape
    font = _font(11)
    texts = [[visible(tokens[i][j]) for j in range(P)] for i in range(L)]  # (L, P)
    col_w = [max(30, max(int(font.getlength(texts[i][j])) for j in range(P)) + 8) for i in range(L)]
    left = max(int(font.getlength(visible(lab))) for lab in labels) + 2 * PAD if labels else 60
    top = 30
    x0 = np.concatenate([[left], left + np.cumsum(col_w)])  # (L + 1,) column edges
    img = Image.new("RGB", (int(x0[-1]) + PAD, top + P * cell_h + 30), BG)
    d = ImageDraw.Draw(img)
    for i, layer in enumerate(layers):
        d.text((int(x0[i]) + 3, 6 + 12 * (i % 2)), f"L{layer}", fill=FG, font=font)
    for j, label in enumerate(labels):
        y = top + j * cell_h
        d.text((PAD, y + 5), visible(label), fill=FG, font=font)
        for i in range(L):
            p = probs[i, j]
            box = [int(x0[i]), y, int(x0[i + 1]) - 2, y + cell_h - 2]
            d.rectangle(box, fill=tuple(int(c) for c in colormap(p)))
            d.text((box[0] + 3, box[1] + 5), texts[i][j], fill=(255, 255, 255) if p < 0.55 else (0, 0, 0), font=font)
    d.text((left, top + P * cell_h + 8), "rows: positions; columns: layers; cell: top-1 token of norm + lm_head "
                                        "on that layer's residual; shade: its probability", fill=DIM, font=font)
    return _stack([_text_block([title], img.width), img, _colorbar(0.0, 1.0, label="top-1 probability")])
