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
Casting (``dtype``) or moving (``device``) copies, one tensor at a time, in chunks whose mmapped file
pages are dropped from the process once copied (``release_file_pages``): a bf16 checkpoint loaded as
float32 peaks at the float32 model's bytes, not that plus the whole file.

Every safetensors file is checked against its own header before it is opened (``check_safetensors``):
a cut-off file (an interrupted download or copy) is an error naming the file and both sizes, not a
parser panic. Pickle files (``.bin``/``.pt``) are never opened. ``dtype`` must be a floating type
(``parse_dtype`` takes torch dtypes and the names fp32/fp16/bf16, float32/...).

Non-persistent buffers (RoPE frequencies, position ids) are not in the checkpoint, so they are still
on the meta device after loading. A module that owns such buffers defines ``init_buffers(device)``
to (re)create them; ``load_into`` calls it on every submodule that has it, then checks that no
tensor is left on the meta device.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llava_next.config import ConfigError, LlavaNextConfig
from llava_next.model.pages import is_file_mapped, release_file_pages
from llava_next_weights.shapes import describe_mismatch

INDEX_FILE = "model.safetensors.index.json"
CAST_CHUNK = 16 << 20  # bytes of source copied (then released) at a time when casting while loading
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class LoadError(ValueError):
    """The directory or its tensors do not fit; the message names the keys and what to do."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, a floating torch dtype, or one of ``DTYPE_NAMES`` -> the torch dtype (or None)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise LoadError(f"dtype {dtype!r} is not supported: weights and activations must be float32, float16 or "
                    f"bfloat16 (names: {', '.join(sorted(DTYPE_NAMES))}); quantized integer dtypes are not")


# The safetensors format as the safetensors library validates it (safetensors/src/tensor.rs: read_metadata,
# Metadata::validate, Dtype::bitsize): a header of at most 100 MB; bits per element of every dtype it defines.
SAFETENSORS_MAX_HEADER = 100_000_000
SAFETENSORS_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
                    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
                    "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_U64 = 2**64


def check_safetensors(path: Path, error: type[Exception] | None = None) -> None:
    """Raise ``error`` (default LoadError) naming ``path`` unless it is a well-formed safetensors file of
    exactly the size its header describes — checked from the header alone, before the file is opened.

    Everything the safetensors library checks is checked here first (``validate_safetensors_header``),
    so its ``SafetensorError`` (a traceback, e.g. for a header whose ``dtype`` field is misspelt) never
    reaches the user, and a header that claims a huge tensor is refused before anything is allocated.
    """
    error = error or LoadError
    size = path.stat().st_size
    again = "it is cut off (an interrupted download or copy?): download or copy it again"
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise error(f"{path}: not a safetensors file, or {again} (it has {size} bytes"
                        f"{'' if n is None else f'; its header alone claims {8 + n}'})")
        if n > SAFETENSORS_MAX_HEADER:
            raise error(f"{path}: not a safetensors file (its header length field says {n} bytes, over the "
                        f"format's limit of {SAFETENSORS_MAX_HEADER}); the file is damaged: get it again")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; absurd nesting
            raise error(f"{path}: not a safetensors file (unreadable header: {_first_line(e)})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: not a safetensors file (its header is a JSON {type(header).__name__}, not an object)")
    problem = validate_safetensors_header(header)
    if problem:
        raise error(f"{path}: damaged safetensors header: {problem}; the file is corrupt: download or copy it again")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise error(f"{path}: has {size} bytes but its header describes {8 + n + end}; {again}")
    if size > 8 + n + end:
        raise error(f"{path}: has {size} bytes but its header describes {8 + n + end}: {size - 8 - n - end} bytes "
                    f"at the end belong to no tensor, so the file is damaged (a bad copy?): download or copy it again")


def validate_safetensors_header(header: dict) -> str | None:
    """What is wrong with a parsed safetensors header (None if nothing), by the rules of the safetensors
    library: every entry but ``__metadata__`` (an object of strings, or null) is an object with ``dtype``
    (a name it knows), ``shape`` (integers >= 0) and ``data_offsets`` ([begin, end], end - begin = the
    tensor's bytes); in offset order the tensors tile the data from 0 without gaps or overlaps."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        return f"__metadata__ must map names to strings, got {_short(meta)}"
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"tensor {key!r} is described by {_short(info)}, not an object"
        missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
        if missing:
            return (f"tensor {key!r} has no {' / '.join(map(repr, missing))} field (its fields: "
                    f"{', '.join(map(repr, info)) or 'none'})")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
            return f"tensor {key!r} has dtype {_short(dtype)}, not a safetensors dtype ({', '.join(SAFETENSORS_BITS)})"
        if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
            return f"tensor {key!r} has shape {_short(shape)}; a shape is a list of integers >= 0"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_u64, offsets))
                and offsets[0] <= offsets[1]):
            return f"tensor {key!r} has data_offsets {_short(offsets)}; they must be [begin, end] with 0 <= begin <= end"
        bits = math.prod(shape) * SAFETENSORS_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            return (f"tensor {key!r} of shape {_short(shape)} and dtype {dtype} needs {bits / 8:.0f} bytes but its "
                    f"data_offsets {offsets} span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            return (f"tensor {key!r} starts at byte {begin} of the data, but the previous tensor ends at {position} "
                    f"(tensors must follow each other without gaps or overlaps)")
        position = end
    return None


def _is_u64(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _U64


def _short(v: object, n: int = 80) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list, str, int, float, bool, type(None))) else repr(v)
    return text if len(text) <= n else text[:n] + "..."


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


@contextlib.contextmanager
def safetensors_errors(path: Path, error: type[Exception] | None = None):
    """Any error the safetensors library raises reading ``path`` as ``error`` (default LoadError) naming the
    file: a backstop behind ``check_safetensors`` for whatever the library rejects that it did not foresee."""
    try:
        yield
    except SafetensorError as e:
        raise (error or LoadError)(f"{path}: not a valid safetensors file ({_first_line(e)}); the file is damaged: "
                                   f"download or copy it again") from None


def is_llava_next_dir(path: str | os.PathLike) -> bool:
    """True for a directory in llava-next's own layout (its config.json is a ``LlavaNextConfig``)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, absurdly nested: read_config says which
        return False
    return isinstance(raw, dict) and "vision" in raw and "text" in raw and "model_type" not in raw


def read_json(path: Path, error: type[Exception] = LoadError, hint: str = "") -> dict:
    """A JSON object from ``path``; ``error`` (with ``hint`` appended) when the file is not one."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError; RecursionError: absurdly deep nesting
        raise error(f"{path}: not valid JSON ({_first_line(e)}); the file is damaged or cut off{hint}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def index_shards(index: Path, error: type[Exception] = LoadError, hint: str = "") -> tuple[list[Path], list[str]]:
    """(the shard files a safetensors index names, the names of those that are not beside it)."""
    weight_map = read_json(index, error, hint).get("weight_map")
    if not isinstance(weight_map, dict):
        raise error(f"{index}: has no 'weight_map'; it is not a safetensors index{hint}")
    names = sorted(set(map(str, weight_map.values())))
    return [index.parent / n for n in names], [n for n in names if not (index.parent / n).is_file()]


def read_config(path: str | os.PathLike) -> LlavaNextConfig:
    """The ``LlavaNextConfig`` of a converted directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LoadError(f"no config.json in {path}")
    raw = read_json(path / "config.json")
    if not is_llava_next_dir(path):
        raise LoadError(f"{path} is not in llava-next's layout (its config.json is a llava-hf or original "
                        f"LLaVA-NeXT config); convert it first: llava_next_weights.hub.resolve({str(path)!r}) "
                        f"or llava_next_weights.convert.convert(src, out)")
    try:
        return LlavaNextConfig.from_dict(raw)
    except ConfigError as e:
        raise LoadError(f"{path / 'config.json'}: {e}") from None


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a directory: by its index, else ``model.safetensors``."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        files, missing = index_shards(index)
        if missing:
            raise LoadError(f"{index} lists files that are missing: {', '.join(missing)}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LoadError(f"{path} has only pickle weight files ({', '.join(pickles[:4])}); loading a pickle can run "
                        f"arbitrary code, so llava-next never unpickles: use safetensors weights")
    raise LoadError(f"no {INDEX_FILE} or model.safetensors in {path}")


def load_state_dict_mmap(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the directory, backed by the mmapped files (nothing is read until touched)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        check_safetensors(file)
        with safetensors_errors(file):
            tensors = load_file(file, device="cpu")
        for key, tensor in tensors.items():
            if key in state:
                raise LoadError(f"key {key!r} appears in two files of {path}")
            state[key] = tensor
    return state


def _cast(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` (a tensor of the mmapped files) as ``dtype`` on ``device``; ``t`` itself when nothing changes.

    Copied ``CAST_CHUNK`` bytes at a time, each chunk's file pages released once copied, so peak memory is
    the copies plus one chunk: ``t.to(dtype)`` keeps every source page resident beside the copies, and
    releasing whole tensors holds the largest one twice."""
    if t.dtype == dtype and t.device == device:
        return t
    out = torch.empty(t.shape, dtype=dtype, device=device)
    src, dst = t.reshape(-1), out.view(-1)  # flat views: safetensors tensors are contiguous
    step = max(1, CAST_CHUNK // t.element_size())
    for i in range(0, src.numel(), step):
        dst[i:i + step].copy_(src[i:i + step])
        release_file_pages(src[i:i + step])
    release_file_pages(t)  # the pages that straddle two chunks
    return out


def local_part(t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The part of the full checkpoint tensor ``t`` this process holds of ``target``: ``t`` itself, or, when
    ``target`` is a DTensor sharded evenly along dimensions (tensor parallelism, llava_next.parallel), this
    rank's slice. A slice along the first dimension stays a view of the mapped file (only its pages are
    ever read); any other slice is copied and the file pages it read are dropped."""
    placements = getattr(target, "placements", None)
    if placements is None:
        return t
    mesh, full = target.device_mesh, t
    for mesh_dim, placement in enumerate(placements):
        dim = getattr(placement, "dim", None)
        if dim is None or not placement.is_shard():
            continue
        n, i = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        if t.shape[dim] % n:
            raise LoadError(f"a tensor of shape {tuple(t.shape)} cannot be split evenly over {n} ranks along "
                            f"dimension {dim}")
        size = t.shape[dim] // n
        t = t.narrow(dim, i * size, size)
    if not t.is_contiguous():
        t = t.contiguous()
        if is_file_mapped(full):  # the rows it was copied from: none of their pages are needed here any more
            release_file_pages(full)
    return t


def load_into(module: torch.nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load a converted directory into ``module`` (built on the meta device) without copying.

    ``dtype`` casts floating tensors; ``device`` moves them (both copy). Returns ``module``.
    """
    dtype = parse_dtype(dtype)
    state = load_state_dict_mmap(path)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in state.items()}
    mismatch = describe_mismatch(actual, expected)
    if mismatch:
        hint = ""
        if set(actual) == set(expected):  # same tensors, other sizes: the numbers in config.json are wrong
            hint = (f"\nEvery tensor is there, with other sizes than {Path(path) / 'config.json'} gives: the "
                    f"config and the weights contradict each other (an edited config.json, one from another "
                    f"model, or altered tensors). Restore the files the checkpoint came with, or convert again.")
        raise LoadError(f"the checkpoint in {path} does not fit {type(module).__name__}:\n{mismatch}{hint}")
    kinds = [f"{k} ({state[k].dtype} in the file, {v.dtype} in the model)" for k, v in module.state_dict().items()
             if state[k].is_floating_point() != v.is_floating_point() or state[k].is_complex() != v.is_complex()]
    if kinds:  # e.g. a float weight stored as U32 (found by fuzzing: torch's load_state_dict raised RuntimeError)
        raise LoadError(f"the checkpoint in {path} stores {len(kinds)} tensor(s) in a dtype of the wrong kind: "
                        f"{', '.join(kinds[:5])}; the file is damaged: convert the checkpoint again")
    device = torch.device(device)
    targets = module.state_dict()
    # buffers a module keeps in their stored dtype whatever ``dtype`` is (NF4's fp32 absmax statistics)
    exact = {f"{n}.{b}" if n else b for n, m in module.named_modules() for b in getattr(m, "exact_dtype_buffers", ())}
    for key, t in state.items():
        t = local_part(t, targets[key])
        t = _cast(t, dtype if dtype is not None and t.is_floating_point() and key not in exact else t.dtype, device)
        if hasattr(targets[key], "placements"):  # a DTensor: this rank's slice, wrapped with the same layout
            from torch.distributed.tensor import DTensor

            t = DTensor.from_local(t, targets[key].device_mesh, targets[key].placements, run_check=False)
        state[key] = t
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
