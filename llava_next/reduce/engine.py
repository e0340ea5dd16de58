"""Prefill and decode through the decoder layer range by layer range, pruning tokens in between.

    engine = ReducedEngine(reduction, layout)                   # layout: VisualLayout of the padded batch
    tokens = generate(decoder, input_embeds=e, attention_mask=m, max_new_tokens=32, engine=engine)
    engine.report                                               # visual tokens before/after, kept positions
    engine.fates                                                # what happened to every original position
    logits = model(ids, videos=[v], engine=engine)              # one forward (B, T, V), original positions

Prefill with a ``PrefillPruner`` at layer K (FastV's KV-cache implementation: pkunlp-icler/FastV, README
"Support KV Cache"):

    x = layers[0, K-1)(embeds)            full sequence, cache slots 0..T-1
    y = layers[K-1](x)                    full sequence; its cached keys + x give the score rows
    keep = pruner.select_rows(...)            per row: every real text token + the chosen visual ones
    y' = y[keep], re-left-padded          positions: the ORIGINAL ids of the kept tokens (gaps)
    layers[K, L)(y')                      cache slots 0..T'-1 of those layers only

so layers < K hold T keys and layers >= K hold T' keys; ``segments`` records (layers, filled length,
key mask, original position of every slot) and every decode step writes slot length + step of each
segment, at RoPE position T_original + step (one position counter for all layers: decode continues at
the unpruned length). Pruning happens once; decode never re-ranks (FastV's README: "all subsequent
decoding tokens uniformly attend to the same set of image tokens").

This engine owns its loop over the decoder's pieces: ``Decoder.begin`` (embedding, ``hook_embed``, the
call's context naming this engine), layer ranges through ``Decoder.forward_layers`` with a row map in their
context (``LayerContext.rows``: the original position of every row and key, so a trace reports a pruned
layer in original positions), and ``Decoder.head``. The prefill's last hidden states are put back at their
original positions (NaN rows for the positions that did not reach the last layer), so the final norm,
head and logits are in original positions.

Batches: rows keep different numbers of tokens; they are left-padded again to the longest and the
padding masked, so each row computes what it computes alone (tests/test_reduce_fastv.py).

With a ``DecodeSelector`` at layer L (DyCoke stage 2) each decode step runs layers up to L-1, asks the
selector which of layer L-1's cached visual keys layers >= L may read (top fraction by the new query's
attention), and runs the rest with the others masked. Combined with a prefill pruner the rule is the same
in original positions: candidates are the visual keys still in layer L-1's cache (what survived pruning
there), and a layer >= L reads a visual key iff it is in that layer's cache and was selected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.context import Kernel, SequenceMap
from ..model.decoder import Decoder
from ..model.engines import grow
from .stages import PruneReport, Reduction, VisualLayout


@dataclass
class Segment:
    layers: range
    length: int  # cache slots filled by the prefill
    key_mask: torch.Tensor | None  # (B, length) or None (no padding)
    positions: torch.Tensor | None = None  # (B, length) original position of each slot (-1: padding); None: 0..T-1


@dataclass
class Fates:
    """What the in-decoder stages did to every ORIGINAL position of the (B, T) prompt (-1 = not applicable).

    removed_at (B, T): the first decoder layer whose attention no longer has the position (-1: every layer
        has it). FastV: K. FrameFusion: 0 for a merge before layer 0, l + 1 for a merge or prune after layer
        l's attention (layer l's MLP already lacks it).
    merged_into (B, T): FrameFusion: the original position the token was averaged into (an anchor can be
        merged later too: follow the chain); -1 when dropped outright or kept.
    decode_layer: DyCoke's L (layers >= L read the selected keys) or None.
    decode_read: per decode step s, (B, T + s + 1) bool: the positions layers >= L could read at that step
        (before intersecting with what each layer's cache holds); None for a step that read everything.
    """

    removed_at: torch.Tensor
    merged_into: torch.Tensor
    num_layers: int
    decode_layer: int | None = None
    decode_read: list = field(default_factory=list)

    @classmethod
    def unreduced(cls, B: int, T: int, num_layers: int, device=None) -> "Fates":
        return cls(torch.full((B, T), -1, dtype=torch.long, device=device),
                   torch.full((B, T), -1, dtype=torch.long, device=device), num_layers)

    def alive(self, layer: int) -> torch.Tensor:
        """(B, T) bool: the positions in ``layer``'s attention (as keys and queries)."""
        return (self.removed_at < 0) | (self.removed_at > layer)


class ReducedEngine:
    """An engine (model/engines.py ``Engine``) for the in-decoder stages of a ``Reduction``."""

    def __init__(self, reduction: Reduction, layout: VisualLayout) -> None:
        self.reduction = reduction
        self.layout = layout
        self.segments: list[Segment] = []
        self.report = PruneReport()
        self.fates: Fates | None = None
        self.prompt_len = 0
        self._key_mask: torch.Tensor | None = None  # (B, T) of the prompt
        self._visual: torch.Tensor | None = None  # (B, T) visual & real
        self._deferred: tuple | None = None  # (max_len, dtype, device) of caches allocated after pruning

    # ---- memory: the layers after a pruner hold only the kept tokens -----------------------------------
    def setup_caches(self, model: Decoder, batch: int, prompt_len: int, max_new_tokens: int, dtype: torch.dtype,
                     device: torch.device) -> None:
        """With a pruner at layer K (FastV), layers < K get caches of prompt + answer slots now; layers >= K get
        theirs in the prefill, once the pruner has chosen: T' + max_new_tokens slots, so pruning saves KV
        memory, not only compute. (FrameFusion merges at every layer and DyCoke keeps every key: their caches
        are allocated at full length.)"""
        max_len = prompt_len + max_new_tokens
        pruner, L = self.reduction.pruner, len(model.layers)
        K = pruner.layer if pruner is not None and not hasattr(pruner, "prefill") else L
        model.setup_caches(batch, max_len, dtype, device, layers=range(K))
        for layer in model.layers[K:]:
            layer.self_attn.kv_cache = None  # a longer cache of an earlier request would pin its memory
        self._deferred = (max_len, dtype, device) if K < L else None

    # ---- the engine: whole calls of the decoder -----------------------------------------------------------
    @torch.no_grad()
    def prefill(self, model: Decoder, embeds: torch.Tensor, position_ids: torch.Tensor,
                key_mask: torch.Tensor | None, last_only: bool = True) -> torch.Tensor:
        """(B, T, C) prompt embeddings -> (B, V) logits of the last position (``last_only=False``: (B, T, V) in
        original positions), the cache filled."""
        T = embeds.shape[1]
        x, _ = model.begin(None, embeds, position_ids, input_pos=torch.arange(T, device=embeds.device),
                           key_mask=key_mask, engine=self)
        try:
            logits = model.head(self._prefill(model, x, position_ids, key_mask), last_only)
        finally:
            model.running = None
        return logits[:, -1] if last_only else logits

    @torch.no_grad()
    def decode(self, model: Decoder, token: torch.Tensor, step: int, position_ids: torch.Tensor,
               kernel: Kernel | None = None) -> torch.Tensor:
        """(B,) token of decode step ``step`` at RoPE positions (B, 1) -> (B, V) logits."""
        if not self.segments:
            raise RuntimeError("a reduced engine decodes after its prefill: call prefill first")
        slot = torch.tensor([self.prompt_len + step], device=token.device)
        x, _ = model.begin(token[:, None], None, position_ids, input_pos=slot,
                           key_mask=grow(self._key_mask, step + 1), kernel=kernel, engine=self)
        try:
            return model.head(self._decode(model, x, step, position_ids, kernel))[:, -1]
        finally:
            model.running = None

    @torch.no_grad()
    def forward(self, model: Decoder, embeds: torch.Tensor, position_ids: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One reduced forward of a (B, T, C) prompt -> (B, T, V) logits in original positions (NaN at the
        positions pruned before the last layer); ``LlavaNextModel.forward(..., engine=...)`` calls this."""
        B, T, _ = embeds.shape
        self.setup_caches(model, B, T, 0, embeds.dtype, embeds.device)
        if position_ids is None:
            position_ids = torch.arange(T, device=embeds.device).expand(B, T)
        return self.prefill(model, embeds, position_ids, key_mask, last_only=False)

    # ---- prefill ------------------------------------------------------------------------------------
    def _prefill(self, model: Decoder, embeds: torch.Tensor, position_ids: torch.Tensor,
                 key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = embeds.shape
        L = len(model.layers)
        layout = self.layout.to(embeds.device)
        if layout.visual.shape != (B, T):
            raise ValueError(f"the engine's VisualLayout covers {tuple(layout.visual.shape)} positions, the prompt "
                             f"is {(B, T)}")
        real = torch.ones(B, T, dtype=torch.bool, device=embeds.device) if key_mask is None else key_mask
        slots = torch.arange(T, device=embeds.device)
        pruner = self.reduction.pruner
        visual = layout.visual & real
        self.prompt_len, self._key_mask, self._visual = T, key_mask, visual
        self.fates = Fates.unreduced(B, T, L, embeds.device)
        if self.reduction.decode is not None:
            self.fates.decode_layer = self.reduction.decode.layer
        self.report = PruneReport(method=", ".join(self.reduction.names()),
                                  visual_before=visual.sum(1).tolist())
        if pruner is None:
            x = model.forward_layers(embeds, position_ids, range(L), input_pos=slots, key_mask=key_mask)
            self.segments = [Segment(range(L), T, key_mask)]
            self.report.visual_after = self.report.visual_before
            self.report.kept_positions = [position_ids[b][visual[b]].tolist() for b in range(B)]
            return x
        if hasattr(pruner, "prefill"):  # a pruner that runs the layers itself (FrameFusion: merges at every layer)
            x, self.segments, alive = pruner.prefill(model, embeds, position_ids, key_mask, layout, self.fates)
            kept_visual = [visual[b][alive[b]] for b in range(B)]
            self.report.visual_after = [int(v.sum()) for v in kept_visual]
            self.report.kept_positions = [position_ids[b][alive[b]][kept_visual[b]].tolist() for b in range(B)]
            return _to_original(x, _slot_positions(alive, x.shape[1]), T)
        K = pruner.layer
        x_in = model.forward_layers(embeds, position_ids, range(K - 1), input_pos=slots, key_mask=key_mask)
        x_out = model.forward_layers(x_in, position_ids, range(K - 1, K), input_pos=slots, key_mask=key_mask)
        keep = pruner.select_rows(model, x_in, x_out, position_ids, key_mask, layout)  # per row: sorted indices
        x2, pos2, mask2 = _gather_left_padded(x_out, position_ids, keep)
        where = _slot_positions(keep, x2.shape[1])  # (B, T') original position of every row (-1: padding)
        T2 = x2.shape[1]
        km2 = None if bool(mask2.all()) else mask2
        if self._deferred is not None:  # setup_caches left layers >= K for now: T2 prompt + the decode slots
            max_len, dtype, device = self._deferred
            model.setup_caches(B, T2 + max_len - T, dtype, device, layers=range(K, L))
            self._deferred = None
        y = model.forward_layers(x2, pos2, range(K, L), input_pos=torch.arange(T2, device=x2.device), key_mask=km2,
                                 rows=SequenceMap(where, where, T))
        self.segments = [Segment(range(K), T, key_mask), Segment(range(K, L), T2, km2, where)]
        for b in range(B):
            gone = real[b].clone()
            gone[keep[b]] = False
            self.fates.removed_at[b, gone] = K
        kept_visual = [visual[b][keep[b]] for b in range(B)]
        self.report.layer = K
        self.report.visual_after = [int(v.sum()) for v in kept_visual]
        self.report.kept_positions = [position_ids[b][keep[b]][kept_visual[b]].tolist() for b in range(B)]
        return _to_original(y, where, T)

    # ---- decode -------------------------------------------------------------------------------------
    def _decode(self, model: Decoder, x: torch.Tensor, step: int, position_ids: torch.Tensor,
                kernel: Kernel | None) -> torch.Tensor:
        B = x.shape[0]
        T = self.prompt_len
        selector = self.reduction.decode
        Ls = selector.layer if selector is not None else None
        new_pos = torch.full((B, 1), T + step, dtype=torch.long, device=x.device)
        read = None  # (B, T + step + 1) bool over original positions, once the selector has chosen
        for seg in self.segments:
            slot = torch.tensor([seg.length + step], device=x.device)
            km = grow(seg.key_mask, step + 1)
            keys = self._key_positions(seg, step, B, x.device)
            smap = None if seg.positions is None else SequenceMap(new_pos, keys, T + step + 1)
            start = seg.layers.start
            if Ls is not None and start < Ls <= seg.layers.stop:  # layer L-1 is here: run up to it, then choose
                x_in = model.forward_layers(x, position_ids, range(start, Ls - 1), input_pos=slot, key_mask=km,
                                            rows=smap, kernel=kernel)
                x = model.forward_layers(x_in, position_ids, range(Ls - 1, Ls), input_pos=slot, key_mask=km,
                                         rows=smap, kernel=kernel)
                read = self._select(model, x_in, position_ids, km, keys, step)
                start = Ls
            if start >= seg.layers.stop:
                continue
            if read is not None and start >= Ls:  # layers >= L: only the selected visual keys of this cache
                full = km if km is not None else torch.ones(B, keys.shape[1], dtype=torch.bool, device=x.device)
                km = full & read.gather(1, keys.clamp(min=0))
            x = model.forward_layers(x, position_ids, range(start, seg.layers.stop), input_pos=slot, key_mask=km,
                                     rows=smap, kernel=kernel)
        if selector is not None:
            self.fates.decode_read.append(read)
        return x

    def _key_positions(self, seg: Segment, step: int, B: int, device) -> torch.Tensor:
        """(B, length + step + 1) original position of each cache slot of a segment at this decode step."""
        prompt = seg.positions if seg.positions is not None else \
            torch.arange(seg.length, device=device).expand(B, -1)
        generated = torch.arange(self.prompt_len, self.prompt_len + step + 1, device=device).expand(B, -1)
        return torch.cat([prompt, generated], 1)

    def _select(self, model: Decoder, x_in: torch.Tensor, position_ids: torch.Tensor, km: torch.Tensor | None,
                keys: torch.Tensor, step: int) -> torch.Tensor | None:
        """The selector's choice among layer L-1's visual keys -> (B, T + step + 1) bool over original
        positions (True: may be read), or None when this step reads everything."""
        B, kv_len = keys.shape
        full = km if km is not None else torch.ones(B, kv_len, dtype=torch.bool, device=x_in.device)
        slot_visual = self._visual.gather(1, keys.clamp(min=0).clamp(max=self.prompt_len - 1)) & \
            (keys >= 0) & (keys < self.prompt_len)
        visible = self.reduction.decode.visible(model, x_in, position_ids, full, slot_visual, step)
        if bool((visible == full).all()):
            return None
        read = torch.ones(B, self.prompt_len + step + 1, dtype=torch.bool, device=x_in.device)
        read[:, :self.prompt_len] = ~self._visual  # visual positions: only the chosen ones
        chosen = visible & slot_visual
        for b in range(B):
            read[b, keys[b][chosen[b]]] = True
        return read


def _slot_positions(keep: list[torch.Tensor], T2: int) -> torch.Tensor:
    """Per row, the kept original indices left-padded with -1 to T2: (B, T2)."""
    out = torch.full((len(keep), T2), -1, dtype=torch.long, device=keep[0].device)
    for b, k in enumerate(keep):
        out[b, T2 - len(k):] = k
    return out


def _to_original(x: torch.Tensor, where: torch.Tensor, T: int) -> torch.Tensor:
    """Rows (B, T', C) at original positions ``where`` (B, T') -> (B, T, C) in original positions, NaN where a
    position did not reach the last layer (so the final norm, head and their hooks stay in original positions;
    the last position, a text token, is always there)."""
    B, _, C = x.shape
    out = x.new_full((B, T + 1, C), float("nan"))
    idx = torch.where(where >= 0, where, T)  # padding rows -> a scratch row
    out.scatter_(1, idx[..., None].expand(-1, -1, C), x)
    return out[:, :T]


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
