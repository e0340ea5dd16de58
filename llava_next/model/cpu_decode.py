"""One-token decode on CPU: attention of one query against the KV cache, compiled.

Decoding one token reads every decoder weight and the whole KV cache once and does almost no arithmetic
per byte, so its speed is bytes / memory bandwidth if the kernels stream. The weights' one-row GEMMs
(oneDNN, prepacked by ``LlavaNextModel.pack_for_cpu``) do; SDPA's CPU kernel with a single query does
not: it reads the KV cache at ~4 GB/s (it is built for blocks of queries), which made attention ~19% of
a bfloat16 decode step of the 7B shape at a 1,200-token context (benchmarks/bench_cpu.py, 2-core Zen 4).

The textbook formula, compiled by torch.compile (inductor's C++ backend), reads the cache ~4x faster:

    out[b, h] = sum_t softmax_t(q[b, h] . k[b, g, t] / sqrt(D)) v[b, g, t]      g = h // (Hq / Hkv)

in float32, rounded once at the end (as SDPA does). It compiles on its first call (the first decoded
token) with dynamic shapes, so one compile serves every cache length. The cost: ~17 s the first time on
a machine, ~5 s in later processes (inductor keeps the code on disk; most of the rest is importing the
compiler). What it saves: for a 7B model at a 1,200-token context, ~115 ms per token (32 layers x 20 MB
of KV, read at ~15 instead of ~4 GB/s), so it pays for itself after ~45 tokens (~150 the very first
time), sooner at longer contexts, and at once in a long-lived process. Compiling in a background thread
while the vision tower runs was tried: on 2 cores the two only take turns.

The attention facade's "auto" backend sends one-query calls without a mask on CPU here.
By default (``LLAVA_NEXT_COMPILE`` unset or ``auto``) ``generate.stream`` uses it only for requests where the
compile pays for itself (``worth_compiling``: long answers over a large KV cache, or once it is compiled in
the process); ``LLAVA_NEXT_COMPILE=1`` always, ``=0`` never; a failed compile (no C++ compiler, say) falls
back with one warning.
SDPA is used then: the same numbers up to float32 summation order.

Tried and dropped (A/B in one process, benchmarks/bench_cpu.py conditions): the same approach for the
one-row linear layers, ``(x.float() * w.float()).sum(-1)`` compiled, streams the weights no faster than
oneDNN's prepacked bf16 GEMV (~30 GB/s both, while a plain ``sum`` reads ~50 GB/s); with dynamic
shapes inductor even emits a single-threaded loop.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings

import torch
import torch.nn.functional as F


def _attention_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # q (B, Hq, 1, D); k, v (B, Hkv, T, D) -> (B, Hq, 1, D); query head h reads kv head h // (Hq // Hkv)
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, 1, D).float()  # (B, Hkv, G, 1, D)
    scores = (qg * k[:, :, None].float()).sum(-1) * (1.0 / math.sqrt(D))  # (B, Hkv, G, T)
    probs = torch.softmax(scores, dim=-1)
    out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # (B, Hkv, G, D)
    return out.reshape(B, Hq, 1, D).to(q.dtype)


_failed = False  # set once a compile has failed: SDPA from then on
_compiled_once = False  # set once the compiled kernel has run in this process: later requests use it for free
_allowed = True  # the current request's choice (``for_request``)
COMPILE_COST_S = 5.0  # a warm compile (inductor's disk cache filled), measured above
SDPA_GBPS, COMPILED_GBPS = 4e9, 15e9  # KV-cache read rates, measured above


def enabled() -> bool:
    """False when ``LLAVA_NEXT_COMPILE=0``, after a compile failed, or inside ``for_request(False)``.
    The kernel compiles on first use."""
    return not _failed and _allowed and os.environ.get("LLAVA_NEXT_COMPILE", "auto") != "0"


def worth_compiling(kv_bytes_per_token: float, new_tokens: int) -> bool:
    """Whether compiling pays for itself for a request that reads ``kv_bytes_per_token`` of KV cache per
    decoded token (mean over the answer) for ``new_tokens`` tokens: always once compiled in this process
    or with ``LLAVA_NEXT_COMPILE=1``; never with ``=0``; else (``auto``, the default) when the time saved,
    new_tokens x kv_bytes x (1/4 - 1/15 GB/s), exceeds ``COMPILE_COST_S``. A 7B model at 1,200 tokens
    saves ~115 ms per token (pays after ~45 tokens); the 2-layer benchmark model ~7 ms (after ~700)."""
    setting = os.environ.get("LLAVA_NEXT_COMPILE", "auto")
    if setting in ("0", "1"):
        return setting == "1"
    if _compiled_once:
        return True
    return new_tokens * kv_bytes_per_token * (1 / SDPA_GBPS - 1 / COMPILED_GBPS) > COMPILE_COST_S


@contextlib.contextmanager
def for_request(allowed: bool):
    """Within the block, one-query attention uses the compiled kernel only if ``allowed`` (and ``enabled``)."""
    global _allowed
    previous, _allowed = _allowed, allowed
    try:
        yield
    finally:
        _allowed = previous


def attention_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, Hq, 1, D) queries against all of (B, Hkv, T, D) keys/values, no mask: compiled, else SDPA."""
    global _failed, _compiled_once
    if k.shape[2] < 2 or not enabled():  # a one-key cache has nothing to stream (and would pin T = 1)
        return _sdpa(q, k, v)
    try:
        out = _compiled()(q, k, v)
        _compiled_once = True
        return out
    except Exception as e:  # noqa: BLE001 - a compiler failure (no C++ compiler, say): SDPA, warned once
        _failed = True
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        warnings.warn(f"llava-next: compiling the CPU decode attention failed ({type(e).__name__}: {first}); "
                      f"decoding uses SDPA instead (slower). Set LLAVA_NEXT_COMPILE=0 to skip the attempt.",
                      RuntimeWarning, stacklevel=2)
        return _sdpa(q, k, v)  # bad inputs raise here, from the library kernel


@functools.cache
def _compiled():
    # one process may decode with several models (dtypes, head counts, batch sizes: each a separate
    # specialization); dynamo's default of 8 per function would end in a hard failure under fullgraph
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(_attention_one_query, dynamic=True, fullgraph=True)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
