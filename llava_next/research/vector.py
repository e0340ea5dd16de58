"""The figures of research/plots.py drawn with matplotlib, for SVG and PDF (``llava-next trace --format svg``).

    frame_heatmaps(frames, grids, times, ...)     one panel per sampled frame (SVG group id "frame-K")
    original_frames(pictures, maps, crops, ...)   whole original frames, maps on their pixels, crop outlined
                                                  ("frame-K", "crop-K")
    layer_frame_chart(shares, layers, ...)        layers x (frames, text segments) on one colour scale
    anyres_overlay(image, base_map, grid_map)     base and AnyRes grid maps on the original pixels ("panel-base",
                                                  "panel-grid"), tiles outlined
    kept_map(frames, fates, removed, arrows, ...)  each cell's fate in categorical colours, arcs to merge targets
                                                  (SVG group ids "frame-K", "merge-N")
    logit_lens_grid(tokens, probs, layers, ...)   positions x layers, every token whole as a text element
    save(fig, path, record)                       SVG (text kept as text) or PDF (TrueType fonts), with metadata

Same arguments as plots.py's functions (the CLI picks the module by format), same colour scale
(``plots.value_range``: vmin / vmax, else 0 and the largest value, stated on every colour bar), but a
matplotlib ``Figure`` back: text stays text, axes and outlines stay lines, only the photos are raster.
matplotlib is an optional dependency (the ``figures`` extra), imported only here and only when drawing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .plots import FATES, thumbnails, value_range, visible

INSTALL = "pip install 'llava-next[figures]'"


def require():
    """matplotlib's modules, or ImportError saying how to install the extra."""
    try:
        import matplotlib
        from matplotlib import colors, patches
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"SVG and PDF figures need matplotlib, which is not installed; {INSTALL} "
                          f"(or draw PNG, which needs only Pillow)") from None
    return matplotlib, colors, patches, Figure


def _cmap():
    matplotlib = require()[0]
    return matplotlib.colormaps["inferno"].with_extremes(bad=(0.0, 0.0, 0.0, 0.9))


def save(fig, path: str, record: str) -> None:
    """``fig`` to ``path`` (.svg / .pdf) with ``record`` (the reproducibility JSON) as its metadata; no dates."""
    matplotlib = require()[0]
    if path.endswith(".svg"):
        meta = {"Description": record, "Date": None}
    else:
        meta = {"Subject": record, "CreationDate": None}
    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42, "svg.hashsalt": "llava-next"}):
        fig.savefig(path, metadata=meta, bbox_inches="tight")


def _frame_panels(Figure, n: int, *, per_row: int, cell_w: float, cell_h: float, pad_w: float):
    """A figure with ``n`` frame panels, at most ``per_row`` a row (inches per panel): (fig, [(k, ax)]), each
    panel's axes off and named ``frame-k`` in the SVG; the grid's unused cells are left blank."""
    per_row = min(n, per_row)
    rows = -(-n // per_row)
    fig = Figure(figsize=(cell_w * per_row + pad_w, cell_h * rows + 0.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, per_row, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for k, ax in enumerate(axes[:n]):
        ax.set_gid(f"frame-{k}")
    return fig, list(enumerate(axes[:n]))


def frame_heatmaps(frames: np.ndarray, grids: Sequence[np.ndarray], timestamps: Sequence[float],
                   frame_indices: Sequence[int], *, title: str, frame_sums: Sequence[float] | None = None,
                   norm: str = "global", covered: float = 1.0, thumb: int = 224,
                   sum_format: str = "mass {:.4f}", value: str = "attention mass",
                   bar_label: str = "attention per token", vmin: float | None = None, vmax: float | None = None):
    """plots.frame_heatmaps as a matplotlib figure: (F, S, S, 3) frames, their (h, w) grids on top."""
    if norm not in ("global", "frame"):
        raise ValueError(f"norm must be 'global' or 'frame', got {norm!r}")
    _, colors, _, Figure = require()
    n, S = len(grids), frames.shape[1]
    fig, panels = _frame_panels(Figure, n, per_row=8, cell_w=2.1, cell_h=2.5, pad_w=0.6)
    glo, ghi = value_range(grids, vmin, vmax)
    side = S * covered
    im = None
    for k, ax in panels:
        lo, hi = (glo, ghi) if norm == "global" else value_range([grids[k]], vmin, vmax)
        ax.imshow(frames[k], extent=(0, S, S, 0))
        im = ax.imshow(np.ma.masked_invalid(np.asarray(grids[k], dtype=np.float64)), cmap=_cmap(), alpha=0.6,
                       norm=colors.Normalize(lo, hi), extent=(0, side, side, 0), interpolation="nearest")
        ax.set_xlim(0, S)
        ax.set_ylim(S, 0)
        line = sum_format.format(frame_sums[k]) if frame_sums is not None else ""
        if norm == "frame":
            line += f"{'  ' if line else ''}scale {lo:.3g}..{hi:.3g}"
        ax.set_title(f"frame {k}  #{frame_indices[k]}  {timestamps[k]:.2f} s\n{line}", fontsize=7)
    scale = "one colour scale for all frames" if norm == "global" else "each frame scaled on its own (range under it)"
    fig.suptitle(f"{title}\n{value} per pooled cell, on the {S}x{frames.shape[2]} crop each frame is given to "
                 f"the model; {scale}", fontsize=8)
    if norm == "global" and im is not None:
        fig.colorbar(im, ax=[ax for _, ax in panels], shrink=0.8, label=f"{bar_label} ({glo:.3g} .. {ghi:.3g})")
    return fig


def original_frames(pictures: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                    crops: Sequence[tuple[float, float, float, float]], timestamps: Sequence[float],
                    frame_indices: Sequence[int], *, title: str, frame_sums: Sequence[float] | None = None,
                    vmin: float | None = None, vmax: float | None = None, width: int = 300,
                    bar_label: str = "attention per token", norm: str = "global"):
    """plots.original_frames as a matplotlib figure: whole frames, maps on their pixels, the crop outlined;
    one colour scale, or one per frame (``norm="frame"``, its range in the frame's title)."""
    if norm not in ("global", "frame"):
        raise ValueError(f"norm must be 'global' or 'frame', got {norm!r}")
    _, colors, patches, Figure = require()
    n = len(pictures)
    h, w = pictures[0].shape[:2]
    fig, panels = _frame_panels(Figure, n, per_row=4, cell_w=3.0, cell_h=3.0 * h / w + 0.5, pad_w=0.8)
    # raster parts at twice the PNG's panel width (print resolution), in the original pixel coordinates
    pictures, maps = thumbnails(pictures, maps, (2 * width, max(1, round(h * 2 * width / w))))
    glo, ghi = value_range(maps, vmin, vmax)
    im = None
    for k, ax in panels:
        lo, hi = (glo, ghi) if norm == "global" else value_range([maps[k]], vmin, vmax)
        ax.imshow(pictures[k], extent=(0, w, h, 0))
        im = ax.imshow(np.ma.masked_invalid(maps[k]), cmap=_cmap(), alpha=0.6, norm=colors.Normalize(lo, hi),
                       extent=(0, w, h, 0), interpolation="nearest")
        x0, y0, x1, y1 = crops[k]
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=(0, 0.86, 1), linewidth=1.5,
                                       gid=f"crop-{k}"))
        mass = f"\nmass {frame_sums[k]:.4f}" if frame_sums is not None else ""
        own = f"\nscale {lo:.3g}..{hi:.3g}" if norm == "frame" else ""
        ax.set_title(f"frame {k}  #{frame_indices[k]}  {timestamps[k]:.2f} s{mass}{own}", fontsize=7)
    scale = "one colour scale for all frames" if norm == "global" else "each frame scaled on its own"
    fig.suptitle(f"{title}\neach {h}x{w} px frame whole; cyan: the crop the model is given (dark: pixels it never "
                 f"sees); {scale}", fontsize=8)
    if norm == "global":
        fig.colorbar(im, ax=[ax for _, ax in panels], shrink=0.8, label=f"{bar_label} ({glo:.3g} .. {ghi:.3g})")
    return fig


def layer_frame_chart(shares: np.ndarray, layers: Sequence[int], timestamps: Sequence[float], *, title: str,
                      extra: dict[str, np.ndarray] | None = None, cell: int = 40, vmin: float | None = None,
                      vmax: float | None = None):
    """plots.layer_frame_chart as a matplotlib figure: one colour scale over frames and text columns."""
    _, colors, _, Figure = require()
    shares = np.asarray(shares, dtype=np.float64)
    L, F = shares.shape
    extra = extra or {}
    table = np.concatenate([shares] + [np.asarray(v, dtype=np.float64)[:, None] for v in extra.values()], axis=1)
    lo, hi = value_range([table], vmin, vmax)
    fig = Figure(figsize=(0.5 * table.shape[1] + 3.5, 0.32 * L + 1.6), layout="constrained")
    ax, bar = fig.subplots(1, 2, width_ratios=[table.shape[1], 4])
    ax.set_gid("table")
    im = ax.imshow(table, cmap=_cmap(), norm=colors.Normalize(lo, hi), aspect="auto", interpolation="nearest")
    for (i, j), v in np.ndenumerate(table):
        scaled = (v - lo) / (hi - lo) if np.isfinite(v) else 0.0
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="white" if scaled < 0.6 else "black")
    ax.set_xticks(range(table.shape[1]), [f"f{j}\n{timestamps[j]:.1f}s" for j in range(F)] + list(extra),
                  fontsize=6, rotation=0)
    ax.set_yticks(range(L), [f"layer {layer}" for layer in layers], fontsize=6)
    if extra:
        ax.axvline(F - 0.5, color="white", linewidth=2)
    visual = np.nansum(shares, axis=1)
    bar.barh(range(L), visual, color=(70 / 255, 110 / 255, 200 / 255))
    bar.set_ylim(L - 0.5, -0.5)
    bar.set_xlim(0, 1)
    bar.set_yticks([])
    bar.set_title("all frames", fontsize=7)
    bar.tick_params(labelsize=6)
    fig.colorbar(im, ax=ax, location="bottom", shrink=0.8, label=f"share of attention, one colour scale for all "
                                                                 f"cells ({lo:.3g} .. {hi:.3g})")
    fig.suptitle(title, fontsize=8)
    return fig


def kept_map(frames: np.ndarray, fates: Sequence[np.ndarray], removed: Sequence[np.ndarray],
             arrows: Sequence[tuple[tuple[int, int, int], tuple[int, int, int]]], timestamps: Sequence[float],
             frame_indices: Sequence[int], *, title: str, covered: float = 1.0, thumb: int = 224):
    """plots.kept_map as a matplotlib figure: categorical cells, an arc from each merged cell to its target."""
    _, _, patches, Figure = require()
    from matplotlib.patches import ConnectionPatch

    n, S = len(fates), frames.shape[1]
    per_row = min(n, 8)
    rows = -(-n // per_row)
    fig = Figure(figsize=(2.1 * per_row + 0.4, 2.4 * rows + 1.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, per_row, squeeze=False)).ravel()
    side = S * covered
    for k, ax in enumerate(axes):
        ax.set_axis_off()
        if k >= n:
            continue
        ax.set_gid(f"frame-{k}")
        ax.imshow(frames[k], extent=(0, S, S, 0))
        h, w = fates[k].shape
        for (r, c), code in np.ndenumerate(fates[k]):
            colour = tuple(v / 255 for v in FATES[int(code)][1])
            ax.add_patch(patches.Rectangle((c * side / w, r * side / h), side / w, side / h, facecolor=colour + (0.6,),
                                           edgecolor=(1, 1, 1, 0.6), linewidth=0.4))
            if int(code) in (1, 2):
                ax.text(c * side / w + 2, r * side / h + 2, f"L{int(removed[k][r, c])}", fontsize=4, color="white",
                        va="top")
        ax.set_title(f"frame {k}  #{frame_indices[k]}  {timestamps[k]:.2f} s", fontsize=7)

    def centre(f, r, c):
        h, w = fates[f].shape
        return (c + 0.5) * side / w, (r + 0.5) * side / h

    for i, (src, dst) in enumerate(arrows):
        fig.add_artist(ConnectionPatch(centre(*src), centre(*dst), "data", "data", axesA=axes[src[0]],
                                       axesB=axes[dst[0]], arrowstyle="-|>", connectionstyle="arc3,rad=0.25",
                                       color=(1, 0.9, 0, 0.8), linewidth=0.6, mutation_scale=5, gid=f"merge-{i}"))
    handles = [patches.Patch(color=tuple(v / 255 for v in colour), label=name) for name, colour in FATES]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(FATES), fontsize=7, frameon=False)
    fig.suptitle(f"{title}\neach pooled cell's fate; Ln: the first decoder layer without it", fontsize=8)
    return fig


def anyres_overlay(image, base_map: np.ndarray, grid_map: np.ndarray | None, *, title: str, base_sum: float,
                   grid_sum: float, tile_boxes: Sequence[tuple[float, float, float, float]] = (),
                   max_side: int = 480, base_label: str | None = None, bar_label: str = "attention per token",
                   vmin: float | None = None, vmax: float | None = None):
    """plots.anyres_overlay as a matplotlib figure: the original image once per part, one colour scale."""
    _, colors, patches, Figure = require()
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    maps = (base_map,) if grid_map is None else (base_map, grid_map)
    lo, hi = value_range(maps, vmin, vmax)
    parts = [("base", base_label or "base (whole image squashed to one tile)", base_map, base_sum)]
    if grid_map is not None:
        parts.append(("grid", "AnyRes grid (tiles, unpadded)", grid_map, grid_sum))
    fig = Figure(figsize=(3.6 * len(parts) + 0.8, 3.6 * h / w + 1.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(parts), squeeze=False)).ravel()
    for ax, (gid, name, m, total) in zip(axes, parts):
        ax.set_gid(f"panel-{gid}")
        ax.imshow(rgb)
        im = ax.imshow(np.ma.masked_invalid(m), cmap=_cmap(), alpha=0.6, norm=colors.Normalize(lo, hi))
        if gid == "grid":
            for x0, y0, x1, y1 in tile_boxes:
                ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=(1, 0.78, 0),
                                               linewidth=1.5))
        ax.set_axis_off()
        ax.set_title(f"{name}\nmass {total:.4f}", fontsize=7)
    fig.suptitle(f"{title}\n{h}x{w} px original; dark: pixels no token of that part covers; yellow: tiles",
                 fontsize=8)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.8, label=f"{bar_label} ({lo:.3g} .. {hi:.3g})")
    return fig


def logit_lens_grid(tokens: Sequence[Sequence[str]], probs: np.ndarray, layers: Sequence[int],
                    labels: Sequence[str], *, title: str, cell_h: int = 22):
    """plots.logit_lens_grid as a matplotlib figure: one row per position, one column per layer, each column as
    wide as its longest token (every token whole, one text element each), probability on a 0..1 colour bar."""
    _, _, _, Figure = require()
    probs = np.asarray(probs, dtype=np.float64)
    L, P = probs.shape
    texts = [[visible(tokens[i][j]) for j in range(P)] for i in range(L)]  # (L, P)
    widths = np.array([max(3, max(len(t) for t in col)) for col in texts], dtype=np.float64)  # characters
    edges = np.concatenate([[0.0], np.cumsum(widths)])  # (L + 1,)
    label_chars = max([len(visible(lab)) for lab in labels] + [4])
    fig = Figure(figsize=(0.062 * (edges[-1] + label_chars) + 1.6, 0.17 * P + 1.3), layout="constrained")
    ax = fig.subplots()
    ax.set_gid("lens")
    mesh = ax.pcolormesh(edges, np.arange(P + 1), probs.T, cmap=_cmap(), vmin=0.0, vmax=1.0,
                         edgecolors=(0.98, 0.98, 0.98), linewidth=0.3)
    for i in range(L):
        for j in range(P):
            ax.text((edges[i] + edges[i + 1]) / 2, j + 0.5, texts[i][j], ha="center", va="center", fontsize=5,
                    family="monospace", color="white" if probs[i, j] < 0.55 else "black", gid=f"lens-{i}-{j}")
    ax.set_ylim(P, 0)
    ax.set_yticks(np.arange(P) + 0.5, [visible(lab) for lab in labels], fontsize=5, family="monospace")
    ax.set_xticks((edges[:-1] + edges[1:]) / 2, [f"L{layer}" for layer in layers], fontsize=5)
    ax.xaxis.tick_top()
    ax.set_xlabel("rows: positions; columns: layers; cell: top-1 token of norm + lm_head on that layer's "
                  "residual; shade: its probability", fontsize=6)
    fig.colorbar(mesh, ax=ax, shrink=0.5, label="top-1 probability (0 .. 1)")
    fig.suptitle(title, fontsize=8)
    return fig
