"""Named hook points: identity modules at every tensor a researcher wants to read or replace.

    hp = HookPoint()            # in a module's __init__
    x = hp(x)                   # in its forward: returns x unchanged unless a hook function is attached
    hp.add_hook(fn)             # fn(tensor, hook) -> None (observe) | tensor (replace); returns a remover

The decoder's points carry TransformerLens' HookedTransformer names (``hook_points`` maps module paths to
them), so a TransformerLens user's hook functions work unchanged:

    hook_embed                                   (B, T, C)   decoder input (token embeddings, or the merged
                                                             multimodal embeddings)
    blocks.{i}.hook_resid_pre / _mid / _post     (B, T, C)
    blocks.{i}.ln1.hook_normalized, ln2.…        (B, T, C)   RMS-normalised, before the norm's weight
    blocks.{i}.ln1.hook_scale, ln2.…             (B, T, 1)   the RMS the norm divides by (ln_final.… too)
    blocks.{i}.attn.hook_q / hook_k / hook_v     (B, T, H, D) before RoPE (k, v: the kv heads, GQA)
    blocks.{i}.attn.hook_rot_q / hook_rot_k      (B, T, H, D) after RoPE (what the scores are made of)
    blocks.{i}.attn.hook_z                       (B, T, H, D) per-head attention output, before o_proj
    blocks.{i}.hook_attn_out / hook_mlp_out      (B, T, C)
    blocks.{i}.mlp.hook_pre / hook_pre_linear    (B, T, I)   gate_proj output (before SiLU) / up_proj output
    blocks.{i}.mlp.hook_post                     (B, T, I)   SiLU(gate) * up
    ln_final.hook_normalized                     (B, T, C)
    hook_logits                                  (B, T, V)

and the multimodal stages, which no other tool names (the vision tower runs once per image batch and
once per chunk of video frames, so these can fire several times per forward):

    vision.hook_embed                            (N, 1+P, Cv) after CLIP's pre-layernorm (hidden_states[0])
    vision.blocks.{j}.hook_resid_post            (N, 1+P, Cv) output of tower layer j (hidden_states[j+1])
    mm.hook_features                             (N, P, Cv)   tower features before pooling (tiles or frames)
    mm.hook_pooled                               (F, h*w, C)  pooled video frames (Cv or D: ``pool_position``)
    mm.hook_projected                            (N, P, D)    projector output (tiles, or video frames)
    mm.hook_newline                              (D,)         the newline row used for images and videos
    mm.hook_merged                               (B, T, D)    prompt embeddings with the visual rows spliced
                                                              in = the decoder input

P is a tile's patch count, which depends on the tower: (tile // 14)^2 = 576 for CLIP-336, 729 for
SigLIP-384 (no class token). The ``vision.*`` points are the CLIP tower's (its class token is the 1).

Cost when nothing is attached: one Python call returning its argument per point (16 per decoder layer; an idle
hook_scale costs one attribute check),
small next to a layer's matrix products. The fast paths stay:
SDPA / Triton / the compiled CPU decode attention, prepacked linears, in-place activations (the decoder's
MLP skips its in-place SiLU only while a hook on gate_proj's or up_proj's output could hold a reference).

A reduced model (llava_next.reduce) fires every point with the same names and meaning; the layers it runs on a
pruned or merged sequence have fewer rows, and the layer context's row map (``LayerContext.rows``, a
``SequenceMap``: model/context.py; ``Decoder.running`` while a call runs) says which original position each
row and key is, so llava_next.research reports them in original positions.

Attention *probabilities* are not a hook point (materialising them is what makes other tools need
eager attention and T x T memory): ``llava_next.research`` computes the statistics asked for from
``hook_rot_q`` / the attended keys, exactly, query chunk by query chunk.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


class HookPoint(nn.Module):
    """Identity module calling its attached functions in order; a function's non-None result replaces the tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""  # set by hook_points(): the TransformerLens-style name
        self.fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def add_hook(self, fn: HookFn, dir: str = "fwd") -> Callable[[], None]:  # noqa: A002 - TransformerLens' argument
        """Attach ``fn(tensor, hook)``; returns a function that detaches it."""
        if dir != "fwd":
            raise ValueError(f"only forward hooks exist (dir='fwd'), got dir={dir!r}")
        self.fns.append(fn)

        def remove() -> None:
            if fn in self.fns:
                self.fns.remove(fn)
        return remove

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = True) -> None:  # noqa: A002
        self.fns.clear()

    def layer(self) -> int:
        """The block index in the name (``blocks.5.hook_resid_post`` -> 5), as TransformerLens' ``hook.layer()``."""
        m = re.search(r"blocks\.(\d+)\.", self.name)
        if m is None:
            raise ValueError(f"hook point {self.name!r} belongs to no block")
        return int(m.group(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                x = out
        return x

    def extra_repr(self) -> str:
        return self.name


# module path (ours) -> hook name (TransformerLens' for the decoder); applied in order, first match wins
_RENAMES = (
    (r"^(language_model\.)?layers\.(\d+)\.", r"blocks.\2."),
    (r"^(language_model\.)?norm\.", "ln_final."),
    (r"^language_model\.", ""),
    (r"^vision_tower\.layers\.(\d+)\.", r"vision.blocks.\1."),
    (r"^vision_tower\.", "vision."),
)
_PARTS = ((r"\.self_attn\.", ".attn."), (r"\.input_layernorm\.", ".ln1."), (r"\.post_attention_layernorm\.", ".ln2."))


def hook_name(module_path: str) -> str:
    """``language_model.layers.3.self_attn.hook_q`` -> ``blocks.3.attn.hook_q`` (see the module docstring)."""
    name = module_path
    for pattern, repl in _RENAMES:
        new = re.sub(pattern, repl, name)
        if new != name:
            name = new
            break
    for pattern, repl in _PARTS:
        name = re.sub(pattern, repl, name)
    return name


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Every HookPoint of ``model`` (a LlavaNextModel, a Decoder or a VisionTower) by name; names are set on them."""
    points = {}
    for path, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = hook_name(path)
            points[module.name] = module
    return points
