"""One model, many questions: each question is traced ONCE and its numbers cached; the views read the cache.

    session = Session(pipe)
    answer = session.ask(Question(media="sample:bunny", text="What happens?", frames=8))
    answer.weights(token=2, layer=5, head=-1)   # (T,) the attention that produced generated token 2
    session.get(answer.key)                     # the same cached answer, for the page's callbacks

``ask`` prepares the request as ``llava-next trace`` does (the same runtime checks, so a bad file, a frame count
that does not fit or a bad reduction raise the same exceptions with the same messages), generates the answer
and traces prompt + answer through ``Pipeline.trace`` (runtime/tracing.py) with per-head rows of every query
that produced a token (``heads="all"``): the last prompt position and every generated position but the last.
Nothing after ``ask`` runs the model: a slider move reads ``Answer.rows``.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..inputs.samples import is_sample, sample_path
from ..runtime.files import check_media_file
from ..runtime.pipeline import Pipeline
from ..runtime.tracing import TraceResult, query_rows

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KEEP = 4  # answers cached (each holds L x |Q| x H x T float64 rows)


class ExploreError(ValueError):
    """Something the user can fix on the page; shown as one line, as the command line prints a user error."""


@dataclass(frozen=True)
class Question:
    """What the page sends: a file or ``sample:`` name, the question and the plan / reduction switches."""

    media: str
    text: str
    frames: int = 8
    max_new_tokens: int = 8
    select_frames: str | None = None  # a frame selector spec, as --select-frames
    reduce: str | None = None  # one reduction method spec, as --reduce



@dataclass
class Answer:
    """One traced question: the trace result, the per-head rows of the producing queries, the timings."""

    key: int
    question: Question
    path: str  # the media file read
    kind: str  # "image" or "video"
    result: TraceResult
    rows: dict[int, torch.Tensor]  # layer -> (K, H, T) float64: row k = the query that produced token k
    producers: list[int]  # (K,) the position whose query produced generated token k
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def provenance(self):
        return self.result.provenance

    def weights(self, token: int, layer: int, head: int) -> torch.Tensor:
        """(T,) attention over every position of the query that produced generated token ``token`` at ``layer``;
        ``head`` -1: the mean of the heads. NaN: a key a reduced layer no longer had."""
        row = self.rows[layer][token]  # (H, T)
        return row.mean(0) if head < 0 else row[head]


class Session:
    """The loaded pipeline and the last ``KEEP`` answers; one question runs at a time (a lock)."""

    def __init__(self, pipe: Pipeline, *, max_new_tokens: int = 8) -> None:
        self.pipe = pipe
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
        """Prepare, generate and trace ``q`` once; the answer is cached under a new key."""
        path, kind = _check(q)
        t0 = time.perf_counter()
        with self._lock:
            request = self.pipe.prepare(q.text, **({"images": [path]} if kind == "image" else {"video": path}),
                                        frames=q.frames, max_new_tokens=q.max_new_tokens,
                                        reduction=_reduction(q, path, kind))
            t1 = time.perf_counter()
            res = self.pipe.trace(request, queries=["last", "generated"], heads="all",
                                  lens=["question", "last", "generated"], max_new_tokens=q.max_new_tokens,
                                  image_names=[os.path.basename(path)] if kind == "image" else [],
                                  compile_step=False)  # a few tokens per question: compiling never pays
            T, P = len(res.provenance), res.provenance.prompt_len
            producers = [P - 1 + k for k in range(len(res.generated))]  # position P-1+k produced token k
            rows = {}
            for layer in res.layers:
                per_query, where = query_rows(res.trace, layer, T)  # (|Q|, H, T)
                rows[layer] = per_query[[where[p] for p in producers]]
        res.trace = None  # the raw steps are not needed again (the rows above hold what the views read)
        answer = Answer(next(self._keys), q, path, kind, res, rows, producers,
                        {"prepare_s": t1 - t0, **res.timings, "ask_s": time.perf_counter() - t0})
        self._answers[answer.key] = answer
        while len(self._answers) > KEEP:
            self._answers.popitem(last=False)
        return answer


def media_kind(path: str) -> str:
    """"image" for a picture's file suffix, else "video"."""
    return "image" if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES else "video"


def _check(q: Question) -> tuple[str, str]:
    """(the media path, a ``sample:`` name resolved; its kind), checked before any work; an empty question
    refused."""
    if not q.text.strip():
        raise ExploreError("no question given: type a question about the image or video, then press Ask")
    if not q.media:
        raise ExploreError("no media given: choose a sample or upload an image or video file")
    if q.max_new_tokens < 1:
        raise ExploreError(f"answer tokens must be >= 1, got {q.max_new_tokens} (the views show the attention that "
                           f"produced each generated token)")
    path = sample_path(q.media) if is_sample(q.media) else q.media
    kind = media_kind(path)
    check_media_file(path, kind)  # FileNotFoundError / IsADirectoryError, as the command line says
    if kind == "video" and q.frames < 1:
        raise ExploreError(f"frames must be >= 1, got {q.frames}")
    return path, kind


def _reduction(q: Question, path: str, kind: str):
    """The Reduction of the question's switches (``llava_next.reduce.parse_reduction``, as the command line), or
    None; the reduce package's messages on a bad spec."""
    if not q.select_frames and not q.reduce:
        return None
    from ..reduce import parse_reduction

    if q.select_frames and kind != "video":
        raise ExploreError(f"frame selection {q.select_frames}: picks a video's frames, but {os.path.basename(path)} "
                           f"is an image")
    return parse_reduction(q.select_frames, [q.reduce] if q.reduce else [])
