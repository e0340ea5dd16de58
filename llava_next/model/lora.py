"""LoRA: low-rank adapters on a ``LlavaNextModel``'s linear layers, computed as PEFT computes them.

    cfg = LoraConfig(r=16, alpha=32)              # decoder q/k/v/o/gate/up/down; projector and tower frozen
    apply_lora(model, cfg)                        # in place: targets wrapped, everything else frozen
    loss.backward(); ...                          # gradients reach lora_A / lora_B (and a "full" projector)
    lora_state_dict(model)                        # what an adapter file holds, in llava-next's names
    merge_lora(model); unmerge_lora(model)        # W += B A * scaling, and back

One wrapped layer (``LoraLinear``), as PEFT's ``lora.Linear`` (peft 0.18, peft/tuners/lora/layer.py):

    y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling        scaling = alpha / r  (rsLoRA: alpha / sqrt(r))

- ``forward`` follows ``lora.Linear.forward``: the base result first, the input cast to the adapter's dtype
  (``_cast_input_dtype``), the sum cast back to the base result's dtype; a merged layer runs the base alone.
- Initialisation follows ``LoraLayer.reset_lora_parameters(init_lora_weights=True)``: A kaiming-uniform with
  a = sqrt(5) (nn.Linear's default), B zeros, so a fresh adapter changes nothing.
- The scaling follows ``LoraLayer.update_layer`` (``use_rslora``: alpha / sqrt(r), else alpha / r).
- Merging follows ``lora.Linear.merge`` / ``unmerge`` / ``get_delta_weight``: delta = (B @ A) * scaling,
  computed in float32 on CPU for half-precision adapters, added to (subtracted from) the base weight in place.
- Names follow PEFT's: the wrapped layer stays at ``<path>.base_layer`` and the adapter's weights are
  ``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` — PEFT's saved names once its adapter name
  ("default") is removed (peft/utils/save_and_load.py, ``get_peft_model_state_dict``), so a key table turns
  one into the other (llava_next_weights/adapters.py).

``LoraLinear`` only calls ``base_layer(x)``: the base may be an ``nn.Linear``, a quantized linear
(model/quant.py) or a prepacked one; merging needs a float ``weight`` (a quantized base keeps its adapter
separate). Targets are named by the module tree (model/keymaps.py, "llava-next's layout"): decoder
``language_model.layers.{i}.self_attn.{q,k,v,o}_proj`` and ``.mlp.{gate,up,down}_proj``; vision tower
``vision_tower.layers.{i}.self_attn.{q,k,v,out}_proj`` and ``.mlp.fc{1,2}``; ``projector.linear_{1,2}``; and,
when ``target_modules`` names it (never by default), the decoder's output layer ``language_model.lm_head``
(PEFT's "lm_head"; not on a model whose lm_head is tied to its embeddings).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .decoder import TiedLMHead

DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# what target_modules may name: the decoder's linears and its output layer (PEFT's "lm_head" target, e.g. to
# teach a model a new script's tokens); lm_head is never a default target
TEXT_TARGETS = DECODER_TARGETS + ("lm_head",)
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# module path templates of every layer LoRA can wrap ({} = a layer index, {n} = a leaf name)
_DECODER_PATH = re.compile(r"^language_model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)$")
_VISION_PATH = re.compile(r"^vision_tower\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)$")
_PROJECTOR_PATH = re.compile(r"^projector\.(linear_1|linear_2)$")


class LoraError(ValueError):
    """A LoRA configuration or operation that cannot be done; the message says what and why."""


@dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how. ``alpha`` / ``r`` scales the update (``use_rslora``: alpha / sqrt(r)), as PEFT.

    projector: "full" trains its weights (PEFT's ``modules_to_save``), "lora" adapts both linears, "frozen"
    leaves it. vision: "lora" adapts every tower layer's ``VISION_TARGETS``, "frozen" leaves the tower.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DECODER_TARGETS
    projector: Literal["full", "lora", "frozen"] = "frozen"
    vision: Literal["frozen", "lora"] = "frozen"
    use_rslora: bool = False
    vision_target_modules: tuple[str, ...] = field(default=VISION_TARGETS)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise LoraError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha):
            raise LoraError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        for name, given, allowed in (("target_modules", self.target_modules, TEXT_TARGETS),
                                     ("vision_target_modules", self.vision_target_modules, VISION_TARGETS)):
            bad = [t for t in given if t not in allowed]
            if bad or isinstance(given, str):
                raise LoraError(f"LoRA {name} {list(given) if not isinstance(given, str) else given!r}: "
                                f"each must be one of {', '.join(allowed)}")
        if self.projector not in ("full", "lora", "frozen"):
            raise LoraError(f"LoRA projector must be 'full', 'lora' or 'frozen', got {self.projector!r}")
        if self.vision not in ("frozen", "lora"):
            raise LoraError(f"LoRA vision must be 'frozen' or 'lora', got {self.vision!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def targets(self, path: str) -> bool:
        """True when the module at ``path`` (llava-next's names) is one this config wraps."""
        if m := _DECODER_PATH.match(path):
            return m.group(1) in self.target_modules
        if path == "language_model.lm_head":
            return "lm_head" in self.target_modules
        if m := _VISION_PATH.match(path):
            return self.vision == "lora" and m.group(1) in self.vision_target_modules
        return self.projector == "lora" and _PROJECTOR_PATH.match(path) is not None


class AdapterLinear(nn.Linear):
    """``lora_A`` / ``lora_B``: an ``nn.Linear`` of its own type, so that ``LlavaNextModel.pack_for_cpu`` (which
    prepacks layers whose type is exactly ``nn.Linear``) leaves adapters as they are: trainable, readable by
    ``lora_state_dict``; the frozen base beside them may be packed."""


class LoraLinear(nn.Module):
    """``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`` (PEFT's ``lora.Linear``, module docstring)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        base_weight = getattr(base_layer, "weight", None)
        device = base_weight.device if isinstance(base_weight, torch.Tensor) else None
        if dtype is None:  # the base's float dtype (PEFT moves the adapter to it); float32 over a quantized base
            floating = isinstance(base_weight, torch.Tensor) and base_weight.is_floating_point()
            dtype = base_weight.dtype if floating else torch.float32
        self.lora_A = AdapterLinear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = AdapterLinear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.disabled = False  # ``adapters_disabled``: the base alone (PEFT's ``disable_adapter``)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's ``init_lora_weights=True``: A as nn.Linear's default (kaiming-uniform, a = sqrt(5)), B zeros."""
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)  # PEFT's _cast_input_dtype
        return (result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """(B @ A) * scaling, (out, in); float32 arithmetic for a half-precision adapter on CPU (as PEFT)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
            return ((b.float() @ a.float()) * self.scaling).to(a.dtype)
        return (b @ a) * self.scaling

    def _base_weight(self, what: str) -> torch.Tensor:
        w = getattr(self.base_layer, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise LoraError(f"cannot {what} a LoRA adapter into a {type(self.base_layer).__name__}: it has no float "
                            f"weight (a quantized or prepacked base); keep the adapter separate")
        return w

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self._base_weight("merge")
        w.data += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self._base_weight("unmerge")
        w.data -= self.delta_weight().to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every ``LoraLinear`` of ``model`` by its module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: nn.Module, cfg: LoraConfig, *, dtype: torch.dtype | None = None) -> dict[str, LoraLinear]:
    """Wrap ``cfg``'s target layers of ``model`` in ``LoraLinear`` (in place) and freeze every other
    parameter; the adapters (and a "full" projector) keep ``requires_grad``. ``model.lora_config`` records
    ``cfg``. Returns the new layers by path. ``dtype``: the adapters' (default: each base weight's float dtype)."""
    if lora_layers(model):
        raise LoraError("the model already has LoRA layers; one adapter at a time (merge_and_unload it first)")
    slots = [name for name, _ in model.named_modules() if cfg.targets(name)]
    if not slots:
        raise LoraError(f"no layer of {type(model).__name__} matches the LoRA targets {list(cfg.target_modules)}")
    if "language_model.lm_head" in slots and isinstance(model.get_submodule("language_model.lm_head"), TiedLMHead):
        raise LoraError("LoRA target lm_head: this model ties lm_head to embed_tokens (tie_word_embeddings), so "
                        "it has no output layer of its own to adapt; leave lm_head out of the targets")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name in slots:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoraLinear(getattr(parent, leaf), cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, dtype)
        setattr(parent, leaf, layer)
        wrapped[name] = layer
    if cfg.projector == "full":
        for p in model.get_submodule("projector").parameters():
            p.requires_grad_(True)
    model.lora_config = cfg
    return wrapped


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block every ``LoraLinear`` runs its base layer alone (PEFT's ``disable_adapter()``): the model
    without its adapter, no second copy of the weights (DPO's reference: train/dpo.py). A merged adapter is in
    the base weight and cannot be left out: an error."""
    layers = lora_layers(model).values()
    if any(layer.merged for layer in layers):
        raise LoraError("cannot disable a merged adapter (unmerge_lora first)")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def merge_lora(model: nn.Module) -> None:
    """Add every adapter into its base weight (``LoraLinear.merge``); the layers then run the base alone."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Subtract every merged adapter from its base weight again."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the base layers back in the wrappers' places (PEFT's ``merge_and_unload``):
    a plain model again, as fast as one without an adapter."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, layer.base_layer)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter holds, in llava-next's names: every ``<path>.lora_A.weight`` / ``.lora_B.weight``, and
    the projector's weights when ``model.lora_config.projector`` is "full"."""
    cfg: LoraConfig | None = getattr(model, "lora_config", None)
    if cfg is None:
        raise LoraError("the model has no LoRA adapter (apply_lora first)")
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    if cfg.projector == "full":
        out.update({f"projector.{k}": v.detach() for k, v in model.get_submodule("projector").state_dict().items()})
    return out
