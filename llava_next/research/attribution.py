"""Gradient attribution: input x gradient and integrated gradients, onto pixels and onto visual tokens.

    inputs = Inputs(ids, images=[im], videos=[clip.pixel_values])         # one request, batch 1
    target = Target(answer=3)                    # f = log p(the last 3 tokens of ids | what precedes them)
    a = input_x_gradient(model, inputs, target, space="tokens")            # a.scores (T,): one per position
    a = integrated_gradients(model, inputs, target, space="pixels", baseline="black", steps=32)
    a.scores                                     # (T,) per visual token: the pixels each token's patch reads
    a.pixels[0]                                  # (tiles | frames, H, W) per-pixel attribution of medium 0
    prov.to_pixels(a.scores, media=0)            # on the original image (research/provenance.py)

What it follows: Simonyan et al. / Shrikumar et al. (input x gradient) and Sundararajan et al. 2017 (integrated
gradients), with Captum's conventions: the attribution of an input element is ``(x - x0) * mean_k grad f(x0 +
a_k (x - x0))`` over the path points a_k, and ``delta = sum(attributions) - (f(x) - f(x0))`` says how far the
path integral is from complete (Captum's convergence delta).

Choices
- The target ``f`` is a log-probability (``Target``): of the last ``answer`` tokens of the sequence given what
  precedes them (teacher forcing: the whole answer, summed), or of one chosen ``token`` predicted after the
  whole sequence; neither given, the model's top-1 next token. Its ``queries`` are the positions whose logits
  it reads (the rows attention rollout and relevancy read, research/relevancy.py).
- One differentiable forward (``logits``): the visual features as ``LlavaNextModel.image_features`` /
  ``video_features`` compute them, then the decoder through the training engine (model/training.py: no KV
  cache, every block differentiable; no checkpointing). The inference fast path is not touched.
- ``space="pixels"``: the gradient of f with respect to every image's tiles (base first) and every video's frames
  (normalised pixel values, as the tower reads them); ``pixels[m]`` (N, H, W) sums the three channels. The
  per-position ``scores`` sum each token's pixels: per tile the (patch x patch) squares, through the model's own
  packing (``pack_image_features``: unpadding, newlines get 0) or pooling (``pool_frames``, times the patches per
  pooled cell, so a frame's token scores sum to its pixels' total for average pooling). Baselines: ``black``
  (RGB 0 after normalisation) or ``zeros`` (0 in normalised pixel space, the dataset mean colour).
- ``space="tokens"``: the gradient with respect to the decoder's input embeddings (``mm.hook_merged``); a
  position's score sums its channels. Integrated gradients interpolate the visual rows only, from ``zeros``
  (text rows stay as they are), so text positions score 0 and ``sum(scores) + delta == f(x) - f(x0)``.
- Integration rules: ``riemann`` (midpoints a_k = (k + 1/2) / n, k < n: n gradients) or ``trapezoid``
  (a_k = k / n, k <= n, end points weighted 1/2: n + 1 gradients). The error of either falls as 1/n^2 for a
  smooth path; ``delta`` reports it.
- Cost: one forward and backward per gradient (integrated gradients: n or n + 1, one at a time), plus two
  gradient-free forwards for f(x) and f(x0); memory is a training step's (activations of one forward).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from ..inputs.image import stats_for
from ..model import policy
from ..model.anyres import ImageInput, pack_image_features
from ..model.pooling import add_video_newlines, pool_frames, pooled_grid_hw
from ..model.training import TrainingEngine
from .attention import ResearchError

Space = Literal["pixels", "tokens"]
Baseline = Literal["black", "zeros"]
Rule = Literal["riemann", "trapezoid"]
RGB_BLACK = 0.0


@dataclass(frozen=True)
class Target:
    """f = log p(the last ``answer`` tokens | prefix), or log p(``token`` | whole sequence) (module docstring)."""

    answer: int = 0
    token: int | None = None

    def __post_init__(self) -> None:
        if self.answer < 0 or (self.answer and self.token is not None):
            raise ResearchError(f"Target takes answer=N (the last N tokens of the sequence, N >= 1) or token=ID "
                                f"(one token predicted after it), not both; got answer={self.answer}, token={self.token}")

    def queries(self, T: int) -> torch.Tensor:
        """The positions whose logits f reads (B=1): the rows that predict the answer tokens, or the last."""
        if self.answer >= T:
            raise ResearchError(f"Target(answer={self.answer}) needs a prompt before the answer; the sequence has {T} tokens")
        return torch.arange(T - self.answer - 1, T - 1) if self.answer else torch.tensor([T - 1])

    def score(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """f from logits (1, T, V) of ids (1, T): a 0-dim tensor, float32 (float64 for a float64 model)."""
        logp = F.log_softmax(logits[0].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (T, V)
        if self.answer:
            q = self.queries(ids.shape[1]).to(logits.device)
            return logp[q, ids[0, q + 1].to(logits.device)].sum()
        if self.token is None:
            raise ResearchError("Target.token is unset: call resolve_target first (it picks the top-1 next token)")
        return logp[-1, self.token]

    def to_dict(self) -> dict:
        return {"answer_tokens": self.answer, "token": self.token, "f": "log-probability"}


@dataclass(frozen=True)
class Inputs:
    """One request (batch 1): ids (1, T) with expanded placeholders, its images and videos (F, 3, S, S)."""

    ids: torch.Tensor
    images: Sequence[ImageInput] = ()
    videos: Sequence[torch.Tensor] = ()

    def __post_init__(self) -> None:
        if self.ids.ndim != 2 or self.ids.shape[0] != 1:
            raise ResearchError(f"attribution takes one request: ids of shape (1, T), got {tuple(self.ids.shape)}")

    def with_pixels(self, pixels: Sequence[torch.Tensor]) -> "Inputs":
        """The same request with other pixel tensors (images' first, then videos', in this order)."""
        n = len(self.images)
        images = [dataclasses.replace(im, pixel_values=p) for im, p in zip(self.images, pixels[:n])]
        return Inputs(self.ids, images, list(pixels[n:]))

    @property
    def pixels(self) -> list[torch.Tensor]:
        return [im.pixel_values for im in self.images] + list(self.videos)


@dataclass
class Attribution:
    """What one method found; ``scores`` (T,) float64 per position (0 where the method gives nothing)."""

    method: str
    space: str
    target: Target
    scores: torch.Tensor
    f: float  # f(x)
    pixels: list[torch.Tensor] | None = None  # per medium (N, H, W), pixel space only
    baseline: str | None = None
    f_baseline: float | None = None
    delta: float | None = None  # sum(attributions) - (f(x) - f(x0)): integrated gradients' completeness error
    queries: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "space": self.space, "target": self.target.to_dict(), "f": self.f,
                "baseline": self.baseline, "f_baseline": self.f_baseline, "delta": self.delta,
                "queries": None if self.queries is None else self.queries.tolist(), "settings": self.settings,
                "scores": [float(v) for v in self.scores.tolist()]}


# ---- the differentiable forward ------------------------------------------------------------------
def embeddings(model, inputs: Inputs, *, recompute_tower: bool = False) -> torch.Tensor:
    """The decoder's input (1, T, D): text embeddings with the visual features spliced in, differentiable.
    ``recompute_tower`` (a gradient to a video's pixels): its frames go through the tower a few at a time and
    run again in the backward instead of keeping their activations (``LlavaNextModel.video_features``)."""
    batch = {"frame_batch": policy.RECOMPUTE_FRAME_BATCH, "recompute": True} if recompute_tower else {}
    return model.embed(inputs.ids, model.image_features(inputs.images),
                       [model.video_features(v, **batch) for v in inputs.videos])


def logits(model, embeds: torch.Tensor) -> torch.Tensor:
    """(1, T, D) decoder input -> (1, T, V) logits through the training engine (no cache, differentiable)."""
    return TrainingEngine(checkpointing=False).forward(model.language_model, embeds)


def resolve_target(model, inputs: Inputs, target: Target | None = None) -> Target:
    """``target``, or (None / neither answer nor token) the model's top-1 next token after the sequence. Any
    object with ``score(logits, ids) -> 0-dim tensor`` is a target too (a custom metric), used as it is."""
    target = target or Target()
    if not isinstance(target, Target) or target.answer or target.token is not None:
        return target
    with torch.no_grad():
        out = logits(model, embeddings(model, inputs))
    return Target(token=int(out[0, -1].argmax()))


def _visual_mask(model, ids: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    mask = ids[0] == cfg.image_token_id
    if cfg.video_token_id is not None:
        mask |= ids[0] == cfg.video_token_id
    return mask.to(model.device)  # (T,)


# ---- input x gradient and integrated gradients ------------------------------------------------------
def input_x_gradient(model, inputs: Inputs, target: Target | None = None, space: Space = "tokens") -> Attribution:
    """x * df/dx summed over channels, per position (``tokens``) or per pixel and per token (``pixels``)."""
    target = resolve_target(model, inputs, target)
    if space == "tokens":
        with torch.no_grad():
            e = embeddings(model, inputs)
        grad, f = _grad_at_embeddings(model, inputs, target, e)
        scores = (e.float() * grad.float()).sum(-1)[0]  # (T,)
        return Attribution("input_x_grad", space, target, scores.double().cpu(), f, queries=target.queries(e.shape[1]))
    _check_space(space)
    x = [p.detach() for p in inputs.pixels]
    grads, f = _grad_at_pixels(model, inputs, target, x)
    pixel_attr = [(xi.float() * g.float()).sum(1).cpu() for xi, g in zip(x, grads)]  # each (N, H, W)
    return Attribution("input_x_grad", space, target, pixels_to_positions(model, inputs, pixel_attr), f,
                       pixels=pixel_attr, queries=target.queries(inputs.ids.shape[1]))


def integrated_gradients(model, inputs: Inputs, target: Target | None = None, space: Space = "tokens", *,
                         baseline: Baseline = "zeros", steps: int = 32, rule: Rule = "riemann") -> Attribution:
    """(x - x0) * the path-averaged gradient from the baseline x0 to x (module docstring)."""
    _check_space(space)
    if steps < 1 or rule not in ("riemann", "trapezoid"):
        raise ResearchError(f"integrated gradients need steps >= 1 and rule 'riemann' or 'trapezoid'; got "
                            f"steps={steps}, rule={rule!r}")
    if space == "tokens" and baseline != "zeros":
        raise ResearchError(f"baseline {baseline!r} is a pixel baseline; in token space the baseline is 'zeros' "
                            f"(visual rows set to 0): use space='pixels' for 'black'")
    target = resolve_target(model, inputs, target)
    alphas, weights = path_points(steps, rule)
    settings = {"steps": steps, "rule": rule}
    if space == "tokens":
        with torch.no_grad():
            x = embeddings(model, inputs)
        x0 = x.masked_fill(_visual_mask(model, inputs.ids)[None, :, None], 0.0)
        total = torch.zeros_like(x, dtype=torch.float32)
        for a, w in zip(alphas, weights):
            total += w * _grad_at_embeddings(model, inputs, target, x0 + a * (x - x0))[0].float()
        scores = ((x - x0).float() * total).sum(-1)[0].double().cpu()  # (T,)
        f, f0 = (_f_at_embeddings(model, inputs, target, e) for e in (x, x0))
        return Attribution("integrated_gradients", space, target, scores, f, baseline=baseline, f_baseline=f0,
                           delta=float(scores.sum()) - (f - f0), queries=target.queries(x.shape[1]), settings=settings)
    x = [p.detach() for p in inputs.pixels]
    x0 = [pixel_baseline(model, p, baseline) for p in x]
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in x]
    for a, w in zip(alphas, weights):
        grads, _ = _grad_at_pixels(model, inputs, target, [b + a * (p - b) for p, b in zip(x, x0)])
        for t, g in zip(totals, grads):
            t += w * g.float()
    pixel_attr = [((p - b).float() * t).sum(1).cpu() for p, b, t in zip(x, x0, totals)]  # each (N, H, W)
    with torch.no_grad():
        f, f0 = (float(target.score(logits(model, embeddings(model, inputs.with_pixels(p))), inputs.ids))
                 for p in (x, x0))
    total_attr = sum(float(a.double().sum()) for a in pixel_attr)
    return Attribution("integrated_gradients", space, target, pixels_to_positions(model, inputs, pixel_attr), f,
                       pixels=pixel_attr, baseline=baseline, f_baseline=f0, delta=total_attr - (f - f0),
                       queries=target.queries(inputs.ids.shape[1]), settings=settings)


def path_points(steps: int, rule: Rule) -> tuple[list[float], list[float]]:
    """The path points a_k in [0, 1] and their weights (summing to 1) of a rule (module docstring)."""
    if rule == "riemann":
        return [(k + 0.5) / steps for k in range(steps)], [1.0 / steps] * steps
    weights = [1.0 / steps] * (steps + 1)
    weights[0] = weights[-1] = 0.5 / steps
    return [k / steps for k in range(steps + 1)], weights


def pixel_baseline(model, pixels: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """The baseline image in the tower's normalised pixel space: ``zeros``, or ``black`` = (0 - mean) / std."""
    if baseline == "zeros":
        return torch.zeros_like(pixels)
    if baseline != "black":
        raise ResearchError(f"pixel baseline must be 'black' or 'zeros', got {baseline!r}")
    mean, std = (torch.tensor(s, dtype=pixels.dtype, device=pixels.device)[:, None, None]
                 for s in stats_for(model.config))  # the tower's normalisation (inputs/image.py)
    return ((RGB_BLACK - mean) / std).expand_as(pixels).clone()  # (N, 3, H, W)


def _check_space(space: str) -> None:
    if space not in ("pixels", "tokens"):
        raise ResearchError(f"space must be 'pixels' (the tower's input) or 'tokens' (the decoder's input "
                            f"embeddings), got {space!r}")


def _grad_at_embeddings(model, inputs: Inputs, target: Target, e: torch.Tensor) -> tuple[torch.Tensor, float]:
    e = e.detach().requires_grad_(True)
    with torch.enable_grad():
        f = target.score(logits(model, e), inputs.ids)
        (grad,) = torch.autograd.grad(f, e)
    return grad, float(f.detach())


def _f_at_embeddings(model, inputs: Inputs, target: Target, e: torch.Tensor) -> float:
    with torch.no_grad():
        return float(target.score(logits(model, e), inputs.ids))


def _grad_at_pixels(model, inputs: Inputs, target: Target, pixels: Sequence[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], float]:
    leaves = [p.detach().to(model.device, model.dtype).requires_grad_(True) for p in pixels]
    with torch.enable_grad():
        f = target.score(logits(model, embeddings(model, inputs.with_pixels(leaves), recompute_tower=True)),
                         inputs.ids)
        grads = torch.autograd.grad(f, leaves)
    return list(grads), float(f.detach())


# ---- per-pixel attributions -> per-position scores --------------------------------------------------
def pixels_to_positions(model, inputs: Inputs, pixel_attr: Sequence[torch.Tensor]) -> torch.Tensor:
    """(T,) float64: each visual token's score = the sum of its patch's pixels (per pooled cell for video),
    placed in the token order the model's own packing makes; text positions 0."""
    side = model.config.vision.grid_size
    patch_sums = []
    for a in pixel_attr:  # (N, H, W) -> (N, side*side, 1): the sum over each patch's square
        p = a.shape[-1] // side
        cells = a[:, :side * p, :side * p].double().reshape(a.shape[0], side, p, side, p).sum((2, 4))
        patch_sums.append(cells.reshape(a.shape[0], side * side, 1))
    return patches_to_positions(model, inputs, patch_sums, pooled_sum=True)


def patches_to_positions(model, inputs: Inputs, patch_values: Sequence[torch.Tensor], *, pooled_sum: bool
                         ) -> torch.Tensor:
    """(T,) float64 from one value per tower patch (per medium (N, side*side, 1)), through the model's own
    packing (``pack_image_features``: unpadding, newlines get 0) or pooling (``pool_frames``; ``pooled_sum``:
    times the patches per pooled cell, so an average pool gives the cell's sum). Linear in the values."""
    cfg = model.config
    side = cfg.vision.grid_size
    per_media = []
    for im, s in zip(inputs.images, patch_values[:len(inputs.images)]):
        zero = torch.zeros(1, dtype=s.dtype)
        if im.grid == (0, 0):
            per_media.append(torch.cat([s[0], zero[None]]) if cfg.untiled_image_newline else s[0])
        else:
            per_media.append(pack_image_features(s, im.image_size, im.grid, zero, cfg.anyres_compat,
                                                 cfg.anyres_max_patches))
    for s in patch_values[len(inputs.images):]:
        pooled = pool_frames(s, (side, side), cfg.spatial_pool_stride, cfg.spatial_pool_mode)  # (F, h*w, 1)
        if pooled_sum:
            pooled = pooled * (side * side / pooled.shape[1])  # a mean over a cell's patches -> their sum (average)
        hw = pooled_grid_hw((side, side), cfg.spatial_pool_stride, cfg.spatial_pool_mode)
        per_media.append(add_video_newlines(pooled, hw, torch.zeros(1, dtype=s.dtype), cfg.video_newline))
    return _place(model, inputs.ids, per_media, len(inputs.images))


def positions_to_patches(model, inputs: Inputs, scores: torch.Tensor) -> list[torch.Tensor]:
    """Per medium (N, side*side) float64: the adjoint of ``patches_to_positions`` (the model's packing and
    pooling as it computes them, no sum scaling) applied to per-position ``scores`` (T,): a base or AnyRes
    grid token's value goes to its one patch, a pooled video token's is shared by the patches its pool reads
    (1/4 each for 2 x 2 average pooling), newlines and unpadded-away patches give and get nothing."""
    side = model.config.vision.grid_size
    leaves = [torch.zeros(p.shape[0], side * side, 1, dtype=torch.float64, requires_grad=True) for p in inputs.pixels]
    with torch.enable_grad():
        out = patches_to_positions(model, inputs, leaves, pooled_sum=False)  # (T,), linear in the leaves
        grads = torch.autograd.grad((out * scores.double().cpu()).sum(), leaves, allow_unused=True)
    return [torch.zeros(x.shape[:2], dtype=torch.float64) if g is None else g[..., 0] for x, g in zip(leaves, grads)]


def _place(model, ids: torch.Tensor, per_media: list[torch.Tensor], n_images: int) -> torch.Tensor:
    """Per-medium token values -> (T,) in sequence positions, spliced as ``LlavaNextModel.embed`` splices."""
    cfg = model.config
    out = torch.zeros(ids.shape[1], dtype=torch.float64)
    for token_id, values in ((cfg.image_token_id, per_media[:n_images]), (cfg.video_token_id, per_media[n_images:])):
        if not values:
            continue
        slots = (ids[0] == token_id).nonzero().flatten()
        flat = torch.cat([v.reshape(-1) for v in values])
        if len(flat) != len(slots):
            raise ResearchError(f"{len(slots)} placeholder positions but the media give {len(flat)} tokens")
        out[slots] = flat
    return out

