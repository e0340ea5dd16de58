"""A whole decode step compiled as one graph (gpt-fast style): fixed shapes, a fully static KV cache.

    step = compiled_step(decoder)                          # cached per decoder
    logits = step(token, input_pos, position_ids, key_mask) # (B,), (1,), (B, 1), (B, S) -> (B, V)

The eager step (``generate.decode_one_token``) attends over the filled prefix of the cache, a length
that grows every token: each new length is a new shape, so only pieces of it can be compiled (the
one-query attention, cpu_decode.py, with dynamic shapes). Here the step reads the *whole* cache buffer,
(B, Hkv, S, D) with S fixed for the request, and masks the slots not yet written (slot s is visible iff
s <= input_pos and ``key_mask[b, s]``), as gpt-fast does. Every shape is then fixed, so
``torch.compile`` sees one graph per (batch, cache length, dtype): embedding, RMSNorms, RoPE, the cache
writes (``index_copy_``), attention, every linear and the lm_head, compiled with inductor's
``max-autotune`` and ``freezing`` (the weights become constants of the graph, and inductor's CPU GEMM
template generates a GEMV for each weight shape — measured at ~97% of a plain memory read for bf16,
where oneDNN's one-row bf16 GEMM reaches ~60-70%).
Reading S instead of kv_len cache slots costs (S - kv_len) / S of the KV bytes, small beside the weights
(7B, 1,200-token prompt: 0.6 GB of KV vs 13.5 GB of weights per token).

Numbers: the same operations in the same order as the eager step, fp32 softmax, one rounding at the
end of attention; inductor fuses and reorders sums, so logits match the eager path within bf16
rounding, and greedy tokens are identical (tests/test_compiled_step.py).

Quantized layers (quant.py) are traced too: int8 as ``F.linear(x, w.to(dtype)) * scales``, the
pattern inductor's CPU weight-only-int8 GEMM template recognises; int4 through torch's int4 kernel.

Cost and when it is used: compiling takes seconds to minutes (per layer, more with max-autotune),
cached on disk by inductor for later processes. ``generate.stream`` uses it only where it was measured to
pay for itself: float decoders and long answers (``worth_compiling``: the policy and the figures are there).
``LLAVA_NEXT_COMPILE_STEP=0`` (or ``compile_step=False``) turns it off, ``=1`` forces it; a failed
compile falls back to the eager step with one warning. The graph does not run the named hook points
(hooks.py) or module hooks inside the decoder: while any is attached, the eager step runs (``observed``).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from .decoder import Decoder, apply_rope, rope_cos_sin, rope_inv_freq
from .hooks import HookPoint

# ---- policy ----------------------------------------------------------------------------------------
# Measured on a 2-core Zen 4 (AVX512-BF16, no AMX), benchmarks/bench_quant.py, 2 decoder layers of the 7B
# shape, ~1,200-token prompt (docs/performance.md):
#   bf16: 20.3 vs 18.3 tok/s eager with 2 threads (1.11x: ~5 ms a token saved per 2 layers), 0.96x with 1;
#   int8: 0.77x, int4: 0.49x (inductor's int templates run slower than torch's int kernels the eager step uses);
#   compile: 43 s cold (empty inductor cache), 11 s warm (a fresh process, cache filled), for 2 layers.
# So "auto" compiles it only for float (unquantized) decoders and answers of at least MIN_NEW_TOKENS tokens,
# where ~5 ms per token per 2 layers repays a warm compile; quantized decoders never ("on" still forces it).
MIN_NEW_TOKENS = 2048  # auto: compile the step for float decoders and requests of at least this many new tokens
MODE = "max-autotune-no-cudagraphs"  # inductor mode (the tests use "default": no autotuning, seconds not minutes)


def setting() -> str:
    """'auto' (default), '1' (always) or '0' (never), from ``LLAVA_NEXT_COMPILE_STEP``."""
    value = os.environ.get("LLAVA_NEXT_COMPILE_STEP", "auto")
    return value if value in ("0", "1") else "auto"


def worth_compiling(decoder: Decoder, max_new_tokens: int, device: torch.device, compile_step: bool | None = None) -> bool:
    """Whether ``stream`` should decode with the compiled step: on CPU, when switched on (``compile_step=True``
    or ``LLAVA_NEXT_COMPILE_STEP=1``); under "auto" for a float decoder when the request asks for at least
    ``MIN_NEW_TOKENS`` tokens or the step is already compiled in this process (the figures above)."""
    if compile_step is False or device.type != "cpu" or _failed or observed(decoder):
        return False
    if compile_step is True or setting() == "1":
        return True
    if setting() == "0" or _quantized(decoder):
        return False
    if getattr(decoder, "_compiled_step", None) is not None:
        return True  # already paid for in this process
    return max_new_tokens >= MIN_NEW_TOKENS and _room_for_frozen_weights(decoder)


def _quantized(decoder: Decoder) -> bool:
    """Weight-only int8 / int4 layers (quant.py): the eager step's int kernels are faster than the graph's."""
    from .quant import Int4Linear, Int8Linear
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in decoder.modules())


def observed(decoder: Decoder) -> bool:
    """True while something watches the decoder's insides: an active named hook point (hooks.py), or a
    forward (pre-)hook on a submodule or a pre-hook on the decoder. The graph does not call them, so the
    eager step runs then (the decoder's own forward hooks are called on the step's logits)."""
    for m in decoder.modules():
        if isinstance(m, HookPoint) and m.active:
            return True
        if m._forward_pre_hooks or (m is not decoder and m._forward_hooks):
            return True
    return False


def _room_for_frozen_weights(decoder: Decoder) -> bool:
    """Freezing makes inductor hold its own (prepacked) copy of every weight: compile only when the memory
    available now exceeds the decoder's weight bytes by 20% (MemAvailable, Linux; elsewhere assume yes)."""
    weights = sum(t.nbytes for n, t in [*decoder.named_parameters(), *decoder.named_buffers()]
                  if "kv_cache" not in n and t.layout == torch.strided)
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return True
    return available > 1.2 * weights


def cache_length(prompt_tokens: int, max_new_tokens: int, bucket: int = 256) -> int:
    """The static cache length for a request, rounded up to ``bucket`` so nearby requests share a graph."""
    return -(-(prompt_tokens + max_new_tokens) // bucket) * bucket


# ---- the step --------------------------------------------------------------------------------------
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    # q (B, Hq, 1, D); k, v (B, Hkv, S, D); allowed (B, S) -> (B, Hq, 1, D); fp32 scores and softmax
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, 1, D).float()  # (B, Hkv, G, 1, D)
    scores = (qg * k[:, :, None].float()).sum(-1) * (1.0 / math.sqrt(D))  # (B, Hkv, G, S)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # (B, Hkv, G, D)
    return out.reshape(B, Hq, 1, D).to(q.dtype)


def decode_step(dec: Decoder, token: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
                key_mask: torch.Tensor) -> torch.Tensor:
    """One token per row, written at cache slot ``input_pos`` (1,), over the whole static cache.
    token (B,), position_ids (B, 1) RoPE positions, key_mask (B, S) bool (False: padding) -> (B, V)."""
    cfg = dec.config
    x = dec.embed_tokens(token[:, None])  # (B, 1, C)
    B = x.shape[0]
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, dec.rope_scaling_factor, x.device)
    cos, sin = rope_cos_sin(position_ids, inv_freq, x.dtype)  # (B, 1, 1, D)
    S = key_mask.shape[1]
    allowed = key_mask & (torch.arange(S, device=x.device) <= input_pos)  # (B, S)
    for layer in dec.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(B, 1, a.num_heads, a.head_dim).transpose(1, 2)  # (B, Hq, 1, D)
        k = a.k_proj(h).view(B, 1, a.num_kv_heads, a.head_dim).transpose(1, 2)  # (B, Hkv, 1, D)
        v = a.v_proj(h).view(B, 1, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = a.kv_cache
        cache.k.index_copy_(2, input_pos, k)
        cache.v.index_copy_(2, input_pos, v)
        y = _attention(q, cache.k, cache.v, allowed)  # (B, Hq, 1, D)
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, 1, a.num_heads * a.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return dec.lm_head(dec.norm(x))[:, -1]  # (B, V)


_failed = False


def compiled_step(dec: Decoder):
    """``decode_step`` bound to ``dec``, compiled (once per decoder; new shapes recompile)."""
    step = getattr(dec, "_compiled_step", None)
    if step is None:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights become graph constants (prepacked, template GEMVs)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = torch.compile(decode_step, mode=MODE, fullgraph=True, dynamic=False)

        def step(token, input_pos, position_ids, key_mask):
            with torch.no_grad():
                return fn(dec, token, input_pos, position_ids, key_mask)

        dec._compiled_step = step
    return step


def run_step(dec: Decoder, token: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
             key_mask: torch.Tensor) -> torch.Tensor | None:
    """The compiled step's logits, or None after a failed compile (warned once; the caller decodes eagerly)."""
    global _failed
    if _failed:
        return None
    try:
        return compiled_step(dec)(token, input_pos, position_ids, key_mask)
    except Exception as e:  # noqa: BLE001 - a compiler failure: the eager step, warned once
        _failed = True
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        warnings.warn(f"llava-next: compiling the whole decode step failed ({type(e).__name__}: {first[:200]}); "
                      f"decoding uses the eager step instead. Set LLAVA_NEXT_COMPILE_STEP=0 to skip the attempt.",
                      RuntimeWarning, stacklevel=2)
        return None
