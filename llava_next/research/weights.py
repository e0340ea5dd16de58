"""The decoder's weights by TransformerLens' names, read from whatever the layers are now.

    W = Weights(model)                  # a LlavaNextModel or its Decoder
    W.W_Q[3]                            # (H, C, D)   layer 3's query weight
    W.W_Q[:]                            # (L, H, C, D) every layer (materialises all of them: small models)
    W["blocks.3.attn.W_O"]              # the same tables by TransformerLens' state-dict names
    W.tokens_to_residual_directions(t)  # (..., C) the unembedding column of each token

Names and shapes are HookedTransformer's: ``W_E`` (V, C); ``W_Q`` (L, H, C, D); ``W_K`` / ``W_V`` (L, H, C, D)
with the key/value heads repeated to the query heads as TransformerLens shows grouped-query attention, and
``_W_K`` / ``_W_V`` (L, Hkv, C, D) unrepeated; ``W_O`` (L, H, D, C); ``b_Q`` (L, H, D), ``b_K`` / ``b_V``,
``b_O`` (L, C) (zeros where the layer has no bias); ``W_gate`` / ``W_in`` (L, C, I) (gate_proj / up_proj);
``W_out`` (L, I, C); ``W_U`` (C, V); ``ln1_w`` / ``ln2_w`` (L, C), ``ln_final_w`` (C,).

Folded norms (``fold_ln=True``, the default, as HookedTransformer loads models): the RMSNorm weights are
multiplied into the matrices that read the normalised stream (ln1 into W_Q/W_K/W_V, ln2 into W_gate/W_in,
ln_final into W_U), so ``cache["normalized", l, "ln1"] @ W_Q[l] + b_Q[l]`` is ``hook_q`` and
``cache.apply_ln_to_stack(x) @ W_U`` are the model's logits. ``fold_ln=False`` gives the layers' own weights.

Any layer kind: a weight is read by running the layer on the identity matrix (``layer(I) - layer(0)`` is
W^T), in row chunks, so a prepacked oneDNN linear, an int8 / int4 / NF4 layer (its dequantised values, what
its forward multiplies by) and a LoRA layer (base + scale * B A, merged or not) all give the matrix they
apply. Exact for float32 and bfloat16 (one non-zero product per output). Cost: one pass over the weight.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_CHUNK = 1024  # identity rows per call: a chunk costs _CHUNK x out_features floats


@torch.no_grad()
def dense_weight(layer: nn.Module, in_features: int, like: torch.Tensor) -> torch.Tensor:
    """(out, in) float32: the matrix ``layer`` multiplies by, whatever its storage (see the module docstring).
    ``like``: a tensor with the dtype and device the layer computes in (the model's embedding weight)."""
    was_training = layer.training
    layer.eval()  # a LoRA layer's dropout off
    try:
        zero = dense_bias(layer, in_features, like)  # (out,)
        cols = []
        for start in range(0, in_features, _CHUNK):
            stop = min(start + _CHUNK, in_features)
            eye = like.new_zeros(stop - start, in_features)
            eye[:, start:stop].fill_diagonal_(1)
            cols.append(layer(eye).float() - zero)  # (chunk, out) = rows start:stop of W^T
    finally:
        layer.train(was_training)
    return torch.cat(cols).T.contiguous()


@torch.no_grad()
def dense_bias(layer: nn.Module, in_features: int, like: torch.Tensor) -> torch.Tensor:
    """(out,) float32: what ``layer`` adds to a zero input (its bias, zeros without one)."""
    return layer(like.new_zeros(1, in_features)).float()[0]


class _ByLayer:
    """``[l]`` computes one layer's table; ``[a:b]`` / ``[:]`` stacks several (dim 0 = layer)."""

    def __init__(self, fn: Callable[[int], torch.Tensor], num_layers: int) -> None:
        self.fn, self.num_layers = fn, num_layers

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, index: int | slice) -> torch.Tensor:
        if isinstance(index, slice):
            return torch.stack([self.fn(i) for i in range(self.num_layers)[index]])
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range: the decoder has {self.num_layers} layers")
        return self.fn(index % self.num_layers)


class Weights:
    """TransformerLens-named views of a decoder's weights (see the module docstring)."""

    def __init__(self, model: nn.Module, fold_ln: bool = True) -> None:
        self.decoder = getattr(model, "language_model", model)
        self.cfg = self.decoder.config
        self.fold_ln = fold_ln
        L, rep = self.cfg.num_layers, self._repeat
        self.W_Q, self.b_Q = _ByLayer(self._w_q, L), _ByLayer(self._b_q, L)  # (L, H, C, D), (L, H, D)
        self._W_K, self._W_V = _ByLayer(self._w_k, L), _ByLayer(self._w_v, L)  # (L, Hkv, C, D)
        self.W_K, self.W_V = _ByLayer(lambda l: rep(self._w_k(l)), L), _ByLayer(lambda l: rep(self._w_v(l)), L)
        self.b_K, self.b_V = _ByLayer(lambda l: rep(self._b_k(l)), L), _ByLayer(lambda l: rep(self._b_v(l)), L)
        self.W_O, self.b_O = _ByLayer(self._w_o, L), _ByLayer(self._b_o, L)  # (L, H, D, C), (L, C)
        self.W_gate, self.W_in = _ByLayer(self._w_gate, L), _ByLayer(self._w_in, L)  # (L, C, I)
        self.W_out = _ByLayer(self._w_out, L)  # (L, I, C)
        self.ln1_w, self.ln2_w = _ByLayer(self._ln1_w, L), _ByLayer(self._ln2_w, L)  # (L, C)

    # ---- helpers ---------------------------------------------------------------------------------
    def _block(self, layer: int) -> nn.Module:
        return self.decoder.layers[layer]

    def _linear(self, module: nn.Module, in_features: int) -> torch.Tensor:
        return dense_weight(module, in_features, self.decoder.embed_tokens.weight)  # (out, in)

    def _ln(self, norm: nn.Module) -> torch.Tensor:
        return norm.weight.detach().float()

    def _fold(self, w_in_out: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """(C, N) rows scaled by the norm's weight when folding."""
        return w_in_out * self._ln(norm)[:, None] if self.fold_ln else w_in_out

    def _heads_in(self, proj: nn.Module, heads: int, norm: nn.Module) -> torch.Tensor:
        """q/k/v: (heads * D, C) -> (heads, C, D), ln1 folded."""
        C, D = self.cfg.hidden_size, self.cfg.head_dim
        w = self._fold(self._linear(proj, C).T, norm)  # (C, heads * D)
        return w.view(C, heads, D).permute(1, 0, 2).contiguous()

    def _bias(self, proj: nn.Module, heads: int) -> torch.Tensor:
        D = self.cfg.head_dim
        b = dense_bias(proj, self.cfg.hidden_size, self.decoder.embed_tokens.weight)
        return b.view(heads, D)

    # ---- per-layer tables ------------------------------------------------------------------------
    def _w_q(self, l: int) -> torch.Tensor:  # (H, C, D)
        a = self._block(l)
        return self._heads_in(a.self_attn.q_proj, self.cfg.num_heads, a.input_layernorm)

    def _w_k(self, l: int) -> torch.Tensor:  # (Hkv, C, D)
        a = self._block(l)
        return self._heads_in(a.self_attn.k_proj, self.cfg.num_kv_heads, a.input_layernorm)

    def _w_v(self, l: int) -> torch.Tensor:  # (Hkv, C, D)
        a = self._block(l)
        return self._heads_in(a.self_attn.v_proj, self.cfg.num_kv_heads, a.input_layernorm)

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        """(Hkv, ...) -> (H, ...): each key/value head once per query head that reads it."""
        return t.repeat_interleave(self.cfg.num_heads // self.cfg.num_kv_heads, dim=0)

    def _w_o(self, l: int) -> torch.Tensor:  # (H, D, C)
        H, D, C = self.cfg.num_heads, self.cfg.head_dim, self.cfg.hidden_size
        return self._linear(self._block(l).self_attn.o_proj, H * D).T.reshape(H, D, C).contiguous()

    def _b_q(self, l: int) -> torch.Tensor:  # (H, D)
        return self._bias(self._block(l).self_attn.q_proj, self.cfg.num_heads)

    def _b_k(self, l: int) -> torch.Tensor:  # (Hkv, D)
        return self._bias(self._block(l).self_attn.k_proj, self.cfg.num_kv_heads)

    def _b_v(self, l: int) -> torch.Tensor:
        return self._bias(self._block(l).self_attn.v_proj, self.cfg.num_kv_heads)

    def _b_o(self, l: int) -> torch.Tensor:  # (C,)
        H, D = self.cfg.num_heads, self.cfg.head_dim
        return dense_bias(self._block(l).self_attn.o_proj, H * D, self.decoder.embed_tokens.weight)

    def _w_gate(self, l: int) -> torch.Tensor:  # (C, I)
        b = self._block(l)
        return self._fold(self._linear(b.mlp.gate_proj, self.cfg.hidden_size).T, b.post_attention_layernorm)

    def _w_in(self, l: int) -> torch.Tensor:  # (C, I)
        b = self._block(l)
        return self._fold(self._linear(b.mlp.up_proj, self.cfg.hidden_size).T, b.post_attention_layernorm)

    def _w_out(self, l: int) -> torch.Tensor:  # (I, C)
        return self._linear(self._block(l).mlp.down_proj, self.cfg.intermediate_size).T.contiguous()

    def _ln1_w(self, l: int) -> torch.Tensor:  # (C,)
        return self._ln(self._block(l).input_layernorm)

    def _ln2_w(self, l: int) -> torch.Tensor:
        return self._ln(self._block(l).post_attention_layernorm)

    # ---- whole-model tables ----------------------------------------------------------------------
    @property
    def W_E(self) -> torch.Tensor:  # (V, C)
        return self.decoder.embed_tokens.weight.detach().float()

    @property
    def W_U(self) -> torch.Tensor:  # (C, V), ln_final folded in when fold_ln
        w = self._linear(self.decoder.lm_head, self.cfg.hidden_size).T
        return self._fold(w, self.decoder.norm)

    @property
    def ln_final_w(self) -> torch.Tensor:
        return self._ln(self.decoder.norm)

    def tokens_to_residual_directions(self, tokens: int | torch.Tensor) -> torch.Tensor:
        """(..., C) the W_U column of each token (TransformerLens' name): what a residual component is dotted
        with, after ``apply_ln_to_stack``, to give its direct contribution to that token's logit."""
        t = torch.as_tensor(tokens, dtype=torch.long)
        lm = self.decoder.lm_head
        rows = lm.weight.detach()[t.flatten()].float() if isinstance(getattr(lm, "weight", None), torch.Tensor) \
            else self.W_U.T[t.flatten()]  # a quantized / prepacked head: its dense form
        if self.fold_ln:
            rows = rows * self.ln_final_w
        return rows.view(*t.shape, -1)

    # ---- TransformerLens state-dict names ----------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        """``blocks.{l}.attn.W_Q``, ``blocks.{l}.mlp.W_in``, ``blocks.{l}.ln1.w``, ``embed.W_E``, ``unembed.W_U``,
        ``ln_final.w``."""
        top = {"embed.W_E": lambda: self.W_E, "unembed.W_U": lambda: self.W_U, "ln_final.w": lambda: self.ln_final_w}
        if name in top:
            return top[name]()
        parts = name.split(".")
        table = {"attn": ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "_W_K", "_W_V"),
                 "mlp": ("W_gate", "W_in", "W_out"), "ln1": ("w",), "ln2": ("w",)}
        if len(parts) == 4 and parts[0] == "blocks" and parts[1].isdigit() and parts[3] in table.get(parts[2], ()):
            attr = parts[2] + "_w" if parts[3] == "w" else parts[3]
            return getattr(self, attr)[int(parts[1])]
        raise KeyError(f"{name!r} is not a TransformerLens weight name: blocks.{{l}}.attn.W_Q / W_K / W_V / W_O / "
                       f"b_Q / b_K / b_V / b_O, blocks.{{l}}.mlp.W_gate / W_in / W_out, blocks.{{l}}.ln1.w / ln2.w, "
                       f"embed.W_E, unembed.W_U, ln_final.w")

