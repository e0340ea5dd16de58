"""The page's pictures and tables, drawn from a cached ``Answer`` (session.py) with research/plots.py.

    heatmap(answer, token, layer, head)      attention that produced a generated token, on the original pixels:
                                             per video frame (timestamps), per image base + AnyRes grid
    heatmap(..., scores=s, method="relevancy")   a gradient map of that token instead (session.token_map)
    layer_chart(answer, token, head)         layers x frames: each frame's share of that attention (videos)
    parts(answer) / positions(answer, part, token, layer, head)
                                             a frame or tile -> the positions it became (provenance), each
                                             with its attention and, on a reduced model, its fate
    kept_map(answer)                         a reduced request: each video cell's fate (kept, merged: an arrow
                                             to where, pruned) and the layer it left at
    logit_lens(answer, tokenizer)            the lens' top-1 token per layer at the question, last and answer
    figure_data(answer, view, token, layer, head)   the numbers behind a figure (for the JSON export)

Nothing here runs the model. The pictures are the ones ``llava-next trace --png`` draws (cli/trace.py), for
one chosen query (the position that produced the token) at one layer and head instead of a layer mean.
``lib``: research/plots.py (Pillow pictures, the page) or research/vector.py (matplotlib figures with the same
arguments, for the SVG export); with vector.py the heatmap is one figure per medium, not one column.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..inputs.image import load_image
from ..research import plots, vector  # vector.py imports matplotlib only when it draws
from ..research.fates import fate_grids
from .session import Answer

BG = (250, 250, 250)


def token_labels(answer: Answer, tokenizer) -> list[str]:
    """One label per generated token: its index, its text and the position whose query produced it."""
    return [f"{k}: {piece(tokenizer, t)!r} (query at position {p})"
            for k, (t, p) in enumerate(zip(answer.result.generated, answer.producers))]


def heatmap(answer: Answer, token: int, layer: int, head: int, *, scores=None, method: str = "attention",
            lib=plots):
    """Every medium of the request with the attention of token ``token``'s query at ``layer`` / ``head``, or with
    ``scores`` (T,), the ``method`` gradient map of that token (all layers: the sliders do not apply)."""
    if scores is None:
        w, labels = answer.weights(token, layer, head), {}
        what = f"attention that produced token {token}, layer {layer}, {_head(head)}"
    else:
        w, what = scores, f"{method} of token {token} (target: log p(token {token}); all layers)"
        labels = {"bar_label": f"{method} per token"}
    pictures = [_video_heatmap(answer, m, w, what, lib, labels) if m.kind == "video"
                else _image_heatmap(answer, m, w, what, lib, labels) for m in answer.provenance.media_info]
    if lib is not plots:
        return pictures
    tops = np.cumsum([0] + [p.height for p in pictures])
    answer.heatmap_rows = [(int(t), p.height) for t, p in zip(tops, pictures)]  # where at_pixel finds each medium
    return _column(pictures)


def _video_heatmap(answer: Answer, m, w, what: str, lib, labels: dict):
    prov, clip = answer.provenance, _clip(answer, m)
    F = m.plan.num_frames
    grids = [prov.to_grid(w, m.index, frame=f).numpy() for f in range(F)]
    sums = [float(w[prov.where(media=m.index, frame=f)].nansum()) for f in range(F)]
    more = {} if not labels else {"value": "score", "sum_format": "sum {:.4g}", **labels}
    return lib.frame_heatmaps(clip.frames, grids, list(m.timestamps), list(m.frame_indices),
                              title=f"{m.name}: {what}", frame_sums=sums, covered=_covered(m), **more)


def _image_heatmap(answer: Answer, m, w, what: str, lib, labels: dict):
    prov, path = answer.provenance, answer.images[m.kind_index]
    image = load_image(path)
    base = prov.to_pixels(w, m.index, part="base")
    untiled = m.plan.aspect != "anyres"  # "resize" / "pad": one tile, no AnyRes grid
    grid = None if untiled else prov.to_pixels(w, m.index, part="grid")
    tiles = prov.tile_boxes(m.index)
    return lib.anyres_overlay(image, base, grid, title=f"{os.path.basename(path)}: {what}", tile_boxes=tiles,
                              base_label="one tile" if untiled else None,
                              base_sum=float(w[prov.where(media=m.index, tile="base")].nansum()),
                              grid_sum=float(w[prov.where(media=m.index, kind="image_grid")].nansum()), **labels)


def layer_chart(answer: Answer, token: int, head: int, lib=plots):
    """The layer x frame chart of the first video (None without a video): each frame's share of the attention
    that produced ``token``, per layer, with the system / question / template text beside."""
    prov = answer.provenance
    videos = [m for m in prov.media_info if m.kind == "video"]
    if not videos:
        return None
    m, layers = videos[0], answer.result.layers
    frames = [prov.where(media=m.index, frame=f) for f in range(m.plan.num_frames)]
    ws = {layer: answer.weights(token, layer, head) for layer in layers}
    shares = np.array([[float(ws[layer][p].nansum()) for p in frames] for layer in layers])
    extra = {name: np.array([float(ws[layer][pos].nansum()) for layer in layers])
             for name, pos in prov.segments().items() if name in ("system", "question", "template")}
    return lib.layer_frame_chart(shares, layers, list(m.timestamps), extra=extra,
                                   title=f"{m.name}: share of the attention that produced token {token} per frame "
                                         f"and layer, {_head(head)}")


def parts(answer: Answer) -> list[str]:
    """The choosable parts of the media: ``m0 frame 3 (1.25 s)`` per video frame, ``m1 base`` / ``m1 tile 0,1``
    per image tile."""
    out = []
    for m in answer.provenance.media_info:
        if m.kind == "video":
            out += [f"m{m.index} frame {f} ({t:.2f} s)" for f, t in enumerate(m.timestamps)]
        else:
            rows, cols = m.plan.grid_hw if m.plan.aspect == "anyres" else (0, 0)
            out += [f"m{m.index} base"] + [f"m{m.index} tile {r},{c}" for r in range(rows) for c in range(cols)]
    return out


def positions(answer: Answer, part: str, token: int, layer: int, head: int) -> list[list]:
    """The positions a part became, one row each: position, kind, frame, time, tile, row, col, source box (in
    the original pixels), attention of token ``token``'s query at ``layer`` / ``head``, fate (reduced model)."""
    prov = answer.provenance
    media, _, rest = part.partition(" ")
    m = int(media[1:])
    if rest.startswith("frame"):
        idx = prov.where(media=m, frame=int(rest.split()[1]))
    elif rest == "base":
        idx = prov.where(media=m, tile="base")
    else:
        r, c = rest.split()[1].split(",")
        idx = prov.where(media=m, tile=(int(r), int(c)))
    return rows_of(answer, idx.tolist(), token, layer, head)


def at_pixel(answer: Answer, x: float, y: float) -> tuple[str | None, list[int]]:
    """A click on the heatmap (``heatmap``'s picture: one medium below the other) at (x, y) -> (the part it is
    in, the positions whose source it is): the pooled cell of a frame, or the base / grid token of an image whose
    box holds that pixel of the original. (None, []) off the pictures. The layout is plots.py's: per medium a
    two-line title, then frames of ``THUMB`` px (``CAPTION`` below each) or the image's panels side by side."""
    prov = answer.provenance
    rows = answer.heatmap_rows or [(0, 1 << 30)]  # (top, height) per medium, as the last heatmap drew them
    k = next((k for k, (top, h) in enumerate(rows) if top <= y < top + h), None)
    if k is None or k >= len(prov.media_info):
        return None, []
    m = prov.media_info[k]
    y -= rows[k][0] + plots.PAD + 2 * (15 + 5)  # plots._text_block: two lines of 15 px + 5 px gap
    return _in_frames(prov, m, x, y) if m.kind == "video" else _in_image(prov, m, x, y)


def _in_frames(prov, m, x: float, y: float) -> tuple[str | None, list[int]]:
    """(x, y) below a video's title -> its frame and the pooled cell's position."""
    per_row = min(m.plan.num_frames, 8)
    col, row = int((x - plots.PAD) // (THUMB + plots.PAD)), int(y // (THUMB + CAPTION))
    fx, fy = (x - plots.PAD - col * (THUMB + plots.PAD)) / THUMB, (y - row * (THUMB + CAPTION)) / THUMB
    f = row * per_row + col
    if not (0 <= col < per_row and 0 <= f < m.plan.num_frames and 0 <= fx < 1 and 0 <= fy < 1):
        return None, []
    idx = prov.where(media=m.index, frame=f, kind="video")
    h, w = m.plan.pooled_hw
    cell_r, cell_c = int(fy / _covered(m) * h), int(fx / _covered(m) * w)
    hit = idx[(prov.row[idx] == cell_r) & (prov.col[idx] == cell_c)]
    return f"m{m.index} frame {f} ({m.timestamps[f]:.2f} s)", hit.tolist()


def _in_image(prov, m, x: float, y: float) -> tuple[str | None, list[int]]:
    """(x, y) below an image's title -> its base or grid panel and the token whose source box holds the pixel."""
    H, W = m.source_hw
    scale = min(1.0, 480 / max(H, W)) if H and W else 1.0
    panel = int((x - plots.PAD) // (round(W * scale) + plots.PAD)) if W else -1
    px = (x - (panel + 1) * plots.PAD - panel * round(W * scale)) / scale
    py = y / scale
    if panel not in (0, 1) or not (0 <= px < W and 0 <= py < H):
        return None, []
    idx = prov.where(media=m.index, tile="base") if panel == 0 else prov.where(media=m.index, kind="image_grid")
    b = prov.box[idx]
    hit = idx[(b[:, 0] <= px) & (px < b[:, 2]) & (b[:, 1] <= py) & (py < b[:, 3])]
    return f"m{m.index} base" if panel == 0 else None, hit.tolist()


THUMB, CAPTION = 224, 38  # plots.frame_heatmaps' defaults


def rows_of(answer: Answer, index: list[int], token: int, layer: int, head: int) -> list[list]:
    """``positions``' table rows for chosen positions."""
    w = answer.weights(token, layer, head)
    records = answer.provenance.to_records()
    return [_row(answer.provenance, records[p], p, float(w[p])) for p in index]


def _row(prov, rec: dict, p: int, value: float) -> list:
    return [p, rec["kind"], rec["frame"], rec["time"], str(rec["tile"]), rec["row"], rec["col"],
            str([round(v, 1) for v in rec["box"]]) if rec["box"] else "",
            None if value != value else round(value, 6), _fate(prov, p)]


POSITION_COLUMNS = ["position", "kind", "frame", "time s", "tile", "row", "col", "box (x0,y0,x1,y1 px)",
                    "attention", "fate"]


def _fate(prov, p: int) -> str:
    if prov.fates is None:
        return ""
    gone, into = prov.removed_at(p), prov.merged_into(p)
    return "kept" if gone is None else f"merged into {into} at layer {gone}" if into is not None \
        else f"pruned at layer {gone}"


def kept_map(answer: Answer, lib=plots):
    """A reduced video request: per frame, each pooled cell's fate in categorical colours (kept to the last layer,
    merged with an arrow to the token it went into, pruned, dropped before the decoder) and the layer it left
    at, the figure ``llava-next trace --reduce ... --png`` draws (research/fates.py); None when the request is
    not reduced or has no video. ``lib``: plots (one picture, the media one below the other) or vector (a
    matplotlib figure per video)."""
    prov, res = answer.provenance, answer.result
    if res.reduction is None:
        return None
    pics = []
    for m in prov.media_info:
        if m.kind != "video":
            continue
        fates, removed, arrows = fate_grids(prov, m)
        pics.append(lib.kept_map(_clip(answer, m).frames, fates, removed, arrows, list(m.timestamps),
                                 list(m.frame_indices), covered=_covered(m),
                                 title=f"{m.name}: what {', '.join(res.reduction['methods'])} did to each token "
                                       f"({res.num_layers} decoder layers)"))
    if lib is not plots:
        return pics or None
    return _column(pics) if pics else None


def logit_lens(answer: Answer, tokenizer, lib=plots):
    """The lens grid (the last 32 lens positions), as ``llava-next trace --png`` draws it."""
    lens, prov = answer.result.logit_lens, answer.provenance
    if not lens:
        return None
    ordered = sorted(lens)
    all_pos = lens[ordered[0]].positions.tolist()
    shown = all_pos[-32:]
    keep = [all_pos.index(p) for p in shown]
    tokens = [[piece(tokenizer, int(lens[layer].ids[0, i, 0])) for i in keep] for layer in ordered]
    probs = np.array([[float(lens[layer].probs[0, i, 0]) for i in keep] for layer in ordered])
    labels = [f"{p}:{piece(tokenizer, int(prov.token_id[p]))}" for p in shown]
    return lib.logit_lens_grid(tokens, probs, ordered, labels,
                                 title="logit lens: top-1 token per layer at the question, last and answer positions")


def figure_data(answer: Answer, view: str, token: int, layer: int, head: int) -> dict:
    """The numbers behind the figure ``view`` ("heatmap", "chart", "kept", "lens") as plain data."""
    prov, res = answer.provenance, answer.result
    out = {"view": view, "media": answer.path, "question": answer.question.text, "answer": res.text,
           "token": token, "layer": layer, "head": None if head < 0 else head,
           "producing_position": answer.producers[token], "positions": prov.to_records()}
    if view == "heatmap":
        w = answer.weights(token, layer, head)
        out["weights"] = [None if v != v else v for v in w.tolist()]
        out["sums"] = prov.sums(w.nan_to_num(0.0))
        out["gradient_maps"] = {method: v.tolist() for (k, method), v in answer.maps.items() if k == token}
    elif view == "chart":
        out["weights_per_layer"] = {str(layer_): [None if v != v else v for v in answer.weights(token, layer_, head)
                                                  .tolist()] for layer_ in res.layers}
    elif view == "kept":
        out["reduction"] = res.reduction
        out["layers_reached"] = prov.layers_reached(res.num_layers).tolist() if res.reduction else None
        out["fates"] = {m.name: _fates_data(prov, m) for m in prov.media_info if m.kind == "video"} \
            if res.reduction else None
    elif view == "lens":
        out["logit_lens"] = {str(layer_): {"positions": r.positions.tolist(), "ids": r.ids[0].tolist(),
                                           "probs": r.probs[0].tolist()} for layer_, r in sorted(res.logit_lens.items())}
    return out


def _fates_data(prov, m) -> dict:
    """The kept map's grids as lists: per frame the fate codes (plots.FATES' order) and the layer each cell left
    at (-1: never), and the merge arrows (frame, row, col) -> (frame, row, col)."""
    fates, removed, arrows = fate_grids(prov, m)
    return {"codes": [name for name, _ in plots.FATES], "fates": [g.tolist() for g in fates],
            "removed_at": [g.astype(int).tolist() for g in removed], "merges": [[list(a), list(b)] for a, b in arrows]}


def piece(tokenizer, idx: int) -> str:
    """A token's text as decoded alone, or its vocabulary piece when that is blank or a partial character."""
    text = tokenizer.decode([idx], False)
    if not text.strip() or "\ufffd" in text:
        found = tokenizer.backend.id_to_token(idx)
        return found if found is not None else text
    return text


def _head(head: int) -> str:
    return "mean of heads" if head < 0 else f"head {head}"


def _clip(answer: Answer, m):
    """The decoded clip of a video medium (Interleave sends a video as its frames: ``request.frame_clips``)."""
    request = answer.result.request
    return (request.frame_clips if m.as_images else request.videos)[m.kind_index]


def _covered(m) -> float:
    """The fraction of the crop the pooled cells cover (floor pooling drops the last rows / columns)."""
    st = m.plan.stride * m.plan.pooled_hw[0] / m.plan.patch_grid_hw[0] if m.plan.mode != "bilinear" else 1.0
    return min(1.0, st)


def _column(pictures: list[Image.Image]) -> Image.Image:
    """Pictures one below the other."""
    out = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), BG)
    y = 0
    for p in pictures:
        out.paste(p, (0, y))
        y += p.height
    return out
