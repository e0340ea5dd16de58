"""Exact attention rows of one decoder layer, recomputed from its cached keys — no eager model needed.

Reduction methods need a few rows of one layer's softmax(q k^T / sqrt(d)): FastV the last query's row at
layer K-1 (or every query's, for the paper's variant), DyCoke the decode query's. After a layer has run
with the KV cache, its post-RoPE keys sit in the cache; the queries are recomputed from the layer's input,
q = rope(q_proj(input_layernorm(x))) (``layer_queries``, the part that is specific to reduction), and the
rows come from ``llava_next.model.attention.attention_probs`` (query-chunked, fp32 softmax, causal and
key masks, GQA without repeating K; its parity tests compare with transformers' eager attention). Never
the whole model in eager mode.

    probs = cached_rows(decoder, layer, hidden_in, position_ids, key_mask, kv_len)
    # (B, H, R, kv_len): row r is query kv_len - R + r of the last forward of that layer
"""

from __future__ import annotations

import torch

from ..model.decoder import Decoder, apply_rope
from ..model.attention import attention_probs


def layer_queries(decoder: Decoder, layer: int, hidden_in: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(B, R, C) inputs of ``layer`` at RoPE positions (B, R) -> (B, H, R, D) post-RoPE queries."""
    block = decoder.layers[layer]
    attn = block.self_attn
    B, R, _ = hidden_in.shape
    q = attn.q_proj(_norm(block.input_layernorm, hidden_in)).view(B, R, attn.num_heads, attn.head_dim).transpose(1, 2)
    ctx = decoder.context(hidden_in, position_ids)  # the RoPE of these rows, as the layer computed it
    return apply_rope(q, ctx.cos, ctx.sin)


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The layer's RMSNorm (decoder.RMSNorm, same numbers) without firing its hook point: recomputing a score
    is not a forward of the layer, so a trace must not see it."""
    x32 = x.float()
    return norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)


def cached_rows(decoder: Decoder, layer: int, hidden_in: torch.Tensor, position_ids: torch.Tensor,
                   key_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor:
    """fp32 attention probabilities (B, H, R, kv_len) of the R queries ``hidden_in`` (B, R, C) — the last R
    positions of the keys — against the first ``kv_len`` cached keys of ``layer``."""
    q = layer_queries(decoder, layer, hidden_in, position_ids)  # (B, H, R, D)
    cache = decoder.layers[layer].self_attn.kv_cache
    if cache is None:
        raise RuntimeError("cached_rows reads the layer's KV cache: run the layer with a cache first")
    k = cache.k[:, :, :kv_len]  # (B, Hkv, kv_len, D)
    mask = None if key_mask is None else key_mask[:, :kv_len]
    return attention_probs(q, k, torch.arange(q.shape[2], device=q.device), key_mask=mask)
