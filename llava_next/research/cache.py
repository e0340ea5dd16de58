"""TransformerLens' ActivationCache over this model's hook names: what ``run_with_cache`` returns.

    logits, cache = run_with_cache(model, ids, videos=[pixels])
    cache["resid_post", 1]                                   # blocks.1.hook_resid_post, (B, T, C)
    cache["scale", 3, "ln1"]                                 # blocks.3.ln1.hook_scale, (B, T, 1): the RMS
    cache["pattern", 2]                                      # (B, H, T, T) softmax of cache["attn_scores", 2]
    resid, labels = cache.decompose_resid(return_labels=True, pos_slice=-1)   # (K, B, C): embed, 0_attn_out, ...
    dla = cache.logit_attrs(resid, tokens=answer_id)                          # (K, B): each one's direct logit
    heads = cache.stack_head_results(pos_slice=-1, apply_ln=True)             # (L*H, B, C), labels "L0H0", ...

Method names, arguments and label strings are TransformerLens' (``transformer_lens/ActivationCache.py``:
``accumulated_resid``, ``decompose_resid``, ``stack_head_results``, ``apply_ln_to_stack``, ``logit_attrs``)
with its conventions: ``layer`` None / -1 / n_layers means the stream before the unembedding; ``pos_slice``
(None, an int that drops the position dimension, a slice, a list or LongTensor of positions) applies to the
position dimension; ``apply_ln_to_stack`` divides by the cached RMS of the norm that reads the stack
(ln1 of ``layer``, ln2 with ``mlp_input``, ln_final at the end) and does not multiply by its weight: the weights
are folded into the matrices that follow (``llava_next.research.weights``, ``fold_ln=True``), as
HookedTransformer loads models. So ``logit_attrs`` of a full decomposition sums to the model's logit.

Virtual entries (computed from what the cache holds, never recorded): ``blocks.{l}.attn.hook_attn_scores``
(B, H, T, T), q.k / sqrt(D) with the causal mask at -inf, from ``hook_rot_q`` / ``hook_rot_k``;
``blocks.{l}.attn.hook_pattern`` its softmax (T x T per head: small inputs; ``Attention`` gives statistics
without it); ``blocks.{l}.attn.hook_result`` (B, T, H, C), each head's write to the residual stream, from
``hook_z`` and W_O.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .weights import Weights

# TransformerLens' get_act_name: short name -> where it lives in a block
_BLOCK = {"resid_pre": "", "resid_mid": "", "resid_post": "", "attn_out": "", "mlp_out": "",
          "q": "attn.", "k": "attn.", "v": "attn.", "z": "attn.", "rot_q": "attn.", "rot_k": "attn.",
          "result": "attn.", "pattern": "attn.", "attn_scores": "attn.",
          "pre": "mlp.", "pre_linear": "mlp.", "post": "mlp."}
_VIRTUAL = ("attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_result")


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """``("resid_post", 1)`` -> ``blocks.1.hook_resid_post``; ``("scale", 3, "ln1")`` -> ``blocks.3.ln1.hook_scale``;
    ``("scale",)`` -> ``ln_final.hook_scale``; ``"embed"`` -> ``hook_embed``; a full name is returned as it is."""
    if "." in name or name.startswith("hook_"):
        return name
    if name in ("scale", "normalized"):
        if layer is None:
            return f"ln_final.hook_{name}"
        if layer_type not in ("ln1", "ln2"):
            raise KeyError(f"({name!r}, {layer}) needs the norm: ({name!r}, {layer}, 'ln1') or 'ln2'")
        return f"blocks.{layer}.{layer_type}.hook_{name}"
    if name in ("embed", "logits"):
        return f"hook_{name}"
    if name not in _BLOCK or layer is None:
        raise KeyError(f"{name!r} is not a cache name this model has: one of {sorted(_BLOCK)} with a layer, "
                       f"'scale' / 'normalized' with a layer and 'ln1' / 'ln2' (or none for ln_final), 'embed', "
                       f"'logits', or a full hook name")
    return f"blocks.{layer}.{_BLOCK[name]}hook_{name}"


def apply_pos_slice(t: torch.Tensor, pos_slice: Any, dim: int = -2) -> torch.Tensor:
    """TransformerLens' Slice on one dimension: None keeps all, an int selects (and drops the dimension), a slice
    narrows, a list / LongTensor gathers."""
    if pos_slice is None:
        return t
    if isinstance(pos_slice, int):
        return t.select(dim, pos_slice)
    if isinstance(pos_slice, slice):
        index = [slice(None)] * t.dim()
        index[dim] = pos_slice
        return t[tuple(index)]
    return t.index_select(dim, torch.as_tensor(pos_slice, dtype=torch.long, device=t.device))


class ActivationCache(dict):
    """A dict of hook name -> tensor with TransformerLens' keys and analysis methods (module docstring)."""

    def __init__(self, cache: dict[str, torch.Tensor], model: nn.Module) -> None:
        super().__init__(cache)
        self.model = model
        self.weights = Weights(model)
        self.n_layers = self.weights.cfg.num_layers
        self.n_heads = self.weights.cfg.num_heads

    # ---- lookup --------------------------------------------------------------------------------------
    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        name = act_name(*key) if isinstance(key, tuple) else act_name(key)
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        if name.startswith("blocks.") and name.endswith(_VIRTUAL):
            return self._virtual(name)
        raise KeyError(f"{name!r} was not recorded: run_with_cache(..., names_filter=...) must include it "
                       f"(the default caches every decoder hook)")

    def _repr_html_(self) -> str:  # Jupyter (research/notebook.py)
        from .notebook import cache_html

        return cache_html(self)

    def _virtual(self, name: str) -> torch.Tensor:
        layer = int(name.split(".")[1])
        if name.endswith("hook_result"):  # (B, T, H, D) x (H, D, C) -> (B, T, H, C)
            return torch.einsum("bthd,hdc->bthc", self[("z", layer)].float(), self.weights.W_O[layer])
        q, k = self[("rot_q", layer)].float(), self[("rot_k", layer)].float()  # (B, T, H, D), (B, Tk, Hkv, D)
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5  # (B, H, T, Tk)
        T, Tk = scores.shape[-2:]
        future = torch.ones(T, Tk, dtype=torch.bool, device=scores.device).triu(Tk - T + 1)  # queries end the keys
        scores = scores.masked_fill(future, float("-inf"))
        return scores if name.endswith("hook_attn_scores") else scores.softmax(-1)

    # ---- stacks of the residual stream -----------------------------------------------------------------
    def _layer(self, layer: int | None) -> int:
        return self.n_layers if layer is None or layer == -1 else layer

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: Any = None, mlp_input: bool = False, return_labels: bool = False):
        """(K, B, [T,] C) the residual stream before each layer up to ``layer`` ("0_pre", ..., "final_post")."""
        layer = self._layer(layer)
        parts, labels = [], []
        for l in range(layer + 1):
            if l == self.n_layers:
                parts.append(self[("resid_post", l - 1)])
                labels.append("final_post")
                continue
            parts.append(self[("resid_pre", l)])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                parts.append(self[("resid_mid", l)])
                labels.append(f"{l}_mid")
        stack = torch.stack([apply_pos_slice(p.float(), pos_slice) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           recompute_ln=layer == self.n_layers)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: Any = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """(K, B, [T,] C) what wrote the stream read by ``layer``: "embed", "0_attn_out", "0_mlp_out", ...;
        they sum to ``accumulated_resid``'s entry for that layer."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer(layer)
        parts, labels = ([self["hook_embed"]], ["embed"]) if incl_embeds else ([], [])
        for l in range(layer):
            if mode != "mlp":
                parts.append(self[("attn_out", l)])
                labels.append(f"{l}_attn_out")
            if mode != "attn":
                parts.append(self[("mlp_out", l)])
                labels.append(f"{l}_mlp_out")
        if mlp_input and mode != "mlp":
            parts.append(self[("attn_out", layer)])
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([apply_pos_slice(p.float(), pos_slice) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int | None = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: Any = None, apply_ln: bool = False):
        """(L*H [+1], B, [T,] C) every head's write to the stream before ``layer`` ("L0H0", ...), plus
        "remainder" (the rest of the stream) with ``incl_remainder``."""
        layer = self._layer(layer)
        heads = [apply_pos_slice(self[("result", l)], pos_slice, dim=-3) for l in range(layer)]  # (B, [T,] H, C)
        labels = [f"L{l}H{h}" for l in range(layer) for h in range(self.n_heads)]
        stack = torch.cat(heads, dim=-2).movedim(-2, 0) if heads else None  # (L*H, B, [T,] C)
        if incl_remainder:
            total = apply_pos_slice(self[("resid_post", layer - 1)].float() if layer else self["hook_embed"].float(),
                                    pos_slice)
            rest = total - (stack.sum(0) if stack is not None else 0)
            stack = rest[None] if stack is None else torch.cat([stack, rest[None]])
            labels.append("remainder")
        if stack is None:
            stack = apply_pos_slice(self["hook_embed"].float(), pos_slice)[:0]
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # ---- norms and logits ------------------------------------------------------------------------------
    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: Any = None, recompute_ln: bool = False) -> torch.Tensor:
        """The stack as the norm reading ``layer`` sees it: divided by that norm's cached RMS (its weight is
        folded into the next matrices). ``recompute_ln`` at the end: each component's own RMS (logit lens)."""
        layer = self._layer(layer)
        if recompute_ln and layer == self.n_layers:
            eps = self.weights.decoder.norm.eps
            return residual_stack * torch.rsqrt(residual_stack.pow(2).mean(-1, keepdim=True) + eps)
        if layer == self.n_layers:
            key = "ln_final.hook_scale"
        else:
            key = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        scale = apply_pos_slice(self[key].float(), pos_slice)  # (B, [T,] 1)
        return residual_stack / scale

    def logit_attrs(self, residual_stack: torch.Tensor, tokens: int | torch.Tensor,
                    incorrect_tokens: int | torch.Tensor | None = None, pos_slice: Any = None) -> torch.Tensor:
        """(K, B, [T]) each component's direct contribution to the logit of ``tokens`` (minus
        ``incorrect_tokens``'), through the final norm's cached RMS and the folded unembedding."""
        directions = self.weights.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            directions = directions - self.weights.tokens_to_residual_directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice)
        return (scaled * directions.to(scaled.device)).sum(-1)


def direct_logit_attribution(cache: ActivationCache, token: int, position: int = -1, per_head: bool = False,
                             incorrect_token: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """(K, B) and labels: how much each component (embed, every attention and MLP output; with ``per_head``
    every head and the MLPs) wrote directly into ``token``'s logit at ``position``. The components sum to the
    logit (minus ``incorrect_token``'s) the model gave there."""
    if per_head:
        heads, labels = cache.stack_head_results(pos_slice=position, return_labels=True)
        rest, rest_labels = cache.decompose_resid(mode="mlp", pos_slice=position, return_labels=True)  # embed, MLPs
        stack, labels = torch.cat([rest[:1], heads, rest[1:]]), rest_labels[:1] + labels + rest_labels[1:]
    else:
        stack, labels = cache.decompose_resid(pos_slice=position, return_labels=True)
    return cache.logit_attrs(stack, token, incorrect_token, pos_slice=position), labels

