"""CPU decode products in C, beside their PyTorch references: y (M, N) = x (M, K) W^T for a few rows of
bf16 activations and a bf16, int8 or int4 weight (``cpu_gemv.c`` has the loops and the formats). The same
library carries the products with int8 activations (``cpu_int8_activations.c``: ``gemv_int8_a8`` /
``gemv_int4_a8`` below, model/int8_activations.py) and the dequantization loops (``cpu_dequant.c``:
NF4 for QLoRA's frozen base, model/nf4.py; int8 and int4 rows for prompt-sized GEMMs, ``dequantize_int8`` /
``dequantize_int4`` below, model/quant.py).

    lib = load()                                     # None where no C compiler works (callers use torch)
    y = gemv_bf16(x, w, bias)                        # x (..., K) bf16, w (N, K) bf16 -> (..., N) bf16
    y = gemv_int8(x, q, scales, bias)                # q (N, K) int8, scales (N,)
    y = gemv_int4(x, packed, scales, zeros, group_size, bias)   # packed (N, K/2) uint8, (N, K/g) each

Why C: one decoded token reads every weight once, so the step's speed is the memory read rate; torch's
one-row kernels on CPU reach about half of it (oneDNN's bf16 GEMM) or are compute-bound (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``). The loops here read each weight once, in the project's own stored layouts
(no second copy), and keep up with memory.

Built once per machine, at first use: the source is compiled by the system C compiler (``$CC``, else ``cc``;
the one torch.compile's CPU backend needs too) with ``-O3 -march=native -fopenmp`` into
``$LLAVA_NEXT_CACHE/kernels/cpu_gemv-native-<hash>/`` (default ``~/.cache/llava-next``), written under a
temporary name and renamed, so concurrent first uses cannot load half a file. ``-march=native`` makes the
library specific to the CPU it was built on: the hash covers the source, the flags, the CPU model and
its vector flags. Three sets of loops (cpu_gemv.c): AVX512-BF16 where the CPU has it (Zen 4, Sapphire
Rapids), AVX-512 without it (Skylake-SP to Ice Lake: weights widened to fp32 by shifts within 32-bit lanes),
and plain C the compiler vectorizes for anything else (AVX2, NEON).

Threads: OpenMP, with torch's thread count; the library links the libgomp torch already loaded, so both
share one thread pool. The call goes through ctypes (a few microseconds, released GIL); ``torch.compile``
cannot trace it, so compiled graphs keep torch's kernels (model/quant.py checks ``is_compiling``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(f) for f in ("cpu_gemv.c", "cpu_dequant.c", "cpu_int8_activations.c")]  # one lib
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_lib: ctypes.CDLL | None = None
_failure: str | None = None  # why the library could not be built, once tried


def cpu_identity() -> str:
    """The CPU model and its vector flags, e.g. "AMD EPYC 9R14 | avx2 avx512f avx512_bf16 ..." (Linux
    /proc/cpuinfo; the platform's processor name elsewhere): what a native build and a measured policy
    depend on."""
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma", "f16c", "sve", "neon")))
    except OSError:
        import platform
        model = platform.processor() or platform.machine()
    return f"{model} | {' '.join(flags)}"


def source_hash() -> str:
    """12 hex digits of the C sources and flags: a changed loop is another library (and another measurement)."""
    return hashlib.sha256(("".join(f.read_text() for f in SOURCES) + " ".join(FLAGS)).encode()).hexdigest()[:12]


def _cache_dir(march: str) -> Path:
    root = Path(os.environ.get("LLAVA_NEXT_CACHE", Path.home() / ".cache" / "llava-next"))
    key = hashlib.sha256((source_hash() + march + cpu_identity()).encode()).hexdigest()[:16]
    return root / "kernels" / f"cpu_gemv-{march}-{key}"


def build(march: str = "native") -> Path:
    """Compile the library for this machine (once; later calls find it); ``march``: another target for
    tests (``skylake-avx512``: the AVX-512 loops without BF16; ``x86-64-v3``: AVX2, the plain C loops).
    Raises RuntimeError with the compiler's message when no compiler works."""
    out = _cache_dir(march) / "cpu_gemv.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc): the CPU decode kernels need one")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, f"-march={march}", "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cc} could not build {' + '.join(f.name for f in SOURCES)}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> ctypes.CDLL | None:
    """The built library, or None (and ``failure()`` says why) where it cannot be built."""
    global _lib, _failure
    if _lib is None and _failure is None:
        try:
            _lib = bind(build())
        except (RuntimeError, OSError) as e:
            _failure = str(e)
    return _lib


def bind(path: Path) -> ctypes.CDLL:
    """Open a built library and declare its entry points (cpu_gemv.c's products, cpu_dequant.c's loops)."""
    lib = ctypes.CDLL(str(path))
    lib.gemv_bf16.argtypes = [_P, _P, _P, _P, _I, _I, _I, _C]
    lib.gemv_int8.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _C]
    lib.gemv_int4.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _C]
    lib.gemv_int8_a8.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _C]
    lib.gemv_int4_a8.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _C]
    lib.nf4_dequantize.argtypes = [_P, _P, _P, _I, _I, _C, _C]
    lib.int8_dequantize.argtypes = [_P, _P, _P, _I, _I, _C, _C]
    lib.int4_dequantize.argtypes = [_P, _P, _P, _P, _I, _I, _I, _C, _C]
    lib.int8_quantize_rows.argtypes = [_P, _P, _P, _I, _I, _C]
    lib.attend_one_query.argtypes = [_P, _P, _P, _P, *[_I] * 11, _C]
    lib.int8_scale_rows.argtypes = [_P, _P, _P, _P, _P, _I, _I, _C]
    return lib


def failure() -> str | None:
    """Why ``load`` returned None (None if it worked or was not tried)."""
    return _failure


def _check(x: torch.Tensor, in_features: int, *weights: torch.Tensor | None) -> None:
    """bf16 CPU activations whose last dimension is the weight's ``in_features``; contiguous CPU weights."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"the CPU decode kernels take bfloat16 activations on CPU, got {x.dtype} on {x.device}")
    for t in weights:
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
            raise ValueError("the CPU decode kernels need contiguous CPU weights (call .contiguous())")
        if t is not None and t.is_floating_point() and t.dtype != torch.bfloat16:
            raise ValueError(f"the CPU decode kernels take bfloat16 weights, scales, zeros and biases, got {t.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"the input has {x.shape[-1]} features, the weight {in_features} input features")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)


def _lib_or_raise() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CPU decode kernels are not available: {_failure}")
    return lib


def gemv_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16, w (N, K) bf16, bias (N,) bf16 or None -> (..., N) bf16."""
    _check(x, w.shape[1], w, bias)
    xr, (N, K) = _rows(x), w.shape
    y = torch.empty(xr.shape[0], N, dtype=torch.bfloat16)
    _lib_or_raise().gemv_bf16(xr.data_ptr(), w.data_ptr(), _ptr(bias), y.data_ptr(), xr.shape[0], N, K,
                              torch.get_num_threads())
    return y.reshape(*x.shape[:-1], N)


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16, q (N, K) int8, scales (N,) bf16 -> (..., N) bf16: x (q * scales)^T (+ bias)."""
    return _int8_product("gemv_int8", x, q, scales, bias)


def _int8_product(entry: str, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """Checks and calls the library's ``entry`` (gemv_int8, gemv_int8_a8): the int8 products' one signature."""
    _check(x, q.shape[1], q, scales, bias)
    xr, (N, K) = _rows(x), q.shape
    y = torch.empty(xr.shape[0], N, dtype=torch.bfloat16)
    getattr(_lib_or_raise(), entry)(xr.data_ptr(), q.data_ptr(), scales.data_ptr(), _ptr(bias), y.data_ptr(),
                                    xr.shape[0], N, K, torch.get_num_threads())
    return y.reshape(*x.shape[:-1], N)


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16, packed (N, K/2) uint8 (column 2j low nibble, 2j + 1 high), scales / zeros (N, K/g)
    bf16 -> (..., N) bf16: x W^T with W = (q - 8) * scale + zero per group of ``group_size`` columns."""
    return _int4_product("gemv_int4", x, packed, scales, zeros, group_size, bias)


def _int4_product(entry: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Checks and calls the library's ``entry`` (gemv_int4, gemv_int4_a8): the int4 products' one signature."""
    _check(x, 2 * packed.shape[1], packed, scales, zeros, bias)
    xr, N, K = _rows(x), packed.shape[0], 2 * packed.shape[1]
    if K % group_size or group_size % 2:
        raise ValueError(f"int4 groups of {group_size} do not divide the {K} input features")
    y = torch.empty(xr.shape[0], N, dtype=torch.bfloat16)
    getattr(_lib_or_raise(), entry)(xr.data_ptr(), packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                                    _ptr(bias), y.data_ptr(), xr.shape[0], N, K, group_size, torch.get_num_threads())
    return y.reshape(*x.shape[:-1], N)


# ---- int8 activations (cpu_int8_activations.c): the decode steps of model/int8_activations.py ---------------
def gemv_int8_a8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16, q (N, K) int8, scales (N,) bf16 -> (..., N) bf16: each row of x quantized to int8
    (``quantize_rows_int8``), summed against q exactly in int32, scaled by the row's and the channel's scales in
    fp32: the bits of ``int8_activations.int8_activation_linear``'s integer GEMM, row for row."""
    return _int8_product("gemv_int8_a8", x, q, scales, bias)


def gemv_int4_a8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16, packed (N, K/2) uint8, scales / zeros (N, K/g) bf16 -> (..., N) bf16: each row of x
    quantized to int8, per group P = sum x_q q and X = sum x_q in int32, y = s_x sum_g (scale P + (zero - 8 scale)
    X) in fp32 (``int8_activations.int4_activation_linear`` has the formula in torch)."""
    return _int4_product("gemv_int4_a8", x, packed, scales, zeros, group_size, bias)


# ---- dequantization of int8 / int4 rows (cpu_dequant.c), for prompt-sized GEMMs -------------------------------
def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                    widen: bool = False) -> torch.Tensor | None:
    """q (n, K) int8, scales (n,) -> (n, K) ``dtype`` = q * scale, the bits of torch's ``empty(dtype).copy_(q)
    .mul_(scales[:, None])`` (``widen``: those bf16 numbers as fp32, the bits of ``.float()`` after it); None where
    the C loop does not apply (not fp32 / bf16, not CPU, no library)."""
    if dtype not in (torch.float32, torch.bfloat16) or q.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    lib = load()
    if lib is None:
        return None
    q, s = q.contiguous(), scales.float().contiguous()  # bf16 -> fp32 is exact
    bf16 = dtype == torch.bfloat16
    out = torch.empty(q.shape, dtype=torch.float32 if widen else dtype)
    lib.int8_dequantize(q.data_ptr(), s.data_ptr(), out.data_ptr(), q.shape[0], q.shape[1],
                        (2 if widen else 1) if bf16 else 0, torch.get_num_threads())
    return out


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype, widen: bool = False) -> torch.Tensor | None:
    """packed (n, K/2) uint8, scales / zeros (n, K/g) -> (n, K) bf16 = (q - 8) * scale + zero, the bits of
    torch's in-place ``sub_(8).mul_(scales).add_(zeros)`` on a bf16 tensor (``widen``: those numbers as fp32, the
    bits of ``.float()`` after it); None where the C loop does not apply (an output other than bf16, not CPU, no
    library)."""
    if dtype != torch.bfloat16 or packed.device.type != "cpu" or torch.compiler.is_compiling() or group_size % 2:
        return None
    lib = load()
    if lib is None:
        return None
    p, s, z = packed.contiguous(), scales.float().contiguous(), zeros.float().contiguous()
    out = torch.empty(p.shape[0], 2 * p.shape[1], dtype=torch.float32 if widen else dtype)
    lib.int4_dequantize(p.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(), p.shape[0], out.shape[1],
                        group_size, int(widen), torch.get_num_threads())
    return out


# ---- one query against a KV cache (cpu_gemv.c): a decode step's attention, model/engines.py --------------------
def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """q (B, Hq, 1, D), k / v (B, Hkv, S, D) bf16 with rows of D contiguous (a slice of the cache) -> (B, Hq, 1, D)
    bf16: ``attention.one_query_attention`` without a mask, fp32 inside, rounded once; None where the C loop
    does not apply (not bf16 on CPU, another shape, no library)."""
    if (q.dtype != torch.bfloat16 or k.dtype != torch.bfloat16 or v.dtype != torch.bfloat16
            or q.device.type != "cpu" or q.dim() != 4 or q.shape[2] != 1 or k.shape[2] < 1
            or k.stride(-1) != 1 or v.stride(-1) != 1 or q.shape[1] % k.shape[1] or q.shape[1] // k.shape[1] > 64
            or torch.compiler.is_compiling()):
        return None
    lib = load()
    if lib is None:
        return None
    B, Hq, _, D = q.shape
    qc = q.contiguous()
    out = torch.empty(B, Hq, 1, D, dtype=torch.bfloat16)
    lib.attend_one_query(qc.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, Hq, k.shape[1], k.shape[2], D,
                         k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                         torch.get_num_threads())
    return out


# ---- int8 activations around a prompt's int8 x int8 GEMM (cpu_dequant.c), model/quant.py -----------------------
def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x (M, K) bf16 -> (x_q (M, K) int8, s (M, 1) fp32): s = max |x_row| / 127 (at least fp32's smallest normal),
    x_q = round(x / s), the bits of the torch ops in ``int8_activations.quantize_rows``; None where the C loop does
    not apply (not bf16 on CPU, no library)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    lib = load()
    if lib is None:
        return None
    x = x.contiguous()
    q, s = torch.empty(x.shape, dtype=torch.int8), torch.empty(x.shape[0], 1, dtype=torch.float32)
    lib.int8_quantize_rows(x.data_ptr(), q.data_ptr(), s.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads())
    return q, s


def scale_rows_int8(acc: torch.Tensor, s: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor | None:
    """acc (M, N) int32, s (M, 1) fp32, scales (N,) -> (M, N) bf16 = acc * s * scale (+ bias), each step in fp32
    as torch's ``(acc * s).mul_(scales)`` (``+= bias``), rounded once; None where the C loop does not apply."""
    if acc.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    lib = load()
    if lib is None:
        return None
    acc, sc = acc.contiguous(), scales.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty(acc.shape, dtype=torch.bfloat16)
    lib.int8_scale_rows(acc.data_ptr(), s.data_ptr(), sc.data_ptr(), _ptr(b), y.data_ptr(), acc.shape[0],
                        acc.shape[1], torch.get_num_threads())
    return y


# ---- the PyTorch references (fp32 sums of the same numbers, rounded once) --------------------------------------
def gemv_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K), w (N, K) float (a dequantized weight) -> (..., N) in x's dtype, summed in fp32."""
    y = x.float() @ w.float().T
    return (y if bias is None else y + bias.float()).to(x.dtype)


def int8_weight(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(N, K) int8, (N,) -> (N, K) fp32 W = q * scales (fp32 product of the stored numbers)."""
    return q.float() * scales.float()[:, None]


def int4_weight(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K/2) uint8, (N, K/g) x2 -> (N, K) fp32 W = (q - 8) * scale + zero."""
    q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1).float()  # (N, K)
    N, K = q.shape
    w = (q.reshape(N, K // group_size, group_size) - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(N, K)
