"""``Pipeline.session``: from a question and its media to a trace in one line, as nnsight's ``model.trace``.

    with pipe.session("What happens?", video="clip.mp4", frames=8) as s:   # prepared, provenance built
        s.generate(max_new_tokens=16)                                       # the answer (untraced)
        tr = s.trace(record=[Record("blocks.*.hook_resid_post", positions=sel.generated(), reduce="mean")],
                     attention=Attention(queries=sel.last_text(), segments="frame"))
    s.text, s.provenance, tr["blocks.3.hook_resid_post"], tr.attention[15].segment_rows

What it saves: ``pipe.prepare`` + ``Provenance.from_request`` with the question given once (the question
selector finds the prompt's text), the rope factor of the request's plan, the media features and the
forward. ``trace`` takes everything ``research.trace`` takes (records, attention, hooks, interventions,
logit lens) and runs ONE forward of the prompt plus the answer generated so far, with the provenance of that
whole sequence, so every selector resolves against what was generated: ``sel.generated()`` names the answer's
positions, and ``segments="frame"`` (any per-position field of the provenance by name) the frames. The
forward is the model's own (SDPA, prepacked linears), only what was asked is kept, and the hooks are gone when
``trace`` returns. A request with an in-decoder reduction (FastV, FrameFusion, DyCoke) is traced by
``Pipeline.trace`` / ``llava-next trace``, which replay the reduced engine.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..research import Provenance
from ..research.trace import Trace, trace
from .pipeline import Pipeline, Request


class SessionError(ValueError):
    """A session used out of order or on a request it cannot trace; the message says what to do."""


class Session:
    """One prepared request, its provenance, its answer once generated, and traced forwards of it."""

    def __init__(self, pipe: Pipeline, question: str, images: Iterable[Any] = (), video: Any = None, *,
                 template: str | None = None, **prepare: Any) -> None:
        self.pipe, self.question, self.template = pipe, question, template
        self.request: Request = pipe.prepare(question, list(images), video, template=template, **prepare)
        if self.request.reduction is not None and self.request.reduction.in_decoder:
            raise SessionError("a session traces the model's own forward; a request with an in-decoder reduction "
                               "(fastv, framefusion, dycoke) is traced by Pipeline.trace or llava-next trace")
        self.generated: list[int] = []
        self.text = ""
        self.logits: torch.Tensor | None = None  # (1, T, V) of the last traced forward
        self.provenance = Provenance.from_request(self.request, pipe.config, tokenizer=pipe.tokenizer,
                                                  question=question, template=template)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    @property
    def ids(self) -> torch.Tensor:
        """(1, T) the prompt and the answer so far."""
        return torch.tensor([self.request.input_ids + self.generated])

    def generate(self, max_new_tokens: int = 32, **sampling: Any) -> str:
        """The answer (greedy unless ``temperature`` > 0), untraced; the provenance grows by its positions."""
        if self.generated:
            raise SessionError("this session already generated its answer: open a new session for another one")
        self.text = self.pipe.generate(self.request, max_new_tokens=max_new_tokens, template=self.template,
                                       **sampling)
        self.generated = list(self.request.tokens)
        self.provenance = self.provenance.with_generated(self.generated)
        return self.text

    def trace(self, **instruments: Any) -> Trace:
        """One forward of ``ids`` under ``research.trace(**instruments)`` (its keywords: record, attention,
        hooks, interventions, logit_lens), resolved against this session's provenance; returns the Trace."""
        model, decoder = self.pipe.model, self.pipe.model.language_model
        previous, decoder.rope_scaling_factor = decoder.rope_scaling_factor, self.request.plan.factor
        try:
            with torch.no_grad(), trace(model, provenance=self.provenance, **instruments) as tr:
                self.logits = model(self.ids.to(model.device), images=self.request.images,
                                    videos=[c.pixel_values for c in self.request.videos])  # (1, T, V)
        finally:
            decoder.rope_scaling_factor = previous
        return tr
