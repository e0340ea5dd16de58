"""Weight-only quantization of linear layers: int8 per output channel, int4 in groups; activations stay bf16
(or, as an opt-in, are quantized to int8 per row: below).

    qc = QuantConfig("int4", group_size=128)                 # or QuantConfig("int8")
    y = Int8Linear.from_linear(linear)(x)                    # one layer
    quant_model.quantize_model(model, qc)                    # a whole model (model/quant_model.py)

Why: decoding one token on a CPU reads every decoder weight once, so its speed is bytes / memory
bandwidth. int8 halves the bytes of bf16, int4 quarters them (a 13B model fits 24 GB in int8, a 34B in
int4). The arithmetic uses torch's own CPU kernels (no new dependency): ``torch._weight_int8pack_mm``
(bf16 or fp32 activations x int8 weights x per-row scales) and ``torch._weight_int4pack_mm_for_cpu``
(bf16 activations x 4-bit weights in torch's blocked CPU layout x per-group scales and zeros), as
gpt-fast does (github.com/pytorch-labs/gpt-fast, quantize.py). Measured decode and prefill speeds against
bf16 and llama.cpp: docs/performance.md ("int8 / int4 and the compiled step against llama.cpp").

The numbers (w: (N, K) float weight of out x in features)
- int8, symmetric per output channel:  scale_n = max_k |w[n, k]| / 127,  q = round(w / scale_n) in
  [-127, 127],  w ~ q * scale_n.
- int4, asymmetric per group of ``group_size`` consecutive input features (gpt-fast's convention, which
  the kernel expects):  scale = (max - min) / 15,  zero = min + 8 * scale,  q = round((w - min) / scale)
  in [0, 15],  w ~ (q - 8) * scale + zero.
Scales (and zeros) are computed in fp32 and stored in the activation dtype (bf16), so the reference a
quantized layer is tested against is ``dequantize(...)`` with the stored (rounded) scales.

Stored layout (what a quantized checkpoint holds, one set per quantized linear ``P``):
- int8: ``P.weight`` int8 (N, K), ``P.scales`` (N,).
- int4: ``P.weight`` uint8 (N, K / 2) — column 2j in the low nibble, 2j + 1 in the high one —
  ``P.scales`` and ``P.zeros`` (N, K / group_size).
The int4 layout is portable on purpose: the kernel's own layout depends on the CPU's vector width
(blocks of 64 rows with AVX-512, 32 with AVX2: aten/src/ATen/native/cpu/int4mm_kernel.cpp), so it is
built when the model is loaded (``init_buffers``) and never written.
``P.bias``, when the layer has one, stays in float.

Prompts (many rows at once) are a GEMM, not a GEMV, and the int kernels run them well below oneDNN's
bf16 rate: from ``DEQUANT_MIN_ROWS`` rows on, a layer dequantizes its weight to the activation dtype a
chunk of output channels at a time, each chunk used by ``F.linear`` while it is in cache
(``dequantized_linear``) — prefill then costs the bf16 GEMM plus the dequantization (both numbers are
policy: model/policy.py, with the measurement that set them).

int8 activations (``activations = "int8"`` on the layers, ``set_activations``; the command line's
``--activations int8``): each row of the input quantized to int8 too, a different numeric contract, off by
default (model/int8_activations.py).

NF4 (``QuantConfig("nf4")``, model/nf4.py): QLoRA's 4-bit NormalFloat with blocksize 64 and a
double-quantized absmax, bit-identical to bitsandbytes; stored as ``P.weight`` uint8 (N, K / 2) (element
2i in the high nibble), ``P.absmax`` uint8 (N K / 64,), ``P.absmax_scale`` fp32 (ceil(N K / 16384),),
``P.absmax_offset`` fp32 (). A frozen base for LoRA training (gradients reach the input), on any device;
it dequantizes the whole weight per call (memory, not CPU speed, is its point).

Which layers (``QuantConfig.scope``): "decoder" (default) quantizes every linear of the language
model, lm_head included; the vision tower and projector stay in their dtype (they run GEMMs over
hundreds of rows, where quantization saves memory but no time). "all" quantizes them too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_gemv, policy
from .int8_activations import ACTIVATIONS, Activations, int4_activation_linear, int8_activation_linear
from .nf4 import NF4Linear

Method = Literal["int8", "int4", "nf4"]
Scope = Literal["decoder", "all"]
METHODS = ("int8", "int4", "nf4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128
DEQUANT_MIN_ROWS = policy.QUANT_GEMM_MIN_ROWS  # rows of activations from which a layer dequantizes (a GEMM)
INNER_K_TILES = 2  # argument of torch._convert_weight_to_int4pack_for_cpu (the CPU layout ignores it)
_CHUNK_ROWS = policy.QUANT_DEQUANT_CHUNK
INT8_KERNEL_K = 16  # torch's int8 CPU kernel is right only for in_features % 16 == 0 (measured, torch 2.13)
ALIGN = 64  # bytes: torch's int8 CPU kernel needs its weight aligned like this (see Int8Linear.init_buffers)


class QuantizationError(ValueError):
    """A layer or a checkpoint cannot be quantized / loaded as quantized; the message names the key."""


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized (written to a quantized checkpoint's ``quantization.json``)."""

    method: Method
    group_size: int = DEFAULT_GROUP_SIZE  # int4 only: input features per scale / zero (nf4: blocks of 64, fixed)
    scope: Scope = "decoder"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"quantization method {self.method!r} is not supported; choose int8 or int4 (CPU inference) or nf4 (QLoRA)")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise QuantizationError(f"int4 group_size {self.group_size!r} is not supported; choose one of "
                                    f"{', '.join(map(str, GROUP_SIZES))} (default {DEFAULT_GROUP_SIZE})")
        if self.scope not in ("decoder", "all"):
            raise QuantizationError(f"quantization scope {self.scope!r} is not supported; choose decoder or all")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.method in ("int8", "nf4"):
            d.pop("group_size")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        if not isinstance(d, dict) or "method" not in d:
            raise QuantizationError(f"a quantization config needs a 'method' (int8, int4 or nf4), got {d!r}")
        unknown = set(d) - {"method", "group_size", "scope"}
        if unknown:
            raise QuantizationError(f"unknown quantization config field(s): {', '.join(sorted(unknown))}")
        if d["method"] == "int4" and "group_size" not in d:
            raise QuantizationError("an int4 quantization config must state its group_size")
        return cls(**d)


# ---- the numbers -----------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q int8 (N, K), scales fp32 (N,)); w ~ q * scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (N,) an all-zero row keeps a finite scale
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]  # (N, K) fp32


def int4_group_sizes(shapes) -> list[int]:
    """The supported group sizes with which every (N, K) weight of ``shapes`` can be quantized to int4."""
    return [g for g in GROUP_SIZES if all(n % 16 == 0 and k % g == 0 for n, k in shapes)]


def check_int4_shape(name: str, n: int, k: int, group_size: int, model_shapes=None) -> None:
    """The int4 kernel needs N a multiple of 16 (it packs the rows in blocks of 16), whatever the group size,
    and K a multiple of the group size. The message states the condition that failed and only advice that
    can help: a group size that works for every layer of ``model_shapes`` (the (N, K) of all the layers to be
    quantized; default this one), or int8 when none does."""
    if not k % group_size and not n % 16:
        return
    if n % 16:
        why = (f"its output features ({n}) are not a multiple of 16, which torch's int4 kernel needs whatever the "
               f"group size (it packs the rows in blocks of 16)")
    else:
        why = f"its input features ({k}) are not a multiple of the group size {group_size}"
    working = int4_group_sizes(model_shapes if model_shapes is not None else [(n, k)])
    if working:
        advice = (f"use {' or '.join(f'--group-size {g}' for g in working)} (group_size={working[0]}), which "
                  f"{'every layer' if model_shapes is not None else 'this layer'} can take, or --quantize int8")
    elif n % 16:
        advice = "no --group-size can help: use --quantize int8 for this model"
    else:
        advice = (f"no supported group size ({', '.join(map(str, GROUP_SIZES))}) suits every layer: use "
                  f"--quantize int8 for this model")
    raise QuantizationError(f"{name}: a ({n}, {k}) weight cannot be quantized to int4 with group_size {group_size}: "
                            f"{why}; {advice}")


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                  name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (packed uint8 (N, K/2), scales fp32 (N, K/g), zeros fp32 (N, K/g))."""
    N, K = w.shape
    check_int4_shape(name, N, K, group_size)
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (N, K/g)
    scales = ((hi - lo) / 15).clamp(min=1e-6)
    zeros = lo + 8 * scales
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return pack_nibbles(q), scales, zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8: column 2j low nibble, 2j + 1 high nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    q = unpack_nibbles(packed).float()  # (N, K)
    N, K = q.shape
    w = (q.reshape(N, K // group_size, group_size) - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(N, K)  # fp32


# ---- the layers ------------------------------------------------------------------------------------
def needs_grad(x: torch.Tensor) -> bool:
    """Whether this call must be differentiable: gradients are on and the input carries one (the frozen
    quantized weights never get a gradient; the layers before them may)."""
    return torch.is_grad_enabled() and x.requires_grad


def decode_kernel(x: torch.Tensor, rows: int, fmt: str) -> bool:
    """Whether this call is a decode step for the C one-row loops (model/cpu_gemv.c): bf16 rows on
    CPU, at most ``policy.GEMV_MAX_ROWS``, outside a compiled graph, where this CPU measured them faster."""
    return (rows <= policy.GEMV_MAX_ROWS and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and not torch.compiler.is_compiling() and policy.gemv_choice(fmt) == "kernel")


def chunked_linear(x: torch.Tensor, weight_rows, out_features: int, bias: torch.Tensor | None,
                   widen: bool = True) -> torch.Tensor:
    """A prompt-sized input (..., K) -> (..., N) through GEMMs ``_CHUNK_ROWS`` output channels at a time:
    ``weight_rows(start, stop, dtype, widen)`` makes each chunk of the weight in ``dtype`` (dequantized), or with
    ``widen`` the same numbers as fp32, while it stays in cache and it is used at once, so no full float copy of
    the weight ever exists (lm_head of a 7B: 32064 x 4096 bf16, 263 MB, saved) and the chunk is read from cache
    rather than memory. Sums in x's dtype (each output
    column the same dot product as ``F.linear(x, weight)``: bit-identical), except bf16 on a CPU that sums bf16
    faster in fp32 (``policy.prompt_choice``): then x and each bf16 chunk (the same weight) are widened, the bias
    added in fp32, and the result rounded to bf16 once. ``widen=False`` keeps x's dtype everywhere (a training
    step: train/memory.py plans its activations in that dtype)."""
    wide = widen and x.dtype == torch.bfloat16 and x.device.type == "cpu" and policy.prompt_choice() == "fp32"
    xc = x.float() if wide else x
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    bias32 = bias.float() if wide and bias is not None else None
    for i in range(0, out_features, _CHUNK_ROWS):
        stop = min(i + _CHUNK_ROWS, out_features)
        w = weight_rows(i, stop, x.dtype, wide)  # (stop - i, K): x's dtype, or its numbers as fp32
        if not wide:
            out[..., i:stop] = F.linear(xc, w)
            continue
        y = F.linear(xc, w)  # (..., stop - i) fp32: the bias added, then rounded, while in cache
        if bias32 is not None:
            y += bias32[i:stop]
        out[..., i:stop] = y
    return out if wide or bias is None else out + bias


def dequantized_linear(layer: "Int8Linear | Int4Linear", x: torch.Tensor, widen: bool = True) -> torch.Tensor:
    """A prompt-sized input through the layer's weight dequantized chunk by chunk (``chunked_linear``)."""
    return chunked_linear(x, layer.dequantized_rows, layer.out_features, layer.bias, widen)


def set_activations(model: nn.Module, mode: Activations) -> int:
    """How every ``Int8Linear`` and ``Int4Linear`` of ``model`` takes its input (module docstring): "float"
    (default: weight-only numbers) or "int8" (int8 activations). Returns the number of layers set."""
    if mode not in ACTIVATIONS:
        raise QuantizationError(f"activations {mode!r} are not supported; choose float (default) or int8")
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    for m in layers:
        m.activations = mode
    return len(layers)


class _FrozenQuantLinearFn(torch.autograd.Function):
    """``dequantized_linear`` with a gradient for the input only, keeping nothing for the backward: the
    backward dequantizes the weight again, ``_CHUNK_ROWS`` rows at a time (grad_x = sum over chunks of
    grad[..., rows] @ W[rows]), so a frozen int8 / int4 base under LoRA saves no float copy of its weight (as
    ``_NF4LinearFn``; plain autograd through the chunks kept every dequantized chunk: a second model's worth)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Int8Linear | Int4Linear") -> torch.Tensor:
        ctx.layer = layer
        return dequantized_linear(layer, x, widen=False)  # sums in x's dtype, as the memory plan counts

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (..., N)
        if not ctx.needs_input_grad[0]:
            return None, None
        layer, N = ctx.layer, ctx.layer.out_features
        out = torch.zeros(*grad.shape[:-1], layer.in_features, dtype=grad.dtype, device=grad.device)  # (..., K)
        for i in range(0, N, _CHUNK_ROWS):
            stop = min(i + _CHUNK_ROWS, N)
            out += grad[..., i:stop].matmul(layer.dequantized_rows(i, stop, grad.dtype))
        return out, None


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight and per-output-channel scales, frozen: the weight never trains, the
    input gets its gradient (through the dequantized weight). ``activations``: float (default) or int8 (module
    docstring; ``set_activations``)."""

    activations: Activations = "float"

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> "Int8Linear":
        dtype = dtype or linear.weight.dtype
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, linear.weight.device)
        q, scales = quantize_int8(linear.weight)
        m.weight, m.scales = q, scales.to(dtype)
        if linear.bias is not None:
            m.bias = linear.bias.detach().to(dtype)
        return m

    def init_buffers(self, device: torch.device) -> None:
        """After loading: an int8 weight not aligned to 64 bytes is copied (the kernel's vector loads need
        the alignment: a misaligned weight crashes it from 2 rows up). The converter aligns the integer
        weights it writes, so mmapped weights are normally used in place."""
        for name in ("weight", "scales"):
            t = getattr(self, name)
            if not t.is_meta and t.data_ptr() % ALIGN:
                setattr(self, name, t.clone())

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype, widen: bool = False) -> torch.Tensor:
        """Output channels [start, stop) of the weight, (stop - start, K) in ``dtype`` (``widen``: those numbers
        as fp32, for a prompt summed in fp32: ``chunked_linear``)."""
        out = cpu_gemv.dequantize_int8(self.weight[start:stop], self.scales[start:stop], dtype, widen)  # one C pass
        if out is None:  # the same bits in torch (not CPU, no C compiler)
            out = torch.empty(stop - start, self.in_features, dtype=dtype, device=self.weight.device)
            out.copy_(self.weight[start:stop]).mul_(self.scales[start:stop, None])
            return out.float() if widen else out
        return out

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantized_rows(0, self.out_features, dtype)  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        # a GEMM: oneDNN on the dequantized weight is faster. K % 16 != 0: torch 2.13's int8 CPU kernel
        # reads past each row (wrong numbers, or a segfault near the end of an mmapped file), so dequantize too.
        # A gradient to the input (adapters train on a frozen quantized base): the int kernel has no backward
        if needs_grad(x):
            return _FrozenQuantLinearFn.apply(x, self)
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        if self.activations == "int8" and x.device.type == "cpu":
            return int8_activation_linear(self, x)
        if decode_kernel(x, rows, "int8"):
            return cpu_gemv.gemv_int8(x, self.weight, scales, self.bias)
        if rows >= DEQUANT_MIN_ROWS or self.in_features % INT8_KERNEL_K:
            return dequantized_linear(self, x)
        if torch.compiler.is_compiling():  # the pattern inductor's CPU weight-only-int8 GEMM template matches
            y = F.linear(x, self.weight.to(x.dtype)) * scales
            return y if self.bias is None else y + self.bias
        y = torch._weight_int8pack_mm(x.reshape(rows, self.in_features).contiguous(), self.weight, scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """``nn.Linear`` with 4-bit weights in groups along the input features, frozen (the input gets its
    gradient through the dequantized weight), CPU.

    ``weight``/``scales``/``zeros`` are the stored (portable) form; ``init_buffers`` builds the kernel's
    CPU layout from them (called by the loader after assigning the checkpoint's tensors). ``activations``: float
    (default) or int8 for decode steps (module docstring; ``set_activations``)."""

    activations: Activations = "float"

    def __init__(self, in_features: int, out_features: int, group_size: int = DEFAULT_GROUP_SIZE, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_int4_shape(f"a ({out_features}, {in_features}) linear", out_features, in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.packed: torch.Tensor | None = None  # (N, K/2) uint8 in the kernel's CPU layout
        self.scales_and_zeros: torch.Tensor | None = None  # (K/g, N, 2) in the activation dtype

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE, dtype: torch.dtype | None = None,
                    name: str = "weight") -> "Int4Linear":
        dtype = dtype or linear.weight.dtype
        packed, scales, zeros = quantize_int4(linear.weight, group_size, name)
        m = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None, dtype, linear.weight.device)
        m.weight, m.scales, m.zeros = packed, scales.to(dtype), zeros.to(dtype)
        if linear.bias is not None:
            m.bias = linear.bias.detach().to(dtype)
        m.init_buffers(m.weight.device)
        return m

    def init_buffers(self, device: torch.device) -> None:
        """Build torch's int4 CPU layout from the stored nibbles (a copy of K/2 bytes per row), unless this CPU
        decodes faster with the C loops, which read the stored nibbles as they are (``policy.gemv_choice``)."""
        if self.weight.is_meta:
            return
        if self.weight.device.type != "cpu":
            raise QuantizationError("int4 weights run on CPU only (torch's int4 CPU kernel); use --device cpu")
        if self.scales.dtype == torch.bfloat16 and policy.gemv_choice("int4") == "kernel":
            return
        self.build_torch_layout()

    def build_torch_layout(self) -> None:
        """``packed`` (N, K/2) in torch's int4 CPU layout and ``scales_and_zeros`` (K/g, N, 2)."""
        q = unpack_nibbles(self.weight).to(torch.int32)  # (N, K)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
        self.scales_and_zeros = torch.stack((self.scales, self.zeros), dim=-1).transpose(0, 1).contiguous()

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype, widen: bool = False) -> torch.Tensor:
        """Output channels [start, stop) of the weight, (stop - start, K) in ``dtype`` (``widen``: those numbers
        as fp32, for a prompt summed in fp32: ``chunked_linear``)."""
        n, K, g = stop - start, self.in_features, self.group_size
        out = cpu_gemv.dequantize_int4(self.weight[start:stop], self.scales[start:stop], self.zeros[start:stop], g,
                                       dtype, widen)  # one C pass; the same bits as below
        if out is not None:
            return out
        out = torch.empty(n, K, dtype=dtype, device=self.weight.device)
        u = self.weight[start:stop]  # (n, K/2) two nibbles per byte
        pairs = out.view(n, K // 2, 2)
        pairs[..., 0], pairs[..., 1] = u & 15, u >> 4
        out.view(n, K // g, g).sub_(8).mul_(self.scales[start:stop, :, None]).add_(self.zeros[start:stop, :, None])
        return out.float() if widen else out

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantized_rows(0, self.out_features, dtype)  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if needs_grad(x):  # the int kernel has no backward
            return _FrozenQuantLinearFn.apply(x, self)
        if self.activations == "int8" and rows <= policy.GEMV_MAX_ROWS and x.device.type == "cpu":
            return int4_activation_linear(self, x)
        if decode_kernel(x, rows, "int4") and self.scales.dtype == torch.bfloat16:
            return cpu_gemv.gemv_int4(x, self.weight, self.scales, self.zeros, self.group_size, self.bias)
        if rows >= DEQUANT_MIN_ROWS or (self.packed is None and torch.compiler.is_compiling()):
            return dequantized_linear(self, x)  # a GEMM: oneDNN on the dequantized weight is faster
        if self.packed is None:  # fp32 activations where the C loops hold the weight: built on first need
            self.build_torch_layout()
        sz = self.scales_and_zeros if self.scales_and_zeros.dtype == x.dtype else self.scales_and_zeros.to(x.dtype)
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(rows, self.in_features).contiguous(), self.packed,
                                              self.group_size, sz)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


QuantLinear = (Int8Linear, Int4Linear, NF4Linear)
