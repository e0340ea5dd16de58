"""The CLIP ViT vision tower (ViT-L/14-336 in every LLaVA-NeXT checkpoint), as LLaVA reads it.

    pixel_values (N, 3, 336, 336) -> features (N, 576, C)   feature_strategy 'default' (CLS dropped)
                                  -> features (N, 577, C)   feature_strategy 'full'    (CLS kept, first)

What it computes (docs/references.md, CLIP vision tower; the same numbers as transformers' CLIPVisionModel and open_clip's
VisionTransformer with QuickGELU):

    patches  = Conv2d(3 -> C, kernel = stride = 14, no bias)       24 x 24 patches, row-major (h, then w)
    x        = [class_embedding, patches] + position_embedding     577 tokens, the CLS token first
    x        = pre_layernorm(x)                                    hidden_states[0]
    for each layer (pre-norm):                                     hidden_states[i] = output of layer i
        x = x + out_proj(attention(layer_norm1(x)))                bidirectional, scale head_dim ** -0.5
        x = x + fc2(quick_gelu(fc1(layer_norm2(x))))               quick_gelu(x) = x * sigmoid(1.702 x)
    features = hidden_states[feature_layer], CLS dropped unless 'full'

Notable choices
- Only the layers up to the selected feature layer exist: ``feature_layer=-2`` of 24 builds and runs 23
  (``VisionConfig.layers_used``); ``feature_layer=0`` builds none. The last layer and CLIP's
  ``post_layernorm``/projection head are never computed by LLaVA, so they are not built (the loader
  drops their weights on purpose, after checking the checkpoint has the configured number of layers).
- The position embedding is added as a whole table (ids 0..576 in order), no index lookup; there is no
  position interpolation: inputs must be exactly ``image_size`` px square (the AnyRes tiles are).
- Attention goes through the ``llava_next.model.attention`` facade (SDPA on CPU, Triton on CUDA, eager for
  reference). Parameter names follow the layout at the top of ``model/keymaps.py``.
- ``from_state_dict`` builds on the meta device and *assigns* the checkpoint tensors (no random init,
  no copy: the tower shares storage with the state dict and takes its dtype).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .attention import attention
from .hooks import HookPoint
from .keymaps import drop_unused_vision_layers, rename_state_dict
from ..config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation (OpenAI's training activation; not the erf GELU).

    Without autograd, ``x`` (fc1's fresh output) is overwritten, 1024 rows at a time: the temporary
    sigmoid(1.702 x) then stays small enough for the allocator to reuse it (a whole-tensor temporary,
    38 MB for 8 frames, is a fresh mmap every call, and its page faults dominate). Same numbers."""
    if (torch.is_grad_enabled() and x.requires_grad) or not x.is_contiguous():
        return x * torch.sigmoid(1.702 * x)
    for rows in x.view(-1, x.shape[-1]).split(1024):
        rows.mul_((1.702 * rows).sigmoid_())
    return x


class SelfAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        C = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C)
        self.v_proj = nn.Linear(C, C)
        self.out_proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        y = attention(q, k, v, causal=False)  # (B, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(C, eps=eps)
        self.self_attn = SelfAttention(config)
        self.layer_norm2 = nn.LayerNorm(C, eps=eps)
        self.mlp = MLP(config)
        self.hook_resid_post = HookPoint()  # "vision.blocks.{j}.hook_resid_post" (model/hooks.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return self.hook_resid_post(x)


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.patch_embedding = nn.Conv2d(config.num_channels, C, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        P = config.num_patches + 1
        self.class_embedding = nn.Parameter(torch.empty(C))
        self.position_embedding = nn.Embedding(P, C, _weight=torch.empty(P, C))  # added whole, id i = token i
        self.pre_layernorm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers_used))
        self.hook_embed = HookPoint()  # "vision.hook_embed": after pre_layernorm
        if not self.class_embedding.is_meta:  # random init is for tests only (load weights); on the meta
            nn.init.normal_(self.class_embedding, std=C ** -0.5)  # device normal_ would import torch._dynamo (seconds)
            nn.init.normal_(self.position_embedding.weight)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalized pixels, S = image_size -> (N, tokens_per_tile, C) in the weights' dtype.

        The 'default' result is a view that skips the CLS row (call ``.contiguous()`` if needed)."""
        self._check_pixels(pixel_values)
        N = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, g*g, C): patches row-major (row over height, then width)
        cls = self.class_embedding.expand(N, 1, -1)  # (N, 1, C)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (N, 1 + g*g, C)
        x = self.hook_embed(self.pre_layernorm(x))  # hidden_states[0]
        for layer in self.layers:
            x = layer(x)  # hidden_states[i]
        return x if self.config.feature_strategy == "full" else x[:, 1:]  # (N, g*g, C)

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        c = self.config
        want = f"(N, {c.num_channels}, {c.image_size}, {c.image_size})"
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"VisionTower expects pixel_values of shape {want}, got {got}")
        _, ch, h, w = pixel_values.shape
        if ch != c.num_channels or (h, w) != (c.image_size, c.image_size):
            raise ValueError(f"VisionTower expects pixel_values of shape {want}, got {tuple(pixel_values.shape)}: "
                             f"split images into {c.image_size} px tiles first (llava_next.model.anyres / image)")
        if not pixel_values.is_floating_point():
            raise ValueError(f"VisionTower expects normalized float pixels, got dtype {pixel_values.dtype}: "
                             "apply llava_next.inputs.image.normalize to uint8 images first")

    # ---- weights --------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], config: VisionConfig,
                        fmt: str = "clip_hf") -> "VisionTower":
        """A tower holding the weights of a standalone CLIP vision checkpoint.

        fmt: "clip_hf" (a transformers CLIPVisionModel checkpoint: ``vision_model.*`` keys) or
        "clip_open_clip" (open_clip ``model.visual.state_dict()``). The checkpoint must have exactly
        ``config.num_layers`` layers; layers after ``config.layers_used`` and the pooled-output head are
        dropped. Any missing, unexpected or mis-shaped key raises a ValueError that names it."""
        renamed = rename_state_dict(fmt, state_dict)  # raises on a key the table does not know
        layers = {int(m.group(1)) for k in renamed if (m := re.match(r"layers\.(\d+)\.", k))}
        if layers != set(range(config.num_layers)):
            raise ValueError(f"the {fmt!r} checkpoint has layers {_ranges(layers)} but VisionConfig.num_layers "
                             f"is {config.num_layers} (feature_layer {config.feature_layer} counts from it): "
                             "use the checkpoint's vision config")
        renamed = {k: v for k, v in renamed.items()
                   if drop_unused_vision_layers(k, config.layers_used, prefix="") is not None}
        with torch.device("meta"):
            tower = cls(config)
        expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
        missing = sorted(expected.keys() - renamed.keys())
        unexpected = sorted(renamed.keys() - expected.keys())
        misshaped = [f"{k}: checkpoint {tuple(v.shape)}, expected {expected[k]}"
                     for k, v in renamed.items() if k in expected and tuple(v.shape) != expected[k]]
        if missing or unexpected or misshaped:
            parts = [f"{what}: {', '.join(keys)}" for what, keys in
                     (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if keys]
            raise ValueError(f"{fmt!r} checkpoint does not fit VisionTower({config}); " + "; ".join(parts))
        tower.load_state_dict(renamed, strict=True, assign=True)
        return tower


def _ranges(indices: set[int]) -> str:
    if not indices:
        return "none"
    s = sorted(indices)
    return f"{s[0]}..{s[-1]}" if s == list(range(s[0], s[-1] + 1)) else str(s)
