"""``Pipeline.trace``: one prepared request run under the research instruments, the numbers returned as data.

    req = pipe.prepare("What happens?", video="clip.mp4", frames=8)
    res = pipe.trace(req, layers=[0, 15, 31], queries=["last", "question"], max_new_tokens=8)
    res.attention[15]["last"]       # (T,) head-averaged attention of the last prompt position over all T
    res.provenance                  # where every position came from (research/provenance.py)

Steps, in order: generate the greedy (or sampled) answer first when ``max_new_tokens`` > 0; build the
request's token provenance; run ONE forward of the whole sequence (prompt + answer) under
``research.trace`` with exact attention rows of the chosen query groups (research/attention.py) and a
streaming logit lens; with ``queries`` holding "all", a second, outer trace adds the per-key mass of every
query to the same forward. A request with an in-decoder reduction (fastv, framefusion, dycoke) runs the
prompt through the reduced prefill and replays each generated token through the reduced decode (one
decoder call per token), so every number is what the reduced model computed, in ORIGINAL prompt positions
(NaN at the keys a layer no longer has); its fates go into the provenance.

Query groups: ``last`` (the last prompt position: FastV's query), ``question``, ``generated``, ``all``; logit
lens groups: those but ``all``, and ``text``, ``visual``, ``none``. ``llava-next trace`` (cli/trace.py)
parses its flags into this call and prints or draws the result.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..reduce.engine import ReducedEngine
from ..reduce.stages import Reduction
from ..research import Attention, LensResult, LogitLens, Provenance, trace
from ..research import select as sel
from ..research.trace import layout_from_provenance
from .pipeline import Pipeline, Request, pruning_report

QUERY_GROUPS = ("last", "question", "generated", "all")
LENS_GROUPS = ("last", "question", "generated", "text", "visual", "none")


@dataclass
class TraceResult:
    """What ``Pipeline.trace`` measured; positions are those of the whole sequence (prompt + generated)."""

    request: Request  # its reduction_report filled from the traced prefill, as a run fills it
    provenance: Provenance  # with the generated tokens, and the fates of a reduced model
    layers: list[int]  # the decoder layers reported, in the order asked (each 0..num_layers-1)
    num_layers: int
    generated: list[int]  # the answer's token ids (empty without max_new_tokens)
    text: str  # ... decoded
    groups: dict[str, torch.Tensor]  # query group -> its positions ("all" not listed: every position)
    attention: dict[int, dict[str, torch.Tensor]]  # layer -> group -> (T,) float64 weights; NaN: key gone
    logit_lens: dict[int, LensResult]  # layer -> the lens at the chosen positions
    reduction: dict | None  # the request's reduction summary, with the layers and what entered the decoder
    trace: object = None  # the research Trace of the rows and the lens (research/trace.py)
    timings: dict[str, float] = field(default_factory=dict)  # generate_s, trace_s

    @property
    def in_decoder(self) -> bool:
        return self.provenance.fates is not None


def trace_request(pipe: Pipeline, request: Request, *, layers: Sequence[int] | None = None,
                  queries: Sequence[str] = ("last",), lens: Sequence[str] = ("question", "last", "generated"),
                  lens_top_k: int = 5, question: str | None = None, template: str | None = None,
                  image_names: Sequence[str] = (), max_new_tokens: int = 0, heads: str = "mean",
                  generated: Sequence[int] | None = None, **sampling) -> TraceResult:
    """``request`` traced (see the module docstring). ``layers``: None = all, negative from the end;
    ``heads``: "all" also keeps every head's row of each traced query (``query_rows``; H times the memory),
    "mean" only their head average;
    ``question``: the question text the ``question`` selector finds (default: the prompt given to prepare);
    ``generated``: the answer's token ids when the caller already streamed them (``Pipeline.stream``, e.g. to
    show them as they came): traced as they are, nothing generated here (``max_new_tokens`` is then ignored);
    ``sampling``: ``temperature``, ``top_p``, ``seed``, ``compile_step`` of the generation, as ``Pipeline.stream``."""
    n_layers = len(pipe.model.language_model.layers)
    layers = list(range(n_layers)) if layers is None else list(dict.fromkeys(x % n_layers for x in layers))
    t0 = time.perf_counter()
    streamed, generated = generated is not None, list(generated or [])
    if max_new_tokens and not streamed:
        for _ in pipe.stream(request, max_new_tokens=max_new_tokens, template=template, **sampling):
            pass
        generated = list(request.tokens)
    t1 = time.perf_counter()
    reducer = request.reduction.reducer if request.reduction is not None else None
    with torch.no_grad():  # the video tokens (a token reducer's, with the pooled cell each one is)
        reduced = [reducer.reduce_video(pipe.model, c.pixel_values) if reducer is not None else None
                   for c in request.videos]
        video_feats = [r.tokens if r is not None else pipe.model.video_features(c.pixel_values)
                       for r, c in zip(reduced, request.videos)]
    question = request.prompt if question is None else question
    prov = Provenance.from_request(request, pipe.config, tokenizer=pipe.tokenizer, question=question,
                                   template=template, image_names=list(image_names),
                                   video_tokens=[(r.frame, r.patch) if r is not None else None for r in reduced])
    prov = prov.with_generated(generated)
    selectors = {"last": sel.last_text(), "question": sel.question(), "generated": sel.generated()}
    groups = {g: selectors[g].resolve(prov) for g in queries if g != "all"}
    lens_groups = {"text": sel.text(), "visual": sel.visual(), **selectors}
    lens_pos = torch.cat([sel.maybe(lens_groups[g]).resolve(prov) for g in lens if g != "none"]
                         or [torch.zeros(0, dtype=torch.long)]).unique()
    ids = torch.tensor([request.input_ids + generated])
    tr, tr_all = _traced_forward(pipe, request, prov, ids, video_feats, layers, groups, "all" in queries,
                                 lens_pos, lens_top_k, heads)
    t2 = time.perf_counter()
    in_decoder = request.reduction is not None and request.reduction.in_decoder
    if in_decoder:
        prov = prov.with_fates(tr.fates)
        request.reduction_report = pruning_report(tr.engine.report, 0)  # what the traced prefill pruned, as run
    attention = {layer: _layer_attention(tr, tr_all, layer, groups, queries, len(prov)) for layer in layers}
    return TraceResult(
        request=request, provenance=prov, layers=layers, num_layers=n_layers, generated=generated,
        text=pipe.tokenizer.decode(generated) if generated else "", groups=groups, attention=attention,
        logit_lens=_logit_lens(tr, in_decoder) if len(lens_pos) else {},
        reduction=_reduction(request, prov, n_layers, in_decoder, reducer is not None), trace=tr,
        timings={"generate_s": t1 - t0, "trace_s": t2 - t1})


def _reduction(request: Request, prov: Provenance, n_layers: int, in_decoder: bool, reduced_before: bool) -> dict | None:
    """The request's reduction summary, the decoder's depth and (a token reducer) which pooled cells of each
    frame entered the decoder."""
    if not request.reduction:
        return None
    out = {**request.reduction_summary(), "num_layers": n_layers,
           **({"decode_layer": prov.fates.decode_layer} if in_decoder else {})}
    if reduced_before:
        out["before_decoder"] = [
            {"media": m.index, "cells_per_frame": m.plan.pooled_hw[0] * m.plan.pooled_hw[1],
             "kept_per_frame": [len(prov.where(media=m.index, frame=f, kind="video")) for f in range(m.plan.num_frames)]}
            for m in prov.media_info if m.kind == "video"]
    return out


# ---- the research API: research.trace, its Trace's steps, attention statistics and logit lens ----------
# (every use of research/trace.py's interface is below, so that a change there is made here once)
def _traced_forward(pipe: Pipeline, request: Request, prov: Provenance, ids: torch.Tensor, video_feats: list,
                    layers: list[int], groups: dict, want_all: bool, lens_pos: torch.Tensor, lens_top_k: int,
                    heads: str = "mean"):
    """One forward of ``ids`` (prompt + generated) under the traces: (the rows and lens trace, the all-query
    trace or None). A reduced model prunes at prefill and reads its pruned cache while decoding: both are
    replayed, one decoder call per generated token."""
    model, decoder = pipe.model, pipe.model.language_model
    reduction = request.reduction if request.reduction is not None and request.reduction.in_decoder else None
    row_queries = torch.cat(list(groups.values())).unique() if groups else None
    attention = Attention(layers=layers, queries=row_queries, rows=True, heads=heads, decode=reduction is not None) \
        if row_queries is not None else None
    logit_lens = LogitLens(positions=lens_pos, top_k=lens_top_k, steps="all" if reduction else "prefill") \
        if len(lens_pos) else None
    outer = trace(model, provenance=prov, attention=Attention(layers=layers, queries="all", rows=False, key_mass=True,
                                                              heads="mean", decode=False)) if want_all else None
    previous, decoder.rope_scaling_factor = decoder.rope_scaling_factor, request.plan.factor
    try:
        with torch.no_grad(), (outer if outer is not None else contextlib.nullcontext()), \
                trace(model, provenance=prov, attention=attention, logit_lens=logit_lens) as tr:
            embeds = model.embed(ids, model.image_features(request.images), video_feats)
            if reduction is None:
                decoder(input_embeds=embeds, last_only=True)
            else:
                _replay_reduced(decoder, embeds, prov, reduction, ids[0, prov.prompt_len:].tolist())
    finally:
        decoder.rope_scaling_factor = previous
    return tr, outer


def _replay_reduced(decoder, embeds: torch.Tensor, prov: Provenance, reduction, generated: list[int]) -> None:
    """The prompt and the generated tokens again through a reduced engine (its prefill, then one decode step
    per token), under the caller's trace, which finds the engine (its report and fates) in the calls' context."""
    P, device = prov.prompt_len, embeds.device
    engine = ReducedEngine(Reduction(pruner=reduction.pruner, decode=reduction.decode), layout_from_provenance(prov))
    engine.setup_caches(decoder, 1, P, len(generated), embeds.dtype, device)
    engine.prefill(decoder, embeds[:, :P], torch.arange(P, device=device)[None], None)
    for s, token in enumerate(generated):
        engine.decode(decoder, torch.tensor([token], device=device), s, torch.tensor([[P + s]], device=device))


def _layer_attention(tr, tr_all, layer: int, groups: dict, queries: Sequence[str], T: int) -> dict[str, torch.Tensor]:
    """Per query group the mean of its queries' head-mean rows at ``layer``, over all T positions."""
    per_group = {}
    if groups:
        rows, where = query_rows(tr, layer, T)
        for g, pos in groups.items():
            mean = rows[[where[int(p)] for p in pos]].mean(0)
            per_group[g] = mean if mean.dim() == 1 else mean.mean(0)  # per-head rows: their head mean
    if tr_all is not None:
        stats = tr_all.attention[layer]  # the mean of the rows of every query the layer has
        per_group["all"] = _pad(stats.key_mass[0].double() / len(stats.queries), T)
    return {g: per_group[g] for g in queries}


def query_rows(tr, layer: int, T: int) -> tuple[torch.Tensor, dict[int, int]]:
    """Rows (|Q|, T) float64 of every traced query of a layer (traced with ``heads="all"``: (|Q|, H, T), one
    per head), from the prefill and (a reduced replay) each decode step, and the row of each query position.
    NaN: a key this layer no longer had. ``tr``: ``TraceResult.trace``."""
    rows, where = [], {}
    for step in tr.steps:
        stats = step.attention.get(layer)
        if stats is None:
            continue
        for i, p in enumerate(stats.query_positions.tolist()):
            where[int(p)] = len(rows)
            rows.append(_pad(stats.rows[0, i].double(), T) if stats.rows.dim() == 3  # (B, |Q|, Tk): head mean
                        else _pad(stats.rows[0, :, i].double(), T))  # (B, H, |Q|, Tk): per head
    return torch.stack(rows), where


def _logit_lens(tr, in_decoder: bool) -> dict[int, LensResult]:
    """The lens per layer; of a reduced replay, every step's joined per layer (positions in order)."""
    if not in_decoder:
        return {layer: r for layer, r in tr.logit_lens.items()}
    parts: dict = {}
    for step in tr.steps:
        for layer, r in step.extra.get("logit_lens", {}).items():
            parts.setdefault(layer, []).append(r)
    return {layer: LensResult(torch.cat([r.positions for r in rs]), torch.cat([r.ids for r in rs], 1),
                              torch.cat([r.probs for r in rs], 1), None) for layer, rs in parts.items()}


def _pad(w: torch.Tensor, T: int) -> torch.Tensor:
    """Weights (..., n) over the first n positions -> over T (0 for later positions: causally unseen)."""
    n = w.shape[-1]
    return w if n >= T else torch.cat([w, w.new_zeros(*w.shape[:-1], T - n)], -1)
