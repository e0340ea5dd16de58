"""The SigLIP vision tower (so400m-patch14-384) as LLaVA-NeXT-Interleave, LLaVA-OneVision and LLaVA-Video read it.

    pixel_values (N, 3, 384, 384) -> features (N, 729, 1152)      27 x 27 patches, every token a patch

What it computes (docs/references.md, SigLIP vision tower; the same numbers as transformers' SiglipVisionModel
``hidden_states[feature_layer]`` and the original LLaVA-NeXT ``SigLipVisionTower``):

    patches  = Conv2d(3 -> C, kernel = stride = 14, WITH bias, "valid")   27 x 27, row-major; the last 6 px
                                                                          rows/columns of 384 are never seen
    x        = patches + position_embedding                               729 tokens: no CLS, no pre-LayerNorm
    for each layer (pre-norm, LayerNorm eps 1e-6):                        hidden_states[i] = output of layer i
        x = x + out_proj(attention(layer_norm1(x)))                       bidirectional, scale head_dim ** -0.5
        x = x + fc2(gelu_tanh(fc1(layer_norm2(x))))                       F.gelu(approximate="tanh")
    features = hidden_states[feature_layer]                               BEFORE post_layernorm

Which layer. The google checkpoint has 27 layers; LLaVA reads the output of layer 26, before
``post_layernorm``: the original code deletes the last layer and takes ``hidden_states[-1]`` (its
``mm_vision_select_layer`` is ignored), llava-hf configs have 26 layers and ``vision_feature_layer=-1``.
Both are ``VisionConfig(kind="siglip", num_layers=26, feature_layer=-1)`` or ``(num_layers=27,
feature_layer=-2)``: ``layers_used`` is 26 either way, and only those layers are built. The
``post_layernorm`` and the attention-pooling head are never computed, so never built (the key tables drop
their weights on purpose). transformers 4.57.0-4.57.1 fed the post-LayerNorm output instead (PR #40994):
tests/test_siglip.py checks the installed transformers does not.

Activation. LLaVA's tower (transformers, the original code) uses the tanh GELU. open_clip's
``ViT-SO400M-14-SigLIP-384`` builds its timm trunk without an ``act_layer``, so timm falls back to
``nn.GELU()`` — the exact erf GELU. ``VisionConfig.hidden_act`` is the switch: "gelu_pytorch_tanh" (the
kind's default, what LLaVA was trained with) or "gelu" (open_clip's exact numbers). The tests compare
with open_clip both ways: unchanged against ``hidden_act="gelu"``, and with every ``blk.mlp.act`` replaced
by ``nn.GELU(approximate="tanh")`` against the default.

Weights: ``from_state_dict`` takes a transformers SiglipVisionModel state dict ("siglip_hf": with or
without the ``vision_model.`` prefix) or open_clip's ``model.visual.state_dict()`` ("siglip_open_clip":
timm trunk, fused qkv split into q/k/v, ``pos_embed`` (1, 729, C) squeezed); the explicit tables are in
``model/keymaps.py``. Parameter names are CLIP's (model/clip.py) minus the CLS and
pre-LayerNorm, plus ``patch_embedding.bias``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .clip import SelfAttention, VisionTower, quick_gelu


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The vision MLP's activation by its transformers name (VisionConfig.hidden_act)."""
    if name == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "quick_gelu":
        return quick_gelu(x)
    raise ValueError(f"vision activation {name!r} is not supported")


class MLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.act = config.hidden_act
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(C, eps=eps)
        self.self_attn = SelfAttention(config)  # q/k/v/out with bias, as CLIP's
        self.layer_norm2 = nn.LayerNorm(C, eps=eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipTower(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.kind != "siglip":
            raise ValueError(f"SiglipTower needs VisionConfig(kind='siglip'), got kind={config.kind!r}")
        self.config = config
        C, P = config.hidden_size, config.num_patches
        self.patch_embedding = nn.Conv2d(config.num_channels, C, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=True)
        self.position_embedding = nn.Embedding(P, C, _weight=torch.empty(P, C))  # added whole, id i = patch i
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers_used))
        if not self.position_embedding.weight.is_meta:  # random init is for tests only (see clip.py)
            nn.init.normal_(self.position_embedding.weight)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalized pixels, S = image_size -> (N, grid**2, C) in the weights' dtype."""
        VisionTower._check_pixels(self, pixel_values)  # the same shape/dtype checks and messages as CLIP's
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, g, g)
        x = x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # (N, g*g, C), row-major patches
        for layer in self.layers:
            x = layer(x)  # hidden_states[i]
        return x

    # ---- weights ---------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], config: VisionConfig,
                        fmt: str = "siglip_hf") -> "SiglipTower":
        """A tower holding a standalone SigLIP checkpoint's weights: fmt "siglip_hf" (SiglipVisionModel) or
        "siglip_open_clip" (``model.visual.state_dict()``). The same strict loader as CLIP's: the checkpoint
        must have ``config.num_layers`` layers, later layers and the heads are dropped, any unknown,
        missing or mis-shaped key raises a ValueError naming it."""
        return VisionTower.from_state_dict.__func__(cls, state_dict, config, fmt)
