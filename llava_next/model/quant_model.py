"""Whole models quantized (the layers themselves: model/quant.py, model/nf4.py): which linears quantization
replaces, quantizing and dequantizing a model in place, and what one quantized linear stores (its tensors,
their shapes, its bytes) for checkpoints and memory plans.

    quantize_model(model, QuantConfig("int4", group_size=128))   # every decoder nn.Linear replaced, in place
    dequantize_model(model)                                      # back to nn.Linear (the tests' reference)
    quantized_state("layers.0.mlp.up", weight, qc, torch.bfloat16)   # the tensors a checkpoint stores
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .nf4 import NF4Error, NF4Linear, check_nf4_shape, nf4_bytes, nf4_dequantize, nf4_quantize
from .quant import (DEFAULT_GROUP_SIZE, Int4Linear, Int8Linear, Method, QuantConfig, QuantizationError, QuantLinear,
                    Scope, check_int4_shape, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8)


def quantized_linear_names(model: nn.Module, scope: Scope = "decoder") -> list[str]:
    """Names of the ``nn.Linear`` modules that quantization replaces (decoder: under ``language_model``,
    or the whole module when it is a decoder itself)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if scope == "all" or not any(n.startswith("language_model.") for n in names):
        return names
    return [n for n in names if n.startswith("language_model.")]


def quantize_model(model: nn.Module, qc: QuantConfig, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the selected ``nn.Linear`` layers by quantized ones, in place. On the meta device (a model
    about to be loaded from a quantized checkpoint) only the structure changes. Scales are kept in
    ``dtype`` (default: each layer's weight dtype)."""
    for name in quantized_linear_names(model, qc.scope):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, leaf)
        dt = dtype or lin.weight.dtype
        if lin.weight.is_meta:
            if qc.method == "int8":
                new = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, dt, "meta")
            elif qc.method == "nf4":
                _check_nf4(f"{name}.weight", lin.out_features, lin.in_features)
                new = NF4Linear(lin.in_features, lin.out_features, lin.bias is not None, dt, "meta")
            else:
                check_int4_shape(f"{name}.weight", lin.out_features, lin.in_features, qc.group_size)
                new = Int4Linear(lin.in_features, lin.out_features, qc.group_size, lin.bias is not None, dt, "meta")
        elif qc.method == "int8":
            new = Int8Linear.from_linear(lin, dt)
        elif qc.method == "nf4":
            _check_nf4(f"{name}.weight", lin.out_features, lin.in_features)
            new = NF4Linear.from_linear(lin, dt, f"{name}.weight")
        else:
            new = Int4Linear.from_linear(lin, qc.group_size, dt, f"{name}.weight")
        if isinstance(new, NF4Linear):  # lm_head dequantizes into a tensor of its own (nf4.py ``_scratch``)
            new.reuse_buffer = leaf != "lm_head"
        setattr(parent, leaf, new)
    return model


def _check_nf4(name: str, n: int, k: int) -> None:
    try:
        check_nf4_shape(name, n, k)
    except NF4Error as e:
        raise QuantizationError(str(e)) from None


def quantized_state(name: str, weight: torch.Tensor, qc: QuantConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized linear ``name`` (its prefix, without ``.weight``)."""
    if qc.method == "nf4":
        N, K = weight.shape
        _check_nf4(f"{name}.weight", N, K)
        q = nf4_quantize(weight)
        return {f"{name}.weight": q.packed.view(N, K // 2), f"{name}.absmax": q.absmax,
                f"{name}.absmax_scale": q.absmax_scale, f"{name}.absmax_offset": q.absmax_offset}
    if qc.method == "int8":
        q, scales = quantize_int8(weight)
        return {f"{name}.weight": q, f"{name}.scales": scales.to(dtype)}
    packed, scales, zeros = quantize_int4(weight, qc.group_size, f"{name}.weight")
    return {f"{name}.weight": packed, f"{name}.scales": scales.to(dtype), f"{name}.zeros": zeros.to(dtype)}


def quantized_shapes(name: str, shape: tuple[int, int], qc: QuantConfig, dtype: torch.dtype) -> dict:
    """{key: (shape, dtype)} of the stored tensors of one quantized linear of weight ``shape`` (N, K)."""
    N, K = shape
    if qc.method == "int8":
        return {f"{name}.weight": ((N, K), torch.int8), f"{name}.scales": ((N,), dtype)}
    if qc.method == "nf4":
        _check_nf4(f"{name}.weight", N, K)
        blocks = N * K // 64
        return {f"{name}.weight": ((N, K // 2), torch.uint8), f"{name}.absmax": ((blocks,), torch.uint8),
                f"{name}.absmax_scale": ((-(blocks // -256),), torch.float32),
                f"{name}.absmax_offset": ((), torch.float32)}
    check_int4_shape(f"{name}.weight", N, K, qc.group_size)
    G = K // qc.group_size
    return {f"{name}.weight": ((N, K // 2), torch.uint8), f"{name}.scales": ((N, G), dtype),
            f"{name}.zeros": ((N, G), dtype)}


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized layer by an ``nn.Linear`` holding its dequantized weight (the reference
    a quantized model is tested against), in place."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        if isinstance(m, Int8Linear):
            w = dequantize_int8(m.weight, m.scales)
        elif isinstance(m, NF4Linear):
            w = nf4_dequantize(m.nf4_weight(), torch.float32)
        else:
            w = dequantize_int4(m.weight, m.scales, m.zeros, m.group_size)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, lin)
    return model


def weight_bytes(shape: tuple[int, int], method: Method | None, itemsize: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes a weight of ``shape`` occupies: float (``itemsize``), or a linear's int8 + scales / int4 + scales, zeros /
    nf4 nibbles + uint8 absmax + its fp32 statistics (0.5 byte per weight + 1 per 64 + 4 per 16384 + 4)."""
    if method is None:
        return math.prod(shape) * itemsize
    N, K = shape
    if method == "nf4":
        return nf4_bytes(N, K)
    if method == "int8":
        return N * K + N * itemsize
    return N * K // 2 + 2 * N * (K // group_size) * itemsize
