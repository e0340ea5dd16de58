"""Attention maths, all of it: the facade every layer calls, the one-query decode kernel, exact
probabilities query chunk by query chunk, and knockout-restricted attention. Model, research and reduce
all import it from here; nothing else computes softmax(q k^T / sqrt(d)).

    attention(q, k, v, causal=..., mask=...) -> (B, Hq, Tq, D)          the facade (backends below)
    one_query_attention(q, k, v, allowed=None) -> (B, Hq, 1, D)         decoding one token (compiled engines)
    attention_probs(q, k, idx, key_mask=...) -> (B, Hq, |idx|, Tk)      exact fp32 rows, never T x T
    grouped_attention(q, k, v, groups) -> (B, Hq, Tq, D)                attention under a knockout table

q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D) with Hq a multiple of Hkv (GQA: query head h reads kv head
h // (Hq // Hkv); K/V are never repeated in memory by the fast paths). ``causal=True`` aligns the
queries to the *end* of the keys: query i sits at key position Tk - Tq + i (prefill, chunked prefill
and one-token decode against a KV cache are all the same call). ``mask`` is an optional boolean
(B, 1, Tq, Tk) or (B, 1, 1, Tk) tensor, True = may attend (left padding in a batch); it is combined
with the causal rule. A query row that may see no key at all (a left-padding row) must come out as
zeros, never NaN, in every backend: NaN would spread to real rows through 0 x NaN in later layers.

Facade backends
- "sdpa":   torch.nn.functional.scaled_dot_product_attention (the CPU fast path).
- "eager":  the textbook softmax(q k^T / sqrt(d)) v in fp32 — the reference the others are tested against.
- "triton": the kernels in llava_next_kernels (the CUDA fast path), imported from that package.
- "auto":   triton on CUDA when available (sdpa for a call that needs a gradient: the kernels have no
            backward), else sdpa.
``use_backend("eager")`` is a context manager that forces one backend (tests run both paths on the
same inputs with it). Which kernel a *decode step* uses (the compiled one-query attention, say) is the
engine's choice, passed down in the layer context (model/context.py, model/engines.py), not a switch here.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F

from .policy import CHUNK_BYTES

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


def forced_backend() -> Backend:
    """The backend ``use_backend`` forces now ("auto" outside it); engines keep their own kernels only under "auto"."""
    return _forced


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
    if backend == "triton" and _forced == "auto" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                                 or v.requires_grad):
        backend = "sdpa"  # the Triton kernels have no backward: a training step takes SDPA's
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


# ---- one query against a whole cache: the decode step's attention ----------------------------------
def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        allowed: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, 1, D) against k, v (B, Hkv, S, D) -> (B, Hq, 1, D); ``allowed`` (B, S) bool masks keys.

        out[b, h] = sum_s softmax_s(q[b, h] . k[b, g, s] / sqrt(D)) v[b, g, s]      g = h // (Hq / Hkv)

    in float32, rounded once at the end (as SDPA does). Written as plain elementwise products and sums so
    that torch.compile (inductor's C++ backend) turns it into one streaming pass over the cache: the
    compiled decode engines (model/engines.py) use it; eagerly it is a reference."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, 1, D).float()  # (B, Hkv, G, 1, D): query heads grouped by kv head
    scores = (qg * k[:, :, None].float()).sum(-1) * (1.0 / math.sqrt(D))  # (B, Hkv, G, S)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # (B, Hkv, G, D)
    return out.reshape(B, Hq, 1, D).to(q.dtype)


# ---- exact probabilities, query chunk by query chunk --------------------------------------------------
# For the research instruments (research/attention.py: rows, key mass, entropy, top-k, segment maps) and the
# reduction methods' scores (FastV's last-query row, DyCoke's decode row, VisionZip's CLS row): eager
# attention's fp32 softmax(q k^T / sqrt(D)), never a T x T map. ``q`` is the post-RoPE query, ``k`` the keys
# it attends, the queries at the END of the keys; ``key_mask`` (B, Tk) marks real keys; ``idx`` are query
# indices in [0, Tq). Parity with transformers' eager attention: tests/test_attention_stats.py.

def default_chunk(batch: int, heads: int, keys: int, budget: int = CHUNK_BYTES) -> int:
    """Queries per chunk so one fp32 (batch, heads, chunk, keys) block fits ``budget`` bytes (at least 1)."""
    return max(1, budget // (4 * batch * heads * keys))


Groups = tuple[torch.Tensor, torch.Tensor]  # (group id per key position (Tk,), allowed table (G, G) bool)


def allowed_block(query_idx: torch.Tensor, Tq: int, Tk: int, key_mask: torch.Tensor | None = None,
                  groups: Groups | None = None, width: int | None = None, causal: bool = True) -> torch.Tensor:
    """Which of the first ``width`` (default Tk) keys the chosen queries may see: (c, width) or (B, 1, c, width)
    bool. Causal (queries at the end of the keys), ``key_mask`` (B, Tk), and a knockout group table: query at
    position i may see key j only if ``table[group[i], group[j]]`` (O(T + G^2) instead of a dense T x T mask)."""
    width = Tk if width is None else width
    keys = torch.arange(width, device=query_idx.device)
    pos = query_idx + (Tk - Tq)
    allowed = keys[None, :] <= pos[:, None] if causal else keys[None, :] >= 0  # (c, width)
    if groups is not None:
        g, table = groups
        allowed = allowed & table[g[pos]][:, g[:width]]
    if key_mask is not None:
        allowed = (allowed[None] & key_mask[:, None, :width])[:, None]  # (B, 1, c, width)
    return allowed


def iter_probs(q: torch.Tensor, k: torch.Tensor, queries: torch.Tensor, *, key_mask: torch.Tensor | None = None,
               chunk: int | None = None, groups: Groups | None = None,
               causal: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (query indices (c,), probabilities (B, Hq, c, kc) fp32) chunk by chunk; rows seeing no key are 0.

    kc <= Tk: only the keys up to the chunk's last query position (the later ones have probability 0 by
    causality and are not computed: half the work of an all-query pass). ``causal=False``: every query sees
    every key (a vision tower's attention).

    Memory: every chunk's scores, scaling, mask and softmax happen in place in ONE buffer of
    B x Hq x chunk x Tk floats (``CHUNK_BYTES`` by default), allocated once per call, so the extra memory is
    that buffer plus one fp32 copy of K, whatever the number of chunks. The yielded block is a view of the
    buffer, valid until the next chunk: a caller that keeps it copies it (``pad_keys`` does)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    chunk = chunk or default_chunk(B, Hq, Tk)
    k32 = k.float().reshape(B * Hkv, Tk, D)
    scale = 1.0 / math.sqrt(D)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)  # autograd takes no out= buffers
    buf = None if grad else torch.empty(B * Hq * min(chunk, queries.numel()) * Tk, device=q.device)
    for idx in queries.split(chunk):
        c = idx.numel()
        kc = int(idx.max()) + (Tk - Tq) + 1 if causal else Tk  # keys this chunk can see
        qc = q[:, :, idx].float().reshape(B * Hkv, G * c, D)  # query heads grouped by kv head: K never repeated
        out = None if buf is None else buf[:B * Hq * c * kc].view(B * Hkv, G * c, kc)
        scores = torch.bmm(qc, k32[:, :kc].transpose(1, 2), out=out).view(B, Hq, c, kc).mul_(scale)
        scores.masked_fill_(~allowed_block(idx, Tq, Tk, key_mask, groups, width=kc, causal=causal), float("-inf"))
        probs = torch.softmax(scores, dim=-1) if buf is None else torch.softmax(scores, dim=-1, out=scores)
        yield idx, probs.nan_to_num_(0.0)


def attention_probs(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                    chunk: int | None = None, groups: Groups | None = None, causal: bool = True) -> torch.Tensor:
    """Exact attention probabilities of the queries ``idx`` (LongTensor in [0, Tq)): (B, Hq, |idx|, Tk) fp32."""
    Tk = k.shape[2]
    parts = [pad_keys(p, Tk) for _, p in iter_probs(q, k, idx, key_mask=key_mask, chunk=chunk, groups=groups,
                                                   causal=causal)]
    return torch.cat(parts, dim=2)


def pad_keys(p: torch.Tensor, Tk: int) -> torch.Tensor:
    """(..., kc) probabilities -> a new (..., Tk) tensor, zeros for the keys the queries cannot see (a copy
    even when kc == Tk: ``iter_probs`` reuses its block for the next chunk)."""
    return p.clone() if p.shape[-1] == Tk else torch.nn.functional.pad(p, (0, Tk - p.shape[-1]))


# ---- attention under a knockout table (research.interventions.knockout) --------------------------------
def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: Groups, *,
                      key_mask: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Causal attention (queries at the end of the keys) restricted by a knockout group table: (B, Hq, Tq, D).

    Extra memory: one (chunk, Tk) boolean mask and SDPA's own per-chunk buffers, never (Tq, Tk). Each chunk
    reads only the keys up to its last query."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    chunk = chunk or default_chunk(B, Hq, Tk)
    out = torch.empty_like(q)
    for idx in torch.arange(Tq, device=q.device).split(chunk):
        kc = int(idx[-1]) + (Tk - Tq) + 1  # keys the chunk can see (causal)
        allowed = allowed_block(idx, Tq, Tk, key_mask, groups, width=kc)  # (c, kc) or (B, 1, c, kc)
        y = F.scaled_dot_product_attention(q[:, :, idx], k[:, :, :kc], v[:, :, :kc], attn_mask=allowed,
                                           enable_gqa=Hq != k.shape[1])
        empty = ~allowed.any(-1)  # rows that may see no key: zeros, never NaN
        if bool(empty.any()):
            y = y.masked_fill(empty[..., None] if empty.dim() == 4 else empty[None, None, :, None], 0.0)
        out[:, :, idx] = y
    return out
