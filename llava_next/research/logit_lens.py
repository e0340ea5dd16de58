"""Logit lens, streaming: the final norm and lm_head applied to chosen positions of each layer's residual.

    with trace(model, logit_lens=LogitLens(positions=video_tokens, top_k=5, targets=[answer_id])) as tr:
        model(ids, videos=[pixels])
    lens = tr.logit_lens[12]        # LensResult: ids (B, P, k), probs (B, P, k), target_logprobs (B, P, n)

What it follows: nostalgebraist's logit lens as TransformerLens computes it (``accumulated_resid`` +
``apply_ln_to_stack`` + unembed): logits_l = lm_head(norm(resid_post_l)), with the model's own final RMSNorm
(weight included) and lm_head; the last layer's lens is the model's logits. llava-interp and vl-interp
keep the full vocabulary for every position and layer (19.9 GB fp32 for a 32-frame video at 7B); this
keeps, per layer, only the top-k ids and probabilities and the log-probabilities of chosen target ids,
computing lm_head over ``chunk`` positions at a time (extra memory: chunk x vocab floats).

Layers: ``blocks.{i}.hook_resid_post`` for i in ``layers`` (None: all); ``embed=True`` adds layer -1, the
decoder input (for visual positions: the projector's output, as llava-interp's "layer 0" view).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from .attention import ResearchError
from .trace import Trace


@dataclass
class LensResult:
    positions: torch.Tensor  # (P,) absolute sequence positions
    ids: torch.Tensor  # (B, P, k) top-k token ids
    probs: torch.Tensor  # (B, P, k) their probabilities
    target_logprobs: torch.Tensor | None  # (B, P, n_targets) log-probabilities of the target ids


def lens_logits(decoder: Any, hidden: torch.Tensor) -> torch.Tensor:
    """norm + lm_head of a (B, P, C) residual, bypassing the hook points (fp32 result)."""
    norm = decoder.norm
    x32 = hidden.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)  # the model's RMSNorm, step by step
    return decoder.lm_head(norm.weight * x32.to(hidden.dtype)).float()


def lens(decoder: Any, hidden: torch.Tensor, top_k: int = 5, targets: torch.Tensor | None = None,
         chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, P, C) residual -> top-k ids (B, P, k), probs (B, P, k), target log-probs (B, P, n) or None."""
    ids, probs, tlp = [], [], []
    for h in hidden.split(chunk, dim=1):
        logp = torch.log_softmax(lens_logits(decoder, h), dim=-1)  # (B, c, V): dropped after this chunk
        v, i = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        ids.append(i)
        probs.append(v.exp())
        if targets is not None:
            tlp.append(logp[..., targets.to(logp.device)])
    return torch.cat(ids, 1), torch.cat(probs, 1), torch.cat(tlp, 1) if targets is not None else None


@dataclass(frozen=True)
class LogitLens:
    """A logit lens to run inside ``trace`` (module docstring). positions: as ``Attention.queries`` (one
    resolver, ``trace.resolve_selection``): None or "all" = every position of a call, "last" = each call's
    last position, absolute positions or a selector."""

    positions: Any = None
    layers: Sequence[int] | None = None
    top_k: int = 5
    targets: Sequence[int] | torch.Tensor | None = None
    embed: bool = False
    chunk: int = 64
    steps: Literal["all", "prefill"] = "all"
    device: str | torch.device | None = "cpu"

    def install(self, tr: Trace) -> None:
        if self.top_k < 1:
            raise ResearchError(f"LogitLens.top_k must be >= 1, got {self.top_k}")
        decoder = tr.decoder
        n = len(decoder.layers)
        layers = list(range(n)) if self.layers is None else [layer % n for layer in self.layers]
        positions = tr.resolve_selection(self.positions, "LogitLens.positions")
        targets = None if self.targets is None else torch.as_tensor(self.targets, dtype=torch.long).reshape(-1)
        points = [(layer, f"blocks.{layer}.hook_resid_post") for layer in layers]
        if self.embed:
            points.insert(0, (-1, "hook_embed"))
        for layer, name in points:
            tr.add_hook(name, self._hook(tr, decoder, layer, positions, targets))

    def _hook(self, tr: Trace, decoder: Any, layer: int, positions: torch.Tensor | None,
              targets: torch.Tensor | None):
        def fn(x: torch.Tensor, hook) -> None:
            step = tr.current
            if self.steps == "prefill" and len(tr.steps) > 1:
                return
            idx = torch.arange(x.shape[1]) if positions is None else tr.local(positions, step.offset, x.shape[1])
            if idx.numel() == 0:
                return
            with torch.no_grad():
                ids, probs, tlp = lens(decoder, x.detach().index_select(1, idx.to(x.device)), self.top_k, targets,
                                       self.chunk)
            place = (lambda t: t.to(self.device)) if self.device is not None else (lambda t: t)  # noqa: E731
            step.extra.setdefault("logit_lens", {})[layer] = LensResult(  # positions: original ones (a pruned
                tr.absolute(idx, step.offset, x.shape[1]), place(ids), place(probs),  # layer lists those it has)
                None if tlp is None else place(tlp))
        return fn
