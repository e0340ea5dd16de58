"""The engines that run the decoder for generation: eager, and the compiled CPU decode. Each owns its loop
over the same blocks (model/decoder.py, ``LayerContext``: model/context.py); ``generate.stream`` drives
whichever it is given or ``choose_engine`` picks. The reduced engine (token pruning and merging) is
llava_next/reduce/engine.py, the tensor-parallel one shards these (llava_next/parallel).

    engine.setup_caches(decoder, batch, prompt_len, max_new_tokens, dtype, device)
    logits = engine.prefill(decoder, embeds, position_ids, key_mask)          # (B, V) of the last position
    logits = engine.decode(decoder, token, step, position_ids, kernel)        # (B, V); step 0 = first new token

- ``EagerEngine``: prefill and each decode step are one ``Decoder.forward``; a decode step attends with
  ``kernel`` (``decode_kernel``: the C one-query attention of model/cpu_gemv.c for bf16 with AVX-512, or
  the compiled one when it pays, else the facade).
- ``CompiledStepEngine``: decode steps run one graph compiled by torch.compile (gpt-fast style) from the
  SAME block code: the step reads the whole static cache (B, Hkv, S, D), S fixed for the request, and
  masks the slots not written yet (slot s is visible iff s <= the new slot and not padding), so every shape
  is fixed and inductor compiles embedding, norms, RoPE, cache writes, attention, every linear and the head
  as one graph (``max-autotune``, ``freezing``: the weights become constants and get template GEMVs).
  Logits match the eager step within bf16 rounding (inductor reorders sums); greedy tokens are identical
  in the tests. It never runs while something observes the decoder (hooks, an instrument): the graph
  would not call them.

When each pays (compile costs seconds to minutes, cached on disk by inductor for later processes):
model/policy.py, from the published benchmark results. A failed compile (no C++ compiler, say) falls back
to the eager path with one warning and is not tried again in the process.
"""

from __future__ import annotations

import functools
import warnings
from typing import Protocol

import torch

from . import cpu_gemv, policy
from .attention import forced_backend, one_query_attention
from .decoder import Decoder, default_kernel
from .context import Kernel
from .hooks import HookPoint
from .pages import available_memory

_compiled: set[str] = set()  # what has compiled and run in this process ("attention", "step"): free from now on
_failed: set[str] = set()  # what failed to compile in this process: never tried again


class Engine(Protocol):
    def setup_caches(self, decoder: Decoder, batch: int, prompt_len: int, max_new_tokens: int,
                     dtype: torch.dtype, device: torch.device) -> None: ...

    def prefill(self, decoder: Decoder, embeds: torch.Tensor, position_ids: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor: ...

    def decode(self, decoder: Decoder, token: torch.Tensor, step: int, position_ids: torch.Tensor,
               kernel: Kernel | None = None) -> torch.Tensor: ...


def grow(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A prefill key mask (B, T) extended by ``n`` real (generated) tokens."""
    return None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], n)], dim=1)


# ---- eager ---------------------------------------------------------------------------------------------
class EagerEngine:
    """Prefill and decode steps through ``Decoder.forward``."""

    def __init__(self) -> None:
        self.prompt_len = 0
        self.key_mask: torch.Tensor | None = None  # (B, T) of the prompt, None without padding

    def setup_caches(self, decoder: Decoder, batch: int, prompt_len: int, max_new_tokens: int,
                     dtype: torch.dtype, device: torch.device) -> None:
        decoder.setup_caches(batch, prompt_len + max_new_tokens, dtype=dtype, device=device)

    @torch.no_grad()
    def prefill(self, decoder: Decoder, embeds: torch.Tensor, position_ids: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        """Run the (B, T, C) prompt, writing cache slots 0..T-1 -> (B, V) logits of the last position."""
        self.prompt_len, self.key_mask = embeds.shape[1], key_mask
        slots = torch.arange(self.prompt_len, device=embeds.device)
        return decoder(input_embeds=embeds, input_pos=slots, position_ids=position_ids, key_mask=key_mask,
                       last_only=True)[:, -1]

    @torch.no_grad()
    def decode(self, decoder: Decoder, token: torch.Tensor, step: int, position_ids: torch.Tensor,
               kernel: Kernel | None = None) -> torch.Tensor:
        """token (B,) of decode step ``step`` at RoPE positions (B, 1) -> (B, V) next-token logits."""
        slot = torch.tensor([self.prompt_len + step], device=token.device)
        return decoder(token[:, None], input_pos=slot, position_ids=position_ids,
                       key_mask=grow(self.key_mask, step + 1), kernel=kernel)[:, -1]


# ---- the compiled one-query attention (a kernel for any engine's decode steps) ---------------------------
def decode_kernel(decoder: Decoder, batch: int, prompt_len: int, max_new_tokens: int, dtype: torch.dtype,
                  device: torch.device) -> Kernel | None:
    """The C one-query attention where the policy chooses it (policy.attention_in_c), else the compiled one when
    it pays for this request (policy.attention_compile_pays), else None (the facade). CPU only, and only while
    no attention backend is forced (``use_backend``)."""
    if device.type != "cpu" or forced_backend() != "auto":
        return None
    if policy.attention_in_c(dtype):
        return c_one_query
    if "attention" in _failed:
        return None
    cfg = decoder.config
    per_token = 2 * cfg.num_layers * batch * cfg.num_kv_heads * (prompt_len + max_new_tokens / 2) * cfg.head_dim \
        * torch.empty((), dtype=dtype).element_size()  # K and V bytes read per decoded token, mean over the answer
    if not policy.attention_compile_pays(per_token, max_new_tokens, "attention" in _compiled):
        return None
    return compiled_one_query


def c_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A ``Kernel``: one query without a mask -> the C loop (model/cpu_gemv.c); anything else -> the facade."""
    out = cpu_gemv.attend_one_query(q, k, v) if mask is None else None
    return default_kernel(q, k, v, mask) if out is None else out


def compiled_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A ``Kernel``: one query without a mask against >= 2 keys -> the compiled ``one_query_attention``;
    anything else (or after a failed compile) -> the facade."""
    if q.shape[2] != 1 or mask is not None or k.shape[2] < 2 or "attention" in _failed:
        return default_kernel(q, k, v, mask)  # a one-key cache has nothing to stream (and would pin S = 1)
    try:
        out = _compiled_one_query()(q, k, v)
    except Exception as e:  # noqa: BLE001 - a compiler failure (no C++ compiler, say): the facade, warned once
        _compile_failed("attention", "the CPU decode attention", "decoding uses SDPA instead (slower)", e)
        return default_kernel(q, k, v, mask)  # bad inputs raise here, from the library kernel
    _compiled.add("attention")
    return out


@functools.cache
def _compiled_one_query():
    # one process may decode with several models (dtypes, head counts, batch sizes: each a specialization);
    # dynamo's default of 8 per function would end in a hard failure under fullgraph
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(one_query_attention, dynamic=True, fullgraph=True)


def _compile_failed(kind: str, what: str, instead: str, e: Exception) -> None:
    _failed.add(kind)
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    warnings.warn(f"llava-next: compiling {what} failed ({type(e).__name__}: {first}); {instead}. "
                  f"Set LLAVA_NEXT_COMPILE=0 to skip the attempt.", RuntimeWarning, stacklevel=3)


# ---- the whole step compiled ------------------------------------------------------------------------------
def static_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The compiled step's attention: one query over the whole static cache, ``mask`` (B, 1, 1, S) the
    written, non-padding slots."""
    return one_query_attention(q, k, v, None if mask is None else mask[:, 0, 0])


def decode_step(decoder: Decoder, token: torch.Tensor, slot: torch.Tensor, position_ids: torch.Tensor,
                visible: torch.Tensor) -> torch.Tensor:
    """One token per row written at cache ``slot`` (1,), attending over the whole static cache: token (B,),
    position_ids (B, 1), visible (B, S) bool -> (B, V). The eager blocks, with a static context."""
    x = decoder.embed_tokens(token[:, None])  # (B, 1, C)
    ctx = decoder.context(x, position_ids, input_pos=slot, key_mask=visible, kv_len=visible.shape[1],
                          kernel=static_kernel)
    for block in decoder.layers:
        x = block(x, ctx)
    return decoder.head(x)[:, -1]


class CompiledStepEngine(EagerEngine):
    """Eager prefill; decode steps through ``decode_step`` compiled once per decoder (new shapes recompile)."""

    def __init__(self, mode: str | None = None) -> None:
        super().__init__()
        self.mode = mode or policy.STEP_MODE
        self.real: torch.Tensor | None = None  # (B, S) the static cache's non-padding slots

    def setup_caches(self, decoder: Decoder, batch: int, prompt_len: int, max_new_tokens: int,
                     dtype: torch.dtype, device: torch.device) -> None:
        S = policy.static_cache_length(prompt_len, max_new_tokens)
        decoder.setup_caches(batch, S, dtype=dtype, device=device)
        self.real = torch.ones(batch, decoder.cache_shape[1], dtype=torch.bool, device=device)

    def prefill(self, decoder: Decoder, embeds: torch.Tensor, position_ids: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        if key_mask is not None:
            self.real[:, :key_mask.shape[1]] = key_mask
        return super().prefill(decoder, embeds, position_ids, key_mask)

    def decode(self, decoder: Decoder, token: torch.Tensor, step: int, position_ids: torch.Tensor,
               kernel: Kernel | None = None) -> torch.Tensor:
        if "step" not in _failed:
            slot = torch.tensor([self.prompt_len + step], device=token.device)
            visible = self.real & (torch.arange(self.real.shape[1], device=token.device) <= slot)
            try:
                logits = compiled_step(decoder, self.mode)(decoder, token, slot, position_ids, visible)
                _compiled.add("step")
                return logits
            except Exception as e:  # noqa: BLE001 - a compiler failure: the eager step, warned once
                _compile_failed("step", "the whole decode step", "decoding uses the eager step instead", e)
        return super().decode(decoder, token, step, position_ids, kernel)


def compiled_step(decoder: Decoder, mode: str):
    """``decode_step`` compiled for ``decoder`` (kept on it: one compile per decoder and mode)."""
    steps = decoder.__dict__.setdefault("_compiled_steps", {})
    if mode not in steps:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights become graph constants (prepacked, template GEMVs)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)

        def step(*args):
            with torch.no_grad():
                return fn(*args)
        steps[mode] = step
    return steps[mode]


# ---- which engine ----------------------------------------------------------------------------------------
def choose_engine(decoder: Decoder, max_new_tokens: int, device: torch.device,
                  compile_step: bool | None = None) -> EagerEngine:
    """The compiled step where it pays (policy.step_compile_pays; ``compile_step`` True / False forces it on or
    off) on CPU while nothing observes the decoder, else the eager engine."""
    if compile_step is False or device.type != "cpu" or "step" in _failed or observed(decoder):
        return EagerEngine()
    weights = sum(t.nbytes for n, t in [*decoder.named_parameters(), *decoder.named_buffers()]
                  if "kv_cache" not in n and t.layout == torch.strided)
    if policy.step_compile_pays(max_new_tokens, _eager_kernels(decoder), bool(decoder.__dict__.get("_compiled_steps")),
                                compile_step, weights, available_memory(torch.device("cpu"))):
        return CompiledStepEngine()
    return EagerEngine()


def observed(decoder: Decoder) -> bool:
    """True while something watches the decoder's insides: an active named hook point (hooks.py), an attention
    instrument, or a torch forward (pre-)hook on it or a submodule. The compiled graph calls none of them."""
    if decoder.instrument is not None:
        return True
    for m in decoder.modules():
        if isinstance(m, HookPoint) and m.active:
            return True
        if m._forward_pre_hooks or m._forward_hooks:
            return True
    return False


def _eager_kernels(decoder: Decoder) -> bool:
    """Layers whose eager kernels decode faster than the compiled graph's (policy.py, the whole-step rule):
    quantized ones (quant.py: int8, int4, nf4) and bf16 linears that decode through the C loops
    (``DecodeLinear``: there because this CPU measured them faster than torch's one-row path)."""
    from .llava import DecodeLinear
    from .quant import QuantLinear
    return any(isinstance(m, (*QuantLinear, DecodeLinear)) for m in decoder.modules())
