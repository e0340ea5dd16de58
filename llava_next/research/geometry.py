"""Where each visual token's pixels came from, for one image or one video: per-token fields (kind, tile,
frame, row/col in its feature grid, the source box in ORIGINAL pixels, coverage), built by running the
model's own packing code on index tensors. provenance.py places these fields at the request's sequence
positions; the construction is described in its docstring.

Sizes are (height, width); boxes are (x0, y0, x1, y1) in pixels with x to the right, y down.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np
import torch

from ..config import ImageAspect, LlavaNextConfig
from ..inputs.tokens import ImagePlan, VideoPlan, image_plan, video_plan
from ..inputs.video import center_crop_offset, frame_options, shortest_edge_size
from ..model.anyres import pack_image_features, paste_offset, unpadded_size
from ..model.pooling import add_video_newlines, pool_frames

Size = tuple[int, int]
KINDS = ("text", "image_base", "image_grid", "image_newline", "video", "video_newline", "generated")
K = {name: i for i, name in enumerate(KINDS)}


# --------------------------------------------------------------------------------------------------
# One medium -> per-token fields, by running the model's own packing code on index tensors
# --------------------------------------------------------------------------------------------------
def empty_fields(n: int) -> dict[str, np.ndarray]:
    return {"kind": np.zeros(n, np.int8), "tile_row": np.full(n, -1, np.int32), "tile_col": np.full(n, -1, np.int32),
            "frame": np.full(n, -1, np.int32), "time": np.full(n, np.nan), "row": np.full(n, -1, np.int32),
            "col": np.full(n, -1, np.int32), "grid_h": np.full(n, -1, np.int32), "grid_w": np.full(n, -1, np.int32),
            "box": np.full((n, 4), np.nan), "coverage": np.full(n, np.nan)}


def image_fields(image_hw: Size, config: LlavaNextConfig,
                 aspect: ImageAspect | None = None) -> tuple[dict[str, np.ndarray], ImagePlan]:
    """Per-token fields of one image, in the order the model emits its tokens (``aspect``: how it was
    preprocessed, default the config's single-image one; ``inputs.tokens.image_aspect`` for a prompt's)."""
    plan = image_plan(image_hw, config, aspect)
    if plan.aspect != "anyres":
        return _untiled_fields(image_hw, config, plan), plan
    side = config.vision.grid_size
    seq = _packed_channels(image_hw, config, plan)  # (tokens, 5)
    n, base = len(seq), side * side
    f = empty_fields(n)
    _fill_base(f, seq[:base], image_hw, config)

    g = seq[base:]
    is_nl = g[:, 0] < 0
    kh, kw = plan.unpadded_hw
    line = np.concatenate([[0], np.cumsum(is_nl)[:-1]])  # the row a token is in = newlines before it
    col = np.arange(len(g)) - np.concatenate([[0], np.flatnonzero(is_nl) + 1])[line]
    sl = slice(base, n)
    grid = ~is_nl
    f["kind"][sl] = np.where(is_nl, K["image_newline"], K["image_grid"])
    f["row"][sl], f["col"][sl] = line, np.where(is_nl, -1, col)
    f["grid_h"][sl], f["grid_w"][sl] = kh, kw
    map_r, map_c, (r0, c0, r1, c1) = _patches_read(g, line, col, grid, image_hw, plan, config)
    ty, tx = map_r // side, map_c // side  # the tile holding the token's (centre) patch
    f["tile_row"][sl], f["tile_col"][sl] = np.where(is_nl, -1, ty), np.where(is_nl, -1, tx)
    # canvas px -> the resized image pasted at (top, left) -> original px
    h, w = image_hw
    patch = config.vision.patch_size
    (rh, rw), (ptop, pleft) = plan.resized_hw, paste_offset(plan.canvas_hw, plan.resized_hw)
    x0, y0, x1, y1 = c0 * patch - pleft, r0 * patch - ptop, c1 * patch - pleft, r1 * patch - ptop
    raw = np.stack([x0 * w / rw, y0 * h / rh, x1 * w / rw, y1 * h / rh], -1).astype(np.float64)
    clipped = np.clip(raw, 0, [w, h, w, h])
    f["box"][sl][grid] = clipped[grid]
    f["coverage"][sl][grid] = (_area(clipped) / _area(raw))[grid]
    return f, plan


def _packed_channels(image_hw: Size, config: LlavaNextConfig, plan: ImagePlan) -> np.ndarray:
    """The model's own packing run on index channels instead of features: (tokens, 5) float64 rows of tile
    (0 = base, 1 + ty * cols + tx), patch row, patch col inside the tile, and the cell's row / col in the
    stitched (rows*side, cols*side) map (linear: anyres_max's bilinear downscale turns them into the map
    coordinate of the output cell's centre); newline rows are all -1."""
    side = config.vision.grid_size
    rows, cols = plan.grid_hw
    n_tiles = 1 + rows * cols
    t = torch.arange(n_tiles).repeat_interleave(side * side)
    pr = torch.arange(side).repeat_interleave(side).repeat(n_tiles)
    pc = torch.arange(side).repeat(side * n_tiles)
    ty_all, tx_all = (t - 1).clamp(min=0) // max(cols, 1), (t - 1).clamp(min=0) % max(cols, 1)
    feats = torch.stack([t, pr, pc, ty_all * side + pr, tx_all * side + pc], -1).double().view(n_tiles, side * side, 5)
    seq = pack_image_features(feats, image_hw, plan.grid_hw, torch.full((5,), -1.0, dtype=torch.float64),
                              config.anyres_compat, config.anyres_max_patches).numpy()  # (tokens, 5)
    if len(seq) != plan.total:
        raise AssertionError(f"pack_image_features gave {len(seq)} tokens for a {image_hw} image, "
                             f"tokens.py {plan.total}")
    return seq


def _fill_base(f: dict[str, np.ndarray], bseq: np.ndarray, image_hw: Size, config: LlavaNextConfig) -> None:
    """The base tile's fields (its first side*side tokens), in place: the base is the whole image squashed
    to one tile, so each patch's box is scaled back to the image's own px."""
    side, patch, tile = config.vision.grid_size, config.vision.patch_size, config.tile_size
    h, w = image_hw
    base = side * side
    bseq = bseq.round().astype(np.int64)
    f["kind"][:base] = K["image_base"]
    f["row"][:base], f["col"][:base] = bseq[:, 1], bseq[:, 2]
    f["grid_h"][:base], f["grid_w"][:base] = side, side
    scale = np.array([w / tile, h / tile, w / tile, h / tile])
    f["box"][:base] = np.stack([bseq[:, 2], bseq[:, 1], bseq[:, 2] + 1, bseq[:, 1] + 1], -1) * patch * scale
    f["coverage"][:base] = 1.0


def _patches_read(g: np.ndarray, line: np.ndarray, col: np.ndarray, grid: np.ndarray, image_hw: Size,
                  plan: ImagePlan, config: LlavaNextConfig):
    """For each grid token (channels ``g``, at ``line``, ``col``): its (centre) map cell, and the patches of
    the stitched map it reads, rows [r0, r1) x cols [c0, c1); checked against where the packing put it."""
    kh, kw = plan.unpadded_hw
    full_h, full_w = unpadded_size(image_hw, plan.feature_map_hw, config.anyres_compat)
    if (kh, kw) == (full_h, full_w):  # no downscale: one patch, the token's own channels
        map_r, map_c = g[:, 3].round().astype(np.int64), g[:, 4].round().astype(np.int64)
        r0, c0, r1, c1 = map_r, map_c, map_r + 1, map_c + 1
    else:  # anyres_max: a bilinear downscale of the unpadded (full_h, full_w) block to (kh, kw)
        top, left = (plan.feature_map_hw[0] - full_h) // 2, (plan.feature_map_hw[1] - full_w) // 2
        rows_read, cols_read = _bilinear_reads(full_h, kh), _bilinear_reads(full_w, kw)  # (out, 2) [first, last]
        li, ci = np.minimum(line, kh - 1), np.clip(col, 0, kw - 1)
        r0, r1 = top + rows_read[li, 0], top + rows_read[li, 1] + 1
        c0, c1 = left + cols_read[ci, 0], left + cols_read[ci, 1] + 1
        # the interpolated map coordinate is the output cell's centre: it must lie among the patches read
        eps = 1e-6
        inside = (g[:, 3] >= r0 - eps) & (g[:, 3] <= r1 - 1 + eps) & (g[:, 4] >= c0 - eps) & (g[:, 4] <= c1 - 1 + eps)
        if not inside[grid].all():
            raise AssertionError(f"anyres_max cells of a {image_hw} image are not where the bilinear weights put them")
        map_r, map_c = np.floor(g[:, 3]).astype(np.int64), np.floor(g[:, 4]).astype(np.int64)
    # the grid is a row-major block: a token's (row, col) is a fixed offset from its map cell
    offsets = np.unique(np.stack([(r0 - line)[grid], (c0 - col)[grid]]), axis=1).T.tolist()
    if (kh, kw) == (full_h, full_w) and len(offsets) > 1:  # (none when the map has no column: 3000x40)
        raise AssertionError(f"grid tokens of a {image_hw} image are not one row-major block: offsets {offsets}")
    return map_r, map_c, (r0, c0, r1, c1)


def _area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def _bilinear_reads(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, 2) first and last input index each output index of the model's bilinear resize reads
    (``F.interpolate`` run on an identity: bilinear is separable, so each axis on its own)."""
    eye = torch.eye(n_in, dtype=torch.float64)[None]  # (1, in channels, in positions)
    weights = torch.nn.functional.interpolate(eye, size=n_out, mode="linear")[0].T.numpy()  # (out, in)
    used = weights != 0
    return np.stack([used.argmax(1), n_in - 1 - used[:, ::-1].argmax(1)], -1)


def untiled_tokens(config: LlavaNextConfig) -> int:
    """Tokens of one untiled image or of one frame sent as an image: a tile's patches (+ one newline)."""
    return config.vision.grid_size ** 2 + int(config.untiled_image_newline)


def _untiled_fields(image_hw: Size, config: LlavaNextConfig, plan: ImagePlan,
                    resize: str | None = None) -> dict[str, np.ndarray]:
    """One tile's patches row-major, then one newline when ``config.untiled_image_newline`` (the model's
    ``image_features`` for a (0, 0) grid). The tile is the image squashed to it ("resize", a SigLIP frame),
    the image padded to a square first ("pad"), or a CLIP frame's centre crop ("crop")."""
    side, patch, tile = config.vision.grid_size, config.vision.patch_size, config.tile_size
    n = untiled_tokens(config)
    if n != plan.total:
        raise AssertionError(f"an untiled image makes {n} tokens here, tokens.py {plan.total}")
    f = empty_fields(n)
    base = side * side
    r, c = np.arange(base) // side, np.arange(base) % side
    f["kind"][:base] = K["image_base"]
    f["row"][:base], f["col"][:base] = r, c
    f["grid_h"][:base], f["grid_w"][:base] = side, side
    f["box"][:base], f["coverage"][:base] = tile_boxes(np.stack([c, r, c + 1, r + 1], -1) * patch, image_hw, tile,
                                                       resize or plan.aspect)
    if n > base:
        f["kind"][base:] = K["image_newline"]
        f["grid_h"][base:], f["grid_w"][base:] = side, side
    return f


def tile_boxes(px: np.ndarray, image_hw: Size, tile: int, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) boxes in the tile's px -> (boxes in the original image's px, coverage) for a tile made by
    ``resize``: "resize" / "squash" (the whole image squashed to tile x tile), "pad" (padded to a centred
    square, ``expand_to_square``, then squashed) or "crop" (shortest edge to the tile, centre crop)."""
    h, w = image_hw
    px = px.astype(np.float64)
    if resize in ("resize", "squash"):
        return px * [w / tile, h / tile, w / tile, h / tile], np.ones(len(px))
    if resize == "pad":
        side = max(h, w)
        left, top = (side - w) // 2, (side - h) // 2
        raw = px * side / tile - [left, top, left, top]
        clipped = np.clip(raw, 0, [w, h, w, h])
        return clipped, _area(clipped) / _area(raw)
    if resize == "crop":
        rh, rw = shortest_edge_size(image_hw, tile)
        top, left = center_crop_offset((rh, rw), tile)
        return (px + [left, top, left, top]) * [w / rw, h / rh, w / rw, h / rh], np.ones(len(px))
    raise ValueError(f"unknown tile resize {resize!r}")


@functools.lru_cache(maxsize=32)
def _cell_footprints(side: int, stride: int, mode: str) -> np.ndarray:
    """(cells, 4) patch box (c0, r0, c1, r1) each pooled cell reads: the model's pooling run on an identity
    (one channel per patch), so the weights it gives a cell are exactly the patches that cell reads."""
    weights = pool_frames(torch.eye(side * side, dtype=torch.float32)[None], (side, side), stride, mode)[0]
    used = (weights != 0).view(-1, side, side).numpy()  # (cells, side, side)
    rows_used, cols_used = used.any(2), used.any(1)  # (cells, side) each
    first = lambda m: m.argmax(1)
    last = lambda m: side - 1 - m[:, ::-1].argmax(1)
    return np.stack([first(cols_used), first(rows_used), last(cols_used) + 1, last(rows_used) + 1], -1)


def video_fields(num_frames: int, frame_hw: Size, config: LlavaNextConfig,
                 timestamps: Sequence[float] | None = None) -> tuple[dict[str, np.ndarray], VideoPlan]:
    """Per-token fields of one video, in the order the model's pooling and newline code emit them."""
    plan = video_plan(num_frames, config)
    side, patch, size = config.vision.grid_size, config.vision.patch_size, config.tile_size
    ph, pw = plan.pooled_hw
    cell_box = _cell_footprints(side, plan.stride, plan.mode)  # (cells, 4) in patches
    # sequence order: (frame, cell) channels through the newline code
    chans = torch.stack(torch.meshgrid(torch.arange(num_frames), torch.arange(ph * pw), indexing="ij"), -1).double()
    seq = add_video_newlines(chans, (ph, pw), torch.full((2,), -1.0, dtype=torch.float64),
                             plan.newline).long().numpy()  # (tokens, 2)
    n = len(seq)
    if n != plan.total:
        raise AssertionError(f"add_video_newlines gave {n} tokens for {num_frames} frames, tokens.py {plan.total}")
    f = empty_fields(n)
    is_nl = seq[:, 0] < 0
    cell = seq[:, 1]
    f["kind"] = np.where(is_nl, K["video_newline"], K["video"]).astype(np.int8)
    # a newline belongs to the frame (and row) of the token before it ("one_token": after all frames: none)
    prev = np.maximum.accumulate(np.where(is_nl, -1, np.arange(n)))
    frame = np.where(prev >= 0, seq[np.maximum(prev, 0), 0], -1)
    if plan.newline == "one_token":
        frame = np.where(is_nl, -1, frame)
    f["frame"] = frame.astype(np.int32)
    last_cell = cell[np.maximum(prev, 0)]
    f["row"] = np.where(is_nl & (plan.newline != "grid"), -1, np.where(is_nl, last_cell // pw, cell // pw))
    f["col"] = np.where(is_nl, -1, cell % pw)
    f["grid_h"][:], f["grid_w"][:] = ph, pw
    if timestamps is not None:
        if len(timestamps) != num_frames:
            raise ValueError(f"{len(timestamps)} timestamps for {num_frames} frames")
        ts = np.asarray(timestamps, dtype=np.float64)
        f["time"] = np.where(f["frame"] >= 0, ts[np.maximum(f["frame"], 0)], np.nan)
    # tile px -> original px, as the frames were made (CLIP: shortest edge + centre crop; SigLIP: squashed)
    box, _ = tile_boxes(cell_box[cell] * patch, frame_hw, size, frame_options(config)["resize"])
    f["box"] = np.where(is_nl[:, None], np.nan, box)
    f["coverage"] = np.where(is_nl, np.nan, 1.0)
    return f, plan


def frame_image_fields(num_frames: int, frame_hw: Size, config: LlavaNextConfig,
                       timestamps: Sequence[float] | None = None) -> tuple[list[dict[str, np.ndarray]], VideoPlan]:
    """A video whose frames the model reads as images, one <image> each (``config.video_as_images``:
    LLaVA-NeXT-Interleave): per frame, the fields of one untiled image of the frame's tile (made as the
    pipeline makes frames, ``inputs.video.frame_options``), with kind video / video_newline, ``frame`` and
    ``time`` set. One dict per frame: each frame is its own run of image placeholders."""
    plan = video_plan(num_frames, config)
    if timestamps is not None and len(timestamps) != num_frames:
        raise ValueError(f"{len(timestamps)} timestamps for {num_frames} frames")
    one = image_plan((config.tile_size, config.tile_size), config, "resize")
    per = _untiled_fields(frame_hw, config, one, frame_options(config)["resize"])
    per["kind"] = np.where(per["kind"] == K["image_base"], K["video"], K["video_newline"]).astype(np.int8)
    out = []
    for k in range(num_frames):
        f = {name: arr.copy() for name, arr in per.items()}
        f["frame"][:] = k
        if timestamps is not None:
            f["time"][:] = float(timestamps[k])
        out.append(f)
    return out, plan


def reduced_video_fields(num_frames: int, frame_hw: Size, config: LlavaNextConfig, frame, cell,
                         timestamps: Sequence[float] | None = None) -> tuple[dict[str, np.ndarray], VideoPlan]:
    """Per-token fields of a video whose tokens a token reducer chose among the model's pooled cells, in its
    order (llava_next.reduce ``ReducedVideo``: token i is cell ``cell[i]`` = row * w + col of frame
    ``frame[i]``; no newline tokens). Reducers whose tokens are no such cells (PLLaVA's, SlowFast's grids,
    VisionZip's merged tokens) have no per-token provenance here."""
    flat, plan = video_fields(num_frames, frame_hw, dataclasses.replace(config, video_newline="none"), timestamps)
    h, w = plan.pooled_hw
    frame, cell = np.asarray(frame, dtype=np.int64), np.asarray(cell, dtype=np.int64)
    if len(frame) != len(cell) or (frame < 0).any() or (frame >= num_frames).any() or (cell < 0).any() \
            or (cell >= h * w).any():
        raise ValueError(f"reduced video tokens must be (frame in 0..{num_frames - 1}, cell in 0..{h * w - 1}) pairs "
                         f"of the {h}x{w} pooled grid")
    idx = frame * h * w + cell
    return {name: arr[idx] for name, arr in flat.items()}, plan
