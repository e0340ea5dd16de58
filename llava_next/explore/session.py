"""One model, many questions: each question is traced ONCE and its numbers cached; the views read the cache.

    session = Session(pipe)
    answer = session.ask(Question(media="sample:bunny", text="What happens?", frames=8))
    answer.weights(token=2, layer=5, head=-1)   # (T,) the attention that produced generated token 2
    session.get(answer.key)                     # the same cached answer, for the page's callbacks

``ask_stream`` prepares the request as ``llava-next trace`` does (the same runtime checks, so a bad file, a frame
count that does not fit or a bad reduction raise the same exceptions with the same messages), streams the
answer through ``Pipeline.stream`` (the generation ``llava-next run`` prints as it comes; its pieces are yielded
to the page), then traces prompt + answer through ``Pipeline.trace`` with those tokens (nothing generated
twice) and per-head rows of every query that produced a token (``heads="all"``): the last prompt position
and every generated position but the last. Nothing after that runs the model for the attention views: a
slider move reads ``Answer.rows``. A gradient map (``Session.token_map``: relevancy, input x gradient,
rollout) runs the float model once per (answer, token, method) and is cached in ``Answer.maps``.
A question may name a LoRA adapter folder: it is answered by the checkpoint with that adapter
(``ModelSource.with_adapter``, as ``run --adapter DIR``).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch

from ..inputs.samples import is_sample, sample_path
from ..runtime.files import check_media_file
from ..runtime.pipeline import Pipeline
from ..runtime.tracing import TraceResult, query_rows

if TYPE_CHECKING:
    from .models import ModelSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KEEP = 4  # answers cached (each holds L x |Q| x H x T float64 rows)


class ExploreError(ValueError):
    """Something the user can fix on the page; shown as one line, as the command line prints a user error."""


@dataclass(frozen=True)
class Question:
    """What the page sends: a file or ``sample:`` name (or several: images, videos, in the order the prompt gets
    them: images first), the question and the plan / reduction switches."""

    media: str | tuple[str, ...]
    text: str
    frames: int = 8
    max_new_tokens: int = 8
    select_frames: str | None = None  # a frame selector spec, as --select-frames
    reduce: str | None = None  # one reduction method spec, as --reduce
    adapter: str | None = None  # a LoRA adapter folder (PEFT format), as --adapter

    @property
    def files(self) -> tuple[str, ...]:
        return (self.media,) if isinstance(self.media, str) else tuple(self.media)


@dataclass
class Answer:
    """One traced question: the trace result, the per-head rows of the producing queries, the timings."""

    key: int
    question: Question
    path: str  # the (first) media file read
    kind: str  # its kind, "image" or "video"
    result: TraceResult
    rows: dict[int, torch.Tensor]  # layer -> (K, H, T) float64: row k = the query that produced token k
    producers: list[int]  # (K,) the position whose query produced generated token k
    seconds: dict[str, float] = field(default_factory=dict)
    maps: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (token, method) -> (T,) gradient map
    images: list[str] = field(default_factory=list)  # the image files, in the request's order (kind_index)
    heatmap_rows: list[tuple[int, int]] = field(default_factory=list)  # per medium: (top, height) px in the heatmap

    @property
    def provenance(self):
        return self.result.provenance

    def weights(self, token: int, layer: int, head: int) -> torch.Tensor:
        """(T,) attention over every position of the query that produced generated token ``token`` at ``layer``;
        ``head`` -1: the mean of the heads. NaN: a key a reduced layer no longer had."""
        row = self.rows[layer][token]  # (H, T)
        return row.mean(0) if head < 0 else row[head]


class Session:
    """The loaded pipeline and the last ``KEEP`` answers; one question runs at a time (a lock). ``source``: where
    the model came from (models.py), to load it with an adapter or for gradients; without it neither is offered."""

    def __init__(self, pipe: Pipeline, *, max_new_tokens: int = 8, source: "ModelSource | None" = None) -> None:
        self.pipe = pipe
        self.source = source
        self.max_new_tokens = max_new_tokens
        self.num_layers = len(pipe.model.language_model.layers)
        self.num_heads = pipe.config.text.num_heads
        self._answers: OrderedDict[int, Answer] = OrderedDict()
        self._keys = itertools.count(1)
        self._lock = threading.Lock()

    def get(self, key: int | None) -> Answer:
        if key is None or key not in self._answers:
            raise ExploreError("no answer to draw yet: choose media, type a question and press Ask")
        return self._answers[key]

    def ask(self, q: Question) -> Answer:
        """``ask_stream`` to the end: the traced answer."""
        for item in self.ask_stream(q):
            pass
        return item

    def ask_stream(self, q: Question) -> Iterator["str | Answer"]:
        """The answer's text pieces as they are generated, then (last) the traced ``Answer``, cached under a new
        key. Checks (the question, the file, the adapter) run before any work."""
        files = _check(q)
        images, videos = [p for p, k in files if k == "image"], [p for p, k in files if k == "video"]
        t0 = time.perf_counter()
        with self._lock:
            pipe = self._pipe_for(q.adapter)
            request = pipe.prepare(q.text, images=images, videos=videos, frames=q.frames,
                                   max_new_tokens=q.max_new_tokens, reduction=_reduction(q, files))
            t1 = time.perf_counter()
            # the pieces as they come (a few tokens per question: compiling the decode step never pays)
            yield from pipe.stream(request, max_new_tokens=q.max_new_tokens, compile_step=False)
            t2 = time.perf_counter()
            res = pipe.trace(request, queries=["last", "generated"], heads="all", generated=list(request.tokens),
                             lens=["question", "last", "generated"],
                             image_names=[os.path.basename(p) for p in images])
            rows, producers = _producer_rows(res)
        res.trace = None  # the raw steps are not needed again (the rows above hold what the views read)
        answer = Answer(next(self._keys), q, *files[0], res, rows, producers,
                        {"prepare_s": t1 - t0, "first_token_s": request.timings["first_token_s"],
                         "generate_s": t2 - t1, "trace_s": res.timings["trace_s"], "ask_s": time.perf_counter() - t0},
                        images=images)
        self._answers[answer.key] = answer
        while len(self._answers) > KEEP:
            self._answers.popitem(last=False)
        yield answer

    def _pipe_for(self, adapter: str | None) -> Pipeline:
        if not adapter:
            return self.pipe
        if self.source is None:
            raise ExploreError("this page was started without its model's source, so it cannot load an adapter; "
                               "start it with llava-next explore --model ID_OR_DIR")
        return self.source.with_adapter(adapter)

    def token_map(self, key: int, token: int, method: str) -> torch.Tensor:
        """(T,) the gradient map ``method`` of generated token ``token`` (gradients.py), computed once and cached."""
        from . import gradients

        a = self.get(key)
        if (token, method) not in a.maps:
            gradients.check(a, method)
            if self.source is None:
                raise ExploreError("this page was started without its model's source, so it cannot load the float "
                                   "model gradient maps need; start it with llava-next explore --model ID_OR_DIR")
            with self._lock:
                a.maps[(token, method)] = gradients.token_map(self.source.for_gradients().model, a, token, method)
        return a.maps[(token, method)]


def _producer_rows(res: TraceResult) -> tuple[dict[int, torch.Tensor], list[int]]:
    """Per layer the (K, H, T) rows of the queries that produced the K generated tokens; those positions."""
    T, P = len(res.provenance), res.provenance.prompt_len
    producers = [P - 1 + k for k in range(len(res.generated))]  # position P-1+k produced token k
    rows = {}
    for layer in res.layers:
        per_query, where = query_rows(res.trace, layer, T)  # (|Q|, H, T)
        rows[layer] = per_query[[where[p] for p in producers]]
    return rows, producers


def media_kind(path: str) -> str:
    """"image" for a picture's file suffix, else "video"."""
    return "image" if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES else "video"


def _check(q: Question) -> list[tuple[str, str]]:
    """Per media file (a ``sample:`` name resolved) its path and kind, images first, checked before any work; an
    empty question refused."""
    if not q.text.strip():
        raise ExploreError("no question given: type a question about the image or video, then press Ask")
    if not q.media:
        raise ExploreError("no media given: choose a sample or upload an image or video file")
    if q.max_new_tokens < 1:
        raise ExploreError(f"answer tokens must be >= 1, got {q.max_new_tokens} (the views show the attention that "
                           f"produced each generated token)")
    files = []
    for name in q.files:
        path = sample_path(name) if is_sample(name) else name
        files.append((path, media_kind(path)))
        check_media_file(path, files[-1][1])  # FileNotFoundError / IsADirectoryError, as the command line says
    if any(k == "video" for _, k in files) and q.frames < 1:
        raise ExploreError(f"frames must be >= 1, got {q.frames}")
    return sorted(files, key=lambda f: f[1] != "image")  # the prompt's order: images, then videos


def _reduction(q: Question, files: list[tuple[str, str]]):
    """The Reduction of the question's switches (``llava_next.reduce.parse_reduction``, as the command line), or
    None; the reduce package's messages on a bad spec."""
    if not q.select_frames and not q.reduce:
        return None
    from ..reduce import parse_reduction

    if q.select_frames and all(k != "video" for _, k in files):
        raise ExploreError(f"frame selection {q.select_frames}: picks a video's frames, but "
                           f"{', '.join(os.path.basename(p) for p, _ in files)} is an image")
    return parse_reduction(q.select_frames, [q.reduce] if q.reduce else [])
