"""DyCoke: temporal token merging before the decoder (TTM) + dynamic KV selection during decode.

Source: KD-TAO/DyCoke @ dd7463498203 (read at 26dc6f4f / 2325b63d): llava/model/llava_arch.py
``dycole_ttm`` (sic) and llava/model/language_model/modeling_qwen2.py ``PrunableDynamicCache
.dycoke_pruning / update_cache`` and ``Qwen2Model.forward``; lmms-eval defaults ``dycoke_l=3,
dycoke_p=0.8, dycoke_k=0.7``; paper arXiv:2411.15024 (CVPR'25).

Stage 1, ``DyCokeMerge`` (``dycoke-ttm``), on the model's pooled, projected frame tokens (F, N, D):
within pairs of frames (0,1), (2,3), ... the later frame keeps only its ``int(keep * N)`` tokens LEAST
similar (cosine, same patch) to a reference frame; within groups of four, frame 4g+2 is also pruned
against frame 4g. (Despite the name it prunes, it does not average.) ``keep`` = 1 - the code's
``merging_ratio`` (``dycoke_k``).

``variant="code"`` reproduces ``dycole_ttm`` exactly, including what it does unlike the paper:
- the odd frame 2j+1 is pruned with the similarities of the PREVIOUS pair ``similarities[(i - 2) // 2]``
  (frames 2j-2, 2j-1; for j = 0 Python's index -1 takes the last pair);
- the group pass runs ``range(0, F - 4, 4)``: the last complete group's frame 4g+2 is never pruned;
- kept tokens are in ``topk`` order (by similarity), not spatial order;
- with an odd number of frames the last frame is dropped.
``variant="paper"``: each later frame against its own reference (2j+1 vs 2j; 4g+2 vs 4g for every group
that has that frame), kept tokens in spatial order, an odd last frame kept whole.

Stage 2, ``DyCokeDecode`` (``dycoke``): at every decode step the new token's attention at layer L-1
(mean over heads, ``attn[1].mean(1)[0, -1]``) over the visual tokens; if it is the first step or its
cosine similarity to the previous step's is below ``threshold`` (0.9), layers >= L read only the text and
the top ``int(n_visual * keep)`` visual keys (``keep`` = 1 - ``dycoke_p``). ``on_similar="full"`` is the
code: at a step whose attention is similar, nothing is pruned (``kv_cache`` is reset to None below layer
L at every step and only re-set when the similarity is low) — layers >= L read the full cache;
``"reuse"`` is the paper's description: keep the previous step's selection. Prefill is never pruned.
Implemented as a key mask (exactly the gathered keys' result: masked keys get softmax weight 0), so it
saves no compute on this CPU path; the official gather does not either with SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from .scores import cached_rows
from .stages import DecodeSelector, ReducedVideo, ReductionError, TokenReducer


def ttm_plan(num_frames: int, variant: str) -> list[tuple[int, int] | None | str]:
    """Per frame: None (kept whole), "drop", or the (frame a, frame b) whose same-patch similarity decides
    which of its tokens are kept."""
    Fn = num_frames
    plan: list = [None] * Fn
    if variant == "code":
        P = len(range(0, Fn - 1, 2))
        pairs = [(2 * j, 2 * j + 1) for j in range(P)]
        for i in range(0, Fn - 1, 2):
            plan[i + 1] = pairs[(i - 2) // 2]  # the previous pair's similarity (index -1 wraps)
        for i in range(0, Fn - 4, 4):
            plan[i + 2] = (i, i + 2)
        if Fn % 2 == 1:
            plan[Fn - 1] = "drop"
        return plan
    for f in range(Fn):
        if f % 2 == 1:
            plan[f] = (f - 1, f)
        elif f % 4 == 2:
            plan[f] = (f - 2, f)
    return plan


@dataclass(frozen=True)
class DyCokeMerge(TokenReducer):
    keep: float = 0.3  # fraction of a pruned frame's tokens kept (1 - dycoke_k; lmms-eval k = 0.7)
    variant: Literal["code", "paper"] = "code"

    name: ClassVar[str] = "dycoke-ttm"
    needs: ClassVar[str] = "pooled"

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ReductionError(f"dycoke-ttm: keep is the fraction of a pruned frame's tokens kept, in (0, 1]; "
                                 f"got {self.keep!r}")
        if self.variant not in ("code", "paper"):
            raise ReductionError(f"dycoke-ttm: variant must be 'code' or 'paper', got {self.variant!r}")

    def _per_frame(self, config) -> int:
        from ..model.pooling import pooled_grid_hw

        h, w = pooled_grid_hw((config.vision.grid_size,) * 2, config.spatial_pool_stride, config.spatial_pool_mode)
        return h * w

    def num_tokens(self, num_frames: int, config) -> int:
        N = self._per_frame(config)
        k = int(self.keep * N)
        return sum(0 if p == "drop" else N if p is None else k for p in ttm_plan(num_frames, self.variant))

    def reduce(self, features: torch.Tensor, config) -> ReducedVideo:
        Fn, N, D = features.shape
        k = int(self.keep * N)
        tokens, frame, patch = [], [], []
        for f, p in enumerate(ttm_plan(Fn, self.variant)):
            if p == "drop":
                continue
            if p is None:
                idx = torch.arange(N)
            else:
                sim = F.cosine_similarity(F.normalize(features[p[0]], dim=1), F.normalize(features[p[1]], dim=1), dim=1)
                idx = sim.topk(k, largest=False).indices.cpu()  # the least similar tokens of frame f
                if self.variant == "paper":
                    idx = idx.sort().values
            tokens.append(features[f][idx.to(features.device)])
            frame.append(torch.full((len(idx),), f))
            patch.append(idx)
        return ReducedVideo(torch.cat(tokens), torch.cat(frame), torch.cat(patch))


@dataclass(frozen=True)
class DyCokeDecode(DecodeSelector):
    layer: int = 3  # L: layers >= L read the selected keys; scores from layer L-1
    keep: float = 0.2  # fraction of visual keys read (1 - dycoke_p; lmms-eval p = 0.8)
    threshold: float = 0.9  # re-select when cos(attention now, attention at the previous step) < threshold
    on_similar: Literal["full", "reuse"] = "full"

    name: ClassVar[str] = "dycoke"
    _state: dict = field(default_factory=dict, compare=False, repr=False)  # per run: previous scores, selection

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 1:
            raise ReductionError(f"dycoke: layer must be an integer >= 1, got {self.layer!r}")
        if not 0 < self.keep <= 1:
            raise ReductionError(f"dycoke: keep is the fraction of visual keys read, in (0, 1]; got {self.keep!r}")
        if self.on_similar not in ("full", "reuse"):
            raise ReductionError(f"dycoke: on_similar must be 'full' (code) or 'reuse' (paper), got {self.on_similar!r}")

    def visible(self, decoder, hidden_in, position_ids, key_mask, visual, step) -> torch.Tensor:
        B, kv_len = key_mask.shape
        probs = cached_rows(decoder, self.layer - 1, hidden_in, position_ids, key_mask, kv_len)
        scores = probs[:, :, 0].mean(1)  # (B, kv_len)
        if step == 0:
            self._state.clear()
        out = key_mask.clone()
        for b in range(B):
            vis = torch.nonzero(visual[b] & key_mask[b]).flatten()
            s = scores[b, vis]
            prev = self._state.get(("score", b))
            similar = prev is not None and float(F.cosine_similarity(s, prev, dim=0)) >= self.threshold
            self._state[("score", b)] = s
            if similar and self.on_similar == "full":
                continue  # the code: no pruning at this step
            if similar:
                chosen = self._state[("chosen", b)]
            else:
                chosen = vis[s.topk(int(len(vis) * self.keep)).indices]
                self._state[("chosen", b)] = chosen
            out[b, vis] = False
            out[b, chosen] = True
        return out
