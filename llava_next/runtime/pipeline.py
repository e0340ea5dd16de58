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
   With uniform sampling the plan is known from the frame count alone, so it is checked before a single
   frame is decoded (``--frames 100000`` fails at once), and again with what was decoded. Images and
   videos may be ``sample:NAME`` (inputs/samples.py), as on the command line.
2. ``embed``: the vision tower, pooling and projector; features spliced at the placeholders.
3. ``stream`` / ``generate``: the decoder with its static KV cache (generate.py), text decoded
   incrementally. Several prepared requests run as one left-padded batch (``generate_batch``).

Guards around the compute (docs/errors.md), none of which costs a measurable fraction of a step:
- Memory: before encoding, the KV cache the request will allocate (2 x layers x batch x KV heads x
  positions x head_dim x bytes) plus the prompt's activations is compared with the memory available
  (/proc/meminfo's MemAvailable on CPU, ``torch.cuda.mem_get_info`` on CUDA); a request that cannot
  fit is refused with the numbers (``MemoryBudgetError``). An allocation that fails anyway is turned
  into the same error.
- Numerics: the visual features and every step's (B, V) logits are checked with ``torch.isfinite``
  (a forward hook on the decoder). float16 overflows on some checkpoints (its range ends at 65504) and
  then produces inf/NaN; generation stops with ``NonFiniteError`` suggesting bfloat16 or float32,
  before a single garbage token is produced.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..config import LlavaNextConfig, TextConfig
from ..model.generate import stream as stream_tokens
from ..inputs.image import ImageInput, preprocess_image
from ..model.llava import LlavaNextModel
from ..model.int8_activations import Activations
from ..inputs.prompt import (IMAGE, VIDEO, TemplateChoice, Tokenizer, build_input_ids, expand_placeholders,
                             stop_token_ids)
from ..inputs.samples import resolve as resolve_sample
from ..inputs.tokens import (ContextOverflowError, ContextPlan, ImagePlan, RopeScale, Size, VideoPlan, check_context,
                             image_aspect, image_plan, plan_context, video_plan)
from ..inputs.scenes import SceneOptions
from ..inputs.video import Sampling, VideoClip, VideoError, estimate_total, frame_options, load_video
from .memory import memory_budget
from ..reduce.stages import Reduction, VisualLayout, native_video_layout

if TYPE_CHECKING:
    from .session import Session
    from .tracing import TraceResult

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
    notes: list[str] = field(default_factory=list)  # unusual but valid input, e.g. repeated frames
    image_plans: list[ImagePlan] = field(default_factory=list)  # every number behind each image's count
    video_plans: list[VideoPlan] = field(default_factory=list)  # ... and each video's
    frame_clips: list[VideoClip] = field(default_factory=list)  # videos sent as frames, one <image> each
    reduction: Reduction | None = None  # token reduction / frame selection (llava_next.reduce)
    unreduced_visual_tokens: int = 0  # what the same request costs without reduction
    reduction_report: dict = field(default_factory=dict)  # filled by the in-decoder stage at prefill
    tokens: list[int] = field(default_factory=list)  # the answer's token ids, filled by stream()
    prompt: str = ""  # the prompt text as given to prepare (what a trace's question selector finds)

    def to_dict(self) -> dict:
        """The token plan as plain data (for --json)."""
        return {
            "input_tokens": len(self.input_ids),
            "image_tokens": self.image_token_counts,
            "video_tokens": self.video_token_counts,
            "video_frames": [{"frame_indices": v.frame_indices, "timestamps": [round(t, 3) for t in v.timestamps],
                              **scene_cuts(v)} for v in self.videos + self.frame_clips],
            "context": self.plan.to_dict(),
            "notes": self.notes,
            **({"reduction": self.reduction_summary()} if self.reduction else {}),
        }

    def reduction_summary(self) -> dict:
        """Methods, visual tokens before (unreduced) and after each stage, kept positions (after prefill)."""
        into = sum(self.image_token_counts) + sum(self.video_token_counts)
        out = {"methods": self.reduction.names(), "visual_tokens_unreduced": self.unreduced_visual_tokens,
               "visual_tokens_into_decoder": into}
        out.update(self.reduction_report)
        return out


def scene_cuts(clip: VideoClip) -> dict:
    """A scene-sampled clip's cuts and their times, for --json ({} when the clip was not scene-sampled)."""
    if clip.cuts is None:
        return {}
    return {"scene_cuts": list(clip.cuts), "scene_cut_times": [round(t, 3) for t in clip.cut_times or ()]}


def _reduces_images(r: Request) -> bool:
    return r.reduction is not None and r.reduction.reducer is not None and "image" in r.reduction.reducer.media


class NonFiniteError(ValueError):
    """The model produced inf/NaN; the message says where and which dtype to use instead."""


class Pipeline:
    def __init__(self, model: LlavaNextModel, tokenizer: Tokenizer) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.progress = None  # a runtime.progress.Progress to report long work on stderr; None: silent
        # the decoder sizes this process computes with, for the memory check: config.text, or one rank's
        # share under tensor parallelism (llava_next.parallel.tensor_parallel.rank_text_config)
        self.budget_text_config: TextConfig | None = None

    def _say(self, stage: str, message: str) -> None:
        if self.progress is not None:
            self.progress.say(stage, message)

    @property
    def config(self) -> LlavaNextConfig:
        return self.model.config

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_id_or_dir: PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", cache_dir: PathLike | None = None,
                        progress: bool = True, quantize: str | None = None,
                        group_size: int = 128, adapter: PathLike | None = None,
                        activations: Activations = "float") -> "Pipeline":
        """A converted llava-next directory, a llava-hf / original checkpoint directory (converted once,
        cached), a hub id (downloaded, converted once, cached), or a built-in model ("tiny-random",
        "tiny-random-interleave", "tiny-random-onevision": runtime/tiny.py, random weights, no download). Weights are mmapped, not copied.
        ``quantize`` ("int8" / "int4" / "nf4"): the decoder's linears quantized once into the cache
        (llava_next/model/quant.py); a directory that is already quantized loads as such without it.
        ``adapter``: a LoRA adapter directory in PEFT's format (adapter_config.json + adapter_model.safetensors),
        merged into float weights, kept separate over quantized ones (docs/training.md).
        ``activations`` ("float" / "int8"): how int8 and int4 layers take their input (model/quant.py: "int8"
        quantizes each row to int8: int8 prompts and decode steps, int4 decode steps; faster, less exact).
        The steps are runtime/loading.py's, which the tensor-parallel loader shares."""
        from .loading import load

        return load(model_id_or_dir, dtype=dtype, device=device, cache_dir=cache_dir, progress=progress,
                    quantize=quantize, group_size=group_size, adapter=adapter, activations=activations,
                    pipeline_class=cls)

    # ---- 1. prepare -------------------------------------------------------------------------------
    def prepare(self, prompt: str, images: Sequence[PathLike | object] = (), video: PathLike | None = None, *,
                frames: int = 8, template: TemplateChoice | None = None, rope_scale: RopeScale = "config",
                max_new_tokens: int = 0, system: str | None = None,
                max_image_pixels: int | None = None, videos: Sequence[PathLike] = (),
                sampling: Sampling = "uniform", allow_overflow: bool = False,
                reduction: Reduction | None = None, scene: SceneOptions | None = None) -> Request:
        """Preprocess media, tokenize, expand placeholders and check the context (nothing runs yet).
        ``videos``: several videos (``video``, a path or a list, goes first); ``sampling``: "uniform", "fps" or
        "scene" (video.py; ``scene``: its cut detector's options, default PySceneDetect's).
        ``max_image_pixels``: refuse larger images (default 100 MP, 0 = no limit; see image.py).
        ``allow_overflow``: plan a prompt longer than the RoPE context instead of refusing it (``plan.fits``
        is then False: for studying that regime on purpose). ``reduction``: frame selection / token reduction
        (llava_next.reduce); its frame selector runs here."""
        cfg = self.config
        t0 = time.perf_counter()
        images = [resolve_sample(im) for im in images]  # "sample:cat", as on the command line
        aspect = image_aspect(cfg, len(images))  # OneVision pads each of several images to one tile
        image_inputs = [preprocess_image(im, cfg, max_pixels=max_image_pixels, aspect=aspect) for im in images]
        user_images = [(im.image_size, im.grid) for im in image_inputs]
        if reduction:
            reduction.check(cfg)
        if image_inputs:
            self._say("images", f"{len(image_inputs)} image(s) -> {sum(1 + im.num_tiles for im in image_inputs)} "
                                f"tiles (base + AnyRes) in {time.perf_counter() - t0:.2f} s")
        frames = 8 if frames is None else frames
        first = list(video) if isinstance(video, (list, tuple)) else [video] if video is not None else []
        paths = [resolve_sample(v) for v in first + list(videos)]
        plan_args = dict(frames=frames, template=template, system=system, rope_scale=rope_scale,
                         max_new_tokens=max_new_tokens, reduction=reduction)
        fixed = sampling in ("uniform", "scene")  # exactly ``frames`` frames per video, known before decoding
        if paths and not allow_overflow and fixed and not (reduction and reduction.select_frames):
            self._check_frames_fit(prompt, paths, user_images, aspect, plan_args)
        clips = []
        for v in paths:
            tv = time.perf_counter()
            clips.append(self._load_clip(v, frames, sampling, reduction, scene or SceneOptions()))
            self._say("frames", f"{os.fspath(v)}: decoded {clips[-1].total_frames} frames, kept {clips[-1].num_frames} "
                                f"in {time.perf_counter() - tv:.2f} s")
        frame_clips, notes = [], []
        if clips and cfg.video_as_images:  # LLaVA-NeXT-Interleave: a video is its frames, one <image> each
            frame_clips, clips = clips, []
            image_inputs, notes = image_inputs + self._frames_as_images(frame_clips), [
                f"{clip.path}: sent as its {clip.num_frames} frames, one <image> each (this checkpoint "
                f"reads videos as interleaved images)" for clip in frame_clips]
        t1 = time.perf_counter()
        ids, image_plans, video_plans, image_counts, video_counts, unreduced, plan = self._token_plan(
            prompt, user_images, aspect, [(c.size_hw, c.num_frames) for c in frame_clips], [c.num_frames for c in clips],
            **plan_args)
        if not allow_overflow:
            check_context(plan)
        return Request(ids, image_inputs, clips, plan, image_counts, video_counts,
                       {"preprocess_s": t1 - t0, "tokenize_s": time.perf_counter() - t1},
                       notes + [note for c in clips + frame_clips for note in c.notes()], image_plans, video_plans,
                       frame_clips, reduction or None, unreduced, prompt=prompt)

    def _check_frames_fit(self, prompt: str, paths: list, user_images: list, aspect: str, plan_args: dict) -> None:
        """Uniform and scene sampling keep exactly ``frames`` frames of every video (repeating frames of a shorter
        one), so the plan is known before decoding: a frame count the context cannot hold fails here, cheaply."""
        frames, tile = plan_args["frames"], (self.config.tile_size,) * 2
        as_images = [(tile, frames)] * len(paths) if self.config.video_as_images else []
        planned = self._token_plan(prompt, user_images, aspect, as_images, [] if as_images else [frames] * len(paths),
                                   **plan_args)[-1]
        try:
            check_context(planned)
        except ContextOverflowError as e:
            raise ContextOverflowError(f"{e}{_shorter_videos(paths, frames)}") from None

    def _frames_as_images(self, clips: list) -> list[ImageInput]:
        """Each frame of each clip as one single-tile image (checkpoints that read videos as images)."""
        tile = (self.config.tile_size,) * 2
        return [ImageInput(clip.pixel_values[i:i + 1], clip.size_hw, tile, (0, 0))
                for clip in clips for i in range(clip.num_frames)]

    def _token_plan(self, prompt: str, images: list[tuple[Size, Size]], aspect: str,
                    frames_as_images: list[tuple[Size, int]], videos: list[int], *, frames: int,
                    template: TemplateChoice | None, system: str | None, rope_scale: RopeScale, max_new_tokens: int,
                    reduction: Reduction | None):
        """The expanded ids and every count of a prompt with these media, from sizes and frame counts alone (so
        ``prepare`` checks the plan before decoding a frame, and again with what was decoded).

        ``images``: the user's images, (height, width) and tile grid each, planned with ``aspect``;
        ``frames_as_images``: (frame size, frames) of each video sent as its frames (Interleave), every frame
        one untiled "resize" image after the user's; ``videos``: the frame count of each pooled video.
        Returns (ids, image plans, video plans, image counts, video counts, unreduced visual tokens, context)."""
        cfg = self.config
        specs = [(hw, grid, aspect) for hw, grid in images]  # each image keeps its own aspect plan
        for hw, n in frames_as_images:
            specs += [(hw, (0, 0), "resize")] * n
            prompt = prompt.replace(VIDEO, IMAGE * n, 1)  # the k-th <video>, if written
        ids = build_input_ids(prompt, self.tokenizer, cfg, len(specs), len(videos), template, system=system)
        image_plans = [image_plan(hw, cfg, a) for hw, _, a in specs]
        video_plans = [video_plan(n, cfg) for n in videos]
        image_counts = [p.total for p in image_plans]
        reducer = reduction.reducer if reduction else None
        unreduced = sum(image_counts)
        if reducer is not None and specs:  # each image on its own (a video-only reducer refuses images)
            reducer.check_media(len(specs), frames_as_images=bool(frames_as_images))
            image_counts = [reducer.num_image_tokens(grid, cfg) for _, grid, _ in specs]
        video_counts = [reducer.num_tokens(n, cfg) if reducer else p.total for n, p in zip(videos, video_plans)]
        selector = reduction.select_frames if reduction else None
        unreduced += sum(video_plan(frames, cfg).total if selector else p.total for p in video_plans)
        ids = expand_placeholders(ids, cfg.image_token_id, cfg.video_token_id, image_counts, video_counts)
        visual = sum(image_counts) + sum(video_counts)
        from_videos = sum(video_counts) + sum(image_counts[len(images):])  # pooled videos, or their frames as images
        plan = plan_context(len(ids) - visual, visual, cfg, rope_scale, new_tokens=max_new_tokens,
                            video_tokens=from_videos)
        return ids, image_plans, video_plans, image_counts, video_counts, unreduced, plan

    def _load_clip(self, video: PathLike, frames: int, sampling: Sampling, reduction: Reduction | None,
                   scene: SceneOptions) -> VideoClip:
        """``frames`` sampled frames, or a frame selector's pick (among its candidates, or its own rule)."""
        options = frame_options(self.config)
        selector = reduction.select_frames if reduction else None
        if selector is None:
            return load_video(video, frames, sampling=sampling, scene=scene, **options)
        own_rule = selector.video_sampling()
        if own_rule is not None:  # e.g. scene cuts: the selector samples the whole video itself
            return load_video(video, selector.budget(frames), **own_rule, **options)
        total, fps = estimate_total(os.fspath(video))
        candidates = load_video(video, selector.candidate_count(frames, total, fps), **options)
        keep = selector.select(candidates.pixel_values, self.model, frames)
        return dataclasses.replace(candidates, pixel_values=candidates.pixel_values[keep],
                                   frames=candidates.frames[keep],
                                   frame_indices=[candidates.frame_indices[i] for i in keep],
                                   timestamps=[candidates.timestamps[i] for i in keep])

    # ---- 2. embed ---------------------------------------------------------------------------------
    def embed(self, requests: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (B, T, D) embeddings with the visual features spliced in, and the (B, T) mask."""
        return self.embed_with_layout(requests)[:2]

    @torch.no_grad()  # inference: the visual features build no graph
    def embed_with_layout(self, requests: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor, VisualLayout]:
        """``embed`` plus the batch's VisualLayout (which positions are visual, their frame and patch);
        a request's token reducer replaces the model's own video pooling."""
        model, pad = self.model, 0
        T = max(len(r.input_ids) for r in requests)
        ids = torch.full((len(requests), T), pad, dtype=torch.long)
        mask = torch.zeros(len(requests), T, dtype=torch.bool)
        for row, r in enumerate(requests):
            ids[row, T - len(r.input_ids):] = torch.tensor(r.input_ids)
            mask[row, T - len(r.input_ids):] = True
        images = [im for r in requests for im in r.images]
        videos = [v for r in requests for v in r.videos]
        total = sum(1 + im.num_tiles for im in images) + sum(v.num_frames for v in videos)
        done, t0 = [0], time.perf_counter()

        def count(module, args, output) -> None:  # one call per batch of frames / tiles
            done[0] += args[0].shape[0]
            self.progress.update("vision tower", f"{done[0]}/{total} frames+tiles, {time.perf_counter() - t0:.1f} s",
                                 final=done[0] >= total)

        hook = model.vision_tower.register_forward_hook(count) if self.progress is not None and total else None
        try:
            plain = iter(model.image_features([im for r in requests if not _reduces_images(r) for im in r.images]))
            image_feats, image_layouts = [], []
            for r in requests:  # a token reducer for images reduces each image of its request on its own
                for im in r.images:
                    if _reduces_images(r):
                        red = r.reduction.reducer.reduce_image(model, im)  # type: ignore[union-attr]
                        image_feats.append(red.tokens)
                        image_layouts.append((red.tile, red.patch))
                    else:
                        image_feats.append(next(plain))
                        image_layouts.append((torch.full((len(image_feats[-1]),), -1),) * 2)
            video_feats, video_layouts = [], []
            for r in requests:
                reducer = r.reduction.reducer if r.reduction else None
                for v in r.videos:
                    if reducer is None:
                        video_feats.append(model.video_features(v.pixel_values))
                        video_layouts.append(native_video_layout(v.num_frames, self.config))
                    else:
                        out = reducer.reduce_video(model, v.pixel_values)
                        video_feats.append(out.tokens)
                        video_layouts.append((out.frame, out.patch))
        finally:
            if hook is not None:
                hook.remove()
        for kind, feats in (("image", image_feats), ("video", video_feats)):
            for i, f in enumerate(feats):
                _check_finite(f, f"the visual features of {kind} {i}")
        layout = VisualLayout.build(ids, self.config, video_layouts, image_layouts)
        return model.embed(ids, image_feats, video_feats), mask.to(model.device), layout

    # ---- 3. generate ------------------------------------------------------------------------------
    def _rope_factor(self, requests: Sequence[Request]) -> float:
        factors = {r.plan.factor for r in requests}
        return max(factors)  # one decoder, one factor: the largest any request needs

    def stream_batch(self, requests: Sequence[Request], *, max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None,
                     template: TemplateChoice | None = None, compile_step: bool | None = None) -> Iterator[torch.Tensor]:
        """Yield (B,) token ids per step for a left-padded batch of prepared requests."""
        if not requests:
            raise ValueError("no requests to generate for")
        if not max_new_tokens >= 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        decoder = self.model.language_model
        budget = memory_budget(self.budget_text_config or self.config.text, len(requests),
                               max(len(r.input_ids) for r in requests),
                               max_new_tokens, self.model.dtype, self.model.device, decoder,
                               videos=any(r.videos or r.frame_clips for r in requests))
        budget.check()
        stops = stop_token_ids(self.tokenizer, self.config.template if template is None else template)
        in_decoder = _in_decoder_reduction(requests)
        previous = decoder.rope_scaling_factor
        try:
            t0 = time.perf_counter()
            embeds, mask, layout = self.embed_with_layout(requests)
            for r in requests:
                r.timings["encode_s"] = time.perf_counter() - t0
            decoder.rope_scaling_factor = self._rope_factor(requests)
            engine = None  # model/engines.py chooses (eager or the compiled decode)
            if in_decoder is not None:  # token pruning / merging in the decoder: the reduced engine
                from ..reduce.engine import ReducedEngine

                engine = ReducedEngine(in_decoder, layout)
            tokens = stream_tokens(decoder, input_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed, eos_token_id=stops,
                                   pad_token_id=self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0,
                                   compile_step=compile_step, engine=engine, on_logits=_check_logits)
            for step, token in enumerate(tokens):
                if step == 0:
                    t_first = time.perf_counter()
                    for row, r in enumerate(requests):
                        r.timings["prefill_s"] = t_first - t0 - r.timings["encode_s"]
                        if engine is not None:
                            r.reduction_report = pruning_report(engine.report, row)
                yield token
        except (torch.OutOfMemoryError, MemoryError) as e:
            raise budget.error(f"the allocation failed: {_first_line(e)}") from None
        except RuntimeError as e:  # the CPU allocator says so in a RuntimeError
            if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
                raise
            raise budget.error(f"the allocation failed: {_first_line(e)}") from None
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
        request.tokens = []
        t0 = time.perf_counter()
        first = None
        for step in self.stream_batch([request], **kwargs):
            if first is None:
                first = time.perf_counter()
                self._say("prefill", f"{len(request.input_ids)} positions, first token after {first - t0:.2f} s "
                                     f"(vision tower and prefill)")
            elif self.progress is not None:
                n = len(request.tokens) + 1
                self.progress.update("decoding", f"{n} tokens, {(n - 1) / (time.perf_counter() - first):.1f} tokens/s")
            token = int(step[0])
            request.tokens.append(token)
            piece = decoder.step(token)
            if piece:
                yield piece
        tail = decoder.finish()
        if tail:
            yield tail
        end = time.perf_counter()
        n = len(request.tokens)
        if self.progress is not None and first is not None and n > 1:
            self.progress.update("decoding", f"{n} tokens, {(n - 1) / (end - first):.1f} tokens/s", final=True)
        request.timings.update({"first_token_s": (first or end) - t0, "total_s": end - t0,
                                "decode_tokens_per_s": (n - 1) / (end - first) if first and n > 1 else 0.0})

    def generate(self, request: Request, **kwargs) -> str:
        return "".join(self.stream(request, **kwargs))

    # ---- 4. trace (research) ----------------------------------------------------------------------
    def trace(self, request: Request, **kwargs) -> "TraceResult":
        """``request`` run under the research instruments (token provenance, exact attention rows of chosen
        query groups, logit lens; a reduced model's prefill and decode replayed), the numbers returned as a
        ``TraceResult``: runtime/tracing.py's ``trace_request``, which says what the arguments are."""
        from .tracing import trace_request

        return trace_request(self, request, **kwargs)

    def session(self, question: str, images: Sequence[PathLike | object] = (), video: PathLike | None = None,
                **prepare) -> "Session":
        """``with pipe.session(question, video=...) as s:``: the request prepared and its provenance built, then
        ``s.generate(...)`` and ``s.trace(record=..., attention=...)``: runtime/session.py."""
        from .session import Session

        return Session(self, question, images, video, **prepare)


def _in_decoder_reduction(requests: Sequence[Request]) -> Reduction | None:
    """The batch's one in-decoder reduction (prefill pruner, decode selector), or None."""
    in_decoder = {(r.reduction.pruner, r.reduction.decode) if r.reduction else (None, None) for r in requests}
    if len(in_decoder) > 1:
        raise ValueError("the requests of one batch must use the same in-decoder reduction (prefill pruner / "
                         "decode selector): run them in separate batches")
    pruner, selector = in_decoder.pop()
    return None if pruner is None and selector is None else Reduction(pruner=pruner, decode=selector)


def _check_logits(logits: torch.Tensor, step: int) -> None:
    """``stream``'s ``on_logits``: the (B, V) logits of every step are finite, whatever the engine."""
    where = "the prompt (prefill)" if step == 0 else f"generated token {step}"
    _check_finite(logits, f"the logits of {where}")


def _check_finite(t: torch.Tensor, what: str) -> None:
    if bool(torch.isfinite(t).all()):
        return
    if t.dtype == torch.float16:
        cause = ("float16 overflowed: its largest value is 65504 and this checkpoint's activations go past "
                 "it. Run in bfloat16 (--dtype bf16, dtype=torch.bfloat16: same memory, float32's range) or "
                 "float32 (--dtype fp32)")
    else:
        cause = (f"in {str(t.dtype).removeprefix('torch.')} this means the weights or the inputs hold inf/NaN, "
                 f"or activations overflow; check the checkpoint's tensors (torch.isfinite), or try --dtype fp32")
    raise NonFiniteError(f"{what} are not finite (inf/NaN), so generation stopped before producing garbage: {cause}")


def _shorter_videos(paths: Sequence[PathLike], frames: int) -> str:
    """'; clip.mp4 has only 12 frames ...' for each video shorter than ``frames`` (read from its index, no
    decoding), to append to a context error: more frames than a video has only repeat its frames."""
    out = ""
    for path in paths:
        try:
            total, _ = estimate_total(os.fspath(path))
        except VideoError:  # a bad file: loading it says why
            continue
        if 0 < total < frames:
            out += f"; {os.fspath(path)} has only {total} frames (uniform sampling repeats frames past that)"
    return out


def pruning_report(report, row: int) -> dict:
    """What an in-decoder reduction's prefill pruned in one row of the batch (a ``ReducedRunner``'s report):
    ``Request.reduction_report``, as a run and a trace report it."""
    return {"pruned_at_layer": report.layer, "visual_tokens_after_pruning": report.visual_after[row],
            "kept_positions": report.kept_positions[row]}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# ----------------------------------------------------------------------------------------------------
# Memory budget
# ----------------------------------------------------------------------------------------------------
def with_overrides(config: LlavaNextConfig, *, pool_stride: int | None = None, pool_mode: str | None = None,
                   newline: str | None = None, pool_position: str | None = None,
                   anyres_compat: str | None = None) -> LlavaNextConfig:
    """The config with run-time token-plan switches changed (the weights do not depend on them); None keeps
    the checkpoint's value. Each is a divergence switch of ``LlavaNextConfig`` (validated there)."""
    changes = {name: value for name, value in (("spatial_pool_stride", pool_stride), ("spatial_pool_mode", pool_mode),
                                               ("video_newline", newline), ("pool_position", pool_position),
                                               ("anyres_compat", anyres_compat)) if value is not None}
    return dataclasses.replace(config, **changes) if changes else config

