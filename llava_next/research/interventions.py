"""Interventions: scoped, composable changes to a forward, each a small spec installed by ``trace``.

    with trace(model, interventions=[ablate(frame_3, mode="mean"),
                                     knockout(src=image, dst=question, layers=range(4, 13))],
               provenance=prov) as tr:
        logits = model(ids, videos=[pixels])
    # or only the change:   with intervene(model, ablate(...), provenance=prov): ...

- ``ablate(positions, mode="zero"|"mean", over=None, at="mm.hook_merged")``: visual tokens replaced by zeros
  or by the mean of the rows ``over`` (default: the ablated rows themselves; llava-interp uses the mean of
  all visual tokens of the image). At ``mm.hook_merged`` the visual rows are exactly the projector's output
  rows (after pooling and AnyRes packing), addressed by sequence position; ``at`` takes any decoder hook
  (e.g. ``blocks.4.hook_resid_post`` to ablate later).
- ``replace_embedding(positions, values, at="hook_embed")``: set the decoder input rows at positions
  ((P, C) or (C,) broadcast).
- ``patch(name, source, positions=None)``: activation patching: the rows of hook(s) ``name`` at
  ``positions`` are taken from another, finished trace that recorded them (``Record(name)`` with all
  positions, or with exactly the same positions); step by step, so decode steps patch too.
  ``source_positions`` (a selector resolved against the SOURCE trace's provenance) patches between two
  different requests: frame i of video A onto frame j of video B (``positions=sel.frame(j),
  source_positions=sel.frame(i)``), a tile onto a tile, one AnyRes grid onto another. Equal counts pair in
  order (the same grid: cell by cell); otherwise each patched visual token takes the source token whose cell
  centre is nearest in its grid's relative coordinates (row + 0.5) / grid_h, (col + 0.5) / grid_w, and the
  positions without a cell (newlines, text) pair proportionally in order (``map_positions``).
- ``knockout(src, dst, layers)``: in those decoder layers, queries at ``dst`` may not attend to keys at
  ``src`` (cross-modal-information-flow's attention knockout). Not a dense T x T mask: each position gets a
  small group id and each layer a G x G table of allowed (query group, key group) pairs; the attention is
  computed query chunk by chunk with SDPA and a (chunk x T) boolean mask made from the table
  (``grouped_attention``), and recorded attention statistics see the same table. A query left with no
  key (only possible when it knocks out itself) gets a zero output, as the facade's rule for empty rows.

Positions are absolute sequence positions or selectors (``resolve(provenance)``), as everywhere in
``llava_next.research``. Hook-based interventions act in every step whose positions they cover
(prefill for prompt positions; a selector of generated positions acts during decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F

from .attention import ResearchError
from .trace import Trace


def _rows(tr: Trace, x: torch.Tensor, positions: torch.Tensor, name: str) -> torch.Tensor | None:
    """Indices into this call's dim 1 of the absolute ``positions`` (None when none fall in the call)."""
    offset = tr.current.offset if tr.is_sequence_hook(name) else 0
    idx = tr.local(positions, offset, x.shape[1])
    return None if idx.numel() == 0 else idx.to(x.device)


@dataclass(frozen=True)
class ablate:  # noqa: N801 - reads as a verb in a list of interventions
    positions: Any
    mode: Literal["zero", "mean"] = "zero"
    over: Any = None
    at: str = "mm.hook_merged"

    def __post_init__(self) -> None:
        if self.mode not in ("zero", "mean"):
            raise ResearchError(f"ablate mode must be 'zero' or 'mean', got {self.mode!r}")

    def install(self, tr: Trace) -> None:
        positions = tr.resolve(self.positions)
        over = tr.resolve(self.over) if self.over is not None else positions

        def fn(x: torch.Tensor, hook) -> torch.Tensor | None:
            idx = _rows(tr, x, positions, hook.name)
            if idx is None:
                return None
            x = x.clone()
            if self.mode == "zero":
                x[:, idx] = 0
            else:
                src = _rows(tr, x, over, hook.name)
                if src is None:
                    raise ResearchError(f"ablate(mode='mean'): none of the 'over' positions are in this call of {hook.name}")
                x[:, idx] = x[:, src].float().mean(1, keepdim=True).to(x.dtype)
            return x
        tr.add_hook(self.at, fn)


@dataclass(frozen=True)
class replace_embedding:  # noqa: N801
    positions: Any
    values: torch.Tensor
    at: str = "hook_embed"

    def install(self, tr: Trace) -> None:
        positions = tr.resolve(self.positions)

        values = torch.as_tensor(self.values)
        if values.dim() == 2 and values.shape[0] != positions.numel():
            raise ResearchError(f"replace_embedding: {values.shape[0]} rows of values for {positions.numel()} positions")

        def fn(x: torch.Tensor, hook) -> torch.Tensor | None:
            offset = tr.current.offset if tr.is_sequence_hook(hook.name) else 0
            inside = (positions >= offset) & (positions < offset + x.shape[1])
            if not bool(inside.any()):
                return None
            x = x.clone()
            x[:, (positions[inside] - offset).to(x.device)] = (values[inside] if values.dim() == 2 else values).to(x.device, x.dtype)
            return x
        tr.add_hook(self.at, fn)


def map_positions(dst_prov: Any, dst: torch.Tensor, src_prov: Any, src: torch.Tensor) -> torch.Tensor:
    """For each position of ``dst`` (in ``dst_prov``) the position of ``src`` (in ``src_prov``) it takes its
    rows from (``patch(source_positions=...)``; the rule is in the module docstring)."""
    if len(dst) == len(src):
        return src.clone()
    if len(src) == 0:
        raise ResearchError("patch: source_positions selects no position of the source request")

    def centres(prov: Any, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cell = prov.row[pos] >= 0
        y = (prov.row[pos].double() + 0.5) / prov.grid_h[pos].double().clamp(min=1)
        x = (prov.col[pos].double() + 0.5) / prov.grid_w[pos].double().clamp(min=1)
        return cell, torch.stack([y, x], 1)

    d_cell, d_xy = centres(dst_prov, dst)
    s_cell, s_xy = centres(src_prov, src)
    out = torch.empty_like(dst)
    if bool(d_cell.any()):
        if not bool(s_cell.any()):
            raise ResearchError("patch: the patched positions are visual tokens and the source positions have none")
        nearest = torch.cdist(d_xy[d_cell], s_xy[s_cell]).argmin(1)  # (n_dst_cells,)
        out[d_cell] = src[s_cell][nearest]
    rest_d, rest_s = (~d_cell).nonzero().flatten(), src[~s_cell]
    if len(rest_d):
        if len(rest_s) == 0:
            raise ResearchError("patch: some patched positions are not visual tokens (newlines, text) and the "
                                "source positions have no such position to take them from")
        out[rest_d] = rest_s[torch.arange(len(rest_d)) * len(rest_s) // len(rest_d)]
    return out


@dataclass(frozen=True)
class patch:  # noqa: N801
    name: str
    source: Trace
    positions: Any = None
    source_positions: Any = None

    def install(self, tr: Trace) -> None:
        positions = tr.resolve(self.positions)
        if self.source_positions is not None:
            if positions is None:
                raise ResearchError("patch(source_positions=...) needs positions=: where in this request to patch")
            self._install_mapped(tr, positions, self.source.resolve(self.source_positions))
            return
        names = tr.names(self.name)
        source_positions = {}
        for rec in self.source.records:
            for n in names:
                if tr.points.get(n) is not None and (n == rec.name or _matches(n, rec.name)):
                    if rec.reduce != "none":
                        raise ResearchError(f"patch({self.name!r}): the source trace reduced {n} ({rec.reduce}); "
                                         "record it with reduce='none'")
                    source_positions[n] = self.source.resolve(rec.positions)
        missing = [n for n in names if n not in source_positions]
        if missing:
            raise ResearchError(f"patch: the source trace did not record {missing[:3]}; record them with Record(name)")

        def fn(x: torch.Tensor, hook) -> torch.Tensor | None:
            step_no = len(tr.steps) - 1 if tr._in_decoder else len(tr.steps)
            if step_no >= len(self.source.steps) or hook.name not in self.source.steps[step_no].records:
                return None
            src = self.source.steps[step_no].records[hook.name]
            offset = tr.current.offset
            want = positions if positions is not None else torch.arange(offset, offset + x.shape[1])
            idx = tr.local(want, offset, x.shape[1])
            if idx.numel() == 0:
                return None
            have = source_positions[hook.name]
            if have is None:  # the source kept every row of this call
                rows = idx
            else:  # the source kept rows at ``have``: find ours among them
                absolute = idx + offset
                where = (have[None, :] == absolute[:, None]).float().argmax(1)
                if not bool(torch.isin(absolute, have).all()):
                    raise ResearchError(f"patch({hook.name}): the source recorded other positions than the ones patched")
                rows = where
            x = x.clone()
            x[:, idx.to(x.device)] = src[:, rows].to(x.device, x.dtype)
            return x
        for n in names:
            tr.add_hook(n, fn)

    def _install_mapped(self, tr: Trace, positions: torch.Tensor, source_positions: torch.Tensor) -> None:
        """Rows at ``positions`` from the source's rows at the mapped positions (prefill only: the source
        must have recorded ``name`` at every position, ``Record(name)``)."""
        take = map_positions(tr.provenance, positions, self.source.provenance, source_positions)
        names = tr.names(self.name)
        kept = {r.name: r for r in self.source.records}
        for n in names:
            rec = kept.get(n) or next((r for r in self.source.records if _matches(n, r.name)), None)
            if rec is None or rec.positions is not None or rec.reduce != "none":
                raise ResearchError(f"patch(source_positions=...): the source trace must record {n} at every "
                                    f"position, unreduced: Record({n!r})")

        def fn(x: torch.Tensor, hook) -> torch.Tensor | None:
            if len(tr.steps) > 1:  # decode steps: the mapped positions are prompt positions
                return None
            src = self.source.steps[0].records[hook.name]  # (B, T_source, ...) every position
            idx = tr.local(positions, tr.current.offset, x.shape[1])
            if idx.numel() != len(positions):
                return None
            x = x.clone()
            x[:, idx.to(x.device)] = src[:, take].to(x.device, x.dtype)
            return x
        for n in names:
            tr.add_hook(n, fn)


def _matches(name: str, pattern: str) -> bool:
    import fnmatch
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class knockout:  # noqa: N801
    src: Any
    dst: Any
    layers: Iterable[int]

    def install(self, tr: Trace) -> None:
        tr.add_knockout(tr.resolve(self.src), tr.resolve(self.dst), list(self.layers))


def intervene(model, *specs: Any, provenance: Any = None) -> Trace:
    """``with intervene(model, ablate(...), knockout(...)):`` — interventions without recording."""
    return Trace(model, interventions=specs, provenance=provenance)
