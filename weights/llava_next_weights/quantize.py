"""Quantized checkpoints: writing them (inside ``convert``), checking them, and loading them.

    convert(src, out, quantize="int4")                         # or llava-next convert SRC OUT --quantize int4
    qc = prepare_quantized(model_on_meta, out, dtype)          # before load_into: the model's quantized layers
    load_into(model_on_meta, out, dtype=dtype)                 # mmapped, strict, as for every checkpoint

A quantized directory is a converted llava-next directory in which every quantized linear ``P`` stores
``P.weight`` as integers plus ``P.scales`` (int4 also ``P.zeros``) — the layout is documented in
``llava_next/model/quant.py`` — and ``quantization.json`` says how: ``{"method": "int8"}`` or
``{"method": "int4", "group_size": 128}`` or ``{"method": "nf4"}`` (plus ``"scope"``; nf4 stores
``P.absmax`` (uint8), ``P.absmax_scale`` and ``P.absmax_offset`` (fp32, kept fp32 when loading) instead of
scales). Which linears are quantized is not
stored per key: it follows from the config and the scope (``quant_model.quantized_linear_names`` on the model
built from the config), the same rule when writing and when loading.

Checked from the safetensors headers before any data is read (``check_quantized``), each error naming
the key: a quantized weight stored as float (or the reverse), missing ``scales`` / ``zeros``, scales of a
shape that does not match the group size in quantization.json, an int4 weight whose shape the kernel
cannot take, integer tensors in a directory without quantization.json. Everything else (missing,
unexpected, mis-shaped keys) is ``load_into``'s usual strict check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from llava_next.config import LlavaNextConfig
from llava_next.model.quant import QuantConfig, QuantizationError, check_int4_shape
from llava_next.model.quant_model import quantize_model, quantized_linear_names, quantized_shapes, quantized_state
from llava_next_weights.load import LoadError, check_safetensors, read_json, weight_files

QUANT_FILE = "quantization.json"
_ST_NAMES = {"I8": torch.int8, "U8": torch.uint8, "BF16": torch.bfloat16, "F16": torch.float16,
             "F32": torch.float32, "F64": torch.float64}


def quantized_weight_keys(config: LlavaNextConfig, qc: QuantConfig) -> list[str]:
    """The ``.weight`` keys of the linears that ``qc`` quantizes in a model of ``config``."""
    from llava_next.model.llava import LlavaNextModel

    with torch.device("meta"):
        model = LlavaNextModel(config)
    return [f"{name}.weight" for name in quantized_linear_names(model, qc.scope)]


# ---- writing (used by convert) ---------------------------------------------------------------------
def quantized_entries(entries: list[tuple[str, tuple, torch.dtype]], config: LlavaNextConfig,
                      qc: QuantConfig) -> list[tuple[str, tuple, torch.dtype]]:
    """``convert``'s output entries (key, shape, dtype) with each quantized weight replaced by its
    stored tensors (scales in the weight's own output dtype). Raises naming a key int4 cannot take."""
    targets = set(quantized_weight_keys(config, qc))
    if qc.method == "int4":  # before anything: the message states which condition fails and what can help
        shapes = [tuple(shape) for key, shape, _ in entries if key in targets]
        for key, shape, _ in entries:
            if key in targets:
                try:
                    check_int4_shape(key, *shape, qc.group_size, model_shapes=shapes)
                except QuantizationError as e:
                    raise QuantizationError(f"cannot quantize this checkpoint to {qc.method}: {e}") from None
    out = []
    for key, shape, dtype in entries:
        if key not in targets:
            out.append((key, shape, dtype))
            continue
        try:
            stored = quantized_shapes(key.removesuffix(".weight"), shape, qc, dtype)
        except QuantizationError as e:
            raise QuantizationError(f"cannot quantize this checkpoint to {qc.method}: {e}") from None
        out += [(k, s, d) for k, (s, d) in stored.items()]
    return out


def quantizing_reader(read: Callable[[str], torch.Tensor], config: LlavaNextConfig,
                      qc: QuantConfig) -> Callable[[str], torch.Tensor]:
    """Wrap ``convert``'s ``read(target)``: a stored tensor of a quantized linear is computed from the
    float weight once (the first of its parts asked for); the other parts wait in a small dict until
    written, whatever order or shard they are written in."""
    targets = set(quantized_weight_keys(config, qc))
    pending: dict[str, torch.Tensor] = {}

    def read_quantized(key: str) -> torch.Tensor:
        if key in pending:
            return pending.pop(key)
        prefix, _, leaf = key.rpartition(".")
        if f"{prefix}.weight" not in targets or leaf not in ("weight", "scales", "zeros", "absmax", "absmax_scale",
                                                              "absmax_offset"):
            return read(key)
        weight = read(f"{prefix}.weight")
        pending.update(quantized_state(prefix, weight, qc, weight.dtype))
        return pending.pop(key)

    return read_quantized


def write_quant_file(directory: Path, qc: QuantConfig) -> None:
    (directory / QUANT_FILE).write_text(json.dumps(qc.to_dict(), indent=2) + "\n")


# ---- reading ---------------------------------------------------------------------------------------
def read_quant_config(path: str | os.PathLike) -> QuantConfig | None:
    """The ``QuantConfig`` of a directory's quantization.json, or None when it has none."""
    file = Path(path) / QUANT_FILE
    if not file.is_file():
        return None
    try:
        return QuantConfig.from_dict(read_json(file))
    except (QuantizationError, TypeError) as e:
        raise LoadError(f"{file}: {e}") from None


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    out = {}
    for file in weight_files(path):
        check_safetensors(file)
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                out[key] = (tuple(s.get_shape()), _ST_NAMES.get(s.get_dtype(), s.get_dtype()))
    return out


def check_quantized(path: str | os.PathLike, config: LlavaNextConfig, qc: QuantConfig | None) -> None:
    """Raise ``LoadError`` naming the key when the stored tensors do not match ``qc`` (see the module
    docstring). Headers only."""
    path = Path(path)
    headers = _headers(path)
    integer = sorted(k for k, (_, d) in headers.items() if d in (torch.int8, torch.uint8))
    if qc is None:
        if integer or any(k.endswith((".scales", ".zeros")) for k in headers):
            key = (integer or [k for k in headers if k.endswith((".scales", ".zeros"))])[0]
            raise LoadError(f"{path}: {key} is a quantized tensor but the directory has no {QUANT_FILE}; restore "
                            f"that file (it says int8, int4 or nf4, and int4's group size), or convert the model again")
        return
    where = f"{path / QUANT_FILE} says {qc.method}" + (f" with group_size {qc.group_size}" if qc.method == "int4" else "")
    problems = []
    qkeys = quantized_weight_keys(config, qc)
    integer_parts = set(qkeys)  # the integer tensors a quantized layer stores (nf4: its uint8 absmax too)
    for key in qkeys:
        prefix = key.removesuffix(".weight")
        if key not in headers:
            problems.append(f"{key} is missing")
            continue
        shape = headers[key][0]
        if len(shape) != 2:
            problems.append(f"{key} has shape {shape}, expected a matrix")
            continue
        n, k = shape[0], shape[1] * (2 if qc.method in ("int4", "nf4") else 1)
        try:
            want = quantized_shapes(prefix, (n, k), qc, torch.bfloat16)
        except QuantizationError as e:
            problems.append(str(e))
            continue
        for part, (want_shape, want_dtype) in want.items():
            if not want_dtype.is_floating_point:
                integer_parts.add(part)
            if part not in headers:
                problems.append(f"{part} is missing (a quantized {qc.method} weight needs it)")
                continue
            got_shape, got_dtype = headers[part]
            if (part.endswith(".weight") or not want_dtype.is_floating_point) and got_dtype != want_dtype:
                problems.append(f"{part} is {str(got_dtype).removeprefix('torch.')}, expected "
                                f"{str(want_dtype).removeprefix('torch.')} for {qc.method}")
            elif (not part.endswith(".weight") and want_dtype.is_floating_point
                  and not (isinstance(got_dtype, torch.dtype) and got_dtype.is_floating_point)):
                problems.append(f"{part} is {got_dtype}, expected a float tensor")
            elif got_shape != want_shape:
                hint = ""
                if part.endswith((".scales", ".zeros")) and qc.method == "int4" and len(got_shape) == 2 and got_shape[1]:
                    hint = f" (written with group_size {k // got_shape[1]}?)" if k % got_shape[1] == 0 else ""
                problems.append(f"{part} has shape {got_shape}, expected {want_shape}{hint}")
    others = sorted(set(integer) - integer_parts)
    if others:
        problems.append(f"integer tensor(s) outside the quantized layers: {', '.join(others[:5])}")
    if problems:
        more = f"\n  ... ({len(problems) - 10} more)" if len(problems) > 10 else ""
        raise LoadError(f"the quantized checkpoint in {path} does not match what {where}:\n  "
                        + "\n  ".join(problems[:10]) + more)


def prepare_quantized(model: torch.nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> QuantConfig | None:
    """Before ``load_into``: check the directory's quantized tensors and give ``model`` (on the meta
    device) the matching quantized layers. Returns the ``QuantConfig`` (None: not quantized)."""
    qc = read_quant_config(path)
    check_quantized(path, model.config, qc)
    if qc is not None:
        quantize_model(model, qc, dtype=dtype)
    return qc
