"""Video frame features: spatial pooling, where it sits relative to the projector, and newline tokens.

Layout. Features are token-major, one row of tokens per frame: ``(F, H*W, C)`` with the ``H*W`` patch
tokens of a frame in row-major order over its (H, W) patch grid (24 x 24 for CLIP ViT-L/14-336).
Pooling keeps that layout: ``(F, H*W, C) -> (F, h*w, C)``. The sequence handed to the language model
is **frame-major**: frame 0's tokens row by row, then frame 1, ... Thinking of the frames as one
stitched 1 x F strip of feature maps is fine, but flattening that strip row-major would interleave
frames (row 0 of every frame, then row 1 ...) and break parity with every reference.

Pooling modes (docs/references.md, Video; original ``get_2dPool``, transformers ``LlavaNextVideoPooler``):
- ``average`` / ``max``: ``avg_pool2d`` / ``max_pool2d`` with kernel = stride, floor mode, no padding
  -> ``(H // s, W // s)``; rows/columns the stride does not cover are dropped, as in both references.
- ``bilinear``: ``interpolate(size=(ceil(H / s), ceil(W / s)), mode="bilinear", align_corners=False)``
  (the original code's OneVision/LLaVA-Video option).

Pool position (``pool_and_project``): transformers, vLLM and the original ``inference`` branch pool
*before* the GELU projector; the original main branch pools *after* it. Average pooling commutes with
a linear map but not with GELU, so the two orders give different features.

Backends: ``pool_frames`` runs the PyTorch code below on CPU and the fused Triton kernel
(``llava_next_kernels.spatial_pool``) on CUDA; ``use_pool_backend`` forces one (tests run both).

Newline modes (``add_video_newlines``, original ``mm_newline_position``; transformers has none):
- ``none``: no extra token.            ``grid``: ``image_newline`` after every row of every frame.
- ``frame``: one after each frame.     ``one_token``: one after all frames.
``newline_count`` is the matching count, used by tokens.py so accounting and features cannot disagree.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from ..config import PoolMode, PoolPosition, VideoNewline

Size = tuple[int, int]  # (height, width)
POOL_MODES: tuple[str, ...] = ("average", "max", "bilinear")
NEWLINE_MODES: tuple[str, ...] = ("none", "grid", "frame", "one_token")


def pooled_grid_hw(grid_hw: Size, stride: int, mode: PoolMode = "average") -> Size:
    """The (height, width) of one frame's token grid after pooling a ``grid_hw`` grid with ``stride``."""
    h, w = grid_hw
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode {mode!r} is not supported; choose one of {list(POOL_MODES)}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"pool stride must be a positive integer, got {stride!r}")
    if mode == "bilinear":
        return math.ceil(h / stride), math.ceil(w / stride)
    if stride > min(h, w):
        raise ValueError(f"pool stride {stride} is larger than the {h}x{w} patch grid; use a stride <= {min(h, w)}")
    return h // stride, w // stride


PoolBackend = Literal["auto", "torch", "triton"]
_pool_backend: PoolBackend = "auto"


@contextlib.contextmanager
def use_pool_backend(name: PoolBackend) -> Iterator[None]:
    """Force the pooling backend: "torch" (the reference below), "triton" (llava_next_kernels.spatial_pool,
    reading the token-major layout directly), or "auto" (triton on CUDA, torch otherwise)."""
    global _pool_backend
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown pooling backend {name!r}; choose auto, torch or triton")
    previous, _pool_backend = _pool_backend, name
    try:
        yield
    finally:
        _pool_backend = previous


def _triton_pool(features: torch.Tensor, mode: PoolMode) -> Callable[..., torch.Tensor] | None:
    if mode == "bilinear" or _pool_backend == "torch" or (_pool_backend == "auto" and features.device.type != "cuda"):
        return None
    if _pool_backend == "auto" and torch.is_grad_enabled() and features.requires_grad:
        return None  # the kernel has no backward: a training step pools with the torch reference
    try:
        from llava_next_kernels.pooling import spatial_pool
    except ImportError as e:
        if _pool_backend == "triton":
            raise RuntimeError(f"pooling backend 'triton' requested but the Triton kernels cannot be imported: {e}") from None
        return None
    return spatial_pool


def pool_frames(features: torch.Tensor, grid_hw: Size, stride: int = 2, mode: PoolMode = "average") -> torch.Tensor:
    """Pool each frame's patch grid: (F, H*W, C) -> (F, h*w, C), token order row-major within a frame."""
    h, w = grid_hw
    if features.dim() != 3 or features.shape[1] != h * w:
        raise ValueError(f"expected frame features of shape (frames, {h}*{w}={h * w}, channels), "
                         f"got {tuple(features.shape)}")
    out_hw = pooled_grid_hw(grid_hw, stride, mode)
    kernel = _triton_pool(features, mode)
    if kernel is not None:  # one pass over the token-major layout, no NCHW round trip
        pooled = kernel(features, stride, mode, size=grid_hw)  # (F * h' * w', C), frame-major
        return pooled.view(features.shape[0], out_hw[0] * out_hw[1], features.shape[2])
    x = rearrange(features, "f (h w) c -> f c h w", h=h, w=w)
    if mode == "average":
        x = F.avg_pool2d(x, kernel_size=stride, stride=stride)
    elif mode == "max":
        x = F.max_pool2d(x, kernel_size=stride, stride=stride)
    else:
        x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
    # x: (F, C, h', w')
    return rearrange(x, "f c h w -> f (h w) c")


def pool_and_project(features: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], grid_hw: Size,
                     stride: int = 2, mode: PoolMode = "average",
                     position: PoolPosition = "before_projector") -> torch.Tensor:
    """Vision features (F, H*W, Cv) -> projected, pooled features (F, h*w, D), in the chosen order."""
    if position == "before_projector":
        return project(pool_frames(features, grid_hw, stride, mode))
    if position == "after_projector":
        return pool_frames(project(features), grid_hw, stride, mode)
    raise ValueError(f"pool position {position!r} is not supported; use 'before_projector' or 'after_projector'")


def newline_count(num_frames: int, pooled_hw: Size, mode: VideoNewline) -> int:
    """How many ``image_newline`` tokens ``add_video_newlines`` inserts."""
    rows = pooled_hw[0]
    counts = {"none": 0, "grid": num_frames * rows, "frame": num_frames, "one_token": 1}
    if mode not in counts:
        raise ValueError(f"video newline mode {mode!r} is not supported; choose one of {list(NEWLINE_MODES)}")
    return counts[mode]


def add_video_newlines(features: torch.Tensor, pooled_hw: Size, newline: torch.Tensor | None,
                       mode: VideoNewline = "none") -> torch.Tensor:
    """(F, h*w, D) pooled, projected features -> (T, D) frame-major sequence with newline tokens inserted."""
    if mode not in NEWLINE_MODES:
        raise ValueError(f"video newline mode {mode!r} is not supported; choose one of {list(NEWLINE_MODES)}")
    num_frames, tokens, dim = features.shape
    h, w = pooled_hw
    if tokens != h * w:
        raise ValueError(f"expected {h}*{w}={h * w} tokens per frame, got {tokens}")
    if mode == "none":
        return features.reshape(num_frames * tokens, dim)
    if newline is None:
        raise ValueError(f"video newline mode {mode!r} needs the model's image_newline vector")
    nl = newline.to(features.dtype).reshape(1, 1, dim)
    if mode == "grid":  # a newline column after every row of every frame
        rows = features.reshape(num_frames * h, w, dim)
        rows = torch.cat([rows, nl.expand(num_frames * h, 1, dim)], dim=1)  # (F*h, w+1, D)
        return rows.reshape(-1, dim)
    if mode == "frame":
        framed = torch.cat([features, nl.expand(num_frames, 1, dim)], dim=1)  # (F, h*w+1, D)
        return framed.reshape(-1, dim)
    return torch.cat([features.reshape(-1, dim), nl.reshape(1, dim)], dim=0)  # one_token: (F*h*w+1, D)
