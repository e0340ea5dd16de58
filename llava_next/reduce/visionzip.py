"""VisionZip: per frame, keep the patches the CLS token attends to most, merge the rest into a few tokens.

Source: dvlab-research/VisionZip @ 3151f6df4fca, visionzip/clip_encoder.py ``CLIPVisionTower_VisionZip
.forward``, visionzip/utils.py (``CLIPAttention_forward`` returns the layer's raw keys, mean over heads, as
``metric``), visionzip/main.py ``visionzip(model, dominant=191, contextual=30)``; README quick start
``dominant=54, contextual=10`` (64 tokens); paper arXiv:2412.04467; token-reduction-spec §6.

Per frame, inside the vision tower, at the feature layer (CLIP layer -2 = the last layer LLaVA runs):
- attention of that layer, CLS row, summed over heads -> the top ``dominant - 1`` patches; dominant tokens
  = the CLS token + those patches, in sequence order (``masked_select``); the CLS token is kept, unlike
  LLaVA's own 'default' features (``main.py`` passes ``dominant - 1`` to the selection);
- the other tokens: their keys (mean over heads, L2-normalised) pick ``contextual`` targets at a uniform
  stride (``step = max(1, n // contextual)``); every other token joins its most similar target;
  contextual token = target + mean(its members) (the target is not in the mean: the code's formula);
- output per frame: dominant (CLS first) then contextual, ``dominant + contextual`` tokens; then the
  projector.

On this model's video path VisionZip replaces the 2 x 2 pooling: each frame gives ``dominant +
contextual`` tokens (64 at the README setting, vs 144 pooled). VisionZip's own LLaVA code applies it to
images (LLaVA-1.5 / LLaVA-NeXT tiles); using it per video frame is this project's mapping. The attention
row and keys are recomputed exactly from the layer's input (no eager tower), in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .stages import ReducedVideo, ReductionError, TokenReducer


@dataclass(frozen=True)
class VisionZip(TokenReducer):
    dominant: int = 54  # CLS + dominant - 1 patches
    contextual: int = 10

    name: ClassVar[str] = "visionzip"
    needs: ClassVar[str] = "tower"

    def __post_init__(self) -> None:
        if not isinstance(self.dominant, int) or self.dominant < 1 or not isinstance(self.contextual, int) \
                or self.contextual < 1:
            raise ReductionError(f"visionzip: dominant and contextual must be integers >= 1, got "
                                 f"{self.dominant!r}, {self.contextual!r}")

    def num_tokens(self, num_frames: int, config) -> int:
        patches = config.vision.num_patches
        if self.dominant - 1 + self.contextual > patches:
            raise ReductionError(f"visionzip: dominant - 1 + contextual = {self.dominant - 1 + self.contextual} is more "
                                 f"than the {patches} patches of a frame")
        return num_frames * (self.dominant + self.contextual)

    @torch.no_grad()
    def select(self, tower, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, 3, S, S) -> hidden states of the feature layer (n, 1 + P, C), CLS attention summed over heads
        (n, P) and the layer's keys averaged over heads (n, 1 + P, hd), both fp32."""
        x = tower.patch_embedding(pixels.to(tower.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([tower.class_embedding.expand(x.shape[0], 1, -1), x], 1) + tower.position_embedding.weight
        x = tower.pre_layernorm(x)  # VisionTower.forward, up to its last layer
        for layer in tower.layers[:-1]:
            x = layer(x)
        last = tower.layers[-1]
        attn = last.self_attn
        n, T, C = x.shape
        h = last.layer_norm1(x)
        q = attn.q_proj(h[:, :1]).view(n, 1, attn.num_heads, attn.head_dim).transpose(1, 2).float()
        k = attn.k_proj(h).view(n, T, attn.num_heads, attn.head_dim).transpose(1, 2).float()  # raw keys
        cls_row = torch.softmax((q * attn.head_dim ** -0.5) @ k.transpose(-1, -2), dim=-1)  # (n, H, 1, T)
        return last(x), cls_row[:, :, 0, 1:].sum(1), k.mean(1)

    def reduce(self, pixels: torch.Tensor, config, model=None) -> ReducedVideo:
        if not hasattr(model.vision_tower, "class_embedding"):
            raise ReductionError("visionzip reads the CLS token's attention; this model's tower has no CLS token "
                                 "(SigLIP): use another reducer (pllava, slowfast, dycoke-ttm)")
        if config.vision.feature_layer != -2:
            raise ReductionError(f"visionzip reads CLIP layer -2 (as its code does); this model's feature layer is "
                                 f"{config.vision.feature_layer}")
        self.num_tokens(1, config)
        tokens, frame, patch = [], [], []
        for f0, chunk in zip(range(0, len(pixels), 8), pixels.split(8)):
            hidden, cls_attn, metric = self.select(model.vision_tower, chunk)
            for i in range(hidden.shape[0]):
                out, idx = merge(hidden[i], cls_attn[i], metric[i], self.dominant - 1, self.contextual)
                tokens.append(out)
                frame.append(torch.full((len(idx),), f0 + i))
                patch.append(idx)
        feats = model.projector(torch.stack(tokens))  # (F, d + c, D)
        return ReducedVideo(feats.reshape(-1, feats.shape[-1]), torch.cat(frame), torch.cat(patch))


def merge(hidden: torch.Tensor, cls_attn: torch.Tensor, metric: torch.Tensor, dominant_num: int,
          contextual_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame: hidden (1 + P, C), cls_attn (P,), metric (1 + P, hd) -> (dominant_num + 1 + contextual_num, C)
    tokens and each one's patch index (-1: CLS; a contextual token: its target's patch)."""
    T = hidden.shape[0]
    top = cls_attn.topk(dominant_num).indices + 1
    keep = torch.ones(T, dtype=torch.bool, device=hidden.device)
    keep[0] = False
    keep[top] = False  # ~keep = CLS + dominant
    dominant_idx = torch.nonzero(~keep).flatten()  # sequence order, CLS first
    rest_idx = torch.nonzero(keep).flatten()
    m = metric[rest_idx]
    m = m / m.norm(dim=-1, keepdim=True)
    n = len(rest_idx)
    step = max(1, n // contextual_num)
    targets = torch.arange(0, n, step, device=hidden.device)[:contextual_num]
    others = ~torch.isin(torch.arange(n, device=hidden.device), targets)
    assign = (m[others] @ m[targets].T).argmax(dim=1)  # (n - c,)
    one_hot = torch.zeros(int(others.sum()), len(targets), dtype=hidden.dtype, device=hidden.device)
    one_hot.scatter_(1, assign[:, None], 1)
    counts = one_hot.sum(0).clamp(min=1)[:, None]
    rest = hidden[rest_idx]
    contextual = rest[targets] + (one_hot.T @ rest[others]) / counts
    out = torch.cat([hidden[dominant_idx], contextual])
    idx = torch.cat([dominant_idx - 1, rest_idx[targets] - 1]).cpu()
    return out, idx
