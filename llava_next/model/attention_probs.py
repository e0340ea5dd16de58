"""Exact attention probabilities, query chunk by query chunk, never a T x T map: eager
attention's fp32 softmax(q k^T / sqrt(D)), for the research instruments
(``research.attention``: rows, key mass, entropy, top-k, segment maps) and the reduction methods' scores
(``reduce.scores``, FastV's last-query score).

    probs = attention_probs(q, k, idx, key_mask=mask)        # (B, Hq, |idx|, Tk) fp32, exact softmax rows
    for idx, p in iter_probs(q, k, queries): ...              # (B, Hq, c, kc) per chunk of c queries

q (B, Hq, Tq, D) is the post-RoPE query and k (B, Hkv, Tk, D) the keys it attends; the queries sit at the
END of the keys (query i at key position Tk - Tq + i), ``key_mask`` (B, Tk) marks real keys, ``idx`` are
query indices in [0, Tq) (``research.attention.attention_rows`` checks and wraps negative ones). The
method and its parity with transformers' eager attention: research/attention.py's docstring. Here, in the
model layer, because both research and reduce use it and reduce may not import research
(docs/architecture.md).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

CHUNK_BYTES = 32 << 20  # default budget of one (B, Hq, chunk, Tk) fp32 probability block


def default_chunk(batch: int, heads: int, keys: int, budget: int = CHUNK_BYTES) -> int:
    """Queries per chunk so one fp32 (batch, heads, chunk, keys) block fits ``budget`` bytes (at least 1)."""
    return max(1, budget // (4 * batch * heads * keys))


Groups = tuple[torch.Tensor, torch.Tensor]  # (group id per key position (Tk,), allowed table (G, G) bool)


def allowed_block(query_idx: torch.Tensor, Tq: int, Tk: int, key_mask: torch.Tensor | None = None,
                  groups: Groups | None = None, width: int | None = None) -> torch.Tensor:
    """Which of the first ``width`` (default Tk) keys the chosen queries may see: (c, width) or (B, 1, c, width)
    bool. Causal (queries at the end of the keys), ``key_mask`` (B, Tk), and a knockout group table: query at
    position i may see key j only if ``table[group[i], group[j]]`` (O(T + G^2) instead of a dense T x T mask)."""
    width = Tk if width is None else width
    keys = torch.arange(width, device=query_idx.device)
    pos = query_idx + (Tk - Tq)
    allowed = keys[None, :] <= pos[:, None]  # (c, width)
    if groups is not None:
        g, table = groups
        allowed = allowed & table[g[pos]][:, g[:width]]
    if key_mask is not None:
        allowed = (allowed[None] & key_mask[:, None, :width])[:, None]  # (B, 1, c, width)
    return allowed


def iter_probs(q: torch.Tensor, k: torch.Tensor, queries: torch.Tensor, *, key_mask: torch.Tensor | None = None,
               chunk: int | None = None, groups: Groups | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (query indices (c,), probabilities (B, Hq, c, kc) fp32) chunk by chunk; rows seeing no key are 0.

    kc <= Tk: only the keys up to the chunk's last query position (the later ones have probability 0 by
    causality and are not computed: half the work of an all-query pass)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    chunk = chunk or default_chunk(B, Hq, Tk)
    k32 = k.float().transpose(-1, -2)[:, :, None]  # (B, Hkv, 1, D, Tk)
    scale = 1.0 / math.sqrt(D)
    for idx in queries.split(chunk):
        kc = int(idx.max()) + (Tk - Tq) + 1  # keys this chunk can see
        qc = q[:, :, idx].float().reshape(B, Hkv, G, idx.numel(), D)  # query heads grouped by kv head
        scores = (qc @ k32[..., :kc]).reshape(B, Hq, idx.numel(), kc) * scale  # (B, Hq, c, kc)
        scores.masked_fill_(~allowed_block(idx, Tq, Tk, key_mask, groups, width=kc), float("-inf"))
        yield idx, torch.softmax(scores, dim=-1).nan_to_num_(0.0)


def attention_probs(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                    chunk: int | None = None, groups: Groups | None = None) -> torch.Tensor:
    """Exact attention probabilities of the queries ``idx`` (LongTensor in [0, Tq)): (B, Hq, |idx|, Tk) fp32."""
    Tk = k.shape[2]
    parts = [pad_keys(p, Tk) for _, p in iter_probs(q, k, idx, key_mask=key_mask, chunk=chunk, groups=groups)]
    return torch.cat(parts, dim=2)


def pad_keys(p: torch.Tensor, Tk: int) -> torch.Tensor:
    """(..., kc) probabilities -> (..., Tk), zeros for the keys the queries cannot see."""
    return p if p.shape[-1] == Tk else torch.nn.functional.pad(p, (0, Tk - p.shape[-1]))
