"""Exact attention rows of one decoder layer, recomputed from its cached keys — no eager model needed.

MINIMAL SHARED PIECE (issue 11 builds the full version as ``llava_next.research.attention``; switch to it
when it lands). Reduction methods need a few rows of one layer's softmax(q k^T / sqrt(d)): FastV the
last query's row at layer K-1 (or every query's, for the paper's variant), DyCoke the decode query's.
After a layer has run with the KV cache, its post-RoPE keys sit in the cache; the queries are
recomputed from the layer's input: q = rope(q_proj(input_layernorm(x))). Scores and softmax in fp32,
causal and key masks applied, GQA heads mapped as the attention facade does. Never the whole model in
eager mode (token-reduction-spec §0.3).

    probs = attention_rows(decoder, layer, hidden_in, position_ids, key_mask, rows=slice(-1, None))
    # (B, H, R, kv_len): row r is query T - R + r of the last forward of that layer
"""

from __future__ import annotations

import math

import torch

from ..model.decoder import Decoder, apply_rope, rope_cos_sin, rope_inv_freq


def layer_queries(decoder: Decoder, layer: int, hidden_in: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(B, R, C) inputs of ``layer`` at RoPE positions (B, R) -> (B, H, R, D) post-RoPE queries."""
    block = decoder.layers[layer]
    attn = block.self_attn
    B, R, _ = hidden_in.shape
    q = attn.q_proj(block.input_layernorm(hidden_in)).view(B, R, attn.num_heads, attn.head_dim).transpose(1, 2)
    cfg = decoder.config
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, decoder.rope_scaling_factor, hidden_in.device)
    cos, sin = rope_cos_sin(position_ids, inv_freq, q.dtype)
    return apply_rope(q, cos, sin)


def attention_rows(decoder: Decoder, layer: int, hidden_in: torch.Tensor, position_ids: torch.Tensor,
                   key_mask: torch.Tensor | None, kv_len: int, *, causal: bool = True,
                   heads_per_chunk: int = 8) -> torch.Tensor:
    """fp32 attention probabilities (B, H, R, kv_len) of the R queries ``hidden_in`` (B, R, C) (the last R
    positions of the keys when ``causal``) against the first ``kv_len`` cached keys of ``layer``."""
    q = layer_queries(decoder, layer, hidden_in, position_ids)  # (B, H, R, D)
    cache = decoder.layers[layer].self_attn.kv_cache
    if cache is None:
        raise RuntimeError("attention_rows reads the layer's KV cache: run the layer with a cache first")
    k = cache.k[:, :, :kv_len]  # (B, Hkv, kv_len, D)
    B, H, R, D = q.shape
    group = H // k.shape[1]
    allowed = torch.ones(R, kv_len, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.arange(kv_len, device=q.device)[None, :] <= torch.arange(kv_len - R, kv_len, device=q.device)[:, None]
    allowed = allowed[None, None]  # (1, 1, R, kv_len)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :kv_len]
    out = []
    for h0 in range(0, H, heads_per_chunk):  # (B, h, R, kv_len) at a time: all-query rows are T^2 per head
        qh = q[:, h0:h0 + heads_per_chunk].float()
        kh = k.repeat_interleave(group, dim=1)[:, h0:h0 + heads_per_chunk].float()
        s = (qh @ kh.transpose(-1, -2)) / math.sqrt(D)
        out.append(torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0))
    return torch.cat(out, dim=1)
