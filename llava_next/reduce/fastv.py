"""FastV: keep the visual tokens the last query attends to most at layer K-1, drop the rest from layer K on.

Source: pkunlp-icler/FastV @ d1659729b5bf, src/transformers/src/transformers/models/llama/modeling_llama.py
L717-760 (the inplace KV-cache-free version) and src/FastV/lmms-eval/fastv_kvcache.py L119-125 (the
lmms-eval KV-cache version, whose ``ratio`` is our ``keep``); paper arXiv:2403.06764.

What the official code does, and what this does:
- score = attention probabilities output by layer K-1 (0-indexed), mean over heads, row of the LAST
  query, restricted to the visual keys (``torch.mean(attn, dim=1)[0][-1][vis]``);
- keep the top ``int(n_visual * keep)`` visual tokens (fastv_kvcache.py: ``int(576 * ratio)``), plus
  every text / system token, in original order (``sort(cat(prefix, topk, suffix))``);
- kept tokens keep their ORIGINAL position ids (``position_ids = keep_indexs``), with gaps;
- layers < K keep the full KV cache, layers >= K the pruned one; pruned once, never re-ranked in decode.

Named options (paper vs code, code vs code):
- ``score="last_query"`` (the code) or ``"all_queries"`` (the paper's "average attention-score one token
  received from all other tokens", FastV issues #14/#44/#48): the attention mass a key receives from
  every real query, divided by the number of queries that can see it under the causal mask (without
  that division early frames win; that the paper normalises this way is not verified).
- ``keep`` is the fraction KEPT. The official scripts mix three conventions (``ATTENTION_RANK`` = count
  kept, HF ``fastv_r`` = fraction pruned, lmms-eval ``ratio`` = fraction kept); only the last is used here.
- Candidates are every visual token of the prompt (all frames of a video, all images: one global top-k),
  from the request's index map, not the hard-coded ``SYS_LENGTH=35/36, IMAGE_TOKEN_LENGTH=576``.
- Not done: the official code's duplicate run of layer K-1 (issue #46: a second copy of its KV), the
  older file's reuse of layer K's KV in deeper layers and ``position_ids = len(keep)`` in decode (issue
  #49), and K=0's random selection (``layer`` must be >= 1). Batches of any size (the code: 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..model.attention import attention_probs
from ..model.decoder import Decoder
from .scores import cached_rows, layer_queries
from .stages import PrefillPruner, ReductionError, VisualLayout

Score = Literal["last_query", "all_queries"]


def fastv_score(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """FastV's token score: the last query's attention row, averaged over heads -> (B, Tk) fp32.

    FastV (pkunlp-icler/FastV, ``modeling_llama.py``) ranks image tokens by this row at layer K-1 and keeps the
    top ones from layer K on. Inside a forward, from the hook points of layer K-1 (both fire before layer K):

        with trace(model, hooks=[("blocks.{K-1}.attn.hook_rot_q", keep_q),            # (B, T, Hq, D)
                                 ("blocks.{K-1}.attn.hook_rot_k", score_from_k)]):   # (B, T, Hkv, D)
            ...   # score_from_k: fastv_score(q.transpose(1, 2), k.transpose(1, 2)) at prefill

    or after it: ``trace(model, attention=Attention(layers=[K - 1], queries="last", heads="mean"))`` then
    ``tr.attention[K - 1].rows[:, 0]``. (``llava_next.research`` exports it too.)"""
    last = torch.tensor([q.shape[2] - 1], device=q.device)
    return attention_probs(q, k, last, key_mask=key_mask).mean(1)[:, 0]


@dataclass(frozen=True)
class FastV(PrefillPruner):
    """Defaults: the paper/README's "FastV K=2 R=50%" (README; lmms-eval file: K=3, keep 0.5)."""

    layer: int = 2  # K: prune before this decoder layer; scores from layer K-1
    keep: float = 0.5  # fraction of the visual tokens kept
    score: Score = "last_query"

    name: ClassVar[str] = "fastv"

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 1:
            raise ReductionError(f"fastv: layer must be an integer >= 1 (scores come from layer-1's attention; "
                                 f"the official K=0 picks tokens at random), got {self.layer!r}")
        if not 0 < self.keep <= 1:
            raise ReductionError(f"fastv: keep is the fraction of visual tokens kept, in (0, 1], got {self.keep!r}")
        if self.score not in ("last_query", "all_queries"):
            raise ReductionError(f"fastv: score must be 'last_query' (official code) or 'all_queries' (paper), "
                                 f"got {self.score!r}")

    def scores(self, decoder: Decoder, hidden_in: torch.Tensor, position_ids: torch.Tensor,
               key_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T) fp32 importance of every key (callers restrict to visual keys)."""
        B, T, _ = hidden_in.shape
        if self.score == "last_query":  # fastv_score on layer K-1's last query and cached keys
            q = layer_queries(decoder, self.layer - 1, hidden_in[:, -1:], position_ids[:, -1:])  # (B, H, 1, D)
            k = decoder.layers[self.layer - 1].self_attn.kv_cache.k[:, :, :T]
            return fastv_score(q, k, key_mask)  # (B, T): mean over heads of the last row
        probs = cached_rows(decoder, self.layer - 1, hidden_in, position_ids, key_mask, T)  # (B, H, T, T)
        real = torch.ones(B, T, dtype=torch.bool, device=hidden_in.device) if key_mask is None else key_mask
        mass = (probs * real[:, None, :, None]).sum(2)  # (B, H, T): received from every real query
        seeing = real.flip(1).long().cumsum(1).flip(1).clamp(min=1)  # real queries at or after each key
        return (mass / seeing[:, None]).mean(1)

    def select_rows(self, decoder, hidden_in, hidden_out, position_ids, key_mask, layout: VisualLayout) -> list[torch.Tensor]:
        return select_top(self.scores(decoder, hidden_in, position_ids, key_mask), layout.visual, key_mask,
                          self.keep)


def select_top(scores: torch.Tensor, visual: torch.Tensor, key_mask: torch.Tensor | None,
               keep: float) -> list[torch.Tensor]:
    """Per row: sorted indices of every real non-visual token plus the top ``int(n_visual * keep)`` visual
    tokens by ``scores`` (B, T)."""
    B, T = scores.shape
    real = torch.ones(B, T, dtype=torch.bool, device=scores.device) if key_mask is None else key_mask
    out = []
    for b in range(B):
        vis = torch.nonzero(visual[b] & real[b]).flatten()
        n_keep = int(len(vis) * keep)
        top = vis[scores[b, vis].topk(n_keep).indices]
        text = torch.nonzero(real[b] & ~visual[b]).flatten()
        out.append(torch.cat([text, top]).sort().values)
    return out
