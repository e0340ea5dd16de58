"""What one decoder call hands down its blocks: positions, the cache view, the key mask, the row map and
the attention function. Every engine (eager, compiled, reduced, tensor-parallel) runs the same blocks with
one of these; nothing else changes what a block does.

    ctx = decoder.context(x, position_ids, input_pos=slots, key_mask=mask)   # built by the decoder
    x = block(x, ctx)                                                        # every layer, every engine

Fields
- ``cos``, ``sin`` (B, 1, T, D): RoPE of the call's rows, shared by all layers.
- ``input_pos`` (T,): the cache slots the rows are written to (None: no cache, the rows attend to each other);
  ``kv_len``: how many cache slots the attention reads, [0, kv_len).
- ``mask`` (B, 1, 1, kv_len) bool or None: False for keys that are padding (or that an engine hides).
- ``rows``: where the rows and keys came from when an engine runs the layers on a pruned or merged
  sequence (``SequenceMap``, original positions); None when the rows are slots ``input_pos``.
- ``kernel(q, k, v, mask)``: the engine's attention kernel (default: the facade, model/attention.py; the
  compiled CPU decode passes its one-query kernel: model/engines.py).
- ``instrument(layer, q, k, v, ctx)``: research's attention instrument (``Decoder.instrument``): it returns
  the attention output (usually ``ctx.kernel``'s) and records statistics or applies knockouts on the way.
- ``engine``: the engine running the call (research reads a reduced engine's ``fates`` from it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Instrument = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, "LayerContext"], torch.Tensor]


@dataclass(frozen=True)
class SequenceMap:
    """Where the rows of a decoder call on a pruned or merged sequence came from (llava_next.reduce passes
    it in the layer context; llava_next.research reads it to report in original positions).

    rows (B, Tq) and keys (B, Tk): the original sequence position of each row of the call's hidden states
    and of each key its attention reads (the layer's KV cache slots), -1 for padding; ``length``: how many
    positions the unreduced model's keys span in this call (the prompt length at prefill, + step + 1 in
    decode). Hook tensors of the call have Tq rows; ``hook_rot_k`` etc. still have Tq rows (the new keys)."""

    rows: torch.Tensor
    keys: torch.Tensor
    length: int


@dataclass(frozen=True)
class LayerContext:
    cos: torch.Tensor
    sin: torch.Tensor
    input_pos: torch.Tensor | None
    kv_len: int
    mask: torch.Tensor | None
    kernel: Kernel
    rows: SequenceMap | None = None
    instrument: Instrument | None = None
    engine: Any = None

    @property
    def offset(self) -> int:
        """The cache slot of the call's first row (0 without a cache)."""
        return 0 if self.input_pos is None else int(self.input_pos[0])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of ``layer``'s post-RoPE q (B, Hq, T, D) over the keys/values it reads (B, Hkv, kv_len, D)."""
        if self.instrument is not None:
            return self.instrument(layer, q, k, v, self)
        return self.kernel(q, k, v, self.mask)

    def with_rows(self, rows: SequenceMap | None) -> "LayerContext":
        """The same call with another row map (FrameFusion: the MLP half sees the merged rows)."""
        return replace(self, rows=rows)
