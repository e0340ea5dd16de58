"""Attention rollout and Chefer et al.'s relevancy through the decoder (and on through the vision tower), read out
as the answer's row.

    a = rollout(model, inputs, target)           # a.scores (T,): the answer rows of the rollout matrix
    a = relevancy(model, inputs, target)         # Chefer et al. 2021, from attention x its gradient
    a = relevancy(model, inputs, target, space="pixels")   # ... carried through the tower onto the patches
    a.pixels[0]                                  # (tiles | frames, H, W): each patch's relevancy over its pixels
    prov.to_pixels(a.scores, media=0)            # on the original pixels (research/provenance.py)

What it follows
- Rollout (Abnar & Zuidema 2020): per layer A_bar = mean over heads of A, + I, each row normalised to sum 1;
  the rollout is the product A_bar_L ... A_bar_1.
- Relevancy (Chefer et al. 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and
  Encoder-Decoder Transformers", self-attention rule; the official code, hila-chefer/Transformer-MM-Explainability
  ``Transformer_MM_explainability_ViT.ipynb``: ``avg_heads`` = rule 5, ``apply_self_attention_rules`` = rule 6):
  R = I; per layer in order, A_bar = mean over heads of clamp(dA * A, min=0) with dA = df/dA; R = R + A_bar @ R.
- The map of a target (research/attribution.py ``Target``) is R's rows at its ``queries`` (the positions whose
  logits f reads), averaged over them: a (T,) vector over every key position; visual positions are the map.

Through the vision tower (``space="pixels"``), what is composed, exactly:
1. r (T,): the decoder's relevancy row above, with dA from one backward of f through decoder AND tower.
2. v (N, P) per medium: r on the visual positions mapped back to the tower's output patch tokens by the adjoint
   of the model's own packing (``attribution.positions_to_patches``): an AnyRes base or grid token's value goes
   to its one patch (unpadded-away patches and newlines: 0), a pooled video token's to the patches its pool
   reads (1/4 each for 2 x 2 average pooling). The projector is per token, so it moves nothing.
3. Per tile / frame n, the tower's own relevancy matrix R_n = prod over its layers (last first) of (I + A_bar_l),
   A_bar_l = mean over heads of clamp(dA_l * A_l, 0) from the tower's dense attention (every tower layer the
   model builds: those up to the feature layer, LLaVA's -2; the ones after it get no gradient and are not built).
   The map is v_n R_n (the CLS token, CLIP's first, starts at 0), read at the patch inputs (CLS column dropped).
4. ``a.pixels[m]`` (N, H, W): each patch's value spread evenly over its pixels (a patch sums to its value);
   ``a.scores`` (T,) sums them per token as the other pixel methods do (``pixels_to_positions``).
LVLM-Interpret (IntelLabs/lvlm-interpret ``utils_relevancy.py``, LLaVA-1.5, one image of 576 tokens, no
pooling or AnyRes) does it differently: its "all" map seeds the ViT rule with the decoder's 576 x 576 image
block of R (a CLS row and column added, R[0, 0] = 1; ``handle_self_attention_image_vit``) and its
"all_generated_token" map seeds an identity with the generated token's row on the image added to the CLS row
and column, then applies the same rule R = R + A_bar @ R over the ViT layers but the last. Here the tower's R
is that rule too; the seed is the answer's row itself, per patch through the model's packing and pooling (one
vector-matrix product per tile / frame, so AnyRes grids and pooled video frames work), and no residual
normalisation (``handle_residual``) is applied.

Choices
- The attention probabilities are built dense, with their gradient (``dense_attention``): while it is
  installed the chosen decoder layers compute A = softmax(q k^T / sqrt(D) + causal and key mask) in float32
  and return A @ v (the same output as the engine's kernel, to rounding); every other layer keeps its kernel.
  This is for tiny or small inputs: memory is 2 x layers x heads x T^2 x 4 bytes (A and dA, float32) on top
  of a training step (a 7B-shaped layer, 32 heads at T = 4,096: 2 GiB per layer). The inference path is not
  touched; the instrument is put back on exit.
- The product is never formed as T x T matrices: the rows at the queries are carried from the last layer down
  (r <- r @ A_bar for rollout, r <- r + r @ A_bar for relevancy), which equals the matrix product's rows.
- ``layers`` (default all): a subset runs the product over those layers only (the others count as identity).
- Through the tower, its attention is built dense too (``dense_tower_attention``: each ``SelfAttention`` of
  CLIP / SigLIP computes softmax(q k^T / sqrt(d)) in float32 or wider, which the backward keeps; a gradient hook
  reduces dA * A to A_bar as soon as dA exists, so dA is never stored): memory tower layers x N x (heads + 1) x
  S^2 x 4 bytes more (ViT-L/336, 23 layers, 16 heads, S = 577: 0.52 GB per tile or frame). The decoder part is unchanged, so ``a.scores`` of ``space="tokens"`` is step 1's r.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch

from .attention import ResearchError
from .attribution import (Attribution, Inputs, Target, embeddings, logits, pixels_to_positions, positions_to_patches,
                          resolve_target)


@contextlib.contextmanager
def dense_attention(model, layers: Sequence[int] | None = None, *, retain_grad: bool = True
                    ) -> Iterator[dict[int, torch.Tensor]]:
    """Install the dense instrument on the decoder; yields {layer: A (B, H, Tq, Tk) float32} filled by each call
    (the last call's, with ``.grad`` after a backward when ``retain_grad``)."""
    decoder = model.language_model
    n = len(decoder.layers)
    chosen = set(range(n)) if layers is None else {int(x) % n for x in layers}
    store: dict[int, torch.Tensor] = {}
    previous = decoder.instrument

    def instrument(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
        if layer not in chosen:
            return previous(layer, q, k, v, ctx) if previous is not None else ctx.kernel(q, k, v, ctx.mask)
        probs = attention_probabilities(q, k, ctx.mask, ctx.offset)  # (B, Hq, Tq, Tk) float32
        if retain_grad and probs.requires_grad:
            probs.retain_grad()
        store[layer] = probs
        rep = q.shape[1] // v.shape[1]
        return (probs @ v.float().repeat_interleave(rep, dim=1)).to(q.dtype)  # (B, Hq, Tq, D)

    decoder.instrument = instrument
    try:
        yield store
    finally:
        decoder.instrument = previous


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                            offset: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) (B, Hq, Tq, Tk) float32, causal (query i at slot offset + i sees keys <= it),
    GQA (query head h reads kv head h // (Hq / Hkv)); ``mask`` (B, 1, 1, Tk) False = a key nobody sees."""
    B, Hq, Tq, D = q.shape
    rep = Hq // k.shape[1]
    scores = q.float() @ k.float().repeat_interleave(rep, dim=1).transpose(-1, -2) / math.sqrt(D)  # (B, Hq, Tq, Tk)
    Tk = k.shape[2]
    causal = torch.arange(Tk, device=q.device)[None, :] <= (offset + torch.arange(Tq, device=q.device))[:, None]
    allowed = causal if mask is None else causal & mask
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def rollout(model, inputs: Inputs, target: Target | None = None, *, layers: Sequence[int] | None = None
            ) -> Attribution:
    """Abnar & Zuidema's attention rollout, read at the target's query rows (module docstring)."""
    target = resolve_target(model, inputs, target)
    with torch.no_grad(), dense_attention(model, layers, retain_grad=False) as probs:
        e = embeddings(model, inputs)
        f = float(target.score(logits(model, e), inputs.ids))
    queries = target.queries(e.shape[1])
    scores = rollout_rows([probs[i][0] for i in sorted(probs)], queries)
    return Attribution("rollout", "tokens", target, scores.double().cpu(), f, queries=queries,
                       settings={"layers": sorted(probs)})


def relevancy(model, inputs: Inputs, target: Target | None = None, *, layers: Sequence[int] | None = None,
              space: str = "tokens") -> Attribution:
    """Chefer et al.'s relevancy of the target, read at its query rows (``space="tokens"``), or carried on
    through the vision tower onto each tile's / frame's patches (``space="pixels"``; module docstring)."""
    if space not in ("tokens", "pixels"):
        raise ResearchError(f"relevancy space must be 'tokens' (the decoder's positions) or 'pixels' (carried "
                            f"through the vision tower onto the patches), got {space!r}")
    target = resolve_target(model, inputs, target)
    if space == "pixels":
        return _relevancy_through_tower(model, inputs, target, layers)
    with torch.no_grad():
        e0 = embeddings(model, inputs)
    with torch.enable_grad(), dense_attention(model, layers) as probs:
        e = e0.detach().requires_grad_(True)  # a leaf, so the graph reaches every layer's A
        f = target.score(logits(model, e), inputs.ids)
        f.backward()
    ordered = sorted(probs)
    missing = [i for i in ordered if probs[i].grad is None]
    if missing:
        raise ResearchError(f"layers {missing} got no gradient: the target does not depend on their attention")
    queries = target.queries(e.shape[1])
    scores = relevancy_rows([probs[i].detach()[0] for i in ordered], [probs[i].grad[0] for i in ordered], queries)
    return Attribution("relevancy", "tokens", target, scores.double().cpu(), float(f.detach()), queries=queries,
                       settings={"layers": ordered})


def _relevancy_through_tower(model, inputs: Inputs, target: Target, layers: Sequence[int] | None) -> Attribution:
    if not inputs.pixels:
        raise ResearchError("relevancy onto pixels needs an image or a video in the request (there are no patches)")
    if model.config.vision.kind == "clip" and model.config.vision.feature_strategy == "full":
        raise ResearchError("relevancy onto pixels reads the patch tokens; CLIP with feature_strategy 'full' also "
                            "feeds the CLS token to the decoder: use space='tokens'")
    leaves = [p.detach().to(model.device, model.dtype).requires_grad_(True) for p in inputs.pixels]
    with torch.enable_grad(), dense_attention(model, layers) as probs, dense_tower_attention(model) as tower:
        f = target.score(logits(model, embeddings(model, inputs.with_pixels(leaves))), inputs.ids)
        f.backward()
    ordered = sorted(probs)
    if any(probs[i].grad is None for i in ordered) or any(c is None for layer in tower for c in layer):
        raise ResearchError("an attention layer got no gradient: the target does not depend on it")
    queries = target.queries(inputs.ids.shape[1])
    decoder_rows = relevancy_rows([probs[i].detach()[0] for i in ordered], [probs[i].grad[0] for i in ordered],
                                  queries)  # (T,)
    a_bars = [torch.cat(layer) for layer in tower]  # per tower layer (sum N, S, S)
    side, maps, start = model.config.vision.grid_size, [], 0
    for x, patches in zip(inputs.pixels, positions_to_patches(model, inputs, decoder_rows)):  # (N, side*side)
        n = x.shape[0]
        r = tower_rows([a[start:start + n] for a in a_bars],
                       patches.to(a_bars[0].device, a_bars[0].dtype))  # (N, side*side): onto the patch inputs
        maps.append(_spread(r.double().cpu().reshape(n, side, side), x.shape[-2:]))
        start += n
    return Attribution("relevancy", "pixels", target, pixels_to_positions(model, inputs, maps), float(f.detach()),
                       pixels=maps, queries=queries,
                       settings={"layers": ordered, "tower_layers": len(tower), "through": "decoder+vision"})


@contextlib.contextmanager
def dense_tower_attention(model) -> Iterator[list[list[torch.Tensor]]]:
    """Every vision tower layer's attention A computed dense; yields per layer the list, per tower call in order
    (images' tiles first, then each video's frame batches), of A_bar = mean over heads of clamp(dA * A, 0)
    (N, S, S), filled in when the backward reaches A (None before; a hook, so dA itself is never kept)."""
    tower = model.vision_tower
    store: list[list[torch.Tensor]] = [[] for _ in tower.layers]

    def dense(attn, calls: list[torch.Tensor]):
        def forward(x: torch.Tensor) -> torch.Tensor:
            B, T, C = x.shape
            shape = (B, T, attn.num_heads, attn.head_dim)
            q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            work = torch.promote_types(q.dtype, torch.float32)
            probs = (q.to(work) @ k.to(work).transpose(-1, -2) * attn.head_dim ** -0.5).softmax(-1)  # (B, H, T, T)
            calls.append(None)
            if probs.requires_grad:
                def reduce(grad: torch.Tensor, slot: int = len(calls) - 1, a: torch.Tensor = probs.detach()) -> None:
                    calls[slot] = (grad * a).clamp(min=0).mean(1)  # (B, T, T)
                probs.register_hook(reduce)
            y = (probs @ v.to(work)).to(x.dtype)  # (B, H, T, hd)
            return attn.out_proj(y.transpose(1, 2).reshape(B, T, C))
        return forward

    for layer, calls in zip(tower.layers, store):
        layer.self_attn.forward = dense(layer.self_attn, calls)  # an instance attribute shadows the class's
    try:
        yield store
    finally:
        for layer in tower.layers:
            del layer.self_attn.forward


def tower_rows(a_bars: Sequence[torch.Tensor], patches: torch.Tensor) -> torch.Tensor:
    """(N, side*side): per tile / frame, the row vector ``patches`` on the tower's output patch tokens times the
    tower's relevancy matrix R = prod over layers (last first) of (I + A_bar), read at the patch inputs; ``a_bars``
    per layer (N, S, S), S = side*side (+ 1 CLS token first, CLIP)."""
    N, P = patches.shape
    offset = a_bars[0].shape[-1] - P  # 1: CLIP's CLS token, 0: SigLIP
    r = torch.cat([torch.zeros(N, offset, dtype=patches.dtype, device=patches.device), patches], dim=1)  # (N, S)
    for a_bar in reversed(a_bars):
        r = r + (r[:, None, :] @ a_bar)[:, 0]
    return r[:, offset:]


def _spread(patches: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """(N, side, side) per-patch values -> (N, H, W): each patch's value spread evenly over its pixels."""
    p = hw[-1] // patches.shape[-1]
    out = torch.zeros(patches.shape[0], *hw, dtype=patches.dtype)
    side = patches.shape[-1] * p
    out[:, :side, :side] = patches.repeat_interleave(p, 1).repeat_interleave(p, 2) / (p * p)
    return out


def rollout_rows(attn: Sequence[torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
    """The mean over ``queries`` of the rollout's rows (T,); ``attn``: per layer, in order, (H, T, T)."""
    r = _rows(attn[0].shape[-1], queries, attn[0].device)  # (|Q|, T)
    for A in reversed(attn):
        a_bar = A.mean(0) + torch.eye(A.shape[-1], device=A.device)  # (T, T)
        r = r @ (a_bar / a_bar.sum(-1, keepdim=True))
    return r.mean(0)


def relevancy_rows(attn: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
    """The mean over ``queries`` of the relevancy's rows (T,): R = prod over layers (last first) of (I + A_bar)."""
    r = _rows(attn[0].shape[-1], queries, attn[0].device)  # (|Q|, T)
    for A, dA in zip(reversed(attn), reversed(grads)):
        a_bar = (dA * A).clamp(min=0).mean(0)  # (T, T)
        r = r + r @ a_bar
    return r.mean(0)


def _rows(T: int, queries: torch.Tensor, device: torch.device) -> torch.Tensor:
    r = torch.zeros(len(queries), T, device=device)
    r[torch.arange(len(queries)), queries.to(device)] = 1.0
    return r  # (|Q|, T): rows of the identity
