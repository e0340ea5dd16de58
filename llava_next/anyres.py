"""AnyRes geometry: which canvas an image gets, how many tiles, and how many features survive unpadding.

Pure functions on sizes — no pixels, no tensors — so the token accounting, the image processor, the
feature packer and `llava-next inspect` all share one definition (reference-spec §2).

Sizes are (height, width). ``pinpoints`` are read as (height, width) pairs in "hf" mode (transformers)
and as (width, height) pairs in "original" mode (the original LLaVA-NeXT code reads ``image.size``);
the default list is symmetric, so the two agree except on exact ties (reference-spec §2.1).
"""

from __future__ import annotations

import math
from typing import Sequence

from .config import AnyresCompat

Size = tuple[int, int]  # (height, width)


def select_best_resolution(image_hw: Size, pinpoints: Sequence[Sequence[int]],
                           compat: AnyresCompat = "hf") -> Size:
    """The canvas (height, width) that keeps the most of the image's pixels, then wastes the least.

    Candidates are tried in list order with strict comparisons, so the first one wins an exact tie.
    """
    h, w = image_hw
    best, best_effective, best_wasted = None, -1, math.inf
    for pair in pinpoints:
        ch, cw = (pair[0], pair[1]) if compat == "hf" else (pair[1], pair[0])
        scale = min(cw / w, ch / h)
        down_h, down_w = int(h * scale), int(w * scale)
        effective = min(down_h * down_w, h * w)
        wasted = ch * cw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ch, cw), effective, wasted
    assert best is not None, "pinpoints must not be empty"
    return best


def resized_size(image_hw: Size, canvas_hw: Size) -> Size:
    """Aspect-preserving size (height, width) of the image inside the canvas (before centred padding)."""
    h, w = image_hw
    th, tw = canvas_hw
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw
    return th, min(math.ceil(w * scale_h), tw)


def unpadded_size(image_hw: Size, grid_hw: Size, compat: AnyresCompat = "hf") -> Size:
    """Rows and columns of the stitched feature map that hold the image, not the black padding.

    ``grid_hw`` is the stitched feature map's size (tiles * patches per side). "hf" rounds the scaled
    side to 7 decimals before truncating (transformers PRs #34522/#35779); "original" truncates.
    """
    h, w = image_hw
    cur_h, cur_w = grid_hw
    if w / h > cur_w / cur_h:  # wider than the map: padding is above and below
        scaled = h * (cur_w / w)
        new_h = int(round(scaled, 7)) if compat == "hf" else int(scaled)
        pad = (cur_h - new_h) // 2
        return cur_h - 2 * pad, cur_w
    scaled = w * (cur_h / h)
    new_w = int(round(scaled, 7)) if compat == "hf" else int(scaled)
    pad = (cur_w - new_w) // 2
    return cur_h, cur_w - 2 * pad
