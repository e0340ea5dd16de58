"""Every speed policy in one place: when compiling pays, chunk sizes. Each constant names the benchmark
result that set it (benchmarks/published/, rendered in docs/performance.md); the code that applies a
policy imports it from here and carries no measured number of its own.

One switch, the environment variable ``LLAVA_NEXT_COMPILE``, read only here (``compile_setting``):
    auto   (default) compile what the figures below say pays for itself in this request
    0      never compile (eager decode, SDPA attention)
    1      always compile the one-query decode attention; the whole step under "auto"'s rule
    step   always decode with the whole-step compiled graph (CPU, float or quantized)
"""

from __future__ import annotations

import os

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
# 43 s cold. So "auto" compiles it only for float decoders and answers of at least STEP_MIN_NEW_TOKENS.
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

# ---- exact attention probabilities (model/attention.py: research statistics, reduction scores) -------------
CHUNK_BYTES = 32 << 20  # one (B, Hq, chunk, Tk) fp32 probability block; bounds the instruments' extra memory


def compile_setting() -> str:
    """``LLAVA_NEXT_COMPILE``: "auto", "0", "1" or "step" (module docstring); anything else is an error."""
    value = os.environ.get("LLAVA_NEXT_COMPILE", "auto")
    if value not in ("auto", "0", "1", "step"):
        raise ValueError(f"LLAVA_NEXT_COMPILE={value!r}: use auto (default), 0 (never compile), 1 (always compile "
                         f"the decode attention) or step (always compile the whole decode step)")
    return value


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


def step_compile_pays(max_new_tokens: int, quantized: bool, compiled_before: bool, forced: bool | None,
                      weight_bytes: int, available_bytes: int | None) -> bool:
    """Whether to decode with the whole-step compiled graph: ``forced`` True / False (the caller's
    ``compile_step``) or ``LLAVA_NEXT_COMPILE=step`` / ``0`` decide; else a float decoder and a request of at
    least STEP_MIN_NEW_TOKENS, or a graph compiled before, with room for the frozen weights."""
    if forced is not None:
        return forced
    setting = compile_setting()
    if setting in ("step", "0"):
        return setting == "step"
    if quantized:
        return False
    if compiled_before:
        return True
    room = available_bytes is None or available_bytes > STEP_MEMORY_HEADROOM * weight_bytes
    return max_new_tokens >= STEP_MIN_NEW_TOKENS and room


def static_cache_length(prompt_tokens: int, max_new_tokens: int) -> int:
    """The compiled step's static cache length, rounded up to STEP_CACHE_BUCKET."""
    return -(-(prompt_tokens + max_new_tokens) // STEP_CACHE_BUCKET) * STEP_CACHE_BUCKET
