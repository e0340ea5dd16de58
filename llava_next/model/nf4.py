"""NF4 (4-bit NormalFloat) weights as QLoRA defines them, bit-identical to bitsandbytes' CPU backend.

    q = nf4_quantize(w)                      # w: (N, K) float -> NF4Weight (packed nibbles + statistics)
    w_hat = nf4_dequantize(q)                # (N, K) in w's dtype, the same bits as bitsandbytes.dequantize_4bit
    layer = NF4Linear.from_linear(linear)    # frozen 4-bit base; gradients flow to the input only

What (QLoRA, Dettmers et al. 2023, arxiv.org/abs/2305.14314, section 3): the weight, flattened row-major,
is cut into blocks of 64 values; each block is scaled by its absolute maximum into [-1, 1] and every value
is replaced by the index of the nearest of 16 levels, the NF4 code book (quantiles of N(0, 1), with an
exact 0). Two indices share a byte. **Double quantization** then quantizes the per-block absmax itself:
its mean is subtracted and the rest is quantized to 8 bits in blocks of 256 with bitsandbytes' signed
dynamic code, keeping one fp32 absmax per 256 blocks and the fp32 mean. Storage: 0.5 byte per weight,
plus 1 byte per 64 weights, plus 4 bytes per 16,384 weights (about 4.127 bits a weight).

Bit-identity with bitsandbytes 0.50.2 (the test reference in tests/test_nf4.py, never imported here).
Every step below repeats the float operations of the code it follows, in the same order:
- the NF4 code book: ``bitsandbytes.functional.get_4bit_type("nf4")`` (fp32);
- 4-bit quantization: ``backends/default/ops.py`` ``quantize_4bit`` (the CPU backend registers no kernel
  of its own for it): full blocks are multiplied by ``1 / absmax`` (absmax clamped to 1e-38), the last,
  partial block is *divided* by its absmax; clamped to [-1, 1]; the index is ``torch.bucketize`` on the
  midpoints of the code book (a value on a midpoint takes the lower level); an odd count is padded with
  one 0.0; element 2i goes in the HIGH nibble of byte i, 2i + 1 in the low one (the reverse of the int4
  layout in quant.py);
- double quantization: ``functional.quantize_4bit(compress_statistics=True)``: ``offset = absmax.mean()``,
  then ``quantize_blockwise(absmax - offset, blocksize=256)`` with ``create_dynamic_map()``, which on CPU
  is the C kernel ``cquantize_blockwise_cpu_fp32``: x / absmax (a division), the code index found by
  binary search (the last level <= x), moved one up when the next level is strictly nearer; a block whose
  absmax is 0 gives NaN there, which the search leaves at index 0 (we do the same);
- dequantization: ``functional.dequantize_4bit``: the absmax is ``dynamic[q] * absmax2[block // 256]``
  (``dequantize_blockwise``) plus the offset, then each weight is ``nf4[q] * absmax[block]`` in fp32,
  cast to the output dtype (``backends/default/ops.py`` ``_dequantize_4bit_compute``; the CPU C kernel
  gives the same bits, tested).

Why a custom autograd function in ``NF4Linear`` (as bitsandbytes' ``MatMul4Bit``,
``bitsandbytes/autograd/_functions.py``): ``F.linear`` on a dequantized weight would keep that float
weight alive until backward, one per layer; ``_NF4LinearFn`` saves only the packed buffers and
dequantizes again in backward. The weight gets no gradient (it is a buffer, not a parameter); the input
does, so LoRA adapters on top of a frozen NF4 base train. Like bitsandbytes' CPU backend it dequantizes the
whole weight per call (forward and backward) and runs a float GEMM. On CPU the dequantization is one pass
of C (``cpu_dequant.c``; bitsandbytes too runs one kernel per weight); elsewhere, and where no C compiler works,
it goes chunk by chunk through a table of the four values two packed bytes hold (``_dequantize_whole_blocks``),
so no int64 or fp32 copy of the whole weight is made. Both give the same bits (tests/test_nf4.py;
benchmarks/bench_train.py measures the step against bitsandbytes). The point is memory: a QLoRA base for fine-tuning on 16-24 GB GPUs.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_gemv

BLOCKSIZE = 64  # QLoRA's block of weights per absmax
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
ABSMAX_BLOCKSIZE = 256  # double quantization: absmax values per second-level absmax (bitsandbytes' choice)

# bitsandbytes.functional.get_4bit_type("nf4"): create_normal_map(offset=0.9677083, use_extra_value=True)
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


class NF4Error(ValueError):
    """A tensor or a shape NF4 cannot take; the message says which and why."""


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """(16,) fp32: the NF4 levels, sorted (index = the stored nibble)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """(256,) fp32: bitsandbytes' signed 8-bit dynamic code, ``functional.create_dynamic_map(signed=True,
    max_exponent_bits=7, total_bits=8)``, computed the same way (fp32 linspace, Python floats, sorted)."""
    data: list[float] = []
    for i in range(7):  # exponents 10^-6 .. 10^0, each with 2^i fraction levels on each side of 0
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]  # 2 * 127 + 2 = 256 values: no padding (additional_items = 0 for 7 exponent bits)
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


@dataclass
class NF4Weight:
    """A quantized tensor. ``packed``: ((numel + 1) // 2,) uint8, element 2i in the high nibble of byte i;
    ``absmax``: (blocks,) fp32, or with double quantization (blocks,) uint8 indices into ``dynamic_code``
    of ``absmax - absmax_offset``, with ``absmax_scale`` (ceil(blocks / 256),) fp32 and ``absmax_offset``
    () fp32. ``shape`` and ``dtype`` are the original tensor's (what ``nf4_dequantize`` returns)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = BLOCKSIZE
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None


def _check_float(w: torch.Tensor) -> None:
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise NF4Error(f"NF4 quantizes float32, float16 or bfloat16 tensors (as bitsandbytes), got {w.dtype}")
    if w.numel() == 0:
        raise NF4Error("NF4 cannot quantize an empty tensor")


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) fp32 -> (values scaled into [-1, 1] (n,), absmax (blocks,)), as bitsandbytes' quantize_4bit:
    full blocks times the reciprocal of their absmax, the partial last block divided by its absmax."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(full // blocksize, blocksize)  # (B, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]  # (B,)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])  # (B + 1,)
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return scaled, absmax


def _absmax_lut(device: torch.device | str | None = None) -> torch.Tensor:
    """(65536,) int64: for each of 65,536 evenly spaced values in [-1, 1], the index of the nearest level of
    ``dynamic_code`` (bitsandbytes' ``build_quantize_lut``, csrc/cpu_ops.cpp: the number of level midpoints
    strictly below the value, all in fp32)."""
    code = dynamic_code(device)
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, right=False)


_LUT_SIZE = 65536


def _quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (blocks,) fp32 -> (uint8 codes (blocks,), absmax2 (ceil(blocks/256),), offset ()).
    As bitsandbytes' C kernel ``cquantize_blockwise_cpu_fp32`` (csrc/cpu_ops.cpp ``quantize_cpu_impl``):
    per block of 256, x * (1 / absmax) clamped to [-1, 1], mapped to the 65,536-entry table by
    ``trunc(((x + 1) * 0.5) * 65535 + 0.5)`` (each step rounded to fp32); a block whose absmax is 0 stores 0s."""
    offset = absmax.mean()  # () the same torch reduction bitsandbytes calls
    a = absmax - offset  # (blocks,)
    n = a.numel()
    nb = -(n // -ABSMAX_BLOCKSIZE)
    padded = F.pad(a, (0, nb * ABSMAX_BLOCKSIZE - n)).view(nb, ABSMAX_BLOCKSIZE)  # padding 0s change no max
    absmax2 = padded.abs().amax(dim=-1)  # (nb,)
    inv = 1.0 / absmax2  # (nb,) fp32; inf where absmax2 is 0 (those blocks are zeroed below)
    v = torch.clamp(padded * inv[:, None], -1.0, 1.0)
    t = ((v + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5
    idx = _absmax_lut(a.device)[t.nan_to_num(0.0).to(torch.int64).clamp_(0, _LUT_SIZE - 1)]  # trunc, as the C cast
    idx = torch.where((absmax2 == 0)[:, None], 0, idx)  # (nb, 256)
    return idx.reshape(-1)[:n].to(torch.uint8), absmax2, offset


def nf4_quantize(w: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = True) -> NF4Weight:
    """Any-shape float tensor -> NF4Weight; ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    quant_type="nf4", compress_statistics=double_quant)`` bit for bit (packed bytes, absmax, statistics)."""
    _check_float(w)
    if blocksize not in BLOCKSIZES:
        raise NF4Error(f"NF4 blocksize {blocksize!r} is not supported; choose one of "
                       f"{', '.join(map(str, BLOCKSIZES))} (QLoRA: {BLOCKSIZE})")
    flat = w.detach().reshape(-1).float()  # (n,) row-major: blocks run across rows when K % blocksize != 0
    scaled, absmax = _scaled_blocks(flat, blocksize)
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))  # the odd last nibble pairs with a 0.0 (index 7)
    levels = nf4_code(w.device)
    q = torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2, out_int32=True).to(torch.uint8)  # (n,) in [0, 15]
    packed = (q[::2] << 4) | q[1::2]  # ((n + 1) // 2,)
    if not double_quant:
        return NF4Weight(packed, absmax, tuple(w.shape), w.dtype, blocksize)
    qabsmax, absmax2, offset = _quantize_absmax(absmax)
    return NF4Weight(packed, qabsmax, tuple(w.shape), w.dtype, blocksize, absmax2, offset)


def block_absmax(q: NF4Weight) -> torch.Tensor:
    """(blocks,) fp32: the absmax each block is scaled by (decoded from the double quantization)."""
    if not q.double_quant:
        return q.absmax.float()
    n = q.absmax.numel()
    scale = q.absmax_scale.repeat_interleave(ABSMAX_BLOCKSIZE)[:n]  # (blocks,) each code's absmax2
    return _cached_dynamic_code(str(q.absmax.device))[q.absmax.long()] * scale + q.absmax_offset


@functools.lru_cache(maxsize=None)
def _cached_dynamic_code(device: str) -> torch.Tensor:
    """``dynamic_code`` built once per device: every NF4 forward and backward decodes its absmax with it."""
    return dynamic_code(device)


def nf4_dequantize(q: NF4Weight, dtype: torch.dtype | None = None, scratch: bool = False) -> torch.Tensor:
    """NF4Weight -> tensor of ``q.shape`` in ``dtype`` (default the original dtype); bitsandbytes'
    ``dequantize_4bit`` bit for bit: nf4[index] * absmax[block] in fp32, then cast. ``scratch=True`` may
    return a view of a buffer the next ``scratch=True`` call on this thread overwrites (the layer's own use)."""
    n = math.prod(q.shape)
    if n % q.blocksize == 0 and q.packed.is_contiguous() and sys.byteorder == "little":
        out = _dequantize_in_c(q, dtype or q.dtype, scratch)
        return out if out is not None else _dequantize_whole_blocks(q, dtype or q.dtype)
    idx = torch.stack((q.packed >> 4, q.packed & 15), dim=-1).reshape(-1)[:n].long()  # (n,) high nibble first
    values = nf4_code(q.packed.device)[idx]  # (n,) fp32
    absmax = block_absmax(q)
    rem, bs = n % q.blocksize, q.blocksize
    full = n - rem
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    out[:full] = (values[:full].view(-1, bs) * absmax[:full // bs].view(-1, 1)).reshape(full)
    if rem:
        out[full:] = values[full:] * absmax[full // bs]
    return out.reshape(q.shape).to(dtype or q.dtype)


def _dequantize_in_c(q: NF4Weight, dtype: torch.dtype, scratch: bool = False) -> torch.Tensor | None:
    """The same bits as ``_dequantize_whole_blocks`` in one pass of C (cpu_dequant.c: each packed byte read once,
    its two values written), or None where that does not apply: not on CPU, an output dtype other than
    fp32 / bf16, inside a torch.compile graph, or no C compiler (``cpu_gemv.failure()`` says why).
    ``scratch``: write into this thread's reused buffer (``_scratch``), valid until the next such call."""
    if (q.packed.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16)
            or torch.compiler.is_compiling() or q.blocksize % 32):
        return None
    lib = cpu_gemv.load()
    if lib is None:
        return None
    absmax = block_absmax(q).contiguous()  # (blocks,) fp32
    out = _scratch(q.shape, dtype) if scratch else torch.empty(q.shape, dtype=dtype)
    lib.nf4_dequantize(q.packed.data_ptr(), absmax.data_ptr(), out.data_ptr(), absmax.numel(), q.blocksize,
                       int(dtype == torch.bfloat16), torch.get_num_threads())
    return out


_local = threading.local()


def _scratch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A ``shape`` view of one buffer per thread, grown to the largest weight asked for and then reused.
    Why: a fresh tensor of a 7B MLP weight (90 MB bf16) is new pages from the kernel on every call, and
    faulting them in cost 40 ms where filling them costs 6 (one thread); a QLoRA step dequantizes every
    weight twice. The layer's forward and backward use each weight before asking for the next one. Not for
    lm_head (``NF4Linear.reuse_buffer``): a buffer of its size (the largest) held through the whole step
    raised the step's peak above PEFT's; the block weights' buffer (the MLP's) stays under it
    (benchmarks/published/6-train.md)."""
    n = math.prod(shape)
    buf = getattr(_local, "buffers", {}).get(dtype)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        _local.buffers = {**getattr(_local, "buffers", {}), dtype: buf}
    return buf[:n].view(shape)


@functools.lru_cache(maxsize=None)
def _quad_table(device: str) -> torch.Tensor:
    """(65536, 4) fp32: for the two packed bytes b0, b1 read as one little-endian uint16 (b0 + 256 b1), their
    four values in order: nf4[b0 >> 4], nf4[b0 & 15], nf4[b1 >> 4], nf4[b1 & 15]."""
    code = nf4_code(device)
    pair = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2): byte -> (high, low)
    u = torch.arange(65536, device=device)
    return torch.cat([pair[u & 255], pair[u >> 8]], dim=1).contiguous()


_CHUNK = 1 << 22  # values per chunk (16 MiB fp32): few enough chunks that per-op overhead (a thread barrier each,
# costly on a shared machine: 1 << 18 spent 75 s of a 7B QLoRA step in them) stays small; 1 << 18 is ~1.5x faster alone


def _dequantize_whole_blocks(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The same values as the general path when every block is whole, 3-7x faster and without its
    int64 / fp32 copies of the whole tensor: per chunk of blocks, one table lookup gives four fp32 values
    per 2 bytes, scaled by the block's absmax in fp32 and written (cast) straight into the output."""
    bs = q.blocksize
    blocks = math.prod(q.shape) // bs
    absmax = block_absmax(q)  # (blocks,) fp32
    table = _quad_table(str(q.packed.device))
    pairs = q.packed.view(torch.uint16).view(blocks, bs // 4)  # (blocks, bs / 4): two bytes each
    out = torch.empty(blocks, bs, dtype=dtype, device=q.packed.device)
    step = max(1, _CHUNK // bs)
    for b0 in range(0, blocks, step):
        b1 = min(b0 + step, blocks)
        values = F.embedding(pairs[b0:b1].int(), table).view(b1 - b0, bs)  # (chunk, bs) fp32
        torch.mul(values, absmax[b0:b1, None], out=out[b0:b1])  # fp32 product, rounded once to dtype
    return out.view(q.shape)


# ---- the layer --------------------------------------------------------------------------------------
class _NF4LinearFn(torch.autograd.Function):
    """y = x W^T + b with W dequantized from NF4 in x's dtype; backward gives x its gradient (W again
    dequantized, not saved) and nothing to the frozen weight. Follows bitsandbytes' MatMul4Bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer = layer  # the module holds the packed buffers; nothing float is kept for backward
        bias = layer.bias if layer.bias is None or layer.bias.dtype == x.dtype else layer.bias.to(x.dtype)
        return F.linear(x, layer.dequantized(x.dtype, scratch=layer.reuse_buffer), bias)  # (..., N)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (..., N)
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.dequantized(grad.dtype, scratch=ctx.layer.reuse_buffer)  # (N, K)
        return grad.matmul(w), None  # (..., K): what F.linear's autograd computes for its input


class NF4Linear(nn.Module):
    """``nn.Linear`` with a frozen NF4 weight (QLoRA: blocksize 64, double-quantized absmax) and an
    optional float bias. Any device (plain torch ops); computes in the input's dtype.

    Buffers (a checkpoint stores them under these names): ``weight`` (N, K/2) uint8, the packed nibbles
    of the row-major weight (bitsandbytes' (N*K/2, 1) tensor, reshaped); ``absmax`` (N*K/64,) uint8;
    ``absmax_scale`` (ceil(N*K/64/256),) fp32; ``absmax_offset`` () fp32; ``bias`` (N,)."""

    exact_dtype_buffers = ("absmax_scale", "absmax_offset")  # the loader keeps them fp32 (bit-identity)

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_nf4_shape(f"a ({out_features}, {in_features}) linear", out_features, in_features)
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        # dequantize into the thread's reused buffer (``_scratch``); quant_model.quantize_model turns it off
        # for lm_head, whose dequantized weight would otherwise stay allocated beside the logits' gradients
        self.reuse_buffer = True
        blocks = out_features * in_features // BLOCKSIZE
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_scale", torch.empty(-(blocks // -ABSMAX_BLOCKSIZE), dtype=torch.float32,
                                                         device=device))
        self.register_buffer("absmax_offset", torch.empty((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None, name: str = "weight") -> "NF4Linear":
        dtype = dtype or linear.weight.dtype
        check_nf4_shape(name, linear.out_features, linear.in_features)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, linear.weight.device)
        m.load_nf4(nf4_quantize(linear.weight))
        if linear.bias is not None:
            m.bias = linear.bias.detach().to(dtype)
        return m

    def load_nf4(self, q: NF4Weight) -> None:
        self.weight = q.packed.view(self.out_features, self.in_features // 2)
        self.absmax, self.absmax_scale, self.absmax_offset = q.absmax, q.absmax_scale, q.absmax_offset

    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(self.weight.reshape(-1), self.absmax, (self.out_features, self.in_features), self.dtype,
                         BLOCKSIZE, self.absmax_scale, self.absmax_offset)

    def dequantized(self, dtype: torch.dtype | None = None, scratch: bool = False) -> torch.Tensor:
        return nf4_dequantize(self.nf4_weight(), dtype or self.dtype, scratch)  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        return _NF4LinearFn.apply(x, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={BLOCKSIZE}, double_quant=True")


def check_nf4_shape(name: str, n: int, k: int) -> None:
    """An NF4 linear stores whole rows of bytes and whole blocks: K even and N * K a multiple of 64."""
    if k % 2 or (n * k) % BLOCKSIZE:
        raise NF4Error(f"{name}: a ({n}, {k}) weight cannot be an NF4 linear: it needs an even number of input "
                       f"features and a weight size (N * K = {n * k}) that is a multiple of the blocksize "
                       f"{BLOCKSIZE}; use --quantize int8 for this model")


def nf4_bytes(n: int, k: int) -> int:
    """Stored bytes of an (N, K) NF4 weight: nibbles, uint8 absmax, fp32 second-level absmax and offset."""
    blocks = -(n * k // -BLOCKSIZE)
    return (n * k + 1) // 2 + blocks + 4 * -(blocks // -ABSMAX_BLOCKSIZE) + 4
