"""int8 activations for the int8 and int4 layers of model/quant.py (``activations = "int8"`` on the layers,
``quant.set_activations``; the command line's ``--activations int8``): a different numeric contract, off by
default. Each row of the input is quantized symmetrically (``s_x = max_k |x[m, k]| / 127``, ``x_q = round(x /
s_x)``) and the integer products are summed exactly in int32:
- int8 weights, prompts and decode steps: ``acc = x_q q^T`` by ``torch._int_mm`` (oneDNN's VNNI / AMX-INT8 GEMM:
  twice the multiply-adds per instruction of the bf16 dot product) for a prompt, by the C loop
  (cpu_int8_activations.c, AVX512-VNNI: 64 byte products per instruction) for a decode step, and
  ``y = acc * s_x * s_w`` in fp32, rounded once: torchao's int8 dynamic-activation / int8-weight scheme
  (per-token activation scales). Prompt and decode give the same bits for the same row.
- int4 weights, decode steps: per group ``P = sum x_q q`` and ``X = sum x_q`` in int32, ``y = s_x sum_g (scale P
  + (zero - 8 scale) X)`` in fp32 (``int4_activation_linear``): the arithmetic of llama.cpp's Q4_0 x Q8_0 dot
  product, which lets a CPU without AVX512-BF16 read int4 weights as fast as memory gives them. Prompts stay on
  the dequantized weight (torch has no grouped integer GEMM).
llama.cpp's Q8_0 quantizes activations per block of 32 values. The cost: each row's error grows with its largest
value, so a row with an outlier feature (LLM.int8, arXiv:2208.07339: from ~6.7B parameters some hidden dimensions
reach 20x the others) loses precision in all its other features; "float" (default) keeps the weight-only numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import torch

from . import cpu_gemv, policy

if TYPE_CHECKING:
    from .quant import Int4Linear, Int8Linear

Activations = Literal["float", "int8"]
ACTIVATIONS = get_args(Activations)


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (x_q (M, K) int8, s_x (M, 1) fp32): s_x = max |x_row| / 127 (at least fp32's smallest normal),
    x_q = round(x / s_x), in one C pass for bf16 (the same bits as these torch ops)."""
    quantized = cpu_gemv.quantize_rows_int8(x2)
    if quantized is None:
        x32 = x2.float()
        sx = x32.abs().amax(-1, keepdim=True).div_(127).clamp_min_(torch.finfo(torch.float32).tiny)  # (M, 1)
        quantized = (x32 / sx).round_().to(torch.int8), sx  # (M, K) in [-127, 127] (x32 is x itself for fp32)
    return quantized


def a8_decode_kernel(layer: "Int8Linear | Int4Linear", x: torch.Tensor, rows: int) -> bool:
    """Whether this call is a decode step for the C int8-activation loops (cpu_int8_activations.c): bf16 rows and
    scales on CPU, at most ``policy.GEMV_MAX_ROWS``, outside a compiled graph, the library built."""
    return (rows <= policy.GEMV_MAX_ROWS and x.dtype == torch.bfloat16 and layer.scales.dtype == torch.bfloat16
            and x.device.type == "cpu" and not torch.compiler.is_compiling() and cpu_gemv.load() is not None)


def int8_activation_linear(layer: "Int8Linear", x: torch.Tensor) -> torch.Tensor:
    """An input (..., K) -> (..., N) in integer arithmetic (module docstring): each row quantized to int8 with its
    own scale, int8 x int8 summed exactly in int32, scaled in fp32."""
    rows, K, N = x.numel() // layer.in_features, layer.in_features, layer.out_features
    if a8_decode_kernel(layer, x, rows):  # the same bits, one pass over the weight
        return cpu_gemv.gemv_int8_a8(x, layer.weight, layer.scales, layer.bias)
    xq, sx = quantize_rows(x.reshape(rows, K))
    acc = torch._int_mm(xq, layer.weight.t())  # (M, N) int32: exact
    y = cpu_gemv.scale_rows_int8(acc, sx, layer.scales, layer.bias) if x.dtype == torch.bfloat16 else None
    if y is None:
        y = (acc * sx).mul_(layer.scales.float())  # fp32: acc * s_x * s_w
        if layer.bias is not None:
            y += layer.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def int4_activation_linear(layer: "Int4Linear", x: torch.Tensor) -> torch.Tensor:
    """A few rows (..., K) -> (..., N) with int8 activations (module docstring): per group P = sum x_q q and
    X = sum x_q, exact (fp32 holds every integer below 2^24: |P| <= 256 * 15 * 127),
    y = s_x sum_g (scale P + (zero - 8 scale) X) in fp32. The C loop where it applies (the sum over groups in
    another order: ~1e-7 relative before the rounding to x's dtype)."""
    rows, K, N, G = x.numel() // layer.in_features, layer.in_features, layer.out_features, layer.group_size
    if a8_decode_kernel(layer, x, rows):
        return cpu_gemv.gemv_int4_a8(x, layer.weight, layer.scales, layer.zeros, G, layer.bias)
    xq, sx = quantize_rows(x.reshape(rows, K))
    xg = xq.float().view(rows, K // G, G)  # (M, groups, G)
    q = torch.stack((layer.weight & 15, layer.weight >> 4), -1).float().view(N, K // G, G)  # (N, groups, G) raw
    # nibbles 0..15: column 2j is byte j's low nibble, 2j + 1 its high one (model/quant.py's stored layout)
    P = torch.einsum("mgk,ngk->mng", xg, q)  # (M, N, groups): exact integers
    s, z = layer.scales.float(), layer.zeros.float()  # (N, groups)
    y = (P * s).sum(-1) + xg.sum(-1) @ (z - 8 * s).T  # (M, N)
    y = y * sx
    if layer.bias is not None:
        y += layer.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
