"""Attention rollout and Chefer et al.'s relevancy through the decoder, read out as the answer's row.

    a = rollout(model, inputs, target)           # a.scores (T,): the answer rows of the rollout matrix
    a = relevancy(model, inputs, target)         # Chefer et al. 2021, from attention x its gradient
    prov.to_pixels(a.scores, media=0)            # on the original pixels (research/provenance.py)

What it follows
- Rollout (Abnar & Zuidema 2020): per layer A_bar = mean over heads of A, + I, each row normalised to sum 1;
  the rollout is the product A_bar_L ... A_bar_1.
- Relevancy (Chefer et al. 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and
  Encoder-Decoder Transformers", self-attention rule): R = I; per layer in order,
  A_bar = mean over heads of clamp(dA * A, min=0) with dA = df/dA; R = R + A_bar @ R.
- The map of a target (research/attribution.py ``Target``) is R's rows at its ``queries`` (the positions whose
  logits f reads), averaged over them: a (T,) vector over every key position; visual positions are the map.

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
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch

from .attention import ResearchError
from .attribution import Attribution, Inputs, Target, embeddings, logits, resolve_target


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


def relevancy(model, inputs: Inputs, target: Target | None = None, *, layers: Sequence[int] | None = None
              ) -> Attribution:
    """Chefer et al.'s relevancy of the target, read at its query rows (module docstring)."""
    target = resolve_target(model, inputs, target)
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
