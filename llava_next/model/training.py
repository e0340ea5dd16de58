"""The training engine and the loss: one differentiable forward of a whole sequence, no KV cache.

    logits = model(ids, images=..., videos=..., attention_mask=m, engine=TrainingEngine(checkpointing=True))
    loss = causal_lm_loss(logits, labels)           # labels (B, T): -100 where nothing is learned
    loss.backward()

``TrainingEngine`` runs the decoder's own pieces (``Decoder.begin``, ``run_layers``, ``head``: model/decoder.py)
like every engine (model/engines.py); what it adds is gradient checkpointing per block: with
``checkpointing`` each block's activations are dropped after its forward and recomputed in the backward
(``torch.utils.checkpoint``, non-reentrant), so a step holds one block's activations at a time plus the
residual stream between blocks. Attention is the facade's (SDPA on CPU and CUDA while a gradient is
needed: model/attention.py), every fast inference layer on the way has a backward to its input
(``PackedLinear``, the quantized linears: their weights are frozen), and the visual features are
differentiable (``LlavaNextModel.image_features`` / ``video_features``).

``causal_lm_loss`` is transformers' ``ForCausalLMLoss`` (loss/loss_utils.py): logits and labels shifted by one,
cross-entropy in float32 with ``ignore_index=-100``, averaged over the supervised tokens (or summed and divided
by ``num_items``, the supervised tokens of a whole accumulated batch, as its ``num_items_in_batch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .decoder import Decoder

IGNORE_INDEX = -100  # LLaVA's and transformers' label for "not learned" (prompt, images, padding)


class TrainingEngine:
    """Whole-sequence forwards for training (module docstring)."""

    def __init__(self, checkpointing: bool = False) -> None:
        self.checkpointing = checkpointing

    def forward(self, decoder: Decoder, embeds: torch.Tensor, position_ids: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) embeddings -> (B, T, V) logits, differentiable; no cache is written or read."""
        if key_mask is not None and bool(key_mask.all()):  # no padding: SDPA's causal kernel (it skips the
            key_mask = None  # upper triangle) instead of a masked one over all T x T, with the same result
        x, ctx = decoder.begin(None, embeds, position_ids, key_mask=key_mask, engine=self)
        try:
            for i in range(len(decoder.layers)):
                one = range(i, i + 1)
                if self.checkpointing and torch.is_grad_enabled():
                    x = checkpoint(decoder.run_layers, x, ctx, one, use_reentrant=False)
                else:
                    x = decoder.run_layers(x, ctx, one)
            return decoder.head(x)
        finally:
            decoder.running = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) at position t predict labels[:, t + 1]; -100 is ignored."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape (batch, tokens) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)  # (B, T): the next token
    loss = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum" if num_items is not None else "mean")
    return loss / num_items if num_items is not None else loss
