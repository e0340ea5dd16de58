"""The main job end to end: a checkpoint, a prompt, images and/or a video in; an answer streamed out.

    pipe = Pipeline.from_pretrained("llava-hf/LLaVA-NeXT-Video-7B-hf", dtype=torch.bfloat16)
    req = pipe.prepare("What happens in this video?", video="clip.mp4", frames=8)
    print(req.plan.summary())                       # the token plan, before any compute
    for piece in pipe.stream(req, max_new_tokens=64): print(piece, end="")

Steps, in order (each its own method, so a reader or a test can stop anywhere):
1. ``prepare``: media -> pixels (image.py AnyRes, video.py frames); prompt -> ids with one placeholder
   per medium (prompt.py); each placeholder expanded to its exact visual-token count (tokens.py — the
   same function the model's features obey); the RoPE context checked *before* running: a prompt
   that needs more positions than max_position_embeddings x factor is refused with the fix spelled
   out (or, with ``rope_scale="auto"``, the smallest linear factor that fits is chosen and reported).
2. ``embed``: the vision tower, pooling and projector; features spliced at the placeholders.
3. ``stream`` / ``generate``: the decoder with its static KV cache (generate.py), text decoded
   incrementally. Several prepared requests run as one left-padded batch (``generate_batch``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .config import LlavaNextConfig
from .generate import stream as stream_tokens
from .image import ImageInput, preprocess_image
from .model import LlavaNextModel
from .prompt import TemplateChoice, Tokenizer, build_input_ids, expand_placeholders, stop_token_ids
from .tokens import ContextPlan, RopeScale, check_context, image_tokens, plan_context, video_tokens
from .video import VideoClip, load_video

PathLike = str | os.PathLike


@dataclass
class Request:
    """One prepared prompt: expanded ids, preprocessed media and its token plan."""

    input_ids: list[int]  # placeholders expanded, one id per visual token
    images: list[ImageInput]
    videos: list[VideoClip]
    plan: ContextPlan
    image_token_counts: list[int]
    video_token_counts: list[int]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The token plan as plain data (for --json)."""
        return {
            "input_tokens": len(self.input_ids),
            "image_tokens": self.image_token_counts,
            "video_tokens": self.video_token_counts,
            "video_frames": [{"frame_indices": v.frame_indices, "timestamps": [round(t, 3) for t in v.timestamps]}
                             for v in self.videos],
            "context": self.plan.to_dict(),
        }


class Pipeline:
    def __init__(self, model: LlavaNextModel, tokenizer: Tokenizer) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    @property
    def config(self) -> LlavaNextConfig:
        return self.model.config

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_id_or_dir: PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", cache_dir: PathLike | None = None,
                        progress: bool = True) -> "Pipeline":
        """A converted llava-next directory, a llava-hf / original checkpoint directory (converted once,
        cached), or a hub id (downloaded, converted once, cached). Weights are mmapped, not copied."""
        from llava_next_weights.hub import resolve
        from llava_next_weights.load import load_into, read_config

        path = resolve(model_id_or_dir, cache_dir=cache_dir, progress=progress)
        config = read_config(path)
        preset = preset_for(model_id_or_dir)
        if preset is not None and config.template != preset.config.template:
            # a llava-hf config.json does not say which chat template the model was trained with (34B: chatml)
            config = dataclasses.replace(config, template=preset.config.template)
        with torch.device("meta"):
            model = LlavaNextModel(config)
        load_into(model, path, dtype=dtype, device=device)
        tokenizer_file = Path(path) / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json; copy the checkpoint's tokenizer.json there")
        return cls(model, Tokenizer.load(tokenizer_file))

    # ---- 1. prepare -------------------------------------------------------------------------------
    def prepare(self, prompt: str, images: Sequence[PathLike | object] = (), video: PathLike | None = None, *,
                frames: int = 8, template: TemplateChoice | None = None, rope_scale: RopeScale = "config",
                max_new_tokens: int = 0, system: str | None = None) -> Request:
        """Preprocess media, tokenize, expand placeholders and check the context (nothing runs yet)."""
        cfg = self.config
        t0 = time.perf_counter()
        image_inputs = [preprocess_image(im, cfg) for im in images]
        clips = [load_video(video, frames, size=cfg.tile_size)] if video is not None else []
        t1 = time.perf_counter()
        ids = build_input_ids(prompt, self.tokenizer, cfg, len(image_inputs), len(clips), template, system=system)
        image_counts = [image_tokens(im.image_size, cfg) for im in image_inputs]
        video_counts = [video_tokens(c.num_frames, cfg) for c in clips]
        ids = expand_placeholders(ids, cfg.image_token_id, cfg.video_token_id, image_counts, video_counts)
        visual = sum(image_counts) + sum(video_counts)
        plan = check_context(plan_context(len(ids) - visual, visual, cfg, rope_scale, new_tokens=max_new_tokens))
        return Request(ids, image_inputs, clips, plan, image_counts, video_counts,
                       {"preprocess_s": t1 - t0, "tokenize_s": time.perf_counter() - t1})

    # ---- 2. embed ---------------------------------------------------------------------------------
    def embed(self, requests: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (B, T, D) embeddings with the visual features spliced in, and the (B, T) mask."""
        model, pad = self.model, 0
        T = max(len(r.input_ids) for r in requests)
        ids = torch.full((len(requests), T), pad, dtype=torch.long)
        mask = torch.zeros(len(requests), T, dtype=torch.bool)
        for row, r in enumerate(requests):
            ids[row, T - len(r.input_ids):] = torch.tensor(r.input_ids)
            mask[row, T - len(r.input_ids):] = True
        images = [im for r in requests for im in r.images]
        videos = [v for r in requests for v in r.videos]
        embeds = model.embed(ids, model.image_features(images), [model.video_features(v.pixel_values) for v in videos])
        return embeds, mask.to(model.device)

    # ---- 3. generate ------------------------------------------------------------------------------
    def _rope_factor(self, requests: Sequence[Request]) -> float:
        factors = {r.plan.factor for r in requests}
        return max(factors)  # one decoder, one factor: the largest any request needs

    def stream_batch(self, requests: Sequence[Request], *, max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None,
                     template: TemplateChoice | None = None) -> Iterator[torch.Tensor]:
        """Yield (B,) token ids per step for a left-padded batch of prepared requests."""
        if not requests:
            raise ValueError("no requests to generate for")
        decoder = self.model.language_model
        t0 = time.perf_counter()
        embeds, mask = self.embed(requests)
        for r in requests:
            r.timings["encode_s"] = time.perf_counter() - t0
        stops = stop_token_ids(self.tokenizer, self.config.template if template is None else template)
        previous = decoder.rope_scaling_factor
        decoder.rope_scaling_factor = self._rope_factor(requests)
        try:
            yield from stream_tokens(decoder, input_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, seed=seed, eos_token_id=stops,
                                     pad_token_id=self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0)
        finally:
            decoder.rope_scaling_factor = previous

    def generate_batch(self, requests: Sequence[Request], **kwargs) -> list[list[int]]:
        """Generated ids per request (up to and including its stop token)."""
        steps = list(self.stream_batch(requests, **kwargs))
        stops = set(stop_token_ids(self.tokenizer, kwargs.get("template") or self.config.template))
        out = []
        for row in range(len(requests)):
            ids = []
            for step in steps:
                ids.append(int(step[row]))
                if ids[-1] in stops:
                    break
            out.append(ids)
        return out

    def stream(self, request: Request, **kwargs) -> Iterator[str]:
        """Text pieces of one request's answer as they are generated (stop tokens not shown)."""
        decoder = self.tokenizer.stream()
        request.tokens = []  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        first = None
        for step in self.stream_batch([request], **kwargs):
            if first is None:
                first = time.perf_counter()
            token = int(step[0])
            request.tokens.append(token)  # type: ignore[attr-defined]
            piece = decoder.step(token)
            if piece:
                yield piece
        tail = decoder.finish()
        if tail:
            yield tail
        end = time.perf_counter()
        n = len(request.tokens)  # type: ignore[attr-defined]
        request.timings.update({"first_token_s": (first or end) - t0, "total_s": end - t0,
                                "decode_tokens_per_s": (n - 1) / (end - first) if first and n > 1 else 0.0})

    def generate(self, request: Request, **kwargs) -> str:
        return "".join(self.stream(request, **kwargs))


def with_overrides(config: LlavaNextConfig, *, pool_stride: int | None = None) -> LlavaNextConfig:
    """The config with run-time video settings changed (the weights do not depend on them)."""
    changes = {}
    if pool_stride is not None:
        changes["spatial_pool_stride"] = pool_stride
    return dataclasses.replace(config, **changes) if changes else config


def preset_for(model_id: PathLike):
    """The preset whose hub id (llava-hf or original) is ``model_id``, or None."""
    from .config import PRESETS

    name = str(model_id)
    return next((p for p in PRESETS.values() if name in (p.hub_id, p.original_id)), None)
