"""Fused spatial pooling of per-frame features in Triton, straight into the output sequence — beside its reference.

    spatial_pool(x, stride, mode, *, size=None, out=None, offset=0)
    spatial_pool_reference(...)  same signature, the PyTorch path every peer uses
    pooled_token_count(frames, size, stride) -> int

x is (F, H*W, C) in token-major layout, exactly what the vision tower emits (row-major patches inside a
frame). Each frame is pooled with kernel = stride = s (average or max, floor mode like torch's
avg_pool2d / max_pool2d: trailing rows and columns the stride does not cover are dropped), and the
pooled tokens are written frame-major, row-major inside a frame, into rows [offset, offset + n) of an
output sequence buffer out (T_total, C) — e.g. the decoder's input embeddings: frame 0's Ho*Wo tokens,
frame 1's, ... (the model adds its newline tokens afterwards: model/pooling.add_video_newlines).

Notable choices
- One program per (block of output tokens, block of channels). A program gathers the s*s input tokens
  of each of its outputs as contiguous channel rows: no permute, no NCHW copy, no intermediate buffer.
  Traffic is the minimum: read F*H*W*C once, write the pooled tokens once.
- Accumulation in fp32 (upcast right after tl.load; the interpreter mishandles bf16 arithmetic), the
  average divides the sum by s*s like torch, one rounding at the store.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the kernels are an extra: say which
    raise ImportError("llava_next_kernels needs triton, which is not installed: pip install 'llava-next[kernels]' "
                      "(the PyTorch paths run without it)") from e

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read when the @triton.jit decorator runs
PoolMode = Literal["average", "max"]
MAX_STRIDE = 8  # the s*s window is unrolled at compile time


# ------------------------------------------------------------------------------------------------ kernel
@triton.jit
def _pool_kernel(X, Out, sx_f, sx_t, so_t, offset, n_pooled, W, Ho, Wo, C,
                 STRIDE: tl.constexpr, IS_MAX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # pooled token index over all frames
    t_ok = t < n_pooled
    f = t // (Ho * Wo)
    ho = t % (Ho * Wo) // Wo
    wo = t % Wo
    # top-left input token of each window; each token is a contiguous row of C channels
    src = X + f.to(tl.int64) * sx_f + ((ho * STRIDE) * W + wo * STRIDE).to(tl.int64) * sx_t
    ok = t_ok[:, None] & c_ok[None, :]
    if IS_MAX:
        acc = tl.full([BLOCK_T, BLOCK_C], float("-inf"), dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for dy in tl.static_range(STRIDE):
        for dx in tl.static_range(STRIDE):
            x = tl.load(src[:, None] + (dy * W + dx) * sx_t + offs_c[None, :], mask=ok, other=0.0)
            if IS_MAX:
                acc = tl.maximum(acc, x.to(tl.float32))
            else:
                acc += x.to(tl.float32)
    if not IS_MAX:
        acc = acc / (STRIDE * STRIDE)
    dst = offset + t.to(tl.int64)  # (BLOCK_T,) output rows: frame-major, row-major inside a frame
    tl.store(Out + dst[:, None] * so_t + offs_c[None, :], acc.to(Out.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------------ launcher
def pooled_token_count(frames: int, size: tuple[int, int], stride: int) -> int:
    """Output rows for ``frames`` frames of ``size`` = (height, width) patches pooled with ``stride``."""
    return frames * (size[0] // stride) * (size[1] // stride)


def _check(x: torch.Tensor, stride: int, mode: str, size: tuple[int, int] | None, out: torch.Tensor | None,
           offset: int) -> tuple[int, int]:
    """Validate the arguments; returns size = (height, width)."""
    if x.dim() != 3:
        raise ValueError(f"x must be (frames, height*width, channels), got shape {tuple(x.shape)}")
    if size is None:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"{x.shape[1]} tokens per frame is not a square; pass size=(height, width)")
        size = (side, side)
    if size[0] * size[1] != x.shape[1]:
        raise ValueError(f"size {tuple(size)} (height, width) has {size[0] * size[1]} patches but x has "
                         f"{x.shape[1]} tokens per frame")
    if not isinstance(stride, int) or not 1 <= stride <= min(MAX_STRIDE, *size):
        raise ValueError(f"stride must be an int in 1..{min(MAX_STRIDE, *size)} for size {tuple(size)}, got {stride!r}")
    if mode not in ("average", "max"):
        raise ValueError(f"mode must be 'average' or 'max', got {mode!r}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if out is None:
        if offset != 0:
            raise ValueError("offset needs an out buffer to offset into")
        return size
    n = pooled_token_count(x.shape[0], size, stride)
    if out.dim() != 2 or out.shape[1] != x.shape[2] or out.device != x.device or not out.is_floating_point():
        raise ValueError(f"out must be a floating (T_total, {x.shape[2]}) tensor on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if out.stride(1) != 1:
        raise ValueError("out must have contiguous rows (out.stride(1) == 1)")
    if not 0 <= offset <= out.shape[0] - n:
        raise ValueError(f"{n} pooled tokens at offset {offset} do not fit out's {out.shape[0]} rows")
    return size


def spatial_pool(x: torch.Tensor, stride: int, mode: PoolMode = "average", *, size: tuple[int, int] | None = None,
                 out: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Pool x (F, H*W, C) per frame and write the tokens to out[offset : offset + n]; returns that view.

    size = (height, width) of the patch grid (default: square). Without ``out`` a fresh (n, C) tensor of
    x's dtype is returned.
    """
    size = _check(x, stride, mode, size, out, offset)
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(f"Triton kernels need CUDA tensors (got {x.device}); for CPU tensors set "
                           "TRITON_INTERPRET=1 before importing llava_next_kernels (slow, for testing)")
    frames, _, C = x.shape
    n = pooled_token_count(frames, size, stride)
    if out is None:
        out = torch.empty(n, C, device=x.device, dtype=x.dtype)
    if x.stride(2) != 1:
        x = x.contiguous()
    ho, wo = size[0] // stride, size[1] // stride
    if _INTERPRET:  # the interpreter's cost is per program and op: few, big tiles
        BLOCK_T, BLOCK_C, launch = 256, min(1024, triton.next_power_of_2(C)), {}
    else:  # 16 tokens x 256 channels: 4*s*s KiB of bf16 reads in flight per program
        BLOCK_T, BLOCK_C, launch = 16, min(256, triton.next_power_of_2(C)), {"num_warps": 4}
    # the interpreter truncates fp32 -> bf16 casts (GPUs round to nearest even): write fp32, round with torch
    target, start = (torch.empty(n, C, device=x.device), 0) if _INTERPRET and out.dtype == torch.bfloat16 else (out, offset)
    grid = (triton.cdiv(n, BLOCK_T), triton.cdiv(C, BLOCK_C))
    _pool_kernel[grid](x, target, x.stride(0), x.stride(1), target.stride(0), start, n, size[1], ho, wo, C,
                       STRIDE=stride, IS_MAX=mode == "max", BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, **launch)
    if target is not out:
        out[offset:offset + n] = target
    return out[offset:offset + n]


# ------------------------------------------------------------------------------------------------ reference
def spatial_pool_reference(x: torch.Tensor, stride: int, mode: PoolMode = "average", *,
                           size: tuple[int, int] | None = None, out: torch.Tensor | None = None,
                           offset: int = 0) -> torch.Tensor:
    """The PyTorch path (view -> NCHW -> avg_pool2d/max_pool2d -> flatten), computed in x's dtype."""
    height, width = _check(x, stride, mode, size, out, offset)
    frames, _, C = x.shape
    grid = x.view(frames, height, width, C).permute(0, 3, 1, 2)  # (F, C, H, W): a strided view
    pool = F.avg_pool2d if mode == "average" else F.max_pool2d
    pooled = pool(grid, kernel_size=stride, stride=stride)  # (F, C, Ho, Wo)
    tokens = pooled.permute(0, 2, 3, 1).reshape(-1, C)  # (F, Ho, Wo, C) -> (F*Ho*Wo, C)
    if out is None:
        return tokens
    out[offset:offset + tokens.shape[0]] = tokens
    return out[offset:offset + tokens.shape[0]]
