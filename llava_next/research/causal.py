"""Causal tracing and sweeps: which layer, frame, tile or head carries what the answer needs.

    ct = causal_trace(model, ids, {"videos": [pixels]}, provenance=prov, target=answer_id, units="frame")
    ct.scores            # (L, U) p(target) with unit u's states restored at layer l into the corrupted run
    ct.clean, ct.corrupt # p(target) of the clean run and of the corrupted run (nothing restored)
    hs = head_sweep(model, ids, media, target=answer_id)        # (L, H) p(target) with head h of layer l ablated

Causal tracing is ROME's noise-corrupt-restore (Meng et al. 2022, ``rome/experiments/causal_trace.py``:
``trace_with_patch``): the decoder input rows of the corrupted positions (default: every visual token, the
"subject" of a vision-language question) get Gaussian noise of ``noise`` x the standard deviation of the
clean input rows (ROME: 3 x the subject embeddings' std), fixed by ``seed``; then, one run per (layer, unit),
the hidden state ``blocks.{l}.hook_resid_post`` (or ``hook_attn_out`` / ``hook_mlp_out`` with ``kind``) at the
unit's positions is restored from the clean run. A unit is a set of positions: every frame (``"frame"``),
every AnyRes tile and the base image (``"tile"``), every segment (``"segment"``: system, question, video,
...), every corrupted position (``"position"``), or a dict of name -> selector. ``scores[l, u] - corrupt`` is the
indirect effect of unit u at layer l. Cost: one forward per cell (L x U forwards), no gradients.

``head_sweep`` ablates one head at a time (its ``hook_z`` rows set to zero, or to their mean over positions
with ``mode="mean"``) and measures the same metric: L x H forwards.

The metric is the probability of ``target`` at the last position (softmax of the logits), or any
``metric(logits) -> float`` given instead. Every run is the model's own forward under ``trace`` hooks (the
interventions of research/interventions.py), so the numbers are those of the model as it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import select as sel
from .attention import ResearchError
from .interventions import patch, replace_embedding
from .provenance import SEGMENTS
from .trace import trace

Metric = Callable[[torch.Tensor], float]


@dataclass
class CausalTrace:
    """ROME's causal-tracing table of one request (module docstring)."""

    scores: torch.Tensor  # (L, U) the metric with unit u restored at layer l
    layers: list[int]
    units: list[str]
    clean: float  # the metric of the clean run
    corrupt: float  # ... of the corrupted run, nothing restored
    kind: str = "resid_post"
    extra: dict = field(default_factory=dict)

    @property
    def indirect_effect(self) -> torch.Tensor:
        """(L, U) how much restoring each cell brings back: scores - corrupt."""
        return self.scores - self.corrupt

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layers": self.layers, "units": self.units, "clean": self.clean,
                "corrupt": self.corrupt, "scores": self.scores.tolist(), **self.extra}


def target_prob(target: int) -> Metric:
    """p(target) at the last position."""
    return lambda logits: float(logits[0, -1].float().softmax(-1)[target])


def unit_positions(prov: Any, units: str | dict, corrupted: torch.Tensor) -> dict[str, torch.Tensor]:
    """{unit name: positions}: each frame, tile, segment or corrupted position of the request, or the user's."""
    if isinstance(units, dict):
        return {name: s.resolve(prov) if hasattr(s, "resolve") else torch.as_tensor(s).long()
                for name, s in units.items()}
    if units == "position":
        return {f"p{int(p)}": p.reshape(1) for p in corrupted}
    if units == "segment":
        return {name: pos for name, pos in prov.segments().items()}
    if units == "frame":
        out = {}
        for m in prov.media_info:
            for f in range(int(prov.frame[prov.media == m.index].max()) + 1 if m.kind == "video" else 0):
                out[f"v{m.kind_index}f{f}"] = sel.frame(f, media=m.index).resolve(prov)
        if out:
            return out
        raise ResearchError("units='frame': this request has no video frames; use 'tile', 'segment' or 'position'")
    if units == "tile":
        out = {}
        for m in prov.media_info:
            if m.kind != "image":
                continue
            rows, cols = prov.tile_row[prov.media == m.index], prov.tile_col[prov.media == m.index]
            out[f"i{m.kind_index}:base"] = sel.tile("base", media=m.index).resolve(prov)
            for r, c in sorted({(int(a), int(b)) for a, b in zip(rows, cols) if a >= 0}):
                out[f"i{m.kind_index}:{r},{c}"] = sel.tile((r, c), media=m.index).resolve(prov)
        if out:
            return out
        raise ResearchError("units='tile': this request has no image tiles; use 'frame', 'segment' or 'position'")
    raise ResearchError(f"units must be 'frame', 'tile', 'segment', 'position' or a dict of name -> selector, "
                        f"got {units!r} (segments are {', '.join(SEGMENTS)})")


@torch.no_grad()
def causal_trace(model: nn.Module, ids: torch.Tensor, media: dict, *, provenance: Any, target: int | None = None,
                 metric: Metric | None = None, corrupt: Any = None, units: str | dict = "frame",
                 layers: list[int] | None = None, kind: str = "resid_post", noise: float = 3.0,
                 seed: int = 0) -> CausalTrace:
    """ROME's causal tracing of one request over layer x unit (module docstring). ``media``: the model's media
    keywords (``images=`` / ``videos=``); ``corrupt``: positions or a selector (default ``sel.visual()``)."""
    if kind not in ("resid_post", "attn_out", "mlp_out"):
        raise ResearchError(f"kind must be 'resid_post', 'attn_out' or 'mlp_out', got {kind!r}")
    metric = _metric(target, metric)
    L = len(getattr(model, "language_model", model).layers)
    layers = list(range(L)) if layers is None else [x % L for x in layers]
    corrupted = (corrupt if corrupt is not None else sel.visual()).resolve(provenance) \
        if not isinstance(corrupt, (list, torch.Tensor)) else torch.as_tensor(corrupt).long()
    names = [f"blocks.{l}.hook_{kind}" for l in layers]
    with trace(model, record=["hook_embed", *names], provenance=provenance) as clean:
        clean_score = metric(model(ids, **media))
    x = clean["hook_embed"][0].float()  # (T, C) the clean decoder input
    gen = torch.Generator().manual_seed(seed)
    noisy = x[corrupted] + noise * x.std() * torch.randn(len(corrupted), x.shape[1], generator=gen)
    corruption = replace_embedding(corrupted, noisy)
    with trace(model, interventions=[corruption], provenance=provenance):
        corrupt_score = metric(model(ids, **media))
    groups = unit_positions(provenance, units, corrupted)
    scores = torch.zeros(len(layers), len(groups))
    for i, name in enumerate(names):
        for j, positions in enumerate(groups.values()):
            with trace(model, interventions=[corruption, patch(name, clean, positions)], provenance=provenance):
                scores[i, j] = metric(model(ids, **media))
    return CausalTrace(scores=scores, layers=layers, units=list(groups), clean=clean_score, corrupt=corrupt_score,
                       kind=kind, extra={"noise": noise, "seed": seed, "corrupted": corrupted.tolist()})


@torch.no_grad()
def head_sweep(model: nn.Module, ids: torch.Tensor, media: dict, *, target: int | None = None,
               metric: Metric | None = None, layers: list[int] | None = None, mode: str = "zero") -> torch.Tensor:
    """(L, H) the metric with head h of layer l ablated (its ``hook_z`` rows zeroed, or set to their mean over
    the call's positions with ``mode="mean"``); the unablated metric is ``metric(model(ids, **media))``."""
    if mode not in ("zero", "mean"):
        raise ResearchError(f"head_sweep mode must be 'zero' or 'mean', got {mode!r}")
    metric = _metric(target, metric)
    decoder = getattr(model, "language_model", model)
    L, H = len(decoder.layers), decoder.config.num_heads
    layers = list(range(L)) if layers is None else [x % L for x in layers]
    out = torch.zeros(len(layers), H)
    for i, layer in enumerate(layers):
        for h in range(H):
            def ablate_head(z: torch.Tensor, hook, h=h) -> torch.Tensor:  # (B, T, H, D)
                z = z.clone()
                z[:, :, h] = 0 if mode == "zero" else z[:, :, h].mean(1, keepdim=True)
                return z
            with trace(model, hooks=[(f"blocks.{layer}.attn.hook_z", ablate_head)]):
                out[i, h] = metric(model(ids, **media))
    return out


def _metric(target: int | None, metric: Metric | None) -> Metric:
    if (target is None) == (metric is None):
        raise ResearchError("give exactly one of target= (a token id: its probability at the last position) and "
                            "metric= (a function of the logits)")
    return metric if metric is not None else target_prob(target)

