"""Image pixels: loading to RGB, CLIP normalization, and the AnyRes pixel pipeline.

    load_image(source)                -> PIL.Image (RGB, upright)
    preprocess_image(source, config)  -> ImageInput(pixel_values (1 + tiles, 3, 336, 336), image_size,
                                                    best_resolution, grid)
    normalize(uint8 (..., H, W, 3))   -> float32 (..., 3, H, W)   (shared with video.py)

The pipeline follows transformers' PIL processor (``LlavaNextImageProcessorPil``, equal to the
original LLaVA-NeXT ``process_anyres_image``; reference-spec §2) and matches it pixel for pixel:
1. pick the canvas from ``config.image_grid_pinpoints`` (anyres.select_best_resolution);
2. resize the image into it keeping its aspect ratio (PIL bicubic, anyres.resized_size);
3. paste it centred on a black canvas (pixel 0 before normalization; an odd remainder goes
   right/bottom) and cut the canvas into row-major 336 px tiles;
4. the *base* image is the whole original resized straight to 336x336 (aspect NOT kept, as in both
   references); it comes first: ``[base, tile_0, tile_1, ...]``;
5. CLIP normalization: x / 255 computed in float64 and cast to float32, then (x - mean) / std.
PIL's bicubic differs from torchvision's (the transformers 5 default ``LlavaNextImageProcessor``) by
up to ~0.03 after normalization; we follow PIL like the original code.

Modes (``load_image``) — what transformers' PIL processor (``convert_to_rgb``) does, except 16-bit:
- RGB: unchanged. L, 1, P, CMYK, YCbCr, ...: ``Image.convert("RGB")`` (CMYK naively, no ICC profile).
- Any alpha (RGBA, LA, PA, or a palette/"transparency" key): composited over WHITE, then RGB. (The
  original code and transformers' own ``load_image`` simply drop alpha, which usually shows black.)
- 16-bit grayscale (I;16*, e.g. 16-bit PNGs): scaled to 8 bits (round(v / 257)). transformers and
  PIL clip at 255 instead, which turns almost every real 16-bit image white — a deliberate difference.
- 32-bit integer (I) and float (F) images have no agreed range: rejected with an error saying how to
  convert them.
- The EXIF orientation tag is applied (``ImageOps.exif_transpose``), as transformers' ``load_image``
  does; the original code does not. Animated/multi-page files give their first frame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError

from .anyres import Size, resized_size, tile_grid
from .config import LlavaNextConfig

# OpenAI CLIP normalization (CLIPImageProcessor defaults; reference-spec §2)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

def _normalize_arith(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) -> (..., 3) float32: x / 255 (in float64, as transformers), then (x - mean) / std."""
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)


# uint8 inputs have 256 values per channel: a table of their normalized values gives bit-identical
# results ~4x faster than the arithmetic on every pixel. (3, 256)
_LUT = _normalize_arith(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)).T.copy()


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W): x / 255 (in float64, as transformers), then (x - mean) / std."""
    if pixels.shape[-1] != 3:
        raise ValueError(f"normalize expects RGB pixels (..., H, W, 3), got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(_normalize_arith(pixels), -1, -3)))
    out = np.empty(pixels.shape[:-3] + (3,) + pixels.shape[-3:-1], dtype=np.float32)
    for c in range(3):
        out[..., c, :, :] = _LUT[c][pixels[..., c]]  # gather channel c into its own plane
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
def _open(source: object) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or not (source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (3, 4))):
            raise ValueError(f"an image array must be uint8 (H, W), (H, W, 3) RGB or (H, W, 4) RGBA, got "
                             f"{source.dtype} {source.shape}")
        return Image.fromarray(source)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"image file not found: {os.fspath(source)!r}")
        try:
            with Image.open(source) as im:
                im.load()  # read now, then close the file
                return im
        except UnidentifiedImageError:
            raise ValueError(f"{os.fspath(source)!r} is not an image file PIL can read") from None
    raise TypeError(f"an image must be a file path, a PIL.Image or a uint8 numpy array, got {type(source).__name__}")


def load_image(source: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """A path, PIL image or uint8 array -> an upright RGB PIL image (mode rules in the module docstring)."""
    image = ImageOps.exif_transpose(_open(source))
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # 16-bit grayscale -> 8 bit, rounded
        gray = np.asarray(image.convert("I"), dtype=np.uint32)
        return Image.fromarray(((gray + 128) // 257).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        raise ValueError(f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} images (PIL mode "
                         f"{image.mode!r}) have no standard pixel range; scale them to 8 bits first, e.g. "
                         f"Image.fromarray((np.asarray(img) / max_value * 255).round().astype(np.uint8))")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert a PIL {image.mode!r} image to RGB ({e}); convert it yourself first") from None


# ----------------------------------------------------------------------------------------------------
# The AnyRes pixel pipeline
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image: what the vision tower and the feature packer need."""

    pixel_values: torch.Tensor  # (1 + rows*cols, 3, tile, tile) float32, base image first
    image_size: Size  # original (height, width) px
    best_resolution: Size  # canvas (height, width) px, a pinpoint
    grid: Size  # (rows, cols) of tiles

    @property
    def num_tiles(self) -> int:
        """Tiles cut from the canvas (the base image not counted)."""
        return self.grid[0] * self.grid[1]


def preprocess_image(image: str | os.PathLike | Image.Image | np.ndarray,
                     config: LlavaNextConfig) -> ImageInput:
    """Load an image and turn it into AnyRes tiles: ``[base, tile_0, ...]`` normalized for CLIP."""
    rgb = load_image(image)
    tile = config.tile_size
    image_hw = (rgb.height, rgb.width)  # PIL's .size is (width, height)
    canvas_hw, (rows, cols) = tile_grid(image_hw, config)
    new_h, new_w = resized_size(image_hw, canvas_hw)
    # the canvas is exactly the pinpoint and holds the resized image (transformers once produced a
    # 768x767 canvas, PR #33501): check instead of trusting the arithmetic
    if canvas_hw != (rows * tile, cols * tile) or not (0 < new_h <= canvas_hw[0] and 0 < new_w <= canvas_hw[1]):
        raise AssertionError(f"AnyRes geometry broken for a {image_hw} image: canvas {canvas_hw}, "
                             f"grid {(rows, cols)}, resized {(new_h, new_w)}")

    # resize into the canvas keeping the aspect ratio, paste centred on black (odd remainder right/bottom)
    canvas = np.zeros((*canvas_hw, 3), dtype=np.uint8)  # (H_canvas, W_canvas, 3)
    top, left = (canvas_hw[0] - new_h) // 2, (canvas_hw[1] - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = np.asarray(rgb.resize((new_w, new_h), Image.BICUBIC))

    tiles = rearrange(canvas, "(r th) (c tw) ch -> (r c) th tw ch", th=tile, tw=tile)  # (rows*cols, T, T, 3)
    base = np.asarray(rgb.resize((tile, tile), Image.BICUBIC))  # (T, T, 3), aspect not kept
    pixels = np.concatenate([base[None], tiles])  # (1 + rows*cols, T, T, 3)
    return ImageInput(pixel_values=normalize(pixels), image_size=image_hw, best_resolution=canvas_hw,
                      grid=(rows, cols))
