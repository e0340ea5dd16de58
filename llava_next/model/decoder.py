"""The Llama-style decoder (Vicuna, Mistral, Yi) with a preallocated KV cache.

    Decoder(TextConfig)(input_ids | input_embeds, input_pos=..., position_ids=..., key_mask=...) -> logits

It computes what transformers' LlamaForCausalLM / MistralForCausalLM compute (models/llama/modeling_llama.py,
models/mistral/modeling_mistral.py):

    x = embed_tokens(ids)                                   (or input_embeds: the multimodal model
    for each layer:                                           splices image features into them)
        x = x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = input_layernorm(x)
        x = x + down_proj(silu(gate_proj(h)) * up_proj(h)),                      h = post_attention_layernorm(x)
    logits = lm_head(norm(x))

Notable choices
- Module names are the checkpoint's leaf names (``q_proj``, ``gate_proj``, ...), so loading a
  transformers state dict is a prefix rename (``model/keymaps.py``, format "llama_hf").
- RMSNorm normalises in fp32, casts back, *then* multiplies by the weight (transformers' order; in
  bf16 the other order rounds differently).
- RoPE uses the rotate-half (NeoX) layout that HF/LLaVA checkpoints are stored in: no weight permutation.
  Linear scaling divides the inverse frequencies by the factor (== dividing positions). Angles are fp32;
  cos/sin are cast to the activation dtype. They are computed once per forward from explicit positions
  and shared by all layers: no precomputed table, so every position computes, even past
  ``max_position_embeddings * factor`` (refusing such prompts is the multimodal model's job).
  ``rope_scaling_factor`` is a plain attribute: set it (or build from ``config.with_rope_scaling``)
  to run the same weights with another factor.
- GQA: K/V keep ``num_kv_heads`` heads, never repeated in memory; the attention facade maps query head
  h to kv head h // (num_heads // num_kv_heads).
- KV cache (gpt-fast): preallocated (B, Hkv, max_len, D) buffers written in place at ``input_pos``.
  Attention reads only the filled prefix [0, kv_len), never the whole max_len buffer.
- Two kinds of position: ``input_pos`` (T,) are cache *slots*, shared by the batch and contiguous;
  ``position_ids`` (B, T) are RoPE positions per row (left padding: cumsum(mask) - 1).
  ``key_mask`` (B, kv_len) marks which keys are real tokens (False = padding).
- One way to run the layers: a call builds a ``LayerContext`` (model/context.py: RoPE, cache slots, key mask,
  row map, attention kernel) and every block takes ``(x, ctx)``. The pieces are public so that each engine
  owns its loop over the same blocks: ``begin`` (embedding, context, ``hook_embed``), ``run_layers`` (a layer
  range, or one half of a block: FrameFusion merges tokens between a block's two residual halves), ``head``
  (final norm, lm_head, ``hook_logits``). ``forward`` is the eager engine: begin, every layer, head. The
  reduced engine (llava_next/reduce/engine.py) runs layer ranges on pruned sequences with a row map in the
  context; the compiled decode (model/engines.py) compiles these same blocks with a static context.
- Named hook points (``HookPoint``, TransformerLens names: model/hooks.py) sit at every residual, q/k/v,
  norm and MLP tensor; ``Decoder.instrument`` (one slot, research/trace.py sets it) gets each layer's
  attention inputs to record statistics or knock out attention; ``Decoder.running`` is the context of the
  call running now, for observers (a trace reports a pruned layer's rows in original positions). Both cost
  nothing while unused.
- Sliding-window attention (Mistral's default 4096) is not implemented: llava-hf's Mistral sets
  ``sliding_window`` null. With a window set, sequences longer than it raise NotImplementedError.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .context import Instrument, Kernel, LayerContext, SequenceMap
from .hooks import HookPoint
from ..config import TextConfig


def default_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The eager engine's attention: the facade (model/attention.py), causal, queries at the end of the keys."""
    return attention(q, k, v, causal=True, mask=mask)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.hook_scale = HookPoint()  # (B, T, 1) the RMS, as TransformerLens' hook_scale
        self.hook_normalized = HookPoint()  # before the weight, as TransformerLens' RMSNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        inv = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (B, T, 1)
        if self.hook_scale.active:  # only then: the RMS itself costs a division
            inv = 1.0 / self.hook_scale(1.0 / inv)
        return self.weight * self.hook_normalized((x32 * inv).to(x.dtype))


# ---- RoPE ----------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, factor: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies 1/theta^(2i/d), divided by the linear scaling factor."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponents) / factor


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, head_dim) for (B, T) positions; angles in fp32, result in ``dtype``."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D): rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D) rotated by (B, 1, T, D) cos/sin."""
    return x * cos + rotate_half(x) * sin


# ---- KV cache ------------------------------------------------------------------------------------
class KVCache(nn.Module):
    """Preallocated keys and values of one layer, (B, Hkv, max_len, D), written in place.

    Buffers are non-persistent: they never appear in ``state_dict``."""

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, Hkv, T, D) k/v at slots ``input_pos`` (T,); return the whole buffers."""
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


# ---- blocks --------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # its index in the decoder: the context's instrument is told which layer attends
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias  # Qwen: q/k/v have a bias, o_proj never
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None
        # named hook points (model/hooks.py); (B, T, H, D) like TransformerLens
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_rot_q, self.hook_rot_k, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)  # (B, Hq, T, D)
        k = self.hook_k(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.hook_v(self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        q = self.hook_rot_q(q.transpose(1, 2)).transpose(1, 2)  # views both ways: free without a hook
        k = self.hook_rot_k(k.transpose(1, 2)).transpose(1, 2)
        if ctx.input_pos is not None:  # cached: attend over the first kv_len slots of the cache
            k_all, v_all = self.kv_cache.update(ctx.input_pos, k, v)
            k, v = k_all[:, :, :ctx.kv_len], v_all[:, :, :ctx.kv_len]  # (B, Hkv, kv_len, D)
        y = ctx.attend(self.layer, q, k, v)  # (B, Hq, T, D)
        z = self.hook_z(y.transpose(1, 2))  # (B, T, Hq, D)
        return self.o_proj(z.reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.hook_pre, self.hook_pre_linear, self.hook_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.hook_pre(self.gate_proj(x)), self.hook_pre_linear(self.up_proj(x))  # (B, T, I)
        if torch.is_grad_enabled() or self.hook_pre.active or self.hook_pre_linear.active:  # a hook may hold them
            return self.down_proj(self.hook_post(F.silu(gate) * up))
        # the same numbers without two (B, T, I) temporaries
        return self.down_proj(self.hook_post(F.silu(gate, inplace=True).mul_(up)))


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return self.mlp_half(self.attention_half(x, ctx))

    # the two residual halves, callable apart (FrameFusion merges tokens between them), hooks included
    def attention_half(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        return self.hook_resid_mid(x + self.hook_attn_out(self.self_attn(self.input_layernorm(x), ctx)))

    def mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x))))


class TiedLMHead(nn.Module):
    """``logits = x @ embed_tokens.weight.T`` (tie_word_embeddings): no parameter of its own, so the weight
    is one tensor, saved and loaded once (as ``embed_tokens.weight``). It reads the embedding's current
    weight at every call, so loading (``assign=True`` replaces the parameter) keeps the tie."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not registered as a submodule (no second state_dict entry)

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


# ---- the decoder ---------------------------------------------------------------------------------
class Decoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.rope_scaling_factor = cfg.rope_scaling_factor  # a run-time choice, see module docstring
        V, C = cfg.vocab_size, cfg.hidden_size
        self.embed_tokens = nn.Embedding(V, C, _weight=torch.empty(V, C))
        if not self.embed_tokens.weight.is_meta:  # random init is for tests only; on the meta device (the
            nn.init.normal_(self.embed_tokens.weight)  # loaders) normal_ would import torch._dynamo (slow)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:  # Qwen 0.5B: the output projection is the embedding table itself
            self.lm_head = TiedLMHead(self.embed_tokens)
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.hook_embed, self.hook_logits = HookPoint(), HookPoint()  # named hook points: model/hooks.py
        self.instrument: Instrument | None = None  # research's attention instrument, put in every context
        self.running: LayerContext | None = None  # the context of the layers running now (for observers)

    # ---- cache ---------------------------------------------------------------------------------
    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(batch, max_len) of the current KV cache, or None without one."""
        c = self.layers[0].self_attn.kv_cache
        return None if c is None else (c.k.shape[0], c.k.shape[2])

    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None, layers: range | None = None) -> None:
        """Allocate per-layer KV caches for ``batch`` rows of up to ``max_len`` tokens (default dtype and
        device: the weights'). Existing caches of the same batch, dtype and device that are at least
        this long are kept: stale contents are harmless, every run overwrites slots from 0 and reads
        only the slots it wrote. ``layers``: only these (default all; a token pruner at layer K sizes the
        caches of layers >= K once it knows how many tokens they keep: llava_next/reduce/engine.py)."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"setup_caches needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        weight = self.embed_tokens.weight
        dtype = dtype or weight.dtype
        device = torch.device(device) if device is not None else weight.device
        cfg = self.config
        for layer in (self.layers if layers is None else [self.layers[i] for i in layers]):
            c = layer.self_attn.kv_cache
            if (c is not None and c.k.shape[0] == batch and c.k.shape[2] >= max_len and c.k.dtype == dtype
                    and c.k.device == device):
                continue
            # the attention's own kv head count: under tensor parallelism (llava_next.parallel) a rank's share
            layer.self_attn.kv_cache = KVCache(batch, layer.self_attn.num_kv_heads, max_len, cfg.head_dim, dtype, device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    # ---- one call: begin, layers, head ----------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, *, input_embeds: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, last_only: bool = False,
                kernel: Kernel | None = None) -> torch.Tensor:
        """The eager engine: logits (B, T, V), or (B, 1, V) with ``last_only`` (prefill only needs the next token).

        input_ids (B, T) or input_embeds (B, T, hidden_size): exactly one.
        input_pos (T,): contiguous cache slots to write, e.g. arange(T) for prefill, then [T], [T+1], ...;
            the tokens attend causally over slots [0, input_pos[-1] + 1). None: no cache, the T tokens
            attend only to each other.
        position_ids (B, T): RoPE positions; default input_pos (or arange(T)) for every row.
        key_mask (B, kv_len) bool: False for padding keys, kv_len = input_pos[-1] + 1 (or T without cache).
        kernel: the attention kernel (default: the facade; the eager decode passes the compiled one-query
            attention where it pays, model/engines.py).
        """
        x, ctx = self.begin(input_ids, input_embeds, position_ids, input_pos=input_pos, key_mask=key_mask,
                            kernel=kernel)
        try:
            return self.head(self.run_layers(x, ctx), last_only)
        finally:
            self.running = None

    def begin(self, input_ids: torch.Tensor | None, input_embeds: torch.Tensor | None,
              position_ids: torch.Tensor | None = None, **context: object) -> tuple[torch.Tensor, LayerContext]:
        """Start a call: the embedded rows (B, T, C) after ``hook_embed`` and their ``LayerContext`` (keyword
        arguments of ``context``). ``running`` is the context from here until the caller sets it to None
        after ``head`` (observers file what the hooks see under this call)."""
        x = self._embed(input_ids, input_embeds)  # (B, T, C)
        ctx = self.context(x, position_ids, **context)
        self.running = ctx
        return self.hook_embed(x), ctx

    def context(self, x: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                input_pos: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                rows: SequenceMap | None = None, kernel: Kernel | None = None, engine: object = None,
                kv_len: int | None = None) -> LayerContext:
        """The ``LayerContext`` of rows x (B, T, C) at RoPE positions (B, T) (default: the slots), written to
        cache slots ``input_pos`` (T,) with keys [0, kv_len) (default input_pos[-1] + 1; a compiled step reads
        its whole static cache and passes kv_len and a mask itself). Arguments as in ``forward``."""
        B, T, _ = x.shape
        if input_pos is None:
            kv_len, default_pos = T, torch.arange(T, device=x.device)
        else:
            kv_len = self._check_cache(input_pos, B, T) if kv_len is None else kv_len
            default_pos = input_pos
        if position_ids is None:
            position_ids = default_pos.expand(B, T)
        elif position_ids.shape != (B, T):
            raise ValueError(f"position_ids must have shape (batch, tokens) = {(B, T)}, got {tuple(position_ids.shape)}")
        window = self.config.sliding_window
        if window is not None and kv_len > window:
            raise NotImplementedError(
                f"the config sets sliding_window={window} and this sequence has {kv_len} tokens: sliding-window "
                f"attention is not implemented (llava-hf Mistral checkpoints set sliding_window null); "
                f"use at most {window} tokens or a config with sliding_window=None")
        mask = None
        if key_mask is not None:
            if key_mask.shape != (B, kv_len) or key_mask.dtype != torch.bool:
                raise ValueError(f"key_mask must be a bool tensor of shape (batch, keys) = {(B, kv_len)}, "
                                 f"got {key_mask.dtype} {tuple(key_mask.shape)}")
            mask = key_mask[:, None, None, :]  # (B, 1, 1, kv_len)
        inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, self.rope_scaling_factor, x.device)
        cos, sin = rope_cos_sin(position_ids, inv_freq, x.dtype)  # (B, 1, T, D)
        return LayerContext(cos, sin, input_pos, kv_len, mask, kernel or default_kernel, rows, self.instrument, engine)

    def run_layers(self, x: torch.Tensor, ctx: LayerContext, layers: range | None = None,
                   part: Literal["block", "attention", "mlp"] = "block") -> torch.Tensor:
        """Hidden states (B, T, C) through ``self.layers[i] for i in layers`` (default all) with ``ctx``; ``part``:
        whole blocks, or only their attention or MLP residual half (FrameFusion changes the rows in between).
        ``running`` is ``ctx`` meanwhile."""
        previous, self.running = self.running, ctx
        try:
            for i in range(len(self.layers)) if layers is None else layers:
                block = self.layers[i]
                if part == "block":
                    x = block(x, ctx)
                elif part == "attention":
                    x = block.attention_half(x, ctx)
                else:
                    x = block.mlp_half(x)
            return x
        finally:
            self.running = previous

    def forward_layers(self, x: torch.Tensor, position_ids: torch.Tensor, layers: range, *,
                       input_pos: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                       rows: SequenceMap | None = None, kernel: Kernel | None = None) -> torch.Tensor:
        """``run_layers`` over a layer range with a context of its own (no embedding, no head): each call has its
        own cache slots and key mask, so layer ranges can hold KV caches of different lengths (a token pruner
        at layer K keeps the full sequence in layers < K and writes only the kept tokens, at slots 0..T'-1, into
        layers >= K); ``rows``: the original positions of these rows and keys; ``kernel`` as in ``forward``."""
        ctx = self.context(x, position_ids, input_pos=input_pos, key_mask=key_mask, rows=rows, kernel=kernel)
        return self.run_layers(x, ctx, layers)

    def head(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Final norm and lm_head: hidden states (B, T, C) -> logits (B, T, V), or (B, 1, V) of the last row."""
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.hook_logits(self.lm_head(self.norm(x)))  # (B, T or 1, V)

    def _embed(self, input_ids: torch.Tensor | None, input_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (input_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or input_embeds (B, T, hidden_size)")
        if input_embeds is not None:
            if input_embeds.dim() != 3 or input_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"input_embeds must have shape (batch, tokens, {self.config.hidden_size}), "
                                 f"got {tuple(input_embeds.shape)}")
            return input_embeds
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        return self.embed_tokens(input_ids)

    def _check_cache(self, input_pos: torch.Tensor, batch: int, tokens: int) -> int:
        """kv_len (= last slot + 1) after checking the cache can take these tokens. One host sync."""
        shape = self.cache_shape
        if shape is None:
            raise RuntimeError("input_pos given but no KV cache: call setup_caches(batch, max_len) first")
        if input_pos.shape != (tokens,):
            raise ValueError(f"input_pos must have shape (tokens,) = ({tokens},), got {tuple(input_pos.shape)}")
        if batch != shape[0]:
            raise ValueError(f"batch of {batch} rows but the KV cache was set up for {shape[0]}; call setup_caches")
        kv_len = int(input_pos[-1]) + 1
        if kv_len > shape[1]:
            raise ValueError(f"cache slot {kv_len - 1} is past the KV cache length {shape[1]}; "
                             f"call setup_caches with max_len >= {kv_len}")
        return kv_len
