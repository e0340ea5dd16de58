"""The multimodal projector: vision features into the decoder's embedding space.

    projector(x) = linear_2(gelu(linear_1(x)))      (N, T, Cv) -> (N, T, D)

A two-layer MLP with exact (erf) GELU, biases on both layers (docs/references.md, Projector: transformers'
``LlavaNextMultiModalProjector``, the original ``mlp2x_gelu``). 1024 -> 4096 -> 4096 for the 7B models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))
