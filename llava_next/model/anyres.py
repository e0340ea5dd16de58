"""AnyRes: the geometry of LLaVA-NeXT's image tiles, and the packing of their features into tokens.

An image of any size is resized into the best-fitting *canvas* from ``image_grid_pinpoints`` and cut
into a grid of 336 px *tiles*; the vision tower sees the tiles plus one *base* image (the whole image
squashed to 336x336). Each tile yields 24x24 *patch* features. This module holds everything about that
except the pixels themselves (image.py does resize / pad / cut with this geometry):

    select_best_resolution(image_hw, pinpoints, compat) -> canvas (h, w)     which canvas
    resized_size(image_hw, canvas_hw)                   -> (h, w)           aspect-kept size in the canvas
    paste_offset(canvas_hw, resized_hw)                 -> (top, left)      where it sits in the canvas
    tile_grid(image_hw, config)                         -> canvas, grid     canvas px and (rows, cols) tiles
    unpadded_size(image_hw, map_hw, compat)             -> (h', w')         feature rows/cols that hold image
    pack_image_features(features, image_hw, grid, newline, compat) -> (tokens, C)
    anyres_max_size(unpadded_hw, side, max_patches)     -> (h'', w'')         OneVision's bilinear downscale
    image_token_count(image_hw, config)                 -> 576 + h' * (w' + 1)

Token layout (docs/references.md, AnyRes images: "spatial_unpad", identical in transformers and the original code):
the base tile's 576 features first (no newline), then the tiles stitched spatially into one
(24*rows, 24*cols) feature map, cropped to the rows/cols that hold the image (the canvas padding is
dropped), with ``image_newline`` appended after every row, flattened row-major.

Sizes are (height, width). ``pinpoints`` are read as (height, width) pairs in "hf" mode
(transformers) and as (width, height) pairs in "original" mode (the original LLaVA-NeXT code reads
PIL's ``image.size``); the default list is symmetric, so both agree except on exact ties — images
with both sides <= 336 px. "original" also truncates instead of rounding when
unpadding (e.g. 748x352 (h, w): 1876 tokens in "hf", 1826 in "original").

anyres_max_N (LLaVA-OneVision, docs/references.md; transformers' LlavaOnevisionModel and the
original code agree): after unpadding, a map of h x w patches larger than N tiles' worth is shrunk —
``ratio = sqrt(h * w / (N * P * P))``; if ratio > 1.1 the (C, h, w) map is resized with
``F.interpolate(size=(int(h // ratio), int(w // ratio)), mode="bilinear")`` (align_corners False, no
antialias) — before the newline column is added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from ..config import AnyresCompat, LlavaNextConfig

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image: what the vision tower and the feature packer need. ``inputs.image``'s
    ``preprocess_image`` makes it; it is defined here, beside the geometry it carries, because the model
    reads it and the model imports nothing of the input pipeline (docs/architecture.md)."""

    pixel_values: torch.Tensor  # (1 + rows*cols, 3, tile, tile) float32, base image first
    image_size: Size  # original (height, width) px
    best_resolution: Size  # canvas (height, width) px, a pinpoint
    grid: Size  # (rows, cols) of tiles; (0, 0): one untiled image ("resize" / "pad"), the base only

    @property
    def num_tiles(self) -> int:
        """Tiles cut from the canvas (the base image not counted)."""
        return self.grid[0] * self.grid[1]


def _check_size(name: str, size: Sequence[int]) -> Size:
    if len(size) != 2 or any(int(v) != v or v <= 0 for v in size):
        raise ValueError(f"{name} must be two positive integers (height, width), got {tuple(size)}")
    return int(size[0]), int(size[1])


def _check_compat(compat: str) -> None:
    if compat not in ("hf", "original"):
        raise ValueError(f"AnyRes compat must be 'hf' (transformers) or 'original' (LLaVA-NeXT repo), got {compat!r}")


def select_best_resolution(image_hw: Size, pinpoints: Sequence[Sequence[int]],
                           compat: AnyresCompat = "hf") -> Size:
    """The canvas (height, width) that keeps the most of the image's pixels, then wastes the least.

    Candidates are tried in list order with strict comparisons, so the first one wins an exact tie.
    """
    h, w = _check_size("image size", image_hw)
    _check_compat(compat)
    if not pinpoints:
        raise ValueError("pinpoints is empty; LLaVA-NeXT uses [[336, 672], [672, 336], [672, 672], ...]")
    best, best_effective, best_wasted = None, -1, math.inf
    for pair in pinpoints:
        ch, cw = (pair[0], pair[1]) if compat == "hf" else (pair[1], pair[0])
        scale = min(cw / w, ch / h)
        down_h, down_w = int(h * scale), int(w * scale)
        effective = min(down_h * down_w, h * w)
        wasted = ch * cw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(ch), int(cw)), effective, wasted
    assert best is not None
    return best


def resized_size(image_hw: Size, canvas_hw: Size) -> Size:
    """Aspect-preserving size (height, width) of the image inside the canvas (before centred padding)."""
    h, w = image_hw
    th, tw = canvas_hw
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw
    return th, min(math.ceil(w * scale_h), tw)


def paste_offset(canvas_hw: Size, resized_hw: Size) -> Size:
    """(top, left) px of the resized image pasted centred on the canvas (an odd remainder goes right/bottom)."""
    return (canvas_hw[0] - resized_hw[0]) // 2, (canvas_hw[1] - resized_hw[1]) // 2


def tile_grid(image_hw: Size, config: LlavaNextConfig) -> tuple[Size, Size]:
    """(canvas (height, width) px, grid (rows, cols) of tiles) for an image of this size."""
    canvas = select_best_resolution(image_hw, config.image_grid_pinpoints, config.anyres_compat)
    tile = config.tile_size
    return canvas, (canvas[0] // tile, canvas[1] // tile)


def unpadded_size(image_hw: Size, map_hw: Size, compat: AnyresCompat = "hf") -> Size:
    """Rows and columns of the stitched feature map that hold the image, not the canvas padding.

    ``map_hw`` is the stitched feature map's size (tiles x patches per tile on each side). The kept
    block is centred: ``(map - kept) // 2`` rows (or columns) are dropped on each side, so the kept size
    is one more than the scaled size when the difference is odd. "hf" rounds the scaled side to 7
    decimals before truncating (transformers PRs #34522/#35779); "original" truncates.
    """
    _check_compat(compat)
    h, w = image_hw
    cur_h, cur_w = map_hw
    if w / h > cur_w / cur_h:  # wider than the map: padding is above and below
        scaled = h * (cur_w / w)
        new_h = int(round(scaled, 7)) if compat == "hf" else int(scaled)
        pad = (cur_h - new_h) // 2
        return cur_h - 2 * pad, cur_w
    scaled = w * (cur_h / h)
    new_w = int(round(scaled, 7)) if compat == "hf" else int(scaled)
    pad = (cur_w - new_w) // 2
    return cur_h, cur_w - 2 * pad


def anyres_max_size(unpadded_hw: Size, side: int, max_patches: int | None) -> Size:
    """The (rows, cols) an unpadded feature map is downscaled to under anyres_max_N (itself if small enough)."""
    h, w = unpadded_hw
    if max_patches is None:
        return h, w
    ratio = math.sqrt(h * w / (max_patches * side ** 2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return h, w


def pack_image_features(tile_features: torch.Tensor, image_hw: Size, grid_hw: Size,
                        image_newline: torch.Tensor | None, compat: AnyresCompat = "hf",
                        max_patches: int | None = None) -> torch.Tensor:
    """One image's per-tile features (base first) -> its token sequence (base, unpadded grid + newlines).

    tile_features: (1 + rows*cols, P*P, C), element 0 the base image, then the tiles row-major; P*P
    patches per tile (576), CLS already dropped. image_hw: the original image's (height, width).
    grid_hw: (rows, cols) of tiles (``ImageInput.grid``). image_newline: (C,), or None for no newline.
    max_patches: anyres_max_N's N (None: no downscale).
    Returns (P*P + h' * (w' + 1), C) — (P*P + h' * w', C) without a newline.
    """
    image_hw = _check_size("image size", image_hw)
    rows, cols = _check_size("tile grid", grid_hw)
    if tile_features.ndim != 3:
        raise ValueError(f"tile_features must be (1 + tiles, patches, channels), got shape {tuple(tile_features.shape)}")
    n, patches, channels = tile_features.shape
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"tile_features has {patches} features per tile, not a square patch grid; AnyRes "
                         f"packing needs the CLS token dropped (feature_strategy='default')")
    if n != 1 + rows * cols:
        raise ValueError(f"tile_features holds {n} tiles but a {rows}x{cols} grid needs 1 + {rows * cols} "
                         f"(the base image first)")
    if image_newline is not None and image_newline.shape != (channels,):
        raise ValueError(f"image_newline must be ({channels},) to match the features, got {tuple(image_newline.shape)}")

    base, tiles = tile_features[0], tile_features[1:]  # (P*P, C), (rows*cols, P*P, C)
    # stitch the tiles spatially, channels last: tile (r, c) covers map rows r*P.., cols c*P..
    fmap = rearrange(tiles, "(gh gw) (ph pw) c -> (gh ph) (gw pw) c", gh=rows, gw=cols, ph=side, pw=side)
    map_h, map_w = rows * side, cols * side
    h, w = unpadded_size(image_hw, (map_h, map_w), compat)
    top, left = (map_h - h) // 2, (map_w - w) // 2
    fmap = fmap[top:top + h, left:left + w]  # (h', w', C)
    small = anyres_max_size((h, w), side, max_patches)
    if small != (h, w):  # anyres_max: bilinear on (1, C, h', w'), as both references
        fmap = F.interpolate(fmap.permute(2, 0, 1)[None], size=small, mode="bilinear")[0].permute(1, 2, 0)
        h, w = small
    if image_newline is not None:
        newline = image_newline.to(fmap.dtype).expand(h, 1, channels)
        fmap = torch.cat([fmap, newline], dim=1)  # (h', w' + 1, C): a newline ends every row
    return torch.cat([base, fmap.reshape(-1, channels)])  # (P*P + h' * (w' + 1), C)
