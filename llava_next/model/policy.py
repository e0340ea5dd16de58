"""Every speed policy in one place: when compiling pays, chunk sizes. Each constant names the benchmark
result that set it (benchmarks/published/, rendered in docs/performance.md); the code that applies a
policy imports it from here and carries no measured number of its own.

Two kinds of rule. Constants measured once and published (compile costs, chunk sizes), each naming its
benchmark; and choices that differ between CPUs (which one-row decode product is fastest here: torch's, or
the project's C loops in model/cpu_gemv.c), made by **measuring this machine at first use** and
cached per CPU model, flags, torch version and C source (``gemv_choice``), as inductor caches its
autotuning: an Intel Xeon with AMX and an AMD Zen 4 each get the path that is fastest on them.

Two switches, environment variables read only here:
``LLAVA_NEXT_COMPILE`` (``compile_setting``):
    auto   (default) compile what the figures below say pays for itself in this request (a bf16 decode
           attention on a CPU with AVX-512 runs the C loop instead: ``attention_in_c``)
    0      never compile (eager decode, SDPA attention)
    1      always compile the one-query decode attention; the whole step under "auto"'s rule
    step   always decode with the whole-step compiled graph (CPU, float or quantized)
``LLAVA_NEXT_GEMV`` (``gemv_choice``): auto (default: measured), kernel (the C loops), torch (torch's kernels).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from . import cpu_gemv

# ---- the one-query decode attention, compiled (model/engines.py) ------------------------------------------
# benchmarks/published/4-cpu.md, "Compiled decode attention" (bench_cpu.py, 7B shape, bf16, ~1,200-token
# context): SDPA's CPU kernel with one query reads the KV cache at ~4 GB/s, the compiled formula ~15 GB/s;
# a warm compile (inductor's disk cache filled, a fresh process) costs ~5 s.
KV_READ_SDPA_BPS = 4e9
KV_READ_COMPILED_BPS = 15e9
ATTENTION_COMPILE_S = 5.0

# ---- the whole decode step, compiled (model/engines.py) ----------------------------------------------------
# benchmarks/published/3-quant.md (bench_quant.py, 2 decoder layers of the 7B shape, ~1,200-token prompt):
# bf16 1.11x the eager step with 2 threads (0.96x with 1), int8 0.77x, int4 0.49x; a compile of 11 s warm,
# 43 s cold. The graph runs torch's products: where this CPU measured the C loops faster (gemv_choice), the
# eager step runs them (bf16: 1.40x torch's eager path, benchmarks/published/7-cpu-decode.md), beyond the graph's
# 1.11x. So "auto" compiles it only for float decoders that decode through torch's products, and answers of at
# least STEP_MIN_NEW_TOKENS.
STEP_MIN_NEW_TOKENS = 2048
STEP_MODE = "max-autotune-no-cudagraphs"  # inductor mode (tests use "default": seconds, not minutes)
STEP_CACHE_BUCKET = 256  # static cache lengths are rounded up to this, so nearby requests share one graph
STEP_MEMORY_HEADROOM = 1.2  # freezing holds a second copy of the weights: compile only with this much room

# ---- quantized linears (model/quant.py) --------------------------------------------------------------------
# benchmarks/published/3-quant.md: torch's int8 / int4 CPU kernels run one-row decode steps well but prompts
# far below oneDNN's bf16 GEMM; from QUANT_GEMM_MIN_ROWS rows a layer dequantizes its weight
# QUANT_DEQUANT_CHUNK output channels at a time (each chunk used while it is in cache) and runs the bf16 GEMM:
# a quantized prefill then costs the bf16 GEMM plus the dequantization (+7% int8, +19% int4 there).
QUANT_GEMM_MIN_ROWS = 128
QUANT_DEQUANT_CHUNK = 512

# ---- the vision tower (model/llava.py, reduce/) --------------------------------------------------------------
FRAME_BATCH = 8  # frames per vision-tower call: activations stay small for long videos
# frames per tower call when a gradient goes back to the pixels (research/attribution.py): each call is run again
# in the backward, so one call's activations are the tower's peak (ViT-L, fp32: ~1 GiB a frame; docs/research.md)
RECOMPUTE_FRAME_BATCH = 2

# ---- exact attention probabilities (model/attention.py: research statistics, reduction scores) -------------
CHUNK_BYTES = 32 << 20  # one (B, Hq, chunk, Tk) fp32 probability block; bounds the instruments' extra memory


def compile_setting() -> str:
    """``LLAVA_NEXT_COMPILE``: "auto", "0", "1" or "step" (module docstring); anything else is an error."""
    value = os.environ.get("LLAVA_NEXT_COMPILE", "auto")
    if value not in ("auto", "0", "1", "step"):
        raise ValueError(f"LLAVA_NEXT_COMPILE={value!r}: use auto (default), 0 (never compile), 1 (always compile "
                         f"the decode attention) or step (always compile the whole decode step)")
    return value


# ---- the one-query decode attention in C (model/cpu_gemv.c ``attend_one_query``, model/engines.py) ------------
# benchmarks/published/7-cpu-decode.md ("the decode attention in C"): with AVX512-BF16 the C loop reads a bf16
# cache at ~27 GB/s with 2 threads (Zen 4; the compiled formula above ~18, SDPA ~4) and needs no compile;
# benchmarks/published/8-cpu-intel.md: its AVX-512 loop without BF16 (Ice Lake) ~11 GB/s against the compiled
# formula's ~8 and SDPA's ~2. So where the library has an AVX-512 loop it replaces both. The plain loops (AVX2,
# NEON) were not measured faster than the compiled formula, so there the rule above stays.
def attention_in_c(dtype: torch.dtype) -> bool:
    """Whether decode steps attend with the C loop: a bf16 cache, a CPU with AVX-512 (the flag the native
    build's vector loops need: with or without AVX512-BF16), the library built, and ``LLAVA_NEXT_COMPILE`` at
    auto (0 keeps SDPA, 1 the compiled formula, step the compiled step)."""
    return (dtype == torch.bfloat16 and compile_setting() == "auto"
            and "avx512f" in cpu_gemv.cpu_identity().split() and cpu_gemv.load() is not None)


def attention_compile_pays(kv_bytes_per_token: float, new_tokens: int, compiled_before: bool) -> bool:
    """Whether the compiled one-query attention pays for itself in a request that reads ``kv_bytes_per_token``
    of KV cache per decoded token (mean over the answer) for ``new_tokens`` tokens: the time it saves,
    new_tokens x kv_bytes x (1/SDPA - 1/compiled read rate), against a warm compile; free once compiled."""
    setting = compile_setting()
    if setting in ("0", "1"):
        return setting == "1"
    if compiled_before:
        return True
    saved = new_tokens * kv_bytes_per_token * (1 / KV_READ_SDPA_BPS - 1 / KV_READ_COMPILED_BPS)
    return saved > ATTENTION_COMPILE_S


def step_compile_pays(max_new_tokens: int, eager_kernels: bool, compiled_before: bool, forced: bool | None,
                      weight_bytes: int, available_bytes: int | None) -> bool:
    """Whether to decode with the whole-step compiled graph: ``forced`` True / False (the caller's
    ``compile_step``) or ``LLAVA_NEXT_COMPILE=step`` / ``0`` decide; never where the eager step has faster
    kernels (``eager_kernels``: quantized layers, or the C decode loops); else a request of at least
    STEP_MIN_NEW_TOKENS, or a graph compiled before, with room for the frozen weights."""
    if forced is not None:
        return forced
    setting = compile_setting()
    if setting in ("step", "0"):
        return setting == "step"
    if eager_kernels:
        return False
    if compiled_before:
        return True
    room = available_bytes is None or available_bytes > STEP_MEMORY_HEADROOM * weight_bytes
    return max_new_tokens >= STEP_MIN_NEW_TOKENS and room


def static_cache_length(prompt_tokens: int, max_new_tokens: int) -> int:
    """The compiled step's static cache length, rounded up to STEP_CACHE_BUCKET."""
    return -(-(prompt_tokens + max_new_tokens) // STEP_CACHE_BUCKET) * STEP_CACHE_BUCKET


# ---- one-row decode products on CPU (model/quant.py, model/llava.py) -----------------------------------------
# Decoding reads every weight once per token, so its speed is the rate at which a one-row product reads
# its weight. Which implementation reads fastest depends on the CPU (vector width, AMX, VNNI, cache sizes)
# and on torch's build, so it is measured here, not written down: each candidate runs over weights of
# ``gemv_probe_bytes()``, alternating, GEMV_PROBE_ROUNDS times, on one thread, and the faster best time wins (by
# CHOICE_MARGIN). The weights are GEMV_PROBE_BYTES, or LLC_MULTIPLE times the last-level cache where that is more,
# so that they are read from memory as a model's are: over twice its 48 MB L3, an Ice Lake Xeon measured the int8
# products about 17% faster than over four or eight times, and 96 MiB would sit whole in a 105 MB Sapphire Rapids L3
# (the temporary weights take up to twice that: torch's candidates read their own layouts). One thread and the
# best time, because a first use may meet a busy machine: with two threads, one core taken by another process
# stalls both candidates at every barrier (seen on the 2-core development VMs: either path from 1 to 26 GB/s run
# to run), while one thread that is time-sliced still has undisturbed passes, and the per-core rate is
# what the threads of a decode step each get. One measurement per machine and format, a few seconds
# for all three, cached in $LLAVA_NEXT_CACHE/kernels/policy.json under ``cpu_key()`` (delete the file to
# measure again).
GEMV_MAX_ROWS = 8  # a product of at most this many rows is a decode step (one token per sequence)
GEMV_PROBE_BYTES = 96 << 20  # at least
LLC_MULTIPLE = 4
GEMV_PROBE_SHAPE = (4096, 4096)  # (N, K): the 7B decoder's attention projections
GEMV_PROBE_ROUNDS = 7
GEMV_FORMATS = ("bf16", "int8", "int4")
_choices: dict[str, str] = {}


def gemv_setting() -> str:
    """``LLAVA_NEXT_GEMV``: "auto", "kernel" or "torch"; anything else is an error."""
    value = os.environ.get("LLAVA_NEXT_GEMV", "auto")
    if value not in ("auto", "kernel", "torch"):
        raise ValueError(f"LLAVA_NEXT_GEMV={value!r}: use auto (default: measured on this CPU at first use), "
                         f"kernel (the C decode loops) or torch (torch's own kernels)")
    return value


def cpu_key() -> str:
    """What a measured choice depends on: CPU model and vector flags, torch version, the C loops' source, the
    probe's size."""
    return (f"{cpu_gemv.cpu_identity()} | torch {torch.__version__} | kernels {cpu_gemv.source_hash()} | "
            f"probe {gemv_probe_bytes() >> 20} MiB")


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest cache CPU 0 has (Linux sysfs: ``index*/size``, e.g. "49152K"); 0 where that cannot be read."""
    sizes = [0]
    for f in Path(root).glob("index*/size"):
        try:
            text = f.read_text().strip()
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes)


def gemv_probe_bytes() -> int:
    """Bytes of weight each probe pass reads: GEMV_PROBE_BYTES, or LLC_MULTIPLE x the last-level cache."""
    return max(GEMV_PROBE_BYTES, LLC_MULTIPLE * last_level_cache_bytes())


# A challenger must beat torch's own path by CHOICE_MARGIN, not merely measure faster: the two round differently,
# and a near tie measured again (another cache, two ranks measuring at once) could go the other way, so two
# processes of one job would give the same sample different numbers. Within the margin the gain is small anyway.
CHOICE_MARGIN = 1.10


def choose_faster(rates: dict[str, float], incumbent: str = "torch") -> str:
    """The rule: the candidate with the highest measured rate if it beats ``incumbent``'s by CHOICE_MARGIN;
    otherwise the incumbent (torch's own path: "torch" for decode products, "bf16" F.linear for prompts)."""
    best = max(rates, key=lambda c: rates[c])
    return best if rates[best] >= CHOICE_MARGIN * rates[incumbent] else incumbent


def gemv_choice(fmt: str) -> str:
    """"kernel" or "torch": which one-row product decodes a ``fmt`` ("bf16", "int8", "int4") weight on this CPU
    (``LLAVA_NEXT_GEMV`` forces one; "auto" measures once per machine, module comment above)."""
    if fmt not in GEMV_FORMATS:
        raise ValueError(f"no decode product for {fmt!r}: one of {', '.join(GEMV_FORMATS)}")
    setting = gemv_setting()
    if setting == "torch" or cpu_gemv.load() is None:
        return "torch"  # no C compiler: torch's kernels (cpu_gemv.failure() says why)
    if setting == "kernel":
        return "kernel"
    if fmt not in _choices:
        key, cache = cpu_key(), _read_policy_cache()
        entry = cache.get(key, {}).get(fmt)
        if entry is None:
            rates = measure_gemv(fmt)
            entry = {"choice": choose_faster(rates), "GB/s": {c: round(r / 1e9, 2) for c, r in rates.items()},
                     "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
            cache.setdefault(key, {})[fmt] = entry
            _write_policy_cache(cache)
        _choices[fmt] = entry["choice"]
    return _choices[fmt]


def gemv_report() -> dict:
    """The measured choices of this machine (for benchmarks and ``inspect``): {"cpu": key, fmt: entry, "prompt":
    entry}."""
    for fmt in GEMV_FORMATS:
        gemv_choice(fmt)
    prompt_choice()
    return {"cpu": cpu_key(), "setting": gemv_setting(), **_read_policy_cache().get(cpu_key(), {})}


def _policy_path() -> Path:
    root = Path(os.environ.get("LLAVA_NEXT_CACHE", Path.home() / ".cache" / "llava-next"))
    return root / "kernels" / "policy.json"


def _read_policy_cache() -> dict:
    try:
        return json.loads(_policy_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_policy_cache(cache: dict) -> None:
    path = _policy_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: measured again by the next process


# ---- prompt-sized bf16 products on CPU (model/quant.py ``chunked_linear``: DecodeLinear, Int8Linear, Int4Linear) --
# A CPU with AVX512-BF16 or AMX multiplies bf16 in hardware; one without (AVX-512 or AVX2 only: Skylake-SP to Ice
# Lake, older AMD) gets oneDNN's bf16 GEMM widening to fp32 inside, well below its own fp32 rate
# (benchmarks/published/8-cpu-intel.md, Ice Lake, 1,200 x 4096 x 11008, 2 threads: 67 against 237 GFLOP/s). There
# a bf16 layer's prompt runs as an fp32 GEMM over its weight widened QUANT_DEQUANT_CHUNK output channels at a
# time (each chunk used while in cache, as the quantized layers' dequantized chunks), rounded to bf16 once:
# F.linear's numbers in another summation order. Which is faster is measured once per machine, as the decode
# products are, by the same rule (one PROMPT_PROBE_SHAPE product each way, best of GEMV_PROBE_ROUNDS on the
# process's threads; cached beside them as "prompt").
PROMPT_PROBE_SHAPE = (256, 2048, 2048)  # (M, K, N)


def prompt_choice() -> str:
    """"bf16" or "fp32": in which dtype a bf16 layer's prompt-sized product sums on this CPU (comment above;
    ``LLAVA_NEXT_GEMV=torch`` keeps bf16, torch's own path, as it does for decode)."""
    if gemv_setting() == "torch":
        return "bf16"
    if "prompt" not in _choices:
        key, cache = cpu_key(), _read_policy_cache()
        entry = cache.get(key, {}).get("prompt")
        if entry is None:
            rates = measure_prompt()
            entry = {"choice": choose_faster(rates, incumbent="bf16"),  # within the margin: F.linear
                     "GFLOP/s": {c: round(r / 1e9, 1) for c, r in rates.items()},
                     "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
            cache.setdefault(key, {})["prompt"] = entry
            _write_policy_cache(cache)
        _choices["prompt"] = entry["choice"]
    return _choices["prompt"]


def measure_prompt() -> dict[str, float]:
    """{"bf16": flop/s, "fp32": flop/s}: a bf16 product of PROMPT_PROBE_SHAPE through oneDNN's bf16 GEMM, and
    the same widened to fp32 QUANT_DEQUANT_CHUNK output channels at a time (the widening counted), best times."""
    M, K, N = PROMPT_PROBE_SHAPE
    x, w = torch.full((M, K), 0.01, dtype=torch.bfloat16), torch.full((N, K), 0.01, dtype=torch.bfloat16)

    def fp32():
        x32, out = x.float(), torch.empty(M, N)
        for i in range(0, N, QUANT_DEQUANT_CHUNK):
            out[:, i:i + QUANT_DEQUANT_CHUNK] = torch.nn.functional.linear(x32, w[i:i + QUANT_DEQUANT_CHUNK].float())
        return out.to(torch.bfloat16)

    candidates = {"bf16": lambda: torch.nn.functional.linear(x, w), "fp32": fp32}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(GEMV_PROBE_ROUNDS):
        for name, run in candidates.items():
            run()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 2 * M * K * N / min(t) for name, t in times.items()}


def measure_gemv(fmt: str) -> dict[str, float]:
    """{"kernel": bytes/s, "torch": bytes/s}: both one-row products of ``fmt`` over weights of
    ``gemv_probe_bytes()`` in total, alternating, GEMV_PROBE_ROUNDS rounds on one thread, best times."""
    candidates, total = _probe(fmt)
    x = torch.ones(1, GEMV_PROBE_SHAPE[1], dtype=torch.bfloat16)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(GEMV_PROBE_ROUNDS):
            for name, run in candidates.items():
                run(x)  # warm: the first pass faults the pages in
                start = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: total / min(t) for name, t in times.items()}


def _probe(fmt: str):
    """({"kernel": f, "torch": f}, bytes): each f(x) runs one product per probe weight, the way the model's
    layers run a decode step in ``fmt`` (torch: oneDNN's prepacked bf16 GEMM, ``_weight_int8pack_mm``,
    ``_weight_int4pack_mm_for_cpu`` on its own layout; kernel: model/cpu_gemv.c)."""
    N, K = GEMV_PROBE_SHAPE
    per = {"bf16": 2 * N * K, "int8": N * K, "int4": N * K // 2}[fmt]
    count = max(1, gemv_probe_bytes() // per)
    if fmt == "bf16":
        ws = [torch.full((N, K), 0.01, dtype=torch.bfloat16) for _ in range(count)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
        kernel = lambda x: [cpu_gemv.gemv_bf16(x, w) for w in ws]
        ref = lambda x: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]
    elif fmt == "int8":
        qs = [torch.ones(N, K, dtype=torch.int8) for _ in range(count)]
        scales = torch.full((N,), 0.01, dtype=torch.bfloat16)
        kernel = lambda x: [cpu_gemv.gemv_int8(x, q, scales) for q in qs]
        ref = lambda x: [torch._weight_int8pack_mm(x, q, scales) for q in qs]
    else:
        nib = [torch.full((N, K // 2), 0x87, dtype=torch.uint8) for _ in range(count)]
        sz = torch.full((K // 128, N, 2), 0.01, dtype=torch.bfloat16)
        sc, ze = sz[..., 0].T.contiguous(), sz[..., 1].T.contiguous()  # (N, K/128) each
        one = torch._convert_weight_to_int4pack_for_cpu(torch.full((N, K), 7, dtype=torch.int32), 2)
        packs = [one.clone() for _ in range(count)]  # distinct memory, one conversion
        kernel = lambda x: [cpu_gemv.gemv_int4(x, p, sc, ze, 128) for p in nib]
        ref = lambda x: [torch._weight_int4pack_mm_for_cpu(x, p, 128, sz) for p in packs]
    return {"kernel": kernel, "torch": ref}, count * per
