"""One entry point to look inside the model: record what is asked, reduced on the fly, and intervene.

    with trace(model, record=[Record("blocks.*.hook_resid_post", positions=sel, reduce="mean")],
               attention=Attention(layers=[2, 15], queries="last", rows=True, segments=frame_ids),
               interventions=[ablate(frame_3, mode="mean")], provenance=prov) as tr:
        logits = model(ids, videos=[pixels])                 # or pipeline / generate: every decoder call
    tr["blocks.15.hook_resid_post"]                          # (B, C) mean over the selected positions
    tr.attention[15].rows.mean(1)                            # (B, |Q|, T) head-averaged exact rows
    tr.steps[3].attention[15].rows                           # the 3rd generated token's row (decode step 3)

What it follows: TransformerLens' names and hook contract (``fn(tensor, hook) -> None | tensor``;
``run_with_cache`` / ``run_with_hooks`` / ``hooks`` below keep its call shapes), baukit's context-managed
``TraceDict`` and its reduce-while-recording ``runningstats``, nnsight's per-step records during generation.

Choices
- Only what is asked is kept: a ``Record`` names hook points (fnmatch patterns: ``blocks.*.attn.hook_z``),
  the sequence positions to keep and a reduction over them (``none`` / ``mean`` / ``sum`` / ``max`` /
  ``topk`` per channel), a dtype and a device. Nothing else is copied.
- Positions are absolute sequence positions: a LongTensor, a list, or any object with
  ``resolve(provenance) -> LongTensor`` (the selectors of ``llava_next.research.provenance``), resolved
  once against the ``provenance`` given to ``trace``. Hooks of the decoder see a call's slice of the
  sequence (the whole prompt at prefill, one new position per decode step): each call keeps the chosen
  positions that fall into its slice, and a call with none of them records nothing.
- Steps: every decoder call is a step (``tr.steps``): step 0 is the prefill (or the one forward), step s
  the s-th decode step. Vision and ``mm.*`` hooks fire before the decoder and are filed under the step
  of the decoder call that follows. ``tr.cache`` / ``tr.attention`` are step 0's. A hook that fires
  several times in one step (the vision tower runs per chunk of frames) has its records concatenated
  along dim 0.
- Attention statistics (``Attention``) are computed from the layer's post-RoPE q and the keys it attends
  (the trace is the decoder's attention instrument, ``Decoder.instrument``: every layer context hands it
  q, k, v) by the exact query-chunked path of research/attention.py; the layer's output still comes from
  the engine's kernel (SDPA, Triton, the compiled CPU decode attention), so tracing never switches the
  model to eager attention.
- ``blocks.{i}.attn.hook_pattern`` is virtual (TransformerLens' name for the (B, H, q, k) probabilities):
  a hook function on it receives the exact pattern of the call, computed query chunk by query chunk from
  q and k — all queries (T x T, as TransformerLens: small inputs) — and may only observe; a ``Record``
  of it keeps only the rows at ``positions`` (memory H x |positions| x T), like TransformerLens'
  ``pos_slice``. Use ``Attention`` for reductions and ``knockout`` to change the pattern.
- Interventions (research/interventions.py) are specs installed by the same trace: hook functions that
  replace tensors, and per-layer knockout group tables the attention override applies.
- Leaving the ``with`` block removes every hook and override, also after an exception.
- Steps start when ``hook_embed`` fires (every engine's call begins there) and last while the decoder
  runs a call (``Decoder.running``: its layer context).
- A reduced model (llava_next.reduce: FastV, FrameFusion, DyCoke; run a call through a ``ReducedEngine``:
  ``model(ids, videos=..., engine=ReducedEngine(red, layout_from_provenance(prov)))``, or ``Pipeline.stream``
  of a reduced request): every hook point fires as unreduced, layers at and past the pruning layer on the
  pruned rows (the layer context's row map, ``LayerContext.rows``, names their original positions). Whatever is reported is in ORIGINAL positions: a ``Record`` at a
  pruned layer keeps the chosen positions with NaN rows where the position was pruned, plus
  ``name + ":kept"`` (B, P) bool; attention ``rows`` / ``key_mass`` cover every original key, NaN for the
  keys that layer no longer has (``query_positions`` lists the chosen queries it still has; ``topk_ids``
  are original positions); the logit lens lists only positions present. ``tr.fates`` says, for every
  original position, which layer removed it, which position it was merged into, and what DyCoke read at
  each decode step (reduce/engine.py ``Fates``; ``Provenance.with_fates`` puts it beside the provenance).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import nn

from ..model.attention import grouped_attention, triton_available
from ..model.hooks import HookFn, HookPoint, hook_points
from .cache import ActivationCache
from .attention import AttentionStats, Groups, ResearchError, attention_rows, attention_stats, key_mass_triton

Reduce = Literal["none", "mean", "sum", "max", "topk"]
NONSEQUENCE = ("vision.", "mm.hook_features", "mm.hook_pooled", "mm.hook_projected", "mm.hook_newline")


def resolve_positions(positions: Any, provenance: Any = None) -> torch.Tensor | None:
    """None (all), a LongTensor / list of indices, or a selector with ``resolve(provenance)`` -> LongTensor."""
    if positions is None:
        return None
    if hasattr(positions, "resolve"):
        if provenance is None:
            raise ResearchError(f"{type(positions).__name__} is a selector and needs the request's token provenance: "
                             "pass provenance=... to trace(), or give positions as a LongTensor")
        positions = positions.resolve(provenance)
    idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    if idx.numel() and int(idx.min()) < 0:
        raise ResearchError("positions must be absolute sequence positions (>= 0); use a selector for 'the last token'")
    return idx


class _Last:
    """The position selector "last": the last position of each call (the prompt's last token at prefill,
    the new token when decoding); ``Trace.local`` turns it into that call's index."""

    def __repr__(self) -> str:
        return "'last'"


LAST = _Last()


def resolve_selection(value: Any, provenance: Any = None, what: str = "positions") -> torch.Tensor | _Last | None:
    """The one resolver of query / lens positions (``Attention.queries``, ``LogitLens.positions``): "all" or
    None -> None (every position of a call), "last" -> ``LAST`` (each call's last position), absolute
    positions or a selector -> LongTensor."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "all":
            return None
        if value == "last":
            return LAST
        raise ResearchError(f"{what} must be 'last', 'all', absolute positions (>= 0) or a selector "
                            f"(llava_next.research.select); got {value!r}")
    return resolve_positions(value, provenance)


def resolve_segments(segments: Any, provenance: Any = None) -> torch.Tensor:
    """``Attention.segments``: a segment id per sequence position (LongTensor, e.g. ``prov.frame``), the name of
    such a provenance field ("frame", "media", "tile_row", "tile_col", "row", "col", "kind", "segment"), or an
    object with ``resolve(provenance)`` giving one. Ids < 0 (``prov.frame``'s -1 on text) are no segment."""
    if isinstance(segments, str):
        named = ("frame", "media", "tile_row", "tile_col", "row", "col", "kind", "segment")
        if segments not in named:
            raise ResearchError(f"segments={segments!r} names no per-position field of the provenance: use one of "
                                f"{', '.join(named)}, or give one id per position")
        if provenance is None:
            raise ResearchError(f"segments={segments!r} is read from the request's token provenance: pass "
                                "provenance=... to trace(), or give segments as a LongTensor of ids")
        segments = getattr(provenance, segments)
    elif hasattr(segments, "resolve"):
        if provenance is None:
            raise ResearchError(f"{type(segments).__name__} resolves against the request's token provenance: pass "
                                "provenance=... to trace(), or give segments as a LongTensor of ids")
        segments = segments.resolve(provenance)
    try:
        return torch.as_tensor(segments).long().reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise ResearchError(f"Attention.segments must be one integer segment id per sequence position (e.g. "
                            f"prov.frame), got {type(segments).__name__}") from None


@dataclass(frozen=True)
class Record:
    """Record hook ``name`` (fnmatch pattern) at ``positions`` (None: all), reduced over them by ``reduce``.

    none: (B, P, ...) the selected rows; mean / sum / max: (B, ...); topk: per channel the k largest values
    over the positions and their absolute positions, stored as ``name`` and ``name + ":positions"``.
    ``key``: store under this name instead of the hook's (two Records of one hook need different keys)."""

    name: str
    positions: Any = None
    reduce: Reduce = "none"
    k: int = 8
    dtype: torch.dtype | None = None
    device: str | torch.device | None = "cpu"
    steps: Literal["all", "prefill", "decode"] = "all"
    key: str | None = None

    def __post_init__(self) -> None:
        if self.reduce not in ("none", "mean", "sum", "max", "topk"):
            raise ResearchError(f"Record.reduce must be none, mean, sum, max or topk, got {self.reduce!r}")
        if self.steps not in ("all", "prefill", "decode"):
            raise ResearchError(f"Record.steps must be all, prefill or decode, got {self.steps!r}")
        if self.reduce == "topk" and self.k < 1:
            raise ResearchError(f"Record.k must be >= 1 for reduce='topk', got {self.k}")


@dataclass(frozen=True)
class Attention:
    """Attention statistics to compute per decoder layer (research/attention.py has the definitions).

    layers: None = all. queries: "last" (the last position of each call: FastV's query at prefill, the new
    token when decoding), "all", or positions / a selector (absolute). segments: a LongTensor of segment ids
    per sequence position (e.g. frame index) or a selector-like object with ``resolve``; enables
    ``segment_rows`` and, with ``segment_map``, the all-query segment x segment map. ``block`` > 0: the
    block-pooled all-query map. ``decode``: also at each decode step (the new token's query). ``heads``:
    "all" keeps per-head statistics, "mean" only their head average (H times less memory).
    ``backend``: "auto" uses the Triton key-mass kernel on CUDA when key_mass is the only statistic."""

    layers: Sequence[int] | None = None
    queries: Any = "last"
    rows: bool = True
    key_mass: bool = False
    entropy: bool = False
    topk: int = 0
    segments: Any = None
    segment_map: bool = False
    block: int = 0
    decode: bool = True
    heads: Literal["all", "mean"] = "all"
    chunk: int | None = None
    device: str | torch.device | None = "cpu"
    backend: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self) -> None:
        if self.heads not in ("all", "mean"):
            raise ResearchError(f"Attention.heads must be 'all' or 'mean', got {self.heads!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ResearchError(f"Attention.backend must be auto, torch or triton, got {self.backend!r}")
        if self.segment_map and self.segments is None:
            raise ResearchError("Attention(segment_map=True) needs segments (one segment id per position)")


@dataclass
class Step:
    """What one decoder call recorded: ``offset`` = the sequence position of its first token."""

    offset: int = 0
    records: dict[str, Any] = field(default_factory=dict)
    attention: dict[int, AttentionStats] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the logit lens


class Trace:
    """The context manager behind ``trace`` (module docstring)."""

    def __init__(self, model: nn.Module, *, record: Iterable[Record | str] = (), attention: Attention | None = None,
                 hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = (), interventions: Iterable[Any] = (),
                 logit_lens: Any = None, provenance: Any = None) -> None:
        self.model = model
        self.decoder = getattr(model, "language_model", model)
        if not hasattr(self.decoder, "layers"):
            raise ResearchError(f"trace() takes a LlavaNextModel or a Decoder, got {type(model).__name__}")
        self.points = hook_points(model)
        self.provenance = provenance
        self.records = [Record(r) if isinstance(r, str) else r for r in record]
        self.attention_spec = attention
        self.user_hooks = list(hooks)
        self.interventions = list(interventions) + ([logit_lens] if logit_lens is not None else [])
        self.steps: list[Step] = []
        self._pending = Step()  # records of hooks that fire before the next decoder call
        self._removers: list[Callable[[], None]] = []
        self._knockouts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> (src, dst) positions
        L = len(self.decoder.layers)
        self.patterns = {f"blocks.{i}.attn.hook_pattern": HookPoint() for i in range(L)}  # virtual (docstring)
        for name, point in self.patterns.items():
            point.name = name
        self._pattern_users: dict[int, list[tuple[Callable, torch.Tensor | None]]] = {}
        self.engine: Any = None  # the engine of the last reduced decoder call seen (reduce/engine.py)

    # ---- what users read ----------------------------------------------------------------------------
    @property
    def cache(self) -> dict[str, Any]:
        return self.steps[0].records if self.steps else self._pending.records

    @property
    def attention(self) -> dict[int, AttentionStats]:
        return self.steps[0].attention if self.steps else {}

    @property
    def logit_lens(self) -> dict[int, Any]:
        """Step 0's logit lens per layer (research/logit_lens.py), if one was asked for."""
        return self.steps[0].extra.get("logit_lens", {}) if self.steps else {}

    @property
    def fates(self) -> Any:
        """What the reduction did to every original position (reduce/engine.py ``Fates``), or None."""
        return None if self.engine is None else self.engine.fates

    def __getitem__(self, name: str) -> Any:
        return self.cache[name]

    def _repr_html_(self) -> str:  # Jupyter (research/notebook.py)
        from .notebook import trace_html

        return trace_html(self)

    # ---- a reduced model: rows of a pruned layer -> original positions -----------------------------------
    @property
    def _in_decoder(self) -> bool:
        """Inside a decoder call this trace saw begin (layers run directly, ``forward_layers``, file under the
        pending step like the vision hooks)."""
        return self.decoder.running is not None and bool(self.steps)

    def seq_map(self) -> Any:
        """The row map of the layers running now (``LayerContext.rows``), None outside a call or unreduced."""
        ctx = self.decoder.running
        return None if ctx is None else ctx.rows

    def row_map(self, length: int) -> torch.Tensor | None:
        """(B, length) original positions of the rows of the current decoder call's tensors while its layers
        run on a pruned or merged sequence (the context's row map); None when the rows are offset + 0..length-1."""
        smap = self.seq_map()
        if smap is None or smap.rows.shape[1] != length:
            return None
        return smap.rows

    def _shared(self, rows: torch.Tensor, what: str) -> torch.Tensor:
        """The (T,) map shared by every batch row (a pruned batch's rows keep different positions)."""
        if rows.shape[0] > 1 and not bool((rows == rows[:1]).all()):
            raise ResearchError(f"{what} of a pruned layer needs one request per trace (the rows of a pruned "
                                "batch keep different positions); trace the requests one at a time")
        return rows[0]

    def absolute(self, idx: torch.Tensor, offset: int, length: int) -> torch.Tensor:
        """Indices into a call's rows -> absolute (original) positions; the inverse of ``local``."""
        rows = self.row_map(length)
        if rows is None:
            return idx + offset
        return self._shared(rows, "positions").to(idx.device)[idx]

    def resolve(self, positions: Any) -> torch.Tensor | None:
        return resolve_positions(positions, self.provenance)

    def resolve_selection(self, value: Any, what: str = "positions") -> torch.Tensor | _Last | None:
        """``resolve_selection`` against this trace's provenance ("last", "all", positions, a selector)."""
        return resolve_selection(value, self.provenance, what)

    @property
    def current(self) -> Step:
        """The step hooks are filed under now (see the module docstring)."""
        return self.steps[-1] if self._in_decoder else self._pending

    # ---- installing ---------------------------------------------------------------------------------
    def names(self, pattern: str | Callable[[str], bool]) -> list[str]:
        """Hook names matching an fnmatch pattern or a predicate; a clear error when none does."""
        every = [*self.points, *self.patterns]
        if callable(pattern):
            found = [n for n in every if pattern(n)]
        else:
            found = [n for n in every if fnmatch.fnmatchcase(n, pattern)]
        if not found:
            example = ", ".join(list(self.points)[:6])
            raise ResearchError(f"no hook point matches {pattern!r}; names look like: {example}, ... "
                           "(llava_next/model/hooks.py lists them)")
        return found

    def add_hook(self, name: str | Callable[[str], bool], fn: HookFn) -> None:
        for n in self.names(name):
            if n in self.patterns:
                self._add_pattern_user(n, fn, None)
            else:
                self._removers.append(self.points[n].add_hook(fn))

    def _add_pattern_user(self, name: str, fn: Callable, positions: torch.Tensor | None) -> None:
        point = self.patterns[name]

        def observe(pattern: torch.Tensor) -> None:
            if fn(pattern, point) is not None:
                raise ResearchError(f"{name} is virtual and read-only (the pattern is recomputed, not used); "
                                    "change attention with research.interventions.knockout")
        self._pattern_users.setdefault(point.layer(), []).append((observe, positions))

    def add_knockout(self, src: torch.Tensor, dst: torch.Tensor, layers: Iterable[int]) -> None:
        """Queries at positions ``dst`` may not attend to keys at ``src`` in these layers."""
        for layer in layers:
            if not 0 <= layer < len(self.decoder.layers):
                raise ResearchError(f"knockout layer {layer} out of range 0..{len(self.decoder.layers) - 1}")
            self._knockouts.setdefault(layer, []).append((src, dst))
            if len(self._knockouts[layer]) > 4:
                raise ResearchError("at most 4 knockouts per layer in one trace (each doubles the group table twice)")

    def local(self, positions: torch.Tensor | None, offset: int, length: int) -> torch.Tensor | None:
        """Absolute positions -> indices into a call covering [offset, offset + length); None = all;
        ``LAST``: the call's last row."""
        if positions is None:
            return None
        if positions is LAST:
            return torch.tensor([length - 1])
        rows = self.row_map(length)
        if rows is not None:  # a pruned layer: the rows holding these original positions (absent ones dropped)
            loc = _inverse(self._shared(rows, "positions")[None].cpu(), positions)[0]
            return loc[loc >= 0]
        inside = positions[(positions >= offset) & (positions < offset + length)]
        return inside - offset

    def __enter__(self) -> "Trace":
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()
        if self._pending.records and not self.steps:  # only the vision side ran (e.g. model.image_features)
            self.steps.append(self._pending)
            self._pending = Step()

    def _install(self) -> None:
        def begin(x: torch.Tensor, hook: HookPoint) -> None:  # every engine's call starts with hook_embed
            ctx = self.decoder.running
            step = self._pending
            step.offset = ctx.offset if ctx is not None else 0
            if ctx is not None and ctx.engine is not None:
                self.engine = ctx.engine
            self._pending = Step()
            self.steps.append(step)

        self._removers.append(self.decoder.hook_embed.add_hook(begin))
        keys: dict[str, str] = {}
        for rec in self.records:
            positions = self.resolve(rec.positions)
            names = self.names(rec.name)
            if rec.key is not None and len(names) > 1:
                raise ResearchError(f"Record(key={rec.key!r}) matches {len(names)} hook points; a key names one")
            for name in names:
                key = rec.key or name
                if key in keys:
                    raise ResearchError(f"two Records store under {key!r} ({keys[key]!r} and {rec.name!r}); "
                                     "give one of them key='...'")
                keys[key] = rec.name
                if name in self.patterns:
                    if rec.reduce != "none":
                        raise ResearchError(f"Record({name!r}) keeps pattern rows; for reductions use Attention(...)")
                    self._add_pattern_user(name, self._pattern_recorder(rec, key), positions)
                    continue
                self._removers.append(self.points[name].add_hook(self._recorder(rec, name, key, positions)))
        for name, fn in self.user_hooks:
            self.add_hook(name, fn)
        for spec in self.interventions:
            spec.install(self)
        self._install_attention()

    def _remove(self) -> None:
        for remove in reversed(self._removers):
            remove()
        self._removers.clear()

    # ---- records -------------------------------------------------------------------------------------
    def is_sequence_hook(self, name: str) -> bool:
        return not name.startswith(NONSEQUENCE)

    def _recorder(self, rec: Record, name: str, key: str, positions: torch.Tensor | None) -> HookFn:
        sequence = self.is_sequence_hook(name)

        def fn(x: torch.Tensor, hook: HookPoint) -> None:
            step = self.current
            decoding = self._in_decoder and len(self.steps) > 1
            if (rec.steps == "prefill" and decoding) or (rec.steps == "decode" and not decoding):
                return
            rows = self.row_map(x.shape[1]) if sequence and x.dim() >= 2 else None
            if rows is not None:  # a pruned layer: report in original positions (module docstring)
                smap = self.seq_map()
                want = positions if positions is not None else torch.arange(step.offset, smap.length)
                want = want[(want >= step.offset) & (want < smap.length)]
                if want.numel() == 0:
                    return
                value, where, kept = reduce_mapped(x.detach(), rows, want.to(rows.device), rec.reduce, rec.k)
                self._store(step, key, self._place(value, rec.dtype, rec.device))
                self._store(step, key + ":kept", kept.to(rec.device or kept.device))
                if where is not None:
                    self._store(step, key + ":positions", where.to(rec.device or where.device))
                return
            idx = positions
            if positions is not None and x.dim() >= 2:
                idx = self.local(positions, step.offset if sequence else 0, x.shape[1])
                if idx.numel() == 0:
                    return
            value, where = reduce_positions(x.detach(), idx.to(x.device) if idx is not None else None, rec.reduce, rec.k)
            if where is not None:
                where = where + (step.offset if sequence else 0)
            self._store(step, key, self._place(value, rec.dtype, rec.device))
            if where is not None:
                self._store(step, key + ":positions", where.to(rec.device or where.device))
        return fn

    def _pattern_recorder(self, rec: Record, key: str) -> Callable:
        def store(pattern: torch.Tensor, hook: HookPoint) -> None:
            if rec.steps == "prefill" and len(self.steps) > 1 or rec.steps == "decode" and len(self.steps) == 1:
                return
            self._store(self.current, key, self._place(pattern, rec.dtype, rec.device))
        return store

    @staticmethod
    def _place(value: torch.Tensor, dtype: torch.dtype | None, device: Any) -> torch.Tensor:
        value = value.to(dtype) if dtype is not None else value
        return value.to(device) if device is not None else value

    @staticmethod
    def _store(step: Step, name: str, value: torch.Tensor) -> None:
        old = step.records.get(name)
        if old is None:
            step.records[name] = value
        elif isinstance(old, list):
            old.append(value)
        else:
            try:
                step.records[name] = torch.cat([old, value])
            except RuntimeError:  # shapes differ (e.g. images of different sizes): keep the calls apart
                step.records[name] = [old, value]

    # ---- attention -----------------------------------------------------------------------------------
    def _install_attention(self) -> None:
        spec = self.attention_spec
        layers: set[int] = set(self._knockouts) | set(self._pattern_users)
        if spec is not None:
            n = len(self.decoder.layers)
            chosen = range(n) if spec.layers is None else spec.layers
            for layer in chosen:
                if not -n <= layer < n:
                    raise ResearchError(f"attention layer {layer} out of range for a {n}-layer decoder")
            layers |= {layer % n for layer in chosen}
            self._attn_layers = {layer % n for layer in chosen}
            self._attn_queries = self.resolve_selection(spec.queries, "Attention.queries")
            self._attn_segments = None if spec.segments is None else resolve_segments(spec.segments, self.provenance)
        else:
            self._attn_layers = set()
        if not layers:
            return
        previous = self.decoder.instrument
        self.decoder.instrument = self._instrument(layers, previous)

        def restore() -> None:
            self.decoder.instrument = previous
        self._removers.append(restore)

    def _groups(self, layer: int, Tk: int, device: torch.device) -> Groups | None:
        """The knockout group table of a layer: one group id per key (bit 2j: in src_j, bit 2j+1: in dst_j)
        and which (query group, key group) pairs may attend. A pruned layer's keys: by original position."""
        specs = self._knockouts.get(layer)
        if not specs:
            return None
        smap = self.seq_map()
        span = Tk if smap is None else smap.length
        g = torch.zeros(span, dtype=torch.long, device=device)
        for j, (src, dst) in enumerate(specs):
            g[src[src < span].to(device)] += 1 << (2 * j)
            g[dst[dst < span].to(device)] += 2 << (2 * j)
        if smap is not None:
            g = g[self._shared(smap.keys, "a knockout").clamp(min=0).to(device)]
        ids = torch.arange(4 ** len(specs), device=device)
        table = torch.ones(len(ids), len(ids), dtype=torch.bool, device=device)
        for j in range(len(specs)):
            in_dst = (ids >> (2 * j + 1)) & 1 == 1
            in_src = (ids >> (2 * j)) & 1 == 1
            table &= ~(in_dst[:, None] & in_src[None, :])
        return g, table

    def _instrument(self, layers: set[int], previous: Callable | None) -> Callable:
        """The decoder's attention instrument (``LayerContext.instrument``): the layers this trace watches get
        their statistics recorded and knockouts applied; the others go to an outer trace's instrument or the
        engine's kernel."""
        def fn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Any) -> torch.Tensor:
            if layer not in layers:
                return previous(layer, q, k, v, ctx) if previous is not None else ctx.kernel(q, k, v, ctx.mask)
            mask = ctx.mask
            key_mask = None if mask is None else mask[:, 0, 0, :]  # (B, Tk): the context holds (B, 1, 1, Tk)
            groups = self._groups(layer, k.shape[2], q.device)
            if groups is not None:
                y = grouped_attention(q, k, v, groups, key_mask=key_mask)
            elif previous is not None:
                y = previous(layer, q, k, v, ctx)
            else:
                y = ctx.kernel(q, k, v, mask)
            if layer in self._attn_layers:
                self._record_attention(layer, q, k, v, key_mask, groups)
            for use, positions in self._pattern_users.get(layer, ()):
                idx = self.local(positions, self.current.offset, q.shape[2]) if positions is not None else \
                    torch.arange(q.shape[2])
                if idx.numel():
                    p = attention_rows(q, k, idx.to(q.device), key_mask=key_mask, groups=groups)
                    use(p if self.row_map(q.shape[2]) is None else self._keys_to_original(p))
            return y
        return fn

    def _record_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_mask: torch.Tensor | None, groups: Groups | None) -> None:
        spec = self.attention_spec
        step = self.current
        Tq, Tk = q.shape[2], k.shape[2]
        decoding = len(self.steps) > 1 and Tq == 1
        if decoding and not spec.decode:
            return
        queries = self._attn_queries
        smap = self.seq_map() if self.row_map(Tq) is not None else None
        if decoding or queries is LAST:
            idx = torch.tensor([Tq - 1], device=q.device)
        elif queries is None:  # "all"
            idx = None
        else:
            idx = self.local(queries, step.offset, Tq)
            if idx.numel() == 0 and not (spec.segment_map or spec.block):
                return
            idx = idx.to(q.device)
        if smap is not None:
            stats = self._mapped_stats(spec, q, k, idx, key_mask, groups, smap, decoding)
            if spec.heads == "mean":
                stats = stats.mean_heads()
            step.attention[layer] = stats.to(spec.device) if spec.device is not None else stats
            return
        only_mass = spec.key_mass and not (spec.rows or spec.entropy or spec.topk or spec.segments is not None)
        use_triton = groups is None and only_mass and (spec.backend == "triton" or (spec.backend == "auto" and q.is_cuda
                                                                            and triton_available()))
        if use_triton:
            n = Tq if idx is None else idx.numel()
            positions = torch.arange(Tq, device=q.device) if idx is None else idx
            stats = AttentionStats(queries=positions, query_positions=positions + (Tk - Tq),
                                   key_mass=key_mass_triton(q, k, v, idx, key_mask=key_mask, chunk=spec.chunk)
                                   if n else q.new_zeros(q.shape[0], q.shape[1], Tk, dtype=torch.float32))
        else:
            stats = attention_stats(q, k, idx, key_mask=key_mask, rows=spec.rows, key_mass=spec.key_mass,
                                    entropy=spec.entropy, topk=spec.topk, segments=self._attn_segments,
                                    segment_map=spec.segment_map and not decoding,
                                    block=0 if decoding else spec.block, chunk=spec.chunk, groups=groups)
        if spec.heads == "mean":
            stats = stats.mean_heads()
        step.attention[layer] = stats.to(spec.device) if spec.device is not None else stats


    def _keys_to_original(self, t: torch.Tensor) -> torch.Tensor:
        """(..., Tk) values over a pruned layer's keys -> (..., length) over original positions, NaN where
        that layer has no key (the call's row map)."""
        smap = self.seq_map()
        keys = self._shared(smap.keys, "attention").to(t.device)
        out = t.new_full((*t.shape[:-1], smap.length + 1), float("nan"))
        out[..., torch.where(keys >= 0, keys, smap.length)] = t
        return out[..., :smap.length]

    def _mapped_stats(self, spec: "Attention", q, k, idx, key_mask, groups, smap, decoding) -> AttentionStats:
        """``attention_stats`` of a pruned layer's call, reported over original positions (module docstring)."""
        keys = self._shared(smap.keys, "attention").to(q.device)
        rows = self._shared(smap.rows, "attention").to(q.device)
        Tq = q.shape[2]
        segments = S_full = None
        if self._attn_segments is not None:
            from .attention import _segment_ids

            seg_full, S_full = _segment_ids(self._attn_segments, smap.length, q.device)
            segments = seg_full[keys.clamp(min=0)]
        stats = attention_stats(q, k, idx, key_mask=key_mask, rows=spec.rows, key_mass=spec.key_mass,
                                entropy=spec.entropy, topk=spec.topk, segments=segments,
                                segment_map=spec.segment_map and not decoding,
                                block=0 if decoding else spec.block, chunk=spec.chunk, groups=groups,
                                key_positions=keys.clamp(min=0))
        chosen = stats.queries
        stats.query_positions = rows[chosen]
        stats.extra["kept_keys"] = self._keys_to_original(torch.ones_like(keys, dtype=torch.float32)) == 1
        if stats.rows is not None:
            stats.rows = self._keys_to_original(stats.rows)
        if stats.key_mass is not None:
            stats.key_mass = self._keys_to_original(stats.key_mass)
        if stats.topk_ids is not None:
            stats.topk_ids = keys[stats.topk_ids]

        def pad(t: torch.Tensor | None, dims: Sequence[int], S: int) -> torch.Tensor | None:
            if t is None:
                return None
            for d in dims:  # a segment whose keys were all pruned at this layer: 0
                if t.shape[d] < S:
                    t = torch.cat([t, t.new_zeros(*t.shape[:d], S - t.shape[d], *t.shape[d + 1:])], d)
            return t
        if S_full is not None:
            stats.segment_rows = pad(stats.segment_rows, [-1], S_full)
        if stats.segment_map is not None:
            S = -(-smap.length // spec.block) if spec.block and not decoding else S_full
            stats.segment_map = pad(stats.segment_map, [-2, -1], S)
            stats.segment_counts = pad(stats.segment_counts, [0], S)
        return stats


def _inverse(rows: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """rows (B, T') original position of each row (-1: padding), want (P,) original positions -> (B, P) the
    row holding each wanted position, -1 where it has none."""
    B, T2 = rows.shape
    span = max(int(rows.max()) + 1 if rows.numel() else 0, int(want.max()) + 1 if want.numel() else 0)
    inv = torch.full((B, span + 1), -1, dtype=torch.long, device=rows.device)
    inv.scatter_(1, torch.where(rows >= 0, rows, span), torch.arange(T2, device=rows.device).expand(B, -1))
    inv[:, span] = -1
    return inv[:, want.to(rows.device)]


def reduce_mapped(x: torch.Tensor, rows: torch.Tensor, want: torch.Tensor, reduce: Reduce, k: int = 8
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``reduce_positions`` for a pruned layer's tensor x (B, T', ...) whose rows sit at original positions
    ``rows`` (B, T'): the wanted original positions ``want`` (P,) -> (value, top-k positions or None, kept
    (B, P) bool). Absent positions are NaN rows (none) and left out of mean / sum / max / top-k."""
    loc = _inverse(rows, want)  # (B, P)
    kept = loc >= 0
    shape = (*loc.shape, *x.shape[2:])
    sel = x.gather(1, loc.clamp(min=0).view(*loc.shape, *([1] * (x.dim() - 2))).expand(shape))  # (B, P, ...)
    present = kept.view(*kept.shape, *([1] * (x.dim() - 2)))
    if reduce == "none":
        return sel.masked_fill(~present, float("nan")), None, kept
    if reduce in ("mean", "sum"):
        total = sel.float().masked_fill(~present, 0).sum(1)
        if reduce == "mean":
            total = total / kept.sum(1).view(-1, *([1] * (x.dim() - 2))).clamp(min=1)
        return total.masked_fill(~present.any(1), float("nan")).to(x.dtype), None, kept
    filled = sel.masked_fill(~present, float("-inf"))
    if reduce == "max":
        return filled.amax(1).masked_fill(~present.any(1), float("nan")), None, kept
    values, order = filled.topk(min(k, filled.shape[1]), dim=1)
    return values, want.to(order.device)[order], kept


def reduce_positions(x: torch.Tensor, idx: torch.Tensor | None, reduce: Reduce, k: int = 8
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Select positions (dim 1; 0-D/1-D tensors have none) and reduce over them. Returns (value, positions of
    the top-k values or None). Always a copy: later in-place updates cannot change a record."""
    if x.dim() < 2:
        return x.clone(), None
    x = x.index_select(1, idx) if idx is not None else x
    if reduce == "none":
        return (x if idx is not None else x.clone()), None
    if reduce == "mean":
        return x.float().mean(1).to(x.dtype), None
    if reduce == "sum":
        return x.float().sum(1).to(x.dtype), None
    if reduce == "max":
        return x.amax(1), None
    values, order = x.topk(min(k, x.shape[1]), dim=1)  # (B, k, ...) per channel
    where = order if idx is None else idx[order]
    return values, where


def trace(model: nn.Module, *, record: Iterable[Record | str] = (), attention: Attention | None = None,
          hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = (), interventions: Iterable[Any] = (),
          logit_lens: Any = None, provenance: Any = None) -> Trace:
    """``with trace(model, ...) as tr:`` — see the module docstring and ``Record`` / ``Attention``."""
    return Trace(model, record=record, attention=attention, hooks=hooks, interventions=interventions,
                 logit_lens=logit_lens, provenance=provenance)


def layout_from_provenance(prov: Any) -> Any:
    """The reducers' index map (reduce.stages.VisualLayout, batch of one) from a request's token provenance:
    visual = every image / video position (newlines included, as the placeholders are), frame and patch
    (row * grid width + col) of each video token, -1 elsewhere."""
    from ..reduce.stages import VisualLayout
    from .provenance import K

    P = prov.prompt_len  # the prompt's positions (generated ones are never pruning candidates)
    visual = prov.media[:P] >= 0
    video = prov.kind[:P] == K["video"]
    frame = torch.where(visual & (prov.frame[:P] >= 0), prov.frame[:P].long(), -1)
    patch = torch.where(video, prov.row[:P].long() * prov.grid_w[:P].long() + prov.col[:P].long(), -1)
    return VisualLayout(visual[None], frame[None], patch[None])


# ---- TransformerLens call shapes ---------------------------------------------------------------------
def hooks(model: nn.Module, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = ()) -> Trace:
    """``with hooks(model, fwd_hooks=[(name, fn)]):`` as TransformerLens' ``model.hooks(...)``; removed on exit."""
    return Trace(model, hooks=fwd_hooks)


def run_with_hooks(model: nn.Module, *args, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = (),
                   **kwargs) -> Any:
    """``model(*args, **kwargs)`` with the hooks attached for that call only."""
    with hooks(model, fwd_hooks):
        return model(*args, **kwargs)


def run_with_cache(model: nn.Module, *args, names_filter: str | Callable[[str], bool] | Sequence[str] | None = None,
                   device: str | torch.device | None = None, **kwargs) -> tuple[Any, ActivationCache]:
    """(output, cache) as TransformerLens' ``run_with_cache``: every matching hook's full tensor, in an
    ``ActivationCache`` (research/cache.py: ``cache["resid_post", 1]``, ``decompose_resid``, ``logit_attrs``, ...).

    Unlike TransformerLens, ``names_filter`` defaults to every *decoder* hook (not the vision tower's), and
    ``trace(record=[Record(..., positions=..., reduce=...)])`` keeps memory to what is needed."""
    if names_filter is None:
        names_filter = lambda n: not n.startswith(("vision.", "mm."))  # noqa: E731
    if isinstance(names_filter, (list, tuple)):
        wanted = set(names_filter)
        names_filter = wanted.__contains__
    tr = Trace(model)
    records = [Record(n, device=device) for n in tr.names(names_filter)]
    with trace(model, record=records) as tr:
        out = model(*args, **kwargs)
    return out, ActivationCache(tr.cache, model)
