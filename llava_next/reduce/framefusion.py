"""FrameFusion: merge a video token into the same patch of the previous frame while they are similar, layer
after layer, then prune once by the last query's attention, to a compute budget.

Source: thu-nics/FrameFusion @ fbec1d2e6bd3, framefusion/main.py (``FrameFusion.forward``,
``compute_similarity_and_token_index_by_patch``, ``merge_tokens_and_get_mask``, ``_compute_pruning_ratio``),
framefusion/models/qwen2/modeling_qwen2.py (where it is called: layer 0 before attention, and after every
layer's attention + residual, before the MLP), framefusion/utils.py (the last query's attention, recomputed);
paper arXiv:2501.01986. Defaults: ``apply_framefusion(cost=0.3,
similarity_lower_bound=0.6, ratio_lower_bound=0.1)``.

Each merge step, per prompt: video tokens are grouped by patch (position in the frame grid), in frame
order; ``sim[j] = cos(h[j], h[j-1])`` within a group; r_up = the pruning ratio the budget still allows.
If the fraction of tokens with ``sim >= similarity`` is below r_up it is recorded and, when below
``ratio_floor``, merging stops (pruning comes next); otherwise exactly the top ``int(r_up * n)`` are merged
and both merging and pruning end. Each run of consecutive mergeable tokens of a group is averaged into the
token just before the run (unweighted) and removed. The prune step (after the attention of the layer
where merging stopped) keeps the top ``round(n * (1 - r))`` video tokens by the last query's attention
(mean over heads). Survivors keep their original RoPE positions; a layer's KV cache holds the tokens
alive in its attention, so a merge after layer l's attention shrinks layers > l only. Decode is untouched.
Each layer runs as its attention half then its MLP half (``Decoder.run_layers(..., part=...)``: every hook
point fires, the context's row map naming the original positions of the rows: the MLP half sees the merged
rows).

Named options / differences:
- ``layers_in_budget``: the budget formula's layer count; 0 (default) = the model's own, the official
  code hard-codes 28 (Qwen2-7B; Vicuna-7B has 32). ``layers_in_budget=28`` reproduces it.
- Patch groups come from the request's index map (``patch`` = position in the pooled frame grid, 144 for
  LLaVA-NeXT-Video), not from a per-model constant; image tokens and newline tokens are never merged.
- The official code is batch size 1 (``assert bsz == 1``); here each prompt of a batch keeps its own
  merge/prune state and the batch is re-left-padded after each step.
- ``cost`` larger than what merging alone reaches is fine; ``cost`` too small raises, as the code does
  ("The cost is too small").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..model.context import SequenceMap
from .engine import Fates, Segment, _gather_left_padded, _slot_positions
from .scores import cached_rows
from .stages import PrefillPruner, ReductionError, VisualLayout


def pruning_ratio(sparsity: list[float], cost: float, num_layers: int) -> float:
    """``_compute_pruning_ratio``: the sparsity every remaining layer needs for a mean cost of ``cost``."""
    s, total = 1.0, 0.0
    for x in sparsity:
        s *= 1 - x
        total += s
    remain = num_layers * cost - total
    if remain < 0:
        raise ReductionError(f"framefusion: the cost {cost} is too small for what merging already spent "
                             f"(the official code raises 'The cost is too small'); raise cost")
    if remain / ((num_layers - len(sparsity)) * s) > 1:
        return 0.0
    return 1 - remain / ((num_layers - len(sparsity)) * s)


@dataclass
class _Row:
    sparsity: list
    merging: bool = True
    pruning: bool = True


@dataclass(frozen=True)
class FrameFusion(PrefillPruner):
    cost: float = 0.3  # mean fraction of the video tokens' compute per layer
    similarity: float = 0.6  # similarity_lower_bound (README: 0.6 for LLaVA-Video-7B)
    ratio_floor: float = 0.1  # ratio_lower_bound: stop merging when fewer than this fraction merge
    layers_in_budget: int = 0  # 0: the model's layer count; the code: 28

    name: ClassVar[str] = "framefusion"
    layer: ClassVar[int] = 1  # (Reduction.check) merging starts before layer 0

    def __post_init__(self) -> None:
        if not 0 < self.cost <= 1:
            raise ReductionError(f"framefusion: cost is the mean fraction of video-token compute per layer, in (0, 1]; "
                                 f"got {self.cost!r}")
        if not -1 <= self.similarity <= 2 or not 0 <= self.ratio_floor <= 1 or self.layers_in_budget < 0:
            raise ReductionError("framefusion: similarity in [-1, 1] (above 1: never merge), ratio_floor in [0, 1], "
                                 f"layers_in_budget >= 0; got {self.similarity!r}, {self.ratio_floor!r}, "
                                 f"{self.layers_in_budget!r}")

    def kept(self, visual_tokens: int) -> None:
        return None  # data-dependent

    def select_rows(self, *args, **kwargs):  # the layer-by-layer prefill below replaces the one-layer hook
        raise NotImplementedError("FrameFusion runs its own prefill (FrameFusion.prefill)")

    # ---- the prefill ------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, model, embeds: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None,
                layout: VisualLayout, fates: Fates | None = None
                ) -> tuple[torch.Tensor, list[Segment], list[torch.Tensor]]:
        """Returns the last layer's hidden states (B, T', C), one Segment per layer, and per row the original
        indices still alive. Each layer runs as its two halves (``Decoder.run_layers(..., part=...)``, hook
        points included) with the context's row map saying which original positions its rows are; ``fates``
        (engine.Fates) gets the layer that removed each position and the anchor a merged one went into."""
        B, T, _ = embeds.shape
        L = len(model.layers)
        n_layers = self.layers_in_budget or L
        real = torch.ones(B, T, dtype=torch.bool, device=embeds.device) if key_mask is None else key_mask
        ptype = torch.where((layout.frame >= 0) & (layout.patch >= 0) & real, layout.patch, -1)  # (B, T)
        alive = [torch.nonzero(real[b]).flatten() for b in range(B)]  # original indices per row
        rows = [_Row([]) for _ in range(B)]
        fates = fates if fates is not None else Fates.unreduced(B, T, L, embeds.device)
        x = embeds
        x, pos, mask, alive = self._step(x, position_ids, real, alive, ptype, rows, n_layers, model, None, None, fates)
        segments = []
        for l in range(L):
            Tl = x.shape[1]
            km = None if bool(mask.all()) else mask
            where = _slot_positions(alive, Tl)  # (B, Tl) original position of every row and key of this layer
            ctx = model.context(x, pos, input_pos=torch.arange(Tl, device=x.device), key_mask=km,
                                rows=SequenceMap(where, where, T))
            x_in = x
            x = model.run_layers(x, ctx, range(l, l + 1), part="attention")
            segments.append(Segment(range(l, l + 1), Tl, km, where))
            x, pos, mask, alive = self._step(x, pos, mask, alive, ptype, rows, n_layers, model, l, x_in, fates)
            merged = ctx.with_rows(SequenceMap(_slot_positions(alive, x.shape[1]), where, T))  # the MLP's rows
            x = model.run_layers(x, merged, range(l, l + 1), part="mlp")
        return x, segments, alive

    def _step(self, x, pos, mask, alive, ptype, rows, n_layers, model, layer, x_in, fates):
        """One FrameFusion call for every row (prune or merge), then re-left-pad. ``layer`` None: layer 0
        before attention (no attention weights)."""
        B, T, _ = x.shape
        keep_rows, new_x = [], x.clone()
        needs_attn = [b for b in range(B) if layer is not None and not rows[b].merging and rows[b].pruning]
        last_attn = None
        removed_at = 0 if layer is None else layer + 1
        if needs_attn:  # the last query's attention of this layer, mean over heads (utils.py, num=1)
            probs = cached_rows(model, layer, x_in[:, -1:], pos[:, -1:], None if bool(mask.all()) else mask, T)
            last_attn = probs[:, :, 0].mean(1)  # (B, T)
        for b in range(B):
            idx = torch.nonzero(mask[b]).flatten()  # this row's real slots, in order
            pt = ptype[b, alive[b]]  # patch type of each alive token (aligned with idx)
            state = rows[b]
            keep = torch.ones(len(idx), dtype=torch.bool, device=x.device)
            if b in needs_attn:
                vis = torch.nonzero(pt >= 0).flatten()
                r = pruning_ratio(state.sparsity, self.cost, n_layers)
                top = vis[last_attn[b, idx[vis]].topk(round(len(vis) * (1 - r))).indices]
                keep[vis] = False
                keep[top] = True
                state.pruning = False
            elif state.merging:
                h = new_x[b, idx]  # (n, C)
                keep, into = self._merge(h, pt, state, n_layers)
                new_x[b, idx] = h  # anchors updated in place
                merged = into >= 0
                fates.merged_into[b, alive[b][merged]] = alive[b][into[merged]]
            fates.removed_at[b, alive[b][~keep]] = removed_at
            keep_rows.append(idx[keep])
            alive[b] = alive[b][keep]
        if all(len(k) == int(mask[b].sum()) for b, k in enumerate(keep_rows)):
            return new_x, pos, mask, alive
        x2, pos2, mask2 = _gather_left_padded(new_x, pos, keep_rows)
        return x2, pos2, mask2, alive

    def _merge(self, h: torch.Tensor, pt: torch.Tensor, state: _Row,
               n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One merge step on one row's alive tokens h (n, C) (modified in place); returns the keep mask and,
        per token, the index of the token it was averaged into (-1: not merged)."""
        n = h.shape[0]
        keep = torch.ones(n, dtype=torch.bool, device=h.device)
        into = torch.full((n,), -1, dtype=torch.long, device=h.device)
        r_up = pruning_ratio(state.sparsity, self.cost, n_layers)
        video = int((pt >= 0).sum())
        if video == 0:
            state.merging = False
            return keep, into
        order = torch.nonzero(pt >= 0).flatten()
        order = order[torch.sort(pt[order], stable=True).indices]  # grouped by patch, frame order inside
        a, b2 = h[order[:-1]].float(), h[order[1:]].float()
        sim = (a * b2).sum(-1) / (a.norm(dim=-1) * b2.norm(dim=-1))  # main.py cosine_similarity (no eps)
        sim[pt[order[:-1]] != pt[order[1:]]] = -2
        sim = torch.cat([sim.new_full((1,), -2.0), sim])  # (len(order),): the group's first token never merges
        merge = torch.nonzero(sim >= self.similarity).flatten()
        frac = len(merge) / video
        if frac < r_up:
            state.sparsity.append(frac)
            if frac < self.ratio_floor:
                state.merging = False
        else:
            merge = torch.sort(sim.topk(int(r_up * video)).indices).values
            state.merging = False
            state.pruning = False
        if len(merge) == 0:
            return keep, into
        flag = torch.zeros(len(order), dtype=torch.bool, device=h.device)
        flag[merge] = True
        j = 0
        while j < len(order):  # each maximal run of flagged positions -> averaged into the one before it
            if not flag[j]:
                j += 1
                continue
            start = j
            while j < len(order) and flag[j]:
                j += 1
            anchor, members = order[start - 1], order[start:j]
            h[anchor] = (h[anchor] + h[members].sum(0)) / (len(members) + 1)
            keep[members] = False
            into[members] = anchor
        return keep, into
