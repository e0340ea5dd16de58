"""``llava-next eval``'s job: a task's samples answered into ``OUT/samples.jsonl`` as they go, then
``OUT/summary.json``; resumable after any kill; under torchrun the ranks share the samples.

    OUT/run.json        the provenance record (records.py) and the task; a rerun must match it (else refused)
    OUT/samples.jsonl   one line per sample, written whole and fsynced as each batch finishes
    OUT/summary.json    accuracy with a bootstrap 95% interval, visual tokens and seconds per sample
    OUT/caption_scores.jsonl   caption tasks: each ok sample's own metrics, written with the summary

A sample line (``status`` "ok"; "error" lines are batch.py's ``error_record``: a missing video is one
sample's error, not the run's):

    {"id": "q7", "status": "ok", "prompt": "...", "prediction": "B. A dog", "parsed": "B", "gold": "B",
     "correct": true, "input_tokens": 1201, "visual_tokens": 1152,
     "timings": {"prepare_s": 0.41, "model_s": 1.93, "seconds": 2.34}}

(multiple choice by log-likelihood adds ``scores``: each candidate's logprob, per_token, per_char, per_byte,
is_greedy; the prediction is the best candidate's text.)

The output file is runtime/batch.py's ``ResultsFile`` (O_APPEND, one ``write`` per line, fsync, a cut-off
last line dropped on resume, an exclusive flock shared by the ranks), and ranks split the ids with its
``owner`` (crc32(id) % world size). A rerun skips the ids already written. ``--limit N`` takes the first N
samples of the data file (lmms-eval's ``--limit``), so a rerun with a larger limit continues the same run.
Every rank writes the summary of what the file holds when it finishes (``complete``: every sample of the run
has a line), so the last rank to finish writes the whole result.

A caption task (``answer: caption``) has no per-sample correctness (``correct`` is null): its summary's
``caption`` holds the corpus metrics over the ok lines' predictions and references (captions.py: BLEU-1..4,
METEOR, ROUGE-L, CIDEr, each with a bootstrap interval but METEOR), ``accuracy`` is null. Each sample's own
scores (pycocoevalcap's per-image values beside the corpus score) go to ``caption_scores.jsonl``, one line per
ok sample, ``{"id": ..., "Bleu_1": ..., ..., "CIDEr": ...}``, rewritten whole with the summary rather than
appended to the sample lines as they are written: a sample's CIDEr depends on the document frequencies of every
sample scored, known only at the end.

Accuracy is over the samples with an ok line (error lines are counted apart, as ``errors``); an unparsed
generation ("" from the parser) is a wrong answer, as in lmms-eval's Video-MME. The interval is the
percentile bootstrap (1,000 resamples of the per-sample 0/1 scores, seeded with the run's seed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

import numpy as np

from ..reduce.stages import Reduction
from ..runtime.batch import Progress, ResultsFile, error_record, owner
from ..runtime.files import check_media_file
from ..runtime.pipeline import Pipeline, Request
from .answers import exact_match, letter_correct, mlvu_scores, mmbench_circular, mme_scores, yes_no
from .captions import caption_scores, check_available
from .score import ScoreItem, candidate_score, prepare_item, score_requests
from .tasks import Sample, Task, read_samples


class EvalRunError(ValueError):
    """The output directory belongs to another run (other task, model, checkpoint or switches)."""


@dataclass
class EvalOptions:
    limit: int | None = None
    batch_size: int = 4
    frames: int | None = None  # None: the task's
    seed: int = 0
    reduction: Reduction | None = None
    max_image_pixels: int | None = None
    sampling: str = "uniform"
    rope_scale: object = "config"
    rank: int = 0
    world_size: int = 1


# ---- the run directory ----------------------------------------------------------------------------
_SAME_RUN = ("model", "checkpoint_sha256", "dtype", "seed", "switches")


def claim(out: Path, task: Task, record: dict) -> None:
    """Write OUT/run.json, or check that the one there is this run's (a resume): same task and _SAME_RUN."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    mine = {"task": task.to_dict(), "record": record}
    if path.exists():
        theirs = json.loads(path.read_text())
        diffs = [k for k in _SAME_RUN if theirs.get("record", {}).get(k) != record.get(k)]
        if {**theirs.get("task", {}), "source": None} != {**mine["task"], "source": None}:
            diffs.insert(0, "task")
        if diffs:
            raise EvalRunError(f"{out} holds another run ({', '.join(diffs)} differ from its run.json); give a "
                               f"new --out, or delete {out} to start over")
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(mine, indent=1))
    os.replace(tmp, path)


# ---- answering ------------------------------------------------------------------------------------
@dataclass
class Evaluator:
    pipe: Pipeline
    task: Task
    options: EvalOptions

    def answer(self, samples: Sequence[Sample]) -> Iterator[dict]:
        """One record per sample, batch by batch."""
        for start in range(0, len(samples), self.options.batch_size):
            yield from self._batch(list(samples[start:start + self.options.batch_size]))

    def _batch(self, samples: list[Sample]) -> Iterator[dict]:
        prepared = []  # (sample, request, continuations or None, prepare seconds)
        for s in samples:
            t0 = time.perf_counter()
            try:
                request, conts = self._prepare(s)
            except Exception as e:  # noqa: BLE001 — one sample's failure is its error line
                yield error_record(s, e)
                continue
            prepared.append((s, request, conts, time.perf_counter() - t0))
        if not prepared:
            return
        t0 = time.perf_counter()
        try:
            outputs = self._run([r for _, r, _, _ in prepared], [c for _, _, c, _ in prepared])
        except Exception as e:  # noqa: BLE001
            if len(prepared) > 1:  # find the sample it belongs to
                for s, *_ in prepared:
                    yield from self._batch([s])
                return
            yield error_record(prepared[0][0], e)
            return
        model_s = (time.perf_counter() - t0) / len(prepared)
        for (s, request, conts, prep_s), output in zip(prepared, outputs):
            yield self._record(s, request, conts, output, prep_s, model_s)

    def _prepare(self, s: Sample) -> tuple[Request, list[list[int]] | None]:
        t, frames = self.task, self.options.frames or self.task.frames
        for what, paths in (("image", s.images), ("video", s.videos)):
            for path in paths:  # the error run, batch and score give for the same path
                if not path.startswith("sample:"):
                    check_media_file(path, what)
        if t.answer == "mc_loglikelihood":
            candidates = s.options if t.candidates == "options" else s.letters
            o = self.options
            item = ScoreItem(s.id, s.prompt, candidates, images=s.images, videos=s.videos, frames=frames,
                             template=t.template, system=t.system, sampling=o.sampling, rope_scale=o.rope_scale,
                             max_image_pixels=o.max_image_pixels)
            return prepare_item(self.pipe, item, delimiter=t.target_delimiter, reduction=self.options.reduction)
        request = self.pipe.prepare(s.prompt, images=s.images, videos=s.videos, frames=frames, template=t.template,
                                    system=t.system, max_new_tokens=t.max_new_tokens, reduction=self.options.reduction,
                                    max_image_pixels=self.options.max_image_pixels, sampling=self.options.sampling,
                                    rope_scale=self.options.rope_scale)
        return request, None

    def _run(self, requests: list[Request], conts: list) -> list:
        if self.task.answer == "mc_loglikelihood":
            logprobs, greedy = score_requests(self.pipe, requests, conts)
            return list(zip(logprobs, greedy))
        return generate_answers(self.pipe, requests, self.task.max_new_tokens, self.task.template)

    def _record(self, s: Sample, request: Request, conts, output, prep_s: float, model_s: float) -> dict:
        t = self.task
        extra = {}
        if t.answer == "mc_loglikelihood":
            candidates = s.options if t.candidates == "options" else s.letters
            scores = [candidate_score(text, ids, lp, g) for text, ids, lp, g in zip(candidates, conts, *output)]
            best = max(range(len(scores)), key=lambda i: getattr(scores[i], t.rank_by))
            prediction, parsed, gold, correct = candidates[best], s.letters[best], s.gold_letter, best == s.gold
            extra["scores"] = [{k: v for k, v in c.to_dict().items() if k != "token_logprobs"} for c in scores]
        else:
            prediction = self._decode(output)
            if t.answer == "mc_generate":
                gold = s.gold_letter
                parsed, correct = letter_correct(t.parser, prediction, gold, s.options)
            elif t.answer == "yes_no":
                gold = s.gold
                parsed, correct = yes_no(prediction, gold)
            elif t.answer == "caption":  # judged over the corpus in the summary (captions.py)
                gold, parsed, correct = s.gold, prediction, None
            else:
                gold = s.gold
                parsed, correct = exact_match(prediction, gold, ignore_case=t.ignore_case,
                                              ignore_punctuation=t.ignore_punctuation)
        return {"id": s.id, "status": "ok", "prompt": s.prompt, "prediction": prediction, "parsed": parsed,
                "gold": gold, "correct": None if correct is None else bool(correct),
                "input_tokens": len(request.input_ids),
                "visual_tokens": sum(request.image_token_counts) + sum(request.video_token_counts), **extra,
                "timings": {"prepare_s": round(prep_s, 4), "model_s": round(model_s, 4),
                            "seconds": round(prep_s + model_s, 4)}}

    def _decode(self, tokens: list[int]) -> str:
        return decode_answer(self.pipe, tokens, self.task.template)


def generate_answers(pipe: Pipeline, requests: Sequence[Request], max_new_tokens: int,
                     template: str | None) -> list[list[int]]:
    """Each prepared request's greedy answer ids (up to its stop token), batched; one RoPE factor per forward
    (batch.py groups the same). Also the lmms-eval backend's (lmms.py)."""
    out: list = [None] * len(requests)
    for factor in {r.plan.factor for r in requests}:
        rows = [i for i, r in enumerate(requests) if r.plan.factor == factor]
        answers = pipe.generate_batch([requests[i] for i in rows], max_new_tokens=max_new_tokens, template=template)
        for i, tokens in zip(rows, answers):
            out[i] = tokens
    return out


def decode_answer(pipe: Pipeline, tokens: list[int], template: str | None) -> str:
    """The answer's text, its stop token dropped."""
    from ..inputs.prompt import stop_token_ids

    stops = set(stop_token_ids(pipe.tokenizer, template or pipe.config.template))
    return pipe.tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stops else tokens)


# ---- the job --------------------------------------------------------------------------------------
def run_eval(pipe_loader: Callable[[], Pipeline], task: Task, out: str | os.PathLike, *, record: dict,
             options: EvalOptions = EvalOptions(), progress: TextIO | None = sys.stderr) -> dict:
    """The whole run for this process (module docstring); returns the summary it wrote."""
    out = Path(out)
    if task.answer == "caption":
        check_available(task.caption_metrics, task.caption_tokenizer)
    samples = read_samples(task)[:options.limit]
    claim(out, task, record)
    results = ResultsFile(out / "samples.jsonl")
    done = results.done_ids()
    mine = [s for s in samples if owner(s.id, options.world_size) == options.rank]
    todo = [s for s in mine if s.id not in done]
    prefix = "[llava-next eval]" if options.world_size == 1 else \
        f"[llava-next eval rank {options.rank}/{options.world_size}]"
    tracker = Progress(total=len(todo), skipped=len(mine) - len(todo), stream=progress, prefix=prefix)
    if progress is not None:
        progress.write(f"{prefix} task {task.name}: {len(samples)} sample(s); this process: {len(mine)}, "
                       f"{len(mine) - len(todo)} already in {results.path}, {len(todo)} to do\n")
    if todo:
        with results.locked():
            pipe = pipe_loader()
        for line in Evaluator(pipe, task, options).answer(todo):
            results.append(line)
            tracker.update(errors=int(line["status"] == "error"))
    with results.locked():
        summary = summarize(task, samples, read_lines(results.path), record, options.seed)
        if "caption" in summary:  # each sample's own scores, beside the summary (module docstring)
            write_jsonl(out / CAPTION_SCORES, summary["caption"].pop("per_sample"))
            summary["caption"]["per_sample"] = CAPTION_SCORES
        write_json(out / "summary.json", summary)
    if progress is not None:
        progress.write(f"{prefix} {summary_line(summary)}\n")
    return summary


def read_lines(path: Path) -> dict[str, dict]:
    """The complete lines of the samples file by id."""
    lines = {}
    for raw in path.read_bytes().splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and isinstance(line.get("id"), str):
            lines[line["id"]] = line
    return lines


def summarize(task: Task, samples: Sequence[Sample], lines: dict[str, dict], record: dict, seed: int) -> dict:
    """accuracy, its bootstrap 95% interval, tokens and time per sample over this run's samples."""
    ok = [lines[s.id] for s in samples if lines.get(s.id, {}).get("status") == "ok"]
    errors = sum(1 for s in samples if lines.get(s.id, {}).get("status") == "error")
    correct = np.array([float(line["correct"]) for line in ok if line["correct"] is not None])
    summary = {"task": task.name, "answer": task.answer, "samples": len(samples), "answered": len(ok),
               "errors": errors, "complete": len(ok) + errors == len(samples),
               "correct": int(correct.sum()), "accuracy": float(correct.mean()) if len(correct) else None,
               "accuracy_ci95": bootstrap_ci(correct, seed), "bootstrap_resamples": BOOTSTRAP,
               "unparsed": sum(1 for line in ok if line.get("parsed") == ""),
               "visual_tokens_per_sample": _mean([line["visual_tokens"] for line in ok]),
               "input_tokens_per_sample": _mean([line["input_tokens"] for line in ok]),
               "seconds_per_sample": _mean([line["timings"]["seconds"] for line in ok]),
               "record": record}
    if task.score == "mme":
        summary["mme"] = mme_scores([(s.meta["category"], s.meta["question_id"], lines[s.id]["correct"])
                                     for s in samples if lines.get(s.id, {}).get("status") == "ok"])
    if task.score == "mmbench_circular":
        summary["mmbench"] = mmbench_circular([(s.meta["index"], s.meta["category"], lines[s.id]["correct"])
                                               for s in samples if lines.get(s.id, {}).get("status") == "ok"])
    if task.score == "mlvu":
        summary["mlvu"] = mlvu_scores([(s.meta["task_type"], lines[s.id]["correct"]) for s in samples
                                       if lines.get(s.id, {}).get("status") == "ok"])
    if task.answer == "caption" and ok:
        caption = caption_scores([line["prediction"] for line in ok], [line["gold"] for line in ok],
                                 metrics=task.caption_metrics, tokenizer=task.caption_tokenizer,
                                 resamples=task.caption_bootstrap, seed=seed)
        each = caption["per_sample"]  # {metric: [value per ok line]} -> one {"id", metric: value} per line
        caption["per_sample"] = [{"id": line["id"], **{m: values[i] for m, values in each.items()}}
                                 for i, line in enumerate(ok)]
        summary["caption"] = caption
    return summary


BOOTSTRAP = 1000


def bootstrap_ci(scores: np.ndarray, seed: int, resamples: int = BOOTSTRAP) -> list[float] | None:
    """The percentile bootstrap 95% interval of the mean of ``scores`` (None for no scores)."""
    if len(scores) == 0:
        return None
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(resamples, len(scores)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


CAPTION_SCORES = "caption_scores.jsonl"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def write_jsonl(path: Path, lines: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)


def summary_line(s: dict) -> str:
    if "caption" in s:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in s["caption"]["metrics"].items())
        return (f"{s['task']}: {metrics} over {s['answered']} of {s['samples']} sample(s), {s['errors']} error(s); "
                f"{s['visual_tokens_per_sample'] or 0:.0f} visual tokens and {s['seconds_per_sample'] or 0:.2f} s "
                f"per sample")
    acc = "n/a" if s["accuracy"] is None else f"{100 * s['accuracy']:.1f}%"
    ci = "" if s["accuracy_ci95"] is None else \
        f" (95% CI {100 * s['accuracy_ci95'][0]:.1f}-{100 * s['accuracy_ci95'][1]:.1f})"
    return (f"{s['task']}: accuracy {acc}{ci} over {s['answered']} of {s['samples']} sample(s), {s['errors']} "
            f"error(s); {s['visual_tokens_per_sample'] or 0:.0f} visual tokens and "
            f"{s['seconds_per_sample'] or 0:.2f} s per sample")
