"""Prefill and decode through the decoder layer range by layer range, pruning tokens in between.

    runner = ReducedRunner(reduction, layout)                   # layout: VisualLayout of the padded batch
    tokens = generate(decoder, input_embeds=e, attention_mask=m, max_new_tokens=32, runner=runner)
    runner.report                                               # visual tokens before/after, kept positions

Prefill with a ``PrefillPruner`` at layer K (FastV's KV-cache implementation, token-reduction-spec §1.2):

    x = layers[0, K-1)(embeds)            full sequence, cache slots 0..T-1
    y = layers[K-1](x)                    full sequence; its cached keys + x give the score rows
    keep = pruner.select_rows(...)            per row: every real text token + the chosen visual ones
    y' = y[keep], re-left-padded          positions: the ORIGINAL ids of the kept tokens (gaps)
    layers[K, L)(y')                      cache slots 0..T'-1 of those layers only

so layers < K hold T keys and layers >= K hold T' keys; ``segments`` records (layers, filled length,
key mask) and every decode step writes slot length + step of each segment, at RoPE position
T_original + step (one position counter for all layers: decode continues at the unpruned length).
Pruning happens once; decode never re-ranks (FastV's README: "all subsequent decoding tokens uniformly
attend to the same set of image tokens").

Batches: rows keep different numbers of tokens; they are left-padded again to the longest and the
padding masked, so each row computes what it computes alone (tests/test_reduce_fastv.py).

With a ``DecodeSelector`` at layer L (DyCoke stage 2) the prefill is the plain one; each decode step
runs layers [0, L), asks the selector which keys layers >= L may read (a key mask), and runs [L, end).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.decoder import Decoder
from .stages import PruneReport, Reduction, VisualLayout


@dataclass
class Segment:
    layers: range
    length: int  # cache slots filled by the prefill
    key_mask: torch.Tensor | None  # (B, length) or None (no padding)


class ReducedRunner:
    """A ``generate.LayerRunner`` for the in-decoder stages of a ``Reduction``."""

    def __init__(self, reduction: Reduction, layout: VisualLayout) -> None:
        self.reduction = reduction
        self.layout = layout
        self.segments: list[Segment] = []
        self.report = PruneReport()
        self._visual_slots: torch.Tensor | None = None  # (B, T) visual mask of the prompt's cache slots

    # ---- prefill ------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, model: Decoder, embeds: torch.Tensor, position_ids: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = embeds.shape
        L = len(model.layers)
        layout = self.layout.to(embeds.device)
        real = torch.ones(B, T, dtype=torch.bool, device=embeds.device) if key_mask is None else key_mask
        slots = torch.arange(T, device=embeds.device)
        pruner = self.reduction.pruner
        visual = layout.visual & real
        self.report = PruneReport(method=", ".join(self.reduction.names()),
                                  visual_before=visual.sum(1).tolist())
        if pruner is None:
            x = model.forward_layers(embeds, position_ids, range(L), input_pos=slots, key_mask=key_mask)
            self.segments = [Segment(range(L), T, key_mask)]
            self._visual_slots = visual
            self.report.visual_after = self.report.visual_before
            self.report.kept_positions = [position_ids[b][visual[b]].tolist() for b in range(B)]
            return model.head(x[:, -1:])[:, -1]
        if hasattr(pruner, "prefill"):  # a pruner that runs the layers itself (FrameFusion: merges at every layer)
            logits, self.segments, alive = pruner.prefill(model, embeds, position_ids, key_mask, layout)
            kept_visual = [visual[b][alive[b]] for b in range(B)]
            self.report.visual_after = [int(v.sum()) for v in kept_visual]
            self.report.kept_positions = [position_ids[b][alive[b]][kept_visual[b]].tolist() for b in range(B)]
            return logits
        K = pruner.layer
        x_in = model.forward_layers(embeds, position_ids, range(K - 1), input_pos=slots, key_mask=key_mask)
        x_out = model.forward_layers(x_in, position_ids, range(K - 1, K), input_pos=slots, key_mask=key_mask)
        keep = pruner.select_rows(model, x_in, x_out, position_ids, key_mask, layout)  # per row: sorted indices
        x2, pos2, mask2 = _gather_left_padded(x_out, position_ids, keep)
        T2 = x2.shape[1]
        km2 = None if bool(mask2.all()) else mask2
        y = model.forward_layers(x2, pos2, range(K, L), input_pos=torch.arange(T2, device=x2.device), key_mask=km2)
        self.segments = [Segment(range(K), T, key_mask), Segment(range(K, L), T2, km2)]
        kept_visual = [visual[b][keep[b]] for b in range(B)]
        self.report.layer = K
        self.report.visual_after = [int(v.sum()) for v in kept_visual]
        self.report.kept_positions = [position_ids[b][keep[b]][kept_visual[b]].tolist() for b in range(B)]
        return model.head(y[:, -1:])[:, -1]

    # ---- decode -------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, model: Decoder, token: torch.Tensor, step: int, position_ids: torch.Tensor) -> torch.Tensor:
        x = model.embed_tokens(token[:, None])  # (B, 1, C)
        selector = self.reduction.decode
        for seg in self.segments:
            input_pos = torch.tensor([seg.length + step], device=x.device)
            km = _grow(seg.key_mask, step + 1)
            if selector is None or selector.layer not in seg.layers:
                x = model.forward_layers(x, position_ids, seg.layers, input_pos=input_pos, key_mask=km)
                continue
            Ls = selector.layer
            x = model.forward_layers(x, position_ids, range(seg.layers.start, Ls - 1), input_pos=input_pos, key_mask=km)
            x_in = x
            x = model.forward_layers(x, position_ids, range(Ls - 1, Ls), input_pos=input_pos, key_mask=km)
            kv_len = seg.length + step + 1
            full = km if km is not None else torch.ones(x.shape[0], kv_len, dtype=torch.bool, device=x.device)
            visual = torch.zeros_like(full)
            visual[:, :seg.length] = self._visual_slots
            visible = selector.visible(model, x_in, position_ids, full, visual, step)
            x = model.forward_layers(x, position_ids, range(Ls, seg.layers.stop), input_pos=input_pos,
                                     key_mask=visible)
        return model.head(x)[:, -1]


def _grow(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The prefill key mask extended by ``n`` real (generated) tokens."""
    if mask is None:
        return None
    return torch.cat([mask, mask.new_ones(mask.shape[0], n)], dim=1)


def _gather_left_padded(x: torch.Tensor, position_ids: torch.Tensor,
                        keep: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``keep[b]`` of x (B, T, C) and their positions, left-padded to the longest: (B, T', C), (B, T'),
    and the (B, T') mask of real rows."""
    B, _, C = x.shape
    T2 = max(len(k) for k in keep)
    out = x.new_zeros(B, T2, C)
    pos = position_ids.new_zeros(B, T2)
    mask = torch.zeros(B, T2, dtype=torch.bool, device=x.device)
    for b, k in enumerate(keep):
        n = len(k)
        out[b, T2 - n:] = x[b, k]
        pos[b, T2 - n:] = position_ids[b, k]
        mask[b, T2 - n:] = True
    return out, pos, mask
