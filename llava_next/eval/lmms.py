"""This project's model as an lmms-eval backend: ``python -m lmms_eval --model llava_next_reimpl``.

    pip install -e ".[lmms-eval]"        # registers the entry point below
    python -m lmms_eval --model llava_next_reimpl \\
        --model_args pretrained=llava-hf/LLaVA-NeXT-Video-7B-hf,frames=16,reduce=fastv:layer=2:keep=0.5 \\
        --tasks videomme --limit 10 --log_samples --output_path runs/

How lmms-eval finds it: lmms-eval 0.7 builds its model registry (``lmms_eval/models/__init__.py``,
``ModelRegistryV2.load_entrypoint_manifests``) from the Python entry-point group ``lmms_eval.models`` as
well as its own list; pyproject.toml declares ``llava_next_reimpl = "llava_next.eval.lmms:manifest"`` there,
so no file of lmms-eval is patched. This is the only module that imports lmms_eval, and only lmms-eval
imports this module (``--model llava_next_reimpl``).

``--model_args`` (comma-separated ``key=value``, as every lmms-eval model):

- ``pretrained``: a preset name, hub id, checkpoint folder or ``tiny-random`` (``Pipeline.from_pretrained``);
- ``frames`` (8), ``sampling`` ("uniform" | "fps"), ``dtype`` (bf16 | fp16 | fp32), ``device`` (cpu | cuda;
  under ``accelerate launch`` / torchrun each rank takes ``cuda:LOCAL_RANK``; also lmms-eval's ``--device``),
  ``adapter``, ``cache_dir``, ``template``, ``system``, ``max_image_pixels``, ``rope_scale``;
- the batch size is lmms-eval's own ``--batch_size N`` (default 1; ``auto`` takes ``--max_batch_size`` or 4);
- ``reduce``: a reduction as ``llava-next eval --reduce`` takes it, with ``:`` between the knobs (a comma
  would end the model argument): ``fastv:layer=2:keep=0.5`` is ``--reduce fastv:layer=2,keep=0.5``; several
  methods joined by ``+``; ``select_frames`` likewise (``--select-frames``).

Requests (``lmms_eval/api/model.py``): each ``Instance.args`` is ``(context, gen_kwargs or continuation,
doc_to_visual, doc_id, task, split)``; the visuals are ``doc_to_visual(doc)``: video paths (a path whose
suffix is a video container's, or a folder of frame images: MVBench's episodic_reasoning), image paths or PIL
images, in order. The context is the user's turn; the
checkpoint's chat template wraps it, media placeholders first unless the context holds ``<image>`` /
``<video>`` placeholders itself (``inputs/prompt.py``), as lmms-eval's llava wrappers do.

- ``generate_until``: greedy decoding (``do_sample`` true or a temperature above 0 is refused, with why),
  ``max_new_tokens`` from the task's ``generation_kwargs`` (else 1024, lmms-eval's llava default), the text cut at
  the first of ``until``; the same code as ``llava-next eval``'s generated answers (run.py
  ``generate_answers``), ``batch_size`` requests per batch.
- ``loglikelihood``: score.py's teacher-forced log-probability of the continuation (tokenized after the
  rendered context, lm-evaluation-harness's ``_encode_pair``); the requests of one (doc, context) — a
  multiple-choice question's options — share one prefill. What comes back is ``(-logprob, is_greedy)``: the
  *negative* summed log-probability. lmms-eval's ``multiple_choice`` scoring (``lmms_eval/api/task.py``
  ``process_results``) picks ``argmin`` of the values, because its llava wrappers return the answer turn's
  mean cross-entropy (a loss); handing it the summed negative log-likelihood makes its ``acc`` lm-eval's
  ``acc`` (the most likely option) and its ``acc_norm`` lm-eval's ``acc_norm`` (per character), and keeps
  the numbers comparable to ``llava-next eval``'s ``scores`` (``logprob`` there is minus this). An
  in-decoder reduction (fastv) cannot score (score.py's ``ScoreError``).
  Each pair is handed back inside lmms-eval's ``GenerationResult`` (``text=(-logprob, is_greedy)``): lmms-eval
  0.7.3's evaluator passes every model output through ``unwrap_generation_output``
  (``lmms_eval/api/instance.py``), which turns a bare ``(float, bool)`` tuple into its ``str``, and its
  ``multiple_choice`` scoring then fails to unpack the string (every simple model's tuples do); a
  ``GenerationResult``'s ``text`` passes through untouched. Both request types report token counts there
  (input tokens with the visual tokens expanded; generated or continuation tokens).
- ``generate_until_multi_round`` is not supported (NotImplementedError saying so).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from ..reduce import parse_reduction
from ..runtime.pipeline import Pipeline
from .run import decode_answer, generate_answers
from .score import ScoreItem, score

MODEL_ID = "llava_next_reimpl"
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".flv", ".m4v", ".mpg", ".mpeg", ".wmv", ".gif"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def manifest():
    """The entry point's payload (group ``lmms_eval.models``): the model id and this module's class
    (``lmms_eval.models`` is imported here, not above: it loads the entry points when first imported)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LlavaNextReimpl")


class LmmsArgumentError(ValueError):
    """A ``--model_args`` value this backend cannot use; the message says what to write."""


def reduction_spec(value: str | None) -> list[str]:
    """``fastv:layer=2:keep=0.5+visionzip:...`` -> ``["fastv:layer=2,keep=0.5", "visionzip:..."]``."""
    if not value:
        return []
    specs = []
    for method in str(value).split("+"):
        name, _, knobs = method.strip().partition(":")
        specs.append(f"{name}:{knobs.replace(':', ',')}" if knobs else name)
    return specs


@dataclass
class Visuals:
    images: list
    videos: list[str]


def split_visuals(visual) -> Visuals:
    """lmms-eval's ``doc_to_visual(doc)`` output as images (paths or PIL images) and video paths."""
    items = [] if visual is None else visual if isinstance(visual, (list, tuple)) else [visual]
    images, videos = [], []
    for v in items:
        if isinstance(v, (str, os.PathLike)):
            is_video = Path(v).suffix.lower() in VIDEO_SUFFIXES or os.path.isdir(v)  # a folder: frame images
            (videos if is_video else images).append(os.fspath(v))
        elif hasattr(v, "convert") and hasattr(v, "size"):  # a PIL image
            images.append(v)
        else:
            raise LmmsArgumentError(f"{MODEL_ID}: doc_to_visual gave a {type(v).__name__}; this backend takes video "
                                    f"paths, image paths and PIL images (no audio)")
    return Visuals(images, videos)


class LlavaNextReimpl(lmms):
    """lmms-eval's ``lmms`` over this project's ``Pipeline`` (module docstring)."""

    def __init__(self, pretrained: str = "tiny-random", frames: int = 8, reduce: str | None = None,
                 select_frames: str | None = None, dtype: str = "bf16", device: str = "cpu",
                 batch_size: int | str = 1, max_batch_size: int | None = None,
                 adapter: str | None = None, cache_dir: str | None = None, template: str | None = None,
                 system: str | None = None, max_image_pixels: int | None = None, sampling: str = "uniform",
                 rope_scale: object = "config", **unknown) -> None:
        super().__init__()
        if unknown:
            raise LmmsArgumentError(f"{MODEL_ID}: unknown model_args {', '.join(sorted(unknown))}; see "
                                    f"docs/evaluation.md (lmms-eval backend) for the arguments")
        if dtype not in DTYPES:
            raise LmmsArgumentError(f"{MODEL_ID}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        from ..config import PRESETS

        if str(device).startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self._device = torch.device(device)
        specs = reduction_spec(reduce)
        self.reduction = parse_reduction(select_frames and reduction_spec(select_frames)[0], specs) \
            if specs or select_frames else None
        model_id = PRESETS[pretrained].hub_id if pretrained in PRESETS else str(pretrained)
        self.pipe = Pipeline.from_pretrained(model_id, dtype=DTYPES[dtype], device=device, cache_dir=cache_dir,
                                             progress=False, adapter=adapter)
        self.frames = int(frames)
        self.batch_size = (int(max_batch_size or 4)) if str(batch_size).startswith("auto") else int(batch_size)
        self.template, self.system = template, system
        self.plan = dict(max_image_pixels=max_image_pixels, sampling=sampling, rope_scale=rope_scale)

    @property
    def device(self) -> torch.device:
        return self._device

    def _visuals(self, request: Instance) -> Visuals:
        doc_to_visual, doc_id, task, split = request.args[2:6]
        return split_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))

    # ---- generate_until --------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        out: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # one generation setting per batch
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for rows in groups.values():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                for i, text in zip(chunk, self._generate([requests[i] for i in chunk])):
                    out[i] = text
        return out

    def _generate(self, requests: list[Instance]) -> list[GenerationResult]:
        kwargs = dict(requests[0].args[1])
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
            raise LmmsArgumentError(f"{MODEL_ID} decodes greedily; the task asks for sampling (do_sample="
                                    f"{kwargs.get('do_sample')}, temperature={kwargs.get('temperature')}): set "
                                    f"do_sample: false and temperature: 0 in its generation_kwargs")
        max_new = int(kwargs.get("max_new_tokens") or 1024)
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else until
        prepared = []
        for r in requests:
            v = self._visuals(r)
            prepared.append(self.pipe.prepare(r.args[0], images=v.images, videos=v.videos, frames=self.frames,
                                              template=self.template, system=self.system, max_new_tokens=max_new,
                                              reduction=self.reduction, **self.plan))
        texts = []
        for request, tokens in zip(prepared, generate_answers(self.pipe, prepared, max_new, self.template)):
            text = decode_answer(self.pipe, tokens, self.template)
            for stop in filter(None, until):
                text = text.split(stop)[0]
            texts.append(GenerationResult(text, TokenCounts(len(request.input_ids), len(tokens))))
        return texts

    # ---- loglikelihood ---------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(-logprob, is_greedy) per request, wrapped (module docstring); the continuations of one (doc, context)
        share a prefill."""
        prompts: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            prompts.setdefault((r.args[4], r.args[5], r.args[3], r.args[0]), []).append(i)
        items = []
        for n, (key, rows) in enumerate(prompts.items()):
            v = self._visuals(requests[rows[0]])
            items.append(ScoreItem(str(n), key[3], [self._continuation(requests[i]) for i in rows], images=v.images,
                                   videos=v.videos, frames=self.frames, template=self.template, system=self.system,
                                   **self.plan))
        out: list = [None] * len(requests)
        for rows, result in zip(prompts.values(), score(self.pipe, items, batch_size=self.batch_size, delimiter="",
                                                        reduction=self.reduction)):
            for i, c in zip(rows, result.candidates):
                out[i] = GenerationResult((-c.logprob, c.is_greedy), TokenCounts(result.input_tokens, len(c.tokens)))
        return out

    def _continuation(self, request: Instance) -> str:
        target = request.args[1]  # multiple_choice: the delimiter and the choice; loglikelihood: doc_to_target
        if isinstance(target, str):
            return target
        context, _, _, doc_id, task, split = request.args
        return target(self.task_dict[task][split][doc_id])

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID} does not run multi-round tasks (generate_until_multi_round); "
                                  f"use a generate_until or multiple_choice task")
