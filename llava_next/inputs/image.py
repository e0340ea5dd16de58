"""Image pixels: loading to RGB, CLIP normalization, and the AnyRes pixel pipeline.

    load_image(source)                -> PIL.Image (RGB, upright)
    preprocess_image(source, config)  -> ImageInput(pixel_values (1 + tiles, 3, 336, 336), image_size,
                                                    best_resolution, grid)
    normalize(uint8 (..., H, W, 3))   -> float32 (..., 3, H, W)   (shared with video.py)

The pipeline follows transformers' PIL processor (``LlavaNextImageProcessorPil``, equal to the
original LLaVA-NeXT ``process_anyres_image``; docs/references.md, AnyRes images) and matches it pixel for pixel:
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

Bad files (docs/errors.md): every problem with an image file is an ``ImageError`` (a ValueError) whose
one-line message names the file — unreadable, truncated or corrupt data, a directory — except a
missing file (``FileNotFoundError``). Images larger than ``max_pixels`` (default
``DEFAULT_MAX_IMAGE_PIXELS`` = 100 megapixels, e.g. 10000x10000; the environment variable
``LLAVA_NEXT_MAX_IMAGE_PIXELS`` changes the default, 0 = no limit) are refused from the file header,
before any pixel is decoded: a decompression bomb (a small PNG that decodes to gigabytes) never
reaches memory. PIL's own DecompressionBomb check is replaced by this one (it would warn at 89 MP
and fail at 179 MP with a message that names neither the file nor the override).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError

from ..model.anyres import ImageInput, paste_offset, resized_size, tile_grid
from ..config import ImageAspect, LlavaNextConfig

# OpenAI CLIP normalization (CLIPImageProcessor defaults)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP (SiglipImageProcessor, the original SigLipImageProcessor): [-1, 1]
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
Stats = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std)
CLIP_STATS: Stats = (CLIP_MEAN, CLIP_STD)
SIGLIP_STATS: Stats = (SIGLIP_MEAN, SIGLIP_STD)


def stats_for(config: LlavaNextConfig) -> Stats:
    """The pixel normalization of the config's vision tower."""
    return SIGLIP_STATS if config.vision.kind == "siglip" else CLIP_STATS


def _normalize_arith(pixels: np.ndarray, stats: Stats = CLIP_STATS) -> np.ndarray:
    """(..., 3) -> (..., 3) float32: x / 255 (in float64, as transformers), then (x - mean) / std."""
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.array(stats[0], dtype=np.float32)) / np.array(stats[1], dtype=np.float32)


# uint8 inputs have 256 values per channel: a table of their normalized values gives bit-identical
# results faster than the arithmetic on every pixel. (3, 256) per normalization
_LUTS = {s: _normalize_arith(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1), s).T.copy()
         for s in (CLIP_STATS, SIGLIP_STATS)}


def normalize(pixels: np.ndarray, stats: Stats = CLIP_STATS) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W): x / 255 (in float64, as transformers), then (x - mean) / std."""
    if pixels.shape[-1] != 3:
        raise ValueError(f"normalize expects RGB pixels (..., H, W, 3), got shape {pixels.shape}")
    if pixels.dtype != np.uint8 or stats not in _LUTS:
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(_normalize_arith(pixels, stats), -1, -3)))
    lut = _LUTS[stats]
    out = np.empty(pixels.shape[:-3] + (3,) + pixels.shape[-3:-1], dtype=np.float32)
    for c in range(3):
        out[..., c, :, :] = lut[c][pixels[..., c]]  # gather channel c into its own plane
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
MAX_PIXELS_ENV = "LLAVA_NEXT_MAX_IMAGE_PIXELS"


class ImageError(ValueError):
    """An image cannot be used; the message names the file (or the value) and what to do."""


def max_image_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` if given, else $LLAVA_NEXT_MAX_IMAGE_PIXELS, else the
    default. 0 means no limit."""
    if max_pixels is None:
        env = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not env:
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            max_pixels = int(float(env))
        except ValueError:
            raise ImageError(f"{MAX_PIXELS_ENV}={env!r} is not a number of pixels (0 = no limit)") from None
    if max_pixels < 0:
        raise ImageError(f"the image pixel limit must be >= 0 (0 = no limit), got {max_pixels}")
    return int(max_pixels)


def _check_pixels(size_wh: tuple[int, int], limit: int, name: str) -> None:
    w, h = size_wh
    if limit and w * h > limit:
        raise ImageError(
            f"{name}: {h}x{w} px (height x width) = {w * h / 1e6:.1f} megapixels is over the limit of "
            f"{limit / 1e6:g} megapixels (a guard against decompression bombs); if the image is genuine, "
            f"raise the limit: --max-image-pixels {w * h} (CLI), max_pixels={w * h} (Python) or "
            f"{MAX_PIXELS_ENV}={w * h}; or downscale the file first")


# PIL's own bomb check (a module global) is switched off while we open and decode a file: ours, on
# the header's size, replaces it. The lock keeps two of our loads from restoring it out of order.
_PIL_CHECK_LOCK = threading.Lock()


def _open_file(path: str, limit: int) -> Image.Image:
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: is an empty file, not an image")
    with _PIL_CHECK_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as im:  # reads the header only
                _check_pixels(im.size, limit, path)
                im.load()  # decode now, then close the file
                return im
        except UnidentifiedImageError:
            raise ImageError(f"{path}: not an image file PIL can read (not an image, a format PIL does not "
                             f"know, or cut off inside its header); PNG, JPEG, WebP, GIF, BMP and TIFF work") from None
        except ImageError:
            raise
        except Exception as e:  # PIL's decoders raise OSError, SyntaxError, EOFError, zlib/struct errors...
            raise ImageError(f"{path}: truncated or corrupt image data ({_reason(e)}); the file is probably "
                             f"incomplete (an interrupted download or copy): get it again or re-save it") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _reason(e: Exception) -> str:
    text = str(e).strip().rstrip(".")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _name(source: object) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the image"


def _open(source: object, limit: int) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        return _open_file(os.fspath(source), limit)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or not (source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (3, 4))):
            raise ImageError(f"an image array must be uint8 (H, W), (H, W, 3) RGB or (H, W, 4) RGBA, got "
                             f"{source.dtype} {source.shape}")
        image = Image.fromarray(source)
    else:
        raise TypeError(f"an image must be a file path, a PIL.Image or a uint8 numpy array, got {type(source).__name__}")
    _check_pixels(image.size, limit, "an in-memory image" if isinstance(source, Image.Image) else "an image array")
    return image


def load_image(source: str | os.PathLike | Image.Image | np.ndarray, *, max_pixels: int | None = None) -> Image.Image:
    """A path, PIL image or uint8 array -> an upright RGB PIL image (mode rules in the module docstring).

    ``max_pixels``: refuse larger images (None: $LLAVA_NEXT_MAX_IMAGE_PIXELS or 100 MP; 0: no limit)."""
    image = _open(source, max_image_pixels(max_pixels))
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as e:  # a malformed EXIF block
        raise ImageError(f"{_name(source)}: unreadable EXIF orientation data ({_reason(e)}); re-save the image "
                         f"without EXIF (e.g. ImageOps.exif_transpose in another tool, or strip metadata)") from None
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # 16-bit grayscale -> 8 bit, rounded
        gray = np.asarray(image.convert("I"), dtype=np.uint32)
        return Image.fromarray(((gray + 128) // 257).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        raise ImageError(f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} images (PIL mode "
                         f"{image.mode!r}) have no standard pixel range; scale them to 8 bits first, e.g. "
                         f"Image.fromarray((np.asarray(img) / max_value * 255).round().astype(np.uint8))")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"cannot convert a PIL {image.mode!r} image to RGB ({e}); convert it yourself first") from None


# ----------------------------------------------------------------------------------------------------
# The AnyRes pixel pipeline
# ----------------------------------------------------------------------------------------------------
def expand_to_square(rgb: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The original ``expand2square``: the image pasted centred (offset floor) on a square of ``fill``."""
    w, h = rgb.size
    if w == h:
        return rgb
    side = max(w, h)
    square = Image.new(rgb.mode, (side, side), fill)
    square.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return square


def preprocess_image(image: str | os.PathLike | Image.Image | np.ndarray,
                     config: LlavaNextConfig, *, max_pixels: int | None = None,
                     aspect: ImageAspect | None = None) -> ImageInput:
    """Load an image and turn it into tiles normalized for the config's tower: AnyRes ``[base, tile_0, ...]``,
    or one tile (``aspect`` "resize": squashed to the tile size, PIL bicubic, as SiglipImageProcessor; "pad":
    first padded to a square with the mean colour, 127 for SigLIP, as the original ``expand2square`` and
    transformers' OneVision multi-image path). ``aspect`` defaults to ``config.image_aspect_ratio``;
    ``max_pixels`` as in ``load_image``."""
    rgb = load_image(image, max_pixels=max_pixels)
    tile = config.tile_size
    image_hw = (rgb.height, rgb.width)  # PIL's .size is (width, height)
    stats = stats_for(config)
    aspect = config.image_aspect_ratio if aspect is None else aspect
    if aspect != "anyres":
        if aspect == "pad":
            rgb = expand_to_square(rgb, tuple(int(m * 255) for m in stats[0]))  # type: ignore[arg-type]
        one = np.asarray(rgb.resize((tile, tile), Image.BICUBIC))[None]  # (1, T, T, 3), aspect not kept
        return ImageInput(pixel_values=normalize(one, stats), image_size=image_hw, best_resolution=(tile, tile),
                          grid=(0, 0))
    canvas_hw, (rows, cols) = tile_grid(image_hw, config)
    new_h, new_w = resized_size(image_hw, canvas_hw)
    # the canvas is exactly the pinpoint and holds the resized image (transformers once produced a
    # 768x767 canvas, PR #33501): check instead of trusting the arithmetic
    if canvas_hw != (rows * tile, cols * tile) or not (0 < new_h <= canvas_hw[0] and 0 < new_w <= canvas_hw[1]):
        raise AssertionError(f"AnyRes geometry broken for a {image_hw} image: canvas {canvas_hw}, "
                             f"grid {(rows, cols)}, resized {(new_h, new_w)}")

    # resize into the canvas keeping the aspect ratio, paste centred on black (odd remainder right/bottom)
    canvas = np.zeros((*canvas_hw, 3), dtype=np.uint8)  # (H_canvas, W_canvas, 3)
    top, left = paste_offset(canvas_hw, (new_h, new_w))
    canvas[top:top + new_h, left:left + new_w] = np.asarray(rgb.resize((new_w, new_h), Image.BICUBIC))

    tiles = rearrange(canvas, "(r th) (c tw) ch -> (r c) th tw ch", th=tile, tw=tile)  # (rows*cols, T, T, 3)
    base = np.asarray(rgb.resize((tile, tile), Image.BICUBIC))  # (T, T, 3), aspect not kept
    pixels = np.concatenate([base[None], tiles])  # (1 + rows*cols, T, T, 3)
    return ImageInput(pixel_values=normalize(pixels, stats), image_size=image_hw, best_resolution=canvas_hw,
                      grid=(rows, cols))
