"""The one loader: a model id -> (checkpoint directory, config, tokenizer) -> a ``Pipeline``.

    pipe = load("tiny-random")                                  # what Pipeline.from_pretrained calls
    pipe = load(model_id, materialize=shard_over_mesh, ...)     # parallel/tensor_parallel.py: its own model

Steps, in order:
1. ``resolve_checkpoint``: a built-in model (runtime/tiny.py: built into the cache on first use), a converted
   llava-next directory, a llava-hf / original checkpoint directory or a hub id (llava_next_weights.hub:
   downloaded, converted once, cached; ``quantize``: its decoder's linears quantized once into the cache).
2. ``read_config``: the checkpoint's config.json, with the chat template of the preset whose hub id it is
   (a llava-hf config.json does not say which template the model was trained with; 34B: chatml).
3. ``materialize``: the weights into a model. ``materialize_single`` (one process: built on the meta device,
   the memory check, the mmapped weights, a LoRA adapter (``adapter``), oneDNN-prepacked on CPU) unless the
   caller brings its own: the tensor-parallel package shards the decoder over a device mesh and loads each
   rank's slices (no adapter there).

An adapter (``adapter=DIR``: PEFT's adapter_config.json + adapter_model.safetensors, llava_next_weights/adapters.py)
is merged into the weights when the base is float (``merge_and_unload``: the model then runs as fast as one
without an adapter), and kept beside the base layers over a quantized base (its weights are integers).
4. ``read_tokenizer``: the checkpoint's tokenizer.json.

The caller may wrap step 1 (``resolve_step``) and steps 2-4 (``load_step``): under torchrun each machine's
local rank 0 resolves first and every rank agrees on the outcome (parallel/launch.py's ``agree``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, TypeVar

import torch

from ..config import LlavaNextConfig
from ..inputs.prompt import Tokenizer
from ..model.llava import LlavaNextModel
from ..model.int8_activations import ACTIVATIONS, Activations
from ..model.quant import set_activations
from . import tiny
from .memory import check_model_fits
from .pipeline import Pipeline

PathLike = str | os.PathLike
T = TypeVar("T")
# (checkpoint directory, config, dtype, device) -> the model with its weights
Materialize = Callable[[Path, LlavaNextConfig, "torch.dtype | None", "str | torch.device"], LlavaNextModel]


def _now(step: Callable[[], T]) -> T:
    return step()


def load(model_id_or_dir: PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         cache_dir: PathLike | None = None, progress: bool = True, quantize: str | None = None,
         group_size: int | None = 128, adapter: PathLike | None = None, activations: Activations = "float",
         materialize: Materialize | None = None,
         pipeline_class: type[Pipeline] = Pipeline, resolve_step: Callable = _now,
         load_step: Callable = _now) -> Pipeline:
    """``model_id_or_dir`` resolved, read and loaded into ``pipeline_class`` (see the module docstring)."""
    from llava_next_weights.load import parse_dtype

    dtype = parse_dtype(dtype)  # a bad dtype fails before any conversion or loading
    check_activations(activations, quantize)
    if adapter is not None:
        from llava_next_weights.adapters import read_adapter

        if materialize is not None:
            raise ValueError("a LoRA adapter cannot be loaded into a model the caller materializes (tensor "
                             "parallel); merge it into a checkpoint first, or run in one process")
        read_adapter(adapter)  # a bad adapter fails before any conversion or loading
    path = resolve_step(lambda: resolve_checkpoint(model_id_or_dir, cache_dir=cache_dir, progress=progress,
                                                   quantize=quantize, group_size=group_size))

    def read_and_materialize() -> Pipeline:
        config = read_config(path, model_id_or_dir)
        if materialize is not None:
            model = materialize(Path(path), config, dtype, device)
        else:
            model = materialize_single(Path(path), config, dtype, device, adapter=adapter)
        if activations != "float" and not set_activations(model, activations):
            raise ValueError(f"activations {activations!r}: {model_id_or_dir} has no int8 or int4 layers; quantize "
                             f"it (--quantize int8 or int4), or leave the activations float")
        return pipeline_class(model, read_tokenizer(path))

    return load_step(read_and_materialize)


def check_activations(mode: str, quantize: str | None) -> None:
    """Bad ``activations``, or int8 ones for a quantization that has none, fail before any loading."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations {mode!r} are not one of {', '.join(ACTIVATIONS)}")
    if mode != "float" and quantize not in (None, "int8", "int4"):
        raise ValueError(f"activations {mode!r} are for int8 or int4 weights, not {quantize}; use --quantize int8 "
                         f"or int4")


def resolve_checkpoint(model_id_or_dir: PathLike, *, cache_dir: PathLike | None = None, progress: bool = True,
                       quantize: str | None = None, group_size: int | None = 128) -> Path:
    """The converted llava-next directory of a built-in model, a directory or a hub id."""
    from llava_next_weights.hub import resolve

    if tiny.is_tiny(model_id_or_dir):  # built in: random weights, built into the cache on first use
        path = tiny.ensure(cache_dir, name=str(model_id_or_dir))
        if quantize is not None:  # quantized into the cache like any llava-next directory
            path = resolve(path, cache_dir=cache_dir, progress=progress, quantize=quantize, group_size=group_size)
        return path
    return resolve(model_id_or_dir, cache_dir=cache_dir, progress=progress, quantize=quantize, group_size=group_size)


def read_config(path: PathLike, model_id: PathLike) -> LlavaNextConfig:
    """``path``'s config.json, with the chat template of ``model_id``'s preset when it has one."""
    from llava_next_weights.load import read_config as read_config_json

    config = read_config_json(path)
    preset = preset_for(model_id)
    if preset is not None and config.template != preset.config.template:
        # a llava-hf config.json does not say which chat template the model was trained with (34B: chatml)
        config = dataclasses.replace(config, template=preset.config.template)
    return config


def read_tokenizer(path: PathLike) -> Tokenizer:
    tokenizer_file = Path(path) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; copy the checkpoint's tokenizer.json there")
    return Tokenizer.load(tokenizer_file)


def materialize_single(path: Path, config: LlavaNextConfig, dtype: torch.dtype | None,
                       device: str | torch.device, adapter: PathLike | None = None) -> LlavaNextModel:
    """One process's model: built on the meta device, checked against the memory available, its weights
    mmapped (quantized where the directory is), ``adapter`` merged in (float) or beside (quantized), prepacked
    for oneDNN on CPU."""
    from llava_next_weights.load import load_into
    from llava_next_weights.quantize import prepare_quantized

    with torch.device("meta"):
        model = LlavaNextModel(config)
    qc = prepare_quantized(model, path, dtype)
    check_model_fits(config, dtype or torch.bfloat16, device, None if qc is None else qc.method,
                     128 if qc is None else qc.group_size)
    if qc is not None and qc.method != "nf4" and torch.device(device).type != "cpu":  # nf4 is plain torch ops
        raise ValueError(f"{path} is quantized: int8 / int4 checkpoints run on CPU only (torch's int8/int4 "
                         f"CPU kernels); use --device cpu, --quantize nf4, or the float checkpoint on {device}")
    load_into(model, path, dtype=dtype, device=device)
    if adapter is not None:
        attach_adapter(model, adapter, merge=qc is None)
    model.requires_grad_(False)  # an inference model: no graph unless a caller chooses what trains
    model.pack_for_cpu()  # oneDNN-prepacked linears on CPU (same numbers, faster); a no-op elsewhere
    return model


def attach_adapter(model: LlavaNextModel, adapter: PathLike, *, merge: bool) -> None:
    """A PEFT-format LoRA adapter into ``model`` for inference: merged into the float weights and the wrappers
    removed (``merge``), or kept beside quantized base layers, in the model's dtype."""
    from llava_next_weights.adapters import load_adapter

    from ..model.lora import merge_and_unload

    load_adapter(model, adapter, dtype=model.dtype)
    if merge:
        merge_and_unload(model)
    for p in model.parameters():  # inference: apply_lora left the adapters trainable
        p.requires_grad_(False)


def preset_for(model_id: PathLike):
    """The preset whose hub id (llava-hf or original) is ``model_id``, or None."""
    from ..config import PRESETS

    name = str(model_id)
    return next((p for p in PRESETS.values() if name in (p.hub_id, p.original_id)), None)
