"""Attention statistics without a T x T map: exact, query chunk by query chunk, from the layer's own q and k.

    rows = attention_rows(q, k, queries)                     # (B, Hq, |Q|, Tk) fp32, exact softmax rows
    score = attention_rows(q, k, [-1]).mean(1)[:, 0]         # FastV's score: last query, head mean -> (B, Tk)
    stats = attention_stats(q, k, queries, rows=True, key_mass=True, entropy=True, segments=frame_ids)

q (B, Hq, Tq, D) is the post-RoPE query of a decoder call and k (B, Hkv, Tk, D) the keys it attends (the KV
cache prefix, post-RoPE), exactly what the decoder's attention instrument receives (``LayerContext.attend``); the queries sit at the END
of the keys (query i at key position Tk - Tq + i: prefill, chunked prefill and decode alike, the attention
facade's rule), ``key_mask`` (B, Tk) marks real keys (left padding). ``queries`` are indices into the Tq
queries (negative counts from the end).

How: for a chunk of c queries, scores = q_c k^T / sqrt(D) in fp32 (GQA by grouping the query heads of one kv
head, K never repeated), masked causally, softmaxed; every statistic is reduced from that (B, Hq, c, Tk)
block, which is then dropped. Extra memory is bounded by Hq x c x Tk floats (plus one fp32 copy of K),
never Hq x Tq x Tk; ``chunk`` defaults to what fits ``CHUNK_BYTES`` (32 MiB). Sums per segment are a
matmul with a (Tk, S) one-hot matrix (index_add_ along the key axis is a scalar loop on CPU). The numbers are those of
transformers' eager attention (fp32 softmax of the scaled scores): the parity tests compare with its
``output_attentions``.

What it returns (``AttentionStats``; every field per head, ``.mean_heads()`` averages them):

    rows             (B, Hq, |Q|, Tk)   exact probabilities of the chosen queries (LVLM-Interpret heatmaps,
                                         FastV's last-query score)
    key_mass         (B, Hq, Tk)        attention each key receives, summed over the chosen queries
                                         (column sums: "received" scores, sinks)
    entropy          (B, Hq, |Q|)       -sum p log p per chosen query
    topk_values/ids  (B, Hq, |Q|, k)    the k most-attended keys of each chosen query
    segment_rows     (B, Hq, |Q|, S)    each chosen query's mass per key segment (frames, tiles, text parts)
    segment_map      (B, Hq, S, S)      mass summed over ALL queries of a segment (rows) to key segments
                                         (columns): the layer x frame chart; with ``block`` it is the
                                         block-pooled map (FastV's figure) instead of a segment one
    segment_counts   (S,)               queries per segment (segment_map / counts = the mean row)

``segments`` is a LongTensor mapping each key position to a segment id 0..S-1 (e.g. frame index, from token
provenance); keys past its end (tokens generated after the prompt) get the extra id S. A negative id (e.g.
``prov.frame``'s -1 on text positions) puts the position in no segment: its keys count in no column of
``segment_rows`` / ``segment_map`` (a row's segment sums then add up to its mass on segmented keys), its
queries in no row of ``segment_map`` nor in ``segment_counts``.

On CUDA the Triton kernel ``flash_attention_with_key_mass`` (kernels/llava_next_kernels/attention.py) computes
``key_mass`` when it is the only statistic asked for (``key_mass_triton``); tests check it against this path
under the Triton interpreter. Rows, entropy, top-k and segment sums use this PyTorch path on every device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from ..model.attention import CHUNK_BYTES, Groups, attention_probs, iter_probs, pad_keys


class ResearchError(ValueError):
    """A research request that cannot be served (unknown hook, bad positions, layer out of range, ...): the
    message says what was wrong and what to do. A ValueError: the CLI reports it as a user error."""


def _as_index(queries: torch.Tensor | Sequence[int] | int, n: int, device: torch.device) -> torch.Tensor:
    """Query indices (negative from the end) -> LongTensor in [0, n), checked."""
    idx = torch.as_tensor(queries, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() and (bool((idx < -n).any()) or bool((idx >= n).any())):
        raise ResearchError(f"query index out of range for {n} queries: got {idx.min().item()}..{idx.max().item()}")
    return idx % n if n else idx


def attention_rows(q: torch.Tensor, k: torch.Tensor, queries: torch.Tensor | Sequence[int] | int = -1, *,
                   key_mask: torch.Tensor | None = None, chunk: int | None = None,
                   groups: Groups | None = None) -> torch.Tensor:
    """Exact attention probabilities of the chosen queries: (B, Hq, |Q|, Tk) fp32 (module docstring)."""
    idx = _as_index(queries, q.shape[2], q.device)
    return attention_probs(q, k, idx, key_mask=key_mask, chunk=chunk, groups=groups)


@dataclass
class AttentionStats:
    """Statistics of one attention call (module docstring); fields not asked for are None."""

    queries: torch.Tensor  # (|Q|,) query indices within the call
    query_positions: torch.Tensor  # (|Q|,) their key positions (= sequence positions)
    rows: torch.Tensor | None = None
    key_mass: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    topk_values: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    segment_rows: torch.Tensor | None = None
    segment_map: torch.Tensor | None = None
    segment_counts: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def mean_heads(self) -> "AttentionStats":
        """The same statistics averaged over heads (dim 1); top-k is per head and dropped."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("rows", "key_mass", "entropy", "segment_rows", "segment_map") and v is not None:
                v = v.mean(dim=1)
            elif f.name in ("topk_values", "topk_ids"):
                v = None
            out[f.name] = v
        return AttentionStats(**out)

    def to(self, device: torch.device | str) -> "AttentionStats":
        return AttentionStats(**{f.name: v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                                 for f in fields(self)})


def _one_hot(seg: torch.Tensor, S: int) -> torch.Tensor:
    """(Tk, S) fp32 one-hot of the key segments: probs (..., Tk) @ it = mass per segment (..., S); a negative
    id (no segment) is a zero row."""
    hot = torch.zeros(seg.numel(), S + 1, device=seg.device).scatter_(1, torch.where(seg < 0, S, seg)[:, None], 1.0)
    return hot[:, :S]


def _segment_ids(segments: torch.Tensor, Tk: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(Tk,) segment id per key (keys past the given ids -> one extra id) and the number of segments."""
    segments = torch.as_tensor(segments, dtype=torch.long, device=device).reshape(-1)
    S = max(int(segments.max()) + 1, 0) if segments.numel() else 0  # ids < 0: no segment
    if segments.numel() >= Tk:
        return segments[:Tk], S
    return torch.cat([segments, segments.new_full((Tk - segments.numel(),), S)]), S + 1


def attention_stats(q: torch.Tensor, k: torch.Tensor, queries: torch.Tensor | Sequence[int] | int | None = None, *,
                    key_mask: torch.Tensor | None = None, rows: bool = False, key_mass: bool = False,
                    entropy: bool = False, topk: int = 0, segments: torch.Tensor | None = None,
                    segment_map: bool = False, block: int = 0, chunk: int | None = None,
                    groups: Groups | None = None, key_positions: torch.Tensor | None = None) -> AttentionStats:
    """Reduce the attention of one call to the statistics asked for (module docstring).

    queries: indices into the call's Tq queries (None = all). ``segments`` (LongTensor of key segment ids)
    enables ``segment_rows`` for the chosen queries; ``segment_map`` (needs ``segments``) or ``block`` > 0
    adds the all-query map (a second pass over all queries when ``queries`` is a subset). ``key_positions``
    (Tk,): the keys' original sequence positions when they are not 0..Tk-1 (a pruned layer,
    llava_next.reduce): ``block`` pools by them."""
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    device = q.device
    idx = torch.arange(Tq, device=device) if queries is None else _as_index(queries, Tq, device)
    out = AttentionStats(queries=idx, query_positions=idx + (Tk - Tq))
    seg = S = None
    if segments is not None:
        seg, S = _segment_ids(segments, Tk, device)
        seg_hot = _one_hot(seg, S)
    per_query = rows or key_mass or entropy or topk or seg is not None
    if per_query:
        parts: dict[str, list[torch.Tensor]] = {"rows": [], "entropy": [], "tv": [], "ti": [], "seg": []}
        mass = torch.zeros(B, Hq, Tk, device=device) if key_mass else None
        for _, p in iter_probs(q, k, idx, key_mask=key_mask, chunk=chunk, groups=groups):  # p (B, Hq, c, kc)
            kc = p.shape[-1]
            if rows:
                parts["rows"].append(pad_keys(p, Tk))
            if mass is not None:
                mass[..., :kc] += p.sum(dim=2)
            if entropy:
                parts["entropy"].append(-(p * p.clamp_min(1e-30).log()).sum(-1))  # 0 log 0 = 0
            if topk:
                v, i = pad_keys(p, Tk).topk(min(topk, Tk), dim=-1)
                parts["tv"].append(v)
                parts["ti"].append(i)
            if seg is not None:
                parts["seg"].append(p @ seg_hot[:kc])  # (B, Hq, c, S)
        cat = lambda name: torch.cat(parts[name], dim=2) if parts[name] else None  # noqa: E731
        out.rows, out.entropy, out.segment_rows = cat("rows"), cat("entropy"), cat("seg")
        out.topk_values, out.topk_ids, out.key_mass = cat("tv"), cat("ti"), mass
    if segment_map or block:
        if block:
            at = torch.arange(Tk, device=device) if key_positions is None else key_positions.to(device)
            map_seg = at // block
            map_S = int(map_seg.max()) + 1 if Tk else 0
        elif seg is None:
            raise ResearchError("segment_map needs segments (a LongTensor of segment ids, one per position)")
        else:
            map_seg, map_S = seg, S
        out.segment_map, out.segment_counts = _segment_map(q, k, map_seg, map_S, key_mask, chunk, groups)
    return out


def _segment_map(q: torch.Tensor, k: torch.Tensor, seg: torch.Tensor, S: int, key_mask: torch.Tensor | None,
                 chunk: int | None, groups: Groups | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The all-query segment x segment map (B, Hq, S, S) and the queries per segment (S,)."""
    B, Hq, Tq, _ = q.shape
    q_seg = seg[k.shape[2] - Tq:]  # segment of each query (queries sit at the end of the keys)
    hot = _one_hot(seg, S)
    smap = torch.zeros(B, Hq, S, S, device=q.device)
    in_seg = torch.nonzero(q_seg >= 0).flatten()  # queries of no segment (id < 0) add to no row
    for qi, p in iter_probs(q, k, in_seg, key_mask=key_mask, chunk=chunk, groups=groups):
        smap.index_add_(2, q_seg[qi], p @ hot[:p.shape[-1]])  # (B, Hq, c, S) per query
    return smap, torch.bincount(q_seg[in_seg], minlength=S)


# ---- CUDA: the Triton key-mass kernel ---------------------------------------------------------------------
def key_mass_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, queries: torch.Tensor | Sequence[int] | None = None,
                    *, key_mask: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """``key_mass`` (B, Hq, Tk) fp32 of the chosen queries from ``flash_attention_with_key_mass``.

    Not for knocked-out layers (the kernel takes no group table). The kernel sums over every query it is given, with causality relative to the end of the keys; a query
    subset is passed with an explicit (B, 1, c, Tk) mask that restores each query's own causal horizon,
    c queries at a time (the kernel's attention output is discarded)."""
    from llava_next_kernels.attention import flash_attention_with_key_mass

    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    idx = torch.arange(Tq, device=q.device) if queries is None else _as_index(queries, Tq, q.device)
    keys = torch.arange(Tk, device=q.device)
    mass = torch.zeros(B, Hq, Tk, device=q.device)
    for part in idx.split(chunk or max(1, CHUNK_BYTES // max(1, B * Tk))):
        allowed = (keys[None, :] <= (part + (Tk - Tq))[:, None])[None].expand(B, -1, -1)  # (B, c, Tk)
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, :]
        _, m = flash_attention_with_key_mass(q[:, :, part], k, v, causal=False, mask=allowed[:, None].contiguous())
        mass += m
    return mass
