"""Lazy loading of a converted llava-next directory: mmapped tensors assigned into a meta-device module.

    config = read_config(path)
    with torch.device("meta"):
        model = LlavaNextModel(config)            # no memory allocated, no random init
    load_into(model, path, dtype=torch.bfloat16)  # parameters become the file's tensors

Choices (after gpt-fast): the module is built on the meta device, so nothing is initialised twice;
``load_state_dict_mmap`` returns tensors backed by the safetensors files (``safetensors`` maps them
copy-on-write: pages are read from disk when first touched and never duplicated in memory), and
``load_state_dict(..., strict=True, assign=True)`` makes those tensors the module's parameters.
A missing, unexpected or mis-shaped key is an error that names it; nothing is skipped silently.
Casting (``dtype``) or moving (``device``) copies, one tensor at a time.

Non-persistent buffers (RoPE frequencies, position ids) are not in the checkpoint, so they are still
on the meta device after loading. A module that owns such buffers defines ``init_buffers(device)``
to (re)create them; ``load_into`` calls it on every submodule that has it, then checks that no
tensor is left on the meta device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from llava_next.config import ConfigError, LlavaNextConfig
from llava_next_weights.shapes import describe_mismatch

INDEX_FILE = "model.safetensors.index.json"


class LoadError(ValueError):
    """The directory or its tensors do not fit; the message names the keys and what to do."""


def is_llava_next_dir(path: str | os.PathLike) -> bool:
    """True for a directory in llava-next's own layout (its config.json is a ``LlavaNextConfig``)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(raw, dict) and "vision" in raw and "text" in raw and "model_type" not in raw


def read_config(path: str | os.PathLike) -> LlavaNextConfig:
    """The ``LlavaNextConfig`` of a converted directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LoadError(f"no config.json in {path}")
    if not is_llava_next_dir(path):
        raise LoadError(f"{path} is not in llava-next's layout (its config.json is a llava-hf or original "
                        f"LLaVA-NeXT config); convert it first: llava_next_weights.hub.resolve({str(path)!r}) "
                        f"or llava_next_weights.convert.convert(src, out)")
    try:
        return LlavaNextConfig.from_dict(json.loads((path / "config.json").read_text()))
    except ConfigError as e:
        raise LoadError(f"{path / 'config.json'}: {e}") from None


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a directory: by its index, else ``model.safetensors``."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise LoadError(f"{index} lists files that are missing: {', '.join(missing)}")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise LoadError(f"no {INDEX_FILE} or model.safetensors in {path}")


def load_state_dict_mmap(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the directory, backed by the mmapped files (nothing is read until touched)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        for key, tensor in load_file(file, device="cpu").items():
            if key in state:
                raise LoadError(f"key {key!r} appears in two files of {path}")
            state[key] = tensor
    return state


def load_into(module: torch.nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load a converted directory into ``module`` (built on the meta device) without copying.

    ``dtype`` casts floating tensors; ``device`` moves them (both copy). Returns ``module``.
    """
    state = load_state_dict_mmap(path)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    mismatch = describe_mismatch({k: tuple(v.shape) for k, v in state.items()}, expected)
    if mismatch:
        raise LoadError(f"the checkpoint in {path} does not fit {type(module).__name__}:\n{mismatch}")
    device = torch.device(device)
    for key, t in state.items():
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        state[key] = t.to(device)  # a no-op for cpu
    module.load_state_dict(state, strict=True, assign=True)
    for sub in module.modules():
        init = getattr(sub, "init_buffers", None)
        if callable(init):
            init(device)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise LoadError(f"{len(left)} tensor(s) of {type(module).__name__} are still on the meta device after "
                        f"loading: {', '.join(left[:10])}. They are not in the checkpoint (non-persistent "
                        f"buffers); the module that owns them must define init_buffers(device)")
    return module
