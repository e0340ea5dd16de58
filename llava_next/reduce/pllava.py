"""PLLaVA pooling: adaptive average pooling of a video's projector outputs over (frames, height, width).

Source: magic-research/PLLaVA @ 6f49fd281a85 (read at 2768c188 too), models/pllava/modeling_pllava.py
``PllavaMultiModalProjector.forward``: linear_1 -> GELU -> linear_2, then ``nn.AdaptiveAvgPool3d(
pooling_shape)`` over (num_frames, 24, 24); paper arXiv:2404.16994; docs/reduction.md.

    (F, 24*24, D) projector outputs -> AdaptiveAvgPool3d((T', H', W')) -> (T' * H' * W', D), frame-major

- Default ``shape=(16, 12, 12)``: what the paper trains and evaluates with (scripts/eval.sh
  ``--pooling_shape 16-12-12``, 2,304 tokens); the class default in configuration_pllava.py is (8, 16, 16).
- Fewer frames than T': the code repeats each frame (``repeat_interleave(int(T'/F) + 1)[:T']``) first;
  so does this. More frames: the code asserts ``F % T' == 0``; adaptive pooling is defined for any F
  (bin i covers frames [floor(i F / T'), ceil((i + 1) F / T'))), so that is allowed here.
- Pooling is applied after the projector, as in PLLaVA. With ``T' = F`` and 12 x 12 it is exactly
  LLaVA-NeXT-Video's own 2 x 2 average pool when that model pools after the projector
  (``pool_position="after_projector"``, the original main branch); llava-hf pools before it.
- Not training-free in the paper (PLLaVA trains the projector and a LoRA); only the operator is used here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange

from .stages import ReducedVideo, ReductionError, TokenReducer


@dataclass(frozen=True)
class PLLaVAPool(TokenReducer):
    shape: tuple[int, int, int] = (16, 12, 12)  # (frames, height, width) after pooling

    name: ClassVar[str] = "pllava"
    needs: ClassVar[str] = "patches"

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(not isinstance(s, int) or s < 1 for s in self.shape):
            raise ReductionError(f"pllava: shape is (frames, height, width) of positive integers, e.g. 16x12x12; "
                                 f"got {self.shape!r}")

    def num_tokens(self, num_frames: int, config) -> int:
        t, h, w = self.shape
        return t * h * w

    def reduce(self, features: torch.Tensor, config) -> ReducedVideo:
        n, hw, d = features.shape
        g = config.vision.grid_size
        t, h, w = self.shape
        if h > g or w > g:
            raise ReductionError(f"pllava: shape {t}x{h}x{w} is larger than the {g}x{g} patch grid")
        x = features
        if n < t:  # the official repeat: each frame repeated int(T'/F) + 1 times, cut to T'
            x = x.repeat_interleave(t // n + 1, dim=0)[:t]
        video = rearrange(x, "f (h w) d -> 1 d f h w", h=g)
        pooled = F.adaptive_avg_pool3d(video, (t, h, w))  # (1, D, T', H', W')
        tokens = rearrange(pooled, "1 d f h w -> (f h w) d")
        frames_in = x.shape[0]
        starts = torch.tensor([(i * frames_in) // t for i in range(t)])  # first input frame of each bin
        if n < t:
            starts = torch.div(starts, t // n + 1, rounding_mode="floor")  # back to the real frame index
        frame = starts.repeat_interleave(h * w)
        patch = torch.arange(h * w).repeat(t)
        return ReducedVideo(tokens, frame, patch)
