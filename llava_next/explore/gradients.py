"""Gradient relevancy maps of one generated token, for the page's map switch (research/relevancy.py,
research/attribution.py: what ``llava-next trace --attribute METHOD`` runs).

    scores = token_map(model, answer, token=2, method="relevancy")   # (T,) float64 over every position

The target is the log-probability of generated token ``token`` given the prompt and the answer before it
(``Target(answer=1)`` on the sequence cut after that token), so its query is the position that produced the
token: the same row the attention view draws. Positions after the token score 0. One forward (rollout) or one
forward and backward (relevancy, input x gradient) of the float model the page loads for gradients
(models.py); the session caches each map per (answer, token, method).
"""

from __future__ import annotations

import torch

from .session import Answer, ExploreError

# the page's names -> the research functions' (cli/trace_attribute.py METHODS)
METHODS = {"relevancy": "relevancy", "input x gradient": "input_x_grad", "rollout": "rollout"}


def check(answer: Answer, method: str) -> None:
    """What a gradient map cannot do, said before any loading (the words of ``trace --attribute``'s checks)."""
    if method not in METHODS:
        raise ExploreError(f"map must be one of attention, {', '.join(METHODS)}; got {method!r}")
    if answer.result.reduction is not None:
        raise ExploreError(f"{method} runs the whole model: set frame selection and token reduction to none and ask "
                           f"again (attribution of a reduced model is not implemented)")
    if answer.question.adapter:
        raise ExploreError(f"{method} loads the float model without prepacking (a gradient must pass every layer) "
                           f"and takes no adapter: clear the adapter folder and ask again, or merge the adapter into "
                           f"a checkpoint first")


def token_map(model, answer: Answer, token: int, method: str) -> torch.Tensor:
    """(T,) float64: ``method``'s scores for generated token ``token`` over every position of the answer."""
    from ..research import Inputs, Target, input_x_gradient, relevancy, rollout

    check(answer, method)
    request, generated = answer.result.request, answer.result.generated
    ids = torch.tensor([request.input_ids + generated[:token + 1]])  # (1, P + token + 1)
    inputs = Inputs(ids, list(request.images), [c.pixel_values for c in request.videos])
    decoder = model.language_model
    previous, decoder.rope_scaling_factor = decoder.rope_scaling_factor, request.plan.factor
    try:
        if METHODS[method] == "input_x_grad":
            a = input_x_gradient(model, inputs, Target(answer=1), space="tokens")
        else:
            a = (rollout if METHODS[method] == "rollout" else relevancy)(model, inputs, Target(answer=1))
    finally:
        decoder.rope_scaling_factor = previous
    out = torch.zeros(len(answer.provenance), dtype=torch.float64)
    out[:ids.shape[1]] = a.scores
    return out
