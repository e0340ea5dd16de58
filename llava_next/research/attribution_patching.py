"""Attribution patching: activation patching estimated from one gradient, beside the real patching it estimates.

    est = attribution_patching(model, "blocks.1.hook_resid_pre", clean, corrupt, target)   # (T,) per position
    real = activation_patching(model, "blocks.1.hook_resid_pre", clean, corrupt, target, positions=visual)

What it follows: Nanda's attribution patching (2023; Syed et al. 2023, "Attribution Patching Outperforms
Automated Circuit Discovery"). Activation patching runs the corrupt request with the clean activation at one
position of a hook point and measures f(patched) - f(corrupt); attribution patching replaces that forward by its
first-order Taylor estimate around the corrupt run:

    f(patched at p) - f(corrupt)  ~=  (a_clean[p] - a_corrupt[p]) . df/da[p] at the corrupt run

so one forward and backward of the corrupt request (and one forward of the clean one) estimate every position
at once. The estimate is exact when f is linear in the activation, and close when the patch is small.

Choices
- ``clean`` and ``corrupt`` are two ``Inputs`` of the same length (e.g. the same prompt with noised pixels, or
  another video); ``hook`` a hook point name of the decoder or the multimodal stage that has one row per
  sequence position (``hook_embed``, ``mm.hook_merged``, ``blocks.{i}.hook_resid_pre`` / ``_mid`` / ``_post``,
  ``blocks.{i}.hook_attn_out`` / ``hook_mlp_out``); f is the ``Target``'s log-probability (research/attribution.py).
- A position's estimate sums the channels of the product; ``activation_patching`` runs one forward per
  position asked (positions default: all).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..model.hooks import hook_points
from .attention import ResearchError
from .attribution import Inputs, Target, embeddings, logits, resolve_target


def attribution_patching(model, hook: str, clean: Inputs, corrupt: Inputs, target: Target | None = None
                         ) -> torch.Tensor:
    """(T,) float64: the first-order estimate of f(corrupt with clean[p] at ``hook``) - f(corrupt), per p."""
    point = _point(model, hook, clean, corrupt)
    target = resolve_target(model, clean, target)
    clean_act = _activation(model, point, clean)  # (1, T, C)
    seen = {}

    def keep(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.detach().requires_grad_(True)  # the corrupt activation, as a leaf to read its gradient
        seen["a"] = x
        return x
    remove = point.add_hook(keep)
    try:
        with torch.enable_grad():
            f = target.score(logits(model, embeddings(model, corrupt)), corrupt.ids)
            (grad,) = torch.autograd.grad(f, seen["a"])
    finally:
        remove()
    return ((clean_act.float() - seen["a"].detach().float()) * grad.float()).sum(-1)[0].double().cpu()


def activation_patching(model, hook: str, clean: Inputs, corrupt: Inputs, target: Target | None = None, *,
                        positions: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """(T,) float64: f(corrupt with the clean activation at p) - f(corrupt) for each p in ``positions`` (NaN
    at the positions not run)."""
    point = _point(model, hook, clean, corrupt)
    target = resolve_target(model, clean, target)
    clean_act = _activation(model, point, clean)
    T = clean.ids.shape[1]
    positions = torch.arange(T) if positions is None else torch.as_tensor(positions).flatten()
    out = torch.full((T,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        base = float(target.score(logits(model, embeddings(model, corrupt)), corrupt.ids))
        for p in positions.tolist():
            def put(x: torch.Tensor, hook, p=p) -> torch.Tensor:
                x = x.clone()
                x[:, p] = clean_act[:, p].to(x.dtype)
                return x
            remove = point.add_hook(put)
            try:
                out[p] = float(target.score(logits(model, embeddings(model, corrupt)), corrupt.ids)) - base
            finally:
                remove()
    return out


def _point(model, hook: str, clean: Inputs, corrupt: Inputs):
    points = hook_points(model)
    if hook not in points or hook.startswith(("vision.", "mm.hook_features", "mm.hook_pooled", "mm.hook_projected",
                                              "mm.hook_newline", "hook_logits")):
        raise ResearchError(f"attribution patching needs a hook point with one row per sequence position "
                            f"(hook_embed, mm.hook_merged, blocks.{{i}}.hook_resid_pre, ...); got {hook!r}")
    if clean.ids.shape != corrupt.ids.shape:
        raise ResearchError(f"clean and corrupt requests must have the same length to patch position by position; "
                            f"got {tuple(clean.ids.shape)} and {tuple(corrupt.ids.shape)}")
    return points[hook]


def _activation(model, point, inputs: Inputs) -> torch.Tensor:
    seen = {}
    remove = point.add_hook(lambda x, hook: seen.__setitem__("a", x.detach().clone()))
    try:
        with torch.no_grad():
            logits(model, embeddings(model, inputs))
    finally:
        remove()
    return seen["a"]  # (1, T, C)
