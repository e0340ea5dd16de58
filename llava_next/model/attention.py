"""The attention facade: one function every attention layer calls, and the switch that picks a backend.

    attention(q, k, v, causal=..., mask=...) -> (B, Hq, Tq, D)

q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D) with Hq a multiple of Hkv (GQA: query head h reads kv head
h // (Hq // Hkv); K/V are never repeated in memory by the fast backends). ``causal=True`` aligns the
queries to the *end* of the keys: query i sits at key position Tk - Tq + i (prefill, chunked prefill
and one-token decode against a KV cache are all the same call). ``mask`` is an optional boolean
(B, 1, Tq, Tk) or (B, 1, 1, Tk) tensor, True = may attend (left padding in a batch); it is combined
with the causal rule. A query row that may see no key at all (a left-padding row) must come out as
zeros, never NaN, in every backend: NaN would spread to real rows through 0 x NaN in later layers.

Backends
- "sdpa":   torch.nn.functional.scaled_dot_product_attention (the CPU fast path).
- "eager":  the textbook softmax(q k^T / sqrt(d)) v in fp32 — the reference the others are tested against.
- "triton": the kernels in llava_next_kernels (the CUDA fast path), imported from that package.
- "auto":   triton on CUDA when available; on CPU, one query without a mask (decoding one token) goes
            to cpu_decode.attention_one_query (compiled; SDPA's CPU kernel reads the KV cache ~4x slower),
            everything else to sdpa.

``use_backend("eager")`` is a context manager that forces one backend (tests run both paths on the
same inputs with it).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F

from . import cpu_decode

Backend = Literal["auto", "sdpa", "eager", "triton"]
AttentionFn = Callable[..., torch.Tensor]

_forced: Backend = "auto"
_triton_fn: AttentionFn | None = None  # imported on first use
_triton_error: str | None = None  # why the import failed, for the error a forced "triton" raises


@contextlib.contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    global _forced
    if name not in ("auto", "sdpa", "eager", "triton"):
        raise ValueError(f"unknown attention backend {name!r}; choose auto, sdpa, eager or triton")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def current_backend(device: torch.device) -> Backend:
    if _forced != "auto":
        return _forced
    if device.type == "cuda" and _load_triton() is not None:
        return "triton"
    return "sdpa"


def _load_triton() -> AttentionFn | None:
    """The Triton kernel, imported on first use (None if triton or the kernels are unavailable)."""
    global _triton_fn, _triton_error
    if _triton_fn is None and _triton_error is None:
        try:
            from llava_next_kernels.attention import flash_attention

            _triton_fn = flash_attention
        except ImportError as e:
            _triton_error = str(e)
    return _triton_fn


def triton_available() -> bool:
    """Whether the Triton kernels import (the `kernels` extra is installed); "auto" uses them on CUDA only then."""
    return _load_triton() is not None


def causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i (at key position tk - tq + i) may see key j."""
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
    return torch.arange(tk, device=device)[None, :] <= q_pos


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    backend = current_backend(q.device)
    if _forced == "auto" and q.device.type == "cpu" and q.shape[-2] == 1 and mask is None and cpu_decode.enabled():
        return cpu_decode.attention_one_query(q, k, v)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, causal=causal, mask=mask)
    if backend == "eager":
        return eager_attention(q, k, v, causal=causal, mask=mask)
    fn = _load_triton()
    if fn is None:
        raise RuntimeError(f"attention backend 'triton' requested but the Triton kernels cannot be imported: {_triton_error}")
    return fn(q, k, v, causal=causal, mask=mask)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    tq, tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    causal = causal and tq > 1  # one query at the end of the keys sees every key: nothing to mask
    if mask is None and (not causal or tq == tk):
        # square causal, full attention or one-token decode: SDPA's own flags pick its fastest kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    allowed = causal_mask(tq, tk, q.device) if causal else None
    if mask is not None:
        allowed = mask if allowed is None else (mask & allowed)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: fp32 scores and softmax, K/V heads repeated explicitly. Rows with no visible key give 0."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(D)  # (B, Hq, Tq, Tk)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = causal_mask(Tq, Tk, q.device)
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    return (probs @ v.float()).to(q.dtype)  # (B, Hq, Tq, D)
