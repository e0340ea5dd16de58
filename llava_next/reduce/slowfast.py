"""SlowFast-LLaVA (training-free): a few frames at a fine grid (slow) + every frame heavily pooled (fast).

Source: apple/ml-slowfast-llava @ bea0f73c106b (read at 6551895d), slowfast_llava/llava/model/llava_arch.py
``prepare_slowfast`` and ``temporal_aggregation``; config cfgs/slowfast_llava_7b-*.yaml
(``TEMPORAL_AGGREGATION: slowfast-slow_10frms_spatial_1d_max_pool-fast_4x4``, ``NUM_FRAMES: 50``);
paper arXiv:2407.15841; docs/reduction.md.

On the projector outputs of all F frames, (F, 24*24, D):
- slow: frames ``int32(linspace(0, F, slow_frames + 1))[:-1]``, each pooled by ``slow_pool``; default
  ``1d_max`` = ``MaxPool1d(2, 2)`` over the flattened 576 tokens (pairs of horizontally adjacent patches:
  24 rows x 12 cols = 288 tokens per frame);
- fast: every frame, ``AdaptiveAvgPool2d((fast_grid, fast_grid))`` (4x4: 16 tokens per frame);
- order: all slow tokens (frame order), then all fast tokens; no separators.
With the paper's 50 frames: 10 x 288 + 50 x 16 = 3,680 tokens.

Differences, as options or notes:
- ``slow_pool``: the code's aggregations ``1d_max`` (default), ``1d_avg``, ``2d_max``, ``2d_avg`` (2x2,
  = LLaVA-NeXT-Video's native 12x12 grid: the in-distribution variant for a model fine-tuned on 12x12
  frames) and ``none`` (all 576).
- The paper runs on the image checkpoint llava-v1.6-vicuna-7b with frames resized to 336 px (no AnyRes)
  and ``rope_scaling={"type": "dynamic", "factor": 2}``; here it runs on whichever checkpoint is loaded,
  on its own frame preprocessing and linear RoPE factor (``--rope-scale``).
- SF-LLaVA samples the middle frame of 50 equal segments; here frames come from the pipeline's sampler
  (uniform, first and last included) or a frame selector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from .stages import ReducedVideo, ReductionError, TokenReducer

SlowPool = Literal["1d_max", "1d_avg", "2d_max", "2d_avg", "none"]


@dataclass(frozen=True)
class SlowFast(TokenReducer):
    slow_frames: int = 10
    slow_pool: SlowPool = "1d_max"
    fast_grid: int = 4  # fast pathway: fast_grid x fast_grid tokens per frame

    name: ClassVar[str] = "slowfast"
    needs: ClassVar[str] = "patches"

    def __post_init__(self) -> None:
        if not isinstance(self.slow_frames, int) or self.slow_frames < 1:
            raise ReductionError(f"slowfast: slow_frames must be an integer >= 1, got {self.slow_frames!r}")
        if self.slow_pool not in ("1d_max", "1d_avg", "2d_max", "2d_avg", "none"):
            raise ReductionError(f"slowfast: slow_pool must be one of 1d_max, 1d_avg, 2d_max, 2d_avg, none; "
                                 f"got {self.slow_pool!r}")
        if not isinstance(self.fast_grid, int) or self.fast_grid < 1:
            raise ReductionError(f"slowfast: fast_grid must be an integer >= 1, got {self.fast_grid!r}")

    def slow_indices(self, num_frames: int) -> list[int]:
        if self.slow_frames > num_frames:
            raise ReductionError(f"slowfast: slow_frames={self.slow_frames} but the video has {num_frames} frames; "
                                 f"use --frames >= {self.slow_frames} (the paper: 50) or fewer slow frames")
        return torch.linspace(0, num_frames, self.slow_frames + 1).to(torch.int32).tolist()[:-1]

    def _slow_per_frame(self, g: int) -> int:
        n = g * g
        return {"1d_max": n // 2, "1d_avg": n // 2, "2d_max": (g // 2) ** 2, "2d_avg": (g // 2) ** 2, "none": n}[self.slow_pool]

    def num_tokens(self, num_frames: int, config) -> int:
        g = config.vision.grid_size
        if self.fast_grid > g:
            raise ReductionError(f"slowfast: fast_grid={self.fast_grid} is larger than the {g}x{g} patch grid")
        return len(self.slow_indices(num_frames)) * self._slow_per_frame(g) + num_frames * self.fast_grid ** 2

    def reduce(self, features: torch.Tensor, config) -> ReducedVideo:
        T, N, D = features.shape
        g = config.vision.grid_size
        idx = self.slow_indices(T)
        slow = features[idx]  # (S, N, D)
        if self.slow_pool in ("1d_max", "1d_avg"):
            pool = F.max_pool1d if self.slow_pool == "1d_max" else F.avg_pool1d
            slow = rearrange(pool(rearrange(slow, "t n d -> t d n"), 2, 2), "t d n -> t n d")
        elif self.slow_pool in ("2d_max", "2d_avg"):
            pool = F.max_pool2d if self.slow_pool == "2d_max" else F.avg_pool2d
            slow = rearrange(pool(rearrange(slow, "t (a b) d -> d t a b", a=g), 2, 2), "d t a b -> t (a b) d")
        per = slow.shape[1]
        fast = F.adaptive_avg_pool2d(rearrange(features, "t (a b) d -> d t a b", a=g), (self.fast_grid,) * 2)
        fast = rearrange(fast, "d t a b -> (t a b) d")
        tokens = torch.cat([slow.reshape(-1, D), fast])
        f2 = self.fast_grid ** 2
        frame = torch.cat([torch.tensor(idx).repeat_interleave(per), torch.arange(T).repeat_interleave(f2)])
        # patch ids: slow grid cells count 0..per-1, fast cells continue after them (distinct grids)
        patch = torch.cat([torch.arange(per).repeat(len(idx)), per + torch.arange(f2).repeat(T)])
        return ReducedVideo(tokens, frame, patch)
