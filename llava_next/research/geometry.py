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

from ..config import LlavaNextConfig
from ..inputs.tokens import ImagePlan, VideoPlan, image_plan, video_plan
from ..inputs.video import center_crop_offset, shortest_edge_size
from ..model.anyres import pack_image_features, paste_offset
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


def image_fields(image_hw: Size, config: LlavaNextConfig) -> tuple[dict[str, np.ndarray], ImagePlan]:
    """Per-token fields of one image, in the order ``pack_image_features`` emits its tokens."""
    plan = image_plan(image_hw, config)
    side, patch, tile = config.vision.grid_size, config.vision.patch_size, config.tile_size
    rows, cols = plan.grid_hw
    n_tiles = 1 + rows * cols
    # channels (float64, exact): tile (0 = base, 1 + ty * cols + tx), patch row, patch col inside the tile
    t = torch.arange(n_tiles).repeat_interleave(side * side)
    pr = torch.arange(side).repeat_interleave(side).repeat(n_tiles)
    pc = torch.arange(side).repeat(side * n_tiles)
    feats = torch.stack([t, pr, pc], -1).double().view(n_tiles, side * side, 3)
    seq = pack_image_features(feats, image_hw, plan.grid_hw, torch.full((3,), -1.0, dtype=torch.float64),
                              config.anyres_compat).long().numpy()  # (tokens, 3)
    n = len(seq)
    if n != plan.total:
        raise AssertionError(f"pack_image_features gave {n} tokens for a {image_hw} image, tokens.py {plan.total}")
    f = empty_fields(n)
    h, w = image_hw
    base = side * side
    f["kind"][:base] = K["image_base"]
    f["row"][:base], f["col"][:base] = seq[:base, 1], seq[:base, 2]
    f["grid_h"][:base], f["grid_w"][:base] = side, side
    scale = np.array([w / tile, h / tile, w / tile, h / tile])  # the base is the whole image squashed to tile px
    f["box"][:base] = np.stack([seq[:base, 2], seq[:base, 1], seq[:base, 2] + 1, seq[:base, 1] + 1], -1) * patch * scale
    f["coverage"][:base] = 1.0

    g = seq[base:]
    is_nl = g[:, 0] < 0
    kh, kw = plan.unpadded_hw
    line = np.concatenate([[0], np.cumsum(is_nl)[:-1]])  # the row a token is in = newlines before it
    col = np.arange(len(g)) - np.concatenate([[0], np.flatnonzero(is_nl) + 1])[line]
    sl = slice(base, n)
    f["kind"][sl] = np.where(is_nl, K["image_newline"], K["image_grid"])
    f["row"][sl], f["col"][sl] = line, np.where(is_nl, -1, col)
    f["grid_h"][sl], f["grid_w"][sl] = kh, kw
    ty, tx = (g[:, 0] - 1) // cols, (g[:, 0] - 1) % cols
    f["tile_row"][sl], f["tile_col"][sl] = np.where(is_nl, -1, ty), np.where(is_nl, -1, tx)
    map_r, map_c = ty * side + g[:, 1], tx * side + g[:, 2]  # cell in the stitched (rows*24, cols*24) map
    grid = ~is_nl
    # the unpadded block is a fixed offset into the stitched map: the sequence and the map agree
    offsets = np.unique(np.stack([(map_r - line)[grid], (map_c - col)[grid]]), axis=1).T.tolist()
    if len(offsets) > 1:  # (0 when the unpadded map has no column: a 3000x40 image keeps only newlines)
        raise AssertionError(f"grid tokens of a {image_hw} image are not one row-major block: offsets {offsets}")
    # canvas px -> the resized image pasted at (top, left) -> original px
    (rh, rw), (top, left) = plan.resized_hw, paste_offset(plan.canvas_hw, plan.resized_hw)
    x0, y0 = map_c * patch - left, map_r * patch - top
    raw = np.stack([x0 * w / rw, y0 * h / rh, (x0 + patch) * w / rw, (y0 + patch) * h / rh], -1)
    clipped = np.clip(raw, 0, [w, h, w, h])
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    f["box"][sl][grid] = clipped[grid]
    f["coverage"][sl][grid] = (area(clipped) / area(raw))[grid]
    return f, plan


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
    # crop px -> the shortest-edge resized frame -> original px
    (fh, fw) = frame_hw
    rh, rw = shortest_edge_size(frame_hw, size)
    top, left = center_crop_offset((rh, rw), size)
    b = cell_box[cell] * patch + [left, top, left, top]
    box = b * [fw / rw, fh / rh, fw / rw, fh / rh]
    f["box"] = np.where(is_nl[:, None], np.nan, box)
    f["coverage"] = np.where(is_nl, np.nan, 1.0)
    return f, plan


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
