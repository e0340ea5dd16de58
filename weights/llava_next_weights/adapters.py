"""LoRA adapters on disk in PEFT's format, so they move between llava-next and transformers + PEFT.

    save_adapter(model, "out/")          # out/adapter_config.json + out/adapter_model.safetensors
    cfg = load_adapter(model, "out/")    # apply_lora(model, cfg) and the file's weights loaded into it
    cfg, tensors = read_adapter("out/")  # the same, without a model (llava-next's names)

The format is what ``PeftModel.save_pretrained`` writes (peft 0.18: peft/peft_model.py ``save_pretrained``,
peft/utils/save_and_load.py ``get_peft_model_state_dict``) for a llava-hf ``LlavaNext(Video)ForConditionalGeneration``
under transformers 5, checked in tests/test_lora.py by wrapping a tiny llava-hf model with ``get_peft_model``:

- ``adapter_config.json``: ``peft_type`` "LORA", ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
  ``target_modules`` (a regular expression PEFT full-matches against the llava-hf module names),
  ``bias`` "none", ``modules_to_save`` (["multi_modal_projector"] for a fully trained projector),
  ``task_type``, ``base_model_name_or_path``, and PEFT's other fields at their defaults.
- ``adapter_model.safetensors``: ``base_model.model.`` + the llava-hf module name + ``.lora_A.weight`` /
  ``.lora_B.weight`` (PEFT drops its adapter name "default"), e.g.
  ``base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`` (r, in) and
  ``...q_proj.lora_B.weight`` (out, r); a ``modules_to_save`` module's full weights under its own name,
  ``base_model.model.model.multi_modal_projector.linear_1.weight``.

Names move through the key tables of model/keymaps.py: a llava-hf module name ``M`` is llava-next's
``map_key("llava_hf_new", M + ".weight")`` less ``.weight`` (either CLIP prefix), and back through
``source_key("llava_hf_5", ...)`` (transformers 5's names, the ones PEFT sees).

Loading decides what is adapted from the tensors (which layers have ``lora_A``), checks them against the
config (rank, shapes) and refuses what it cannot reproduce exactly (DoRA, a LoRA bias, per-module alpha).
Nothing is unpickled: an ``adapter_model.bin`` is refused unopened, with the command that converts it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_next.model.keymaps import UnmappedKeyError, map_key, source_key
from llava_next.model.lora import (TEXT_TARGETS, VISION_TARGETS, LoraConfig, LoraError, apply_lora,
                                   lora_layers, lora_state_dict)
from llava_next_weights.load import LoadError, check_safetensors, read_json, safetensors_errors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."  # PeftModel -> LoraModel (base_model) -> the wrapped transformers model (model)
PROJECTOR = "multi_modal_projector"  # the llava-hf module a "full" projector is saved as (modules_to_save)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
# PEFT saves a LoRA-targeted lm_head's frozen base weight beside its adapter (get_peft_model_state_dict's
# save_embedding_layers="auto"): a copy of the base model's own weight, which loading leaves out
_BASE_COPY = re.compile(r"^base_model\.model\.lm_head\.base_layer\.weight$")

PathLike = str | os.PathLike


class AdapterError(LoadError):
    """An adapter directory that cannot be loaded or written; the message names the file and field."""


# ---- names ---------------------------------------------------------------------------------------
def hf_module(ours: str) -> str:
    """llava-next module path -> the llava-hf (transformers 5) module name PEFT uses."""
    return source_key("llava_hf_5", ours + ".weight").removesuffix(".weight")


def our_module(hf: str) -> str:
    """llava-hf module name (either CLIP prefix) -> llava-next module path."""
    target = map_key("llava_hf_new", hf + ".weight")
    if not isinstance(target, str):
        raise UnmappedKeyError(f"{hf!r} is not a layer llava-next builds")
    return target.removesuffix(".weight")


def to_peft_key(ours: str) -> str:
    """llava-next adapter key -> PEFT's saved key."""
    m = _LORA_KEY.match(ours)
    if m:
        return f"{PREFIX}{hf_module(m['module'])}.{m['which']}.weight"
    return PREFIX + source_key("llava_hf_5", ours)


def from_peft_key(key: str) -> str:
    """PEFT's saved key -> llava-next adapter key (raises ``UnmappedKeyError`` naming it)."""
    if not key.startswith(PREFIX):
        raise UnmappedKeyError(f"adapter key {key!r} does not start with {PREFIX!r}")
    key = key[len(PREFIX):]
    m = _LORA_KEY.match(key)
    if m:
        return f"{our_module(m['module'])}.{m['which']}.weight"
    target = map_key("llava_hf_new", key)
    if not isinstance(target, str):
        raise UnmappedKeyError(f"adapter key {key!r} names a tensor llava-next does not build")
    return target


def _target_regex(modules: list[str]) -> str:
    """A regular expression that full-matches exactly these llava-hf module names (layer indices grouped)."""
    by_template: dict[str, list[str]] = {}
    for name in modules:
        template = re.sub(r"\.(\d+)\.", ".{}.", name, count=1)
        index = re.search(r"\.(\d+)\.", name)
        by_template.setdefault(template, []).append(index.group(1) if index else "")
    parts = []
    for template, indices in by_template.items():
        escaped = re.escape(template).replace(r"\{\}", "{}")
        numbers = sorted(set(indices), key=int) if all(indices) else []
        parts.append(escaped.format("(?:" + "|".join(numbers) + ")") if numbers else escaped)
    return "|".join(sorted(parts))


# ---- saving ----------------------------------------------------------------------------------------
def adapter_config(cfg: LoraConfig, modules: list[str], *, base_model_name_or_path: str = "") -> dict:
    """PEFT's ``adapter_config.json`` for ``cfg`` with these llava-hf target module names."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": _target_regex(modules), "bias": "none",
        "modules_to_save": [PROJECTOR] if cfg.projector == "full" else None,
        "init_lora_weights": True, "inference_mode": True, "fan_in_fan_out": False, "use_dora": False,
        "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }


def save_adapter(model: torch.nn.Module, directory: PathLike, *, base_model_name_or_path: str = "") -> Path:
    """Write ``model``'s adapter (``apply_lora``) as PEFT's two files in ``directory``; returns it."""
    cfg: LoraConfig | None = getattr(model, "lora_config", None)
    if cfg is None:
        raise LoraError("the model has no LoRA adapter to save (apply_lora first)")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise LoraError("the adapter is merged into the base weights; unmerge_lora(model) before saving it")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {to_peft_key(k): v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    modules = [hf_module(name) for name in lora_layers(model)]
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    config = adapter_config(cfg, modules, base_model_name_or_path=base_model_name_or_path)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


# ---- loading ---------------------------------------------------------------------------------------
def convert_command(path: Path) -> str:
    """The one-line command that rewrites a pickled adapter as safetensors (the user runs it; we never unpickle)."""
    out = path.with_name(WEIGHTS_FILE)
    return (f"python -c \"import torch; from safetensors.torch import save_file; save_file({{k: v.contiguous() "
            f"for k, v in torch.load('{path}', weights_only=True).items()}}, '{out}', metadata={{'format': 'pt'}})\"")


def _field(config: dict, path: Path, name: str, check, expected: str, default=None, required: bool = False):
    if name not in config:
        if required:
            raise AdapterError(f"{path}: field {name!r} is missing (expected {expected})")
        return default
    value = config[name]
    if not check(value):
        raise AdapterError(f"{path}: field {name!r} is {json.dumps(value)}; expected {expected}")
    return value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_config(directory: Path) -> dict:
    """The checked fields of ``adapter_config.json``: r, alpha, dropout, use_rslora, modules_to_save."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path}: not found; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                           f"(what PEFT's save_pretrained writes)")
    config = read_json(path, AdapterError)
    _field(config, path, "peft_type", lambda v: v == "LORA", '"LORA" (other PEFT methods are not supported)',
           required=True)
    r = _field(config, path, "r", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
               "a positive integer", required=True)
    alpha = _field(config, path, "lora_alpha", _is_number, "a number", required=True)
    dropout = _field(config, path, "lora_dropout", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)", 0.0)
    rslora = _field(config, path, "use_rslora", lambda v: isinstance(v, bool), "true or false", False)
    _field(config, path, "bias", lambda v: v == "none", '"none" (trained biases are not supported)')
    for name in ("use_dora", "lora_bias", "fan_in_fan_out"):
        _field(config, path, name, lambda v: v in (False, None), f"false ({name} is not supported)")
    for name in ("rank_pattern", "alpha_pattern"):
        _field(config, path, name, lambda v: not v, f"empty (per-module {name.split('_')[0]} is not supported)")
    to_save = _field(config, path, "modules_to_save", lambda v: v is None or (
        isinstance(v, list) and all(m == PROJECTOR for m in v)), f'null or ["{PROJECTOR}"]', None)
    return {"r": r, "alpha": alpha, "dropout": float(dropout), "use_rslora": rslora, "full_projector": bool(to_save)}


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """``adapter_model.safetensors`` in PEFT's names; a pickled ``adapter_model.bin`` is refused unopened."""
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        pickled = directory / PICKLE_FILE
        if pickled.is_file():
            raise AdapterError(f"{pickled}: a pickled adapter (loading it could run code, so llava-next never "
                               f"opens it); convert it to {WEIGHTS_FILE} once, then load again: "
                               f"{convert_command(pickled)}")
        raise AdapterError(f"{path}: not found; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    check_safetensors(path, AdapterError)
    with safetensors_errors(path, AdapterError):
        return load_file(path, device="cpu")


def read_adapter(directory: PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(the ``LoraConfig`` an adapter directory describes, its tensors in llava-next's names)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter directory")
    fields = read_config(directory)
    ours = {}
    for key, tensor in read_tensors(directory).items():
        if _BASE_COPY.match(key):
            continue
        try:
            ours[from_peft_key(key)] = tensor
        except UnmappedKeyError as e:
            raise AdapterError(f"{directory / WEIGHTS_FILE}: {e}") from None
    decoder, vision, projector = set(), set(), set()
    for key, tensor in ours.items():
        m = _LORA_KEY.match(key)
        if m is None:
            if not key.startswith("projector."):
                raise AdapterError(f"{directory / WEIGHTS_FILE}: {key!r} is a full weight outside the projector")
            continue
        module = m["module"]
        leaf = module.rpartition(".")[2]
        (decoder if module.startswith("language_model.") else vision if module.startswith("vision_tower.")
         else projector).add(leaf)
        if m["which"] == "lora_A" and tensor.shape[0] != fields["r"]:
            raise AdapterError(f"{directory / WEIGHTS_FILE}: {key} has rank {tensor.shape[0]} but "
                               f"{directory / CONFIG_FILE} says r = {fields['r']}")
    full = any(not _LORA_KEY.match(k) for k in ours)
    if full != fields["full_projector"]:
        raise AdapterError(f"{directory / CONFIG_FILE}: field 'modules_to_save' "
                           f"{'does not name' if full else 'names'} {PROJECTOR!r} but {WEIGHTS_FILE} "
                           f"{'has' if full else 'has no'} its weights")
    if projector and full:
        raise AdapterError(f"{directory / WEIGHTS_FILE}: the projector is both LoRA-adapted and fully saved")
    cfg = LoraConfig(r=fields["r"], alpha=fields["alpha"], dropout=fields["dropout"], use_rslora=fields["use_rslora"],
                     target_modules=tuple(t for t in TEXT_TARGETS if t in decoder),
                     vision_target_modules=tuple(t for t in VISION_TARGETS if t in vision),
                     vision="lora" if vision else "frozen",
                     projector="full" if full else "lora" if projector else "frozen")
    return cfg, ours


@torch.no_grad()
def load_adapter(model: torch.nn.Module, directory: PathLike, *, dtype: torch.dtype | None = None) -> LoraConfig:
    """Read an adapter directory, ``apply_lora`` its config to ``model`` and copy its tensors in. Strict: a
    layer the adapter lacks or a tensor the model lacks is an error naming it. Returns the config.
    ``dtype``: the adapters' (default: each base weight's float dtype, float32 over a quantized base)."""
    cfg, tensors = read_adapter(directory)
    apply_lora(model, cfg, dtype=dtype)
    expected = lora_state_dict(model)
    where = Path(directory) / WEIGHTS_FILE
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterError(f"{where} does not fit the model: "
                           + "; ".join(f"{what} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                                       for what, keys in (("missing", missing), ("unexpected", extra)) if keys))
    for key, target in expected.items():
        if tensors[key].shape != target.shape:
            raise AdapterError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, the model needs "
                               f"{tuple(target.shape)} (an adapter for another model?)")
        target.copy_(tensors[key])
    return cfg
