"""Batch results -> training data: answers into SFT conversations, two answers per item into preference pairs.

    ok, errors = read_results("results.jsonl")          # the ok lines of a ``llava-next batch`` output
    items = caption_items(ok, media_root="clips/")       # LLaVA conversation items (train/data.py's format)
    pairs, report = preference_pairs(read_results("a.jsonl")[0], read_results("b.jsonl")[0], media_root=".")
    write_jsonl(items, "train.jsonl")

The loop this closes (docs/captioning.md): caption videos zero-shot with ``llava-next batch --videos ...``,
correct the ``"text"`` of any line by hand (or delete the line), convert (``llava-next data captions``), train
(``llava-next train --method sft``). A batch ok line carries what was asked (runtime/batch.py): ``prompt``,
``video`` (a path) and/or ``images`` (a list), paths as batch opened them, i.e. relative to the folder batch
ran in (``base``, default the current folder).

- ``caption_items``: one item per line, ``{"id", "video" | "image", "conversations": [{"from": "human", "value":
  "<video>\\n" + prompt}, {"from": "gpt", "value": text}]}``; the text is kept exactly (no stripping: Korean and
  any other text byte for byte). Media paths are rewritten relative to ``media_root``, as ``llava-next train
  --media-root`` reads them (its default, the data file's folder, is the default here too).
- ``preference_pairs``: the ids answered ok in both files, ``{"id", "video" | "image", "prompt", "chosen",
  "rejected"}`` (the prompt as asked, no placeholder). Which answer is chosen is the user's call, said in the
  files: a line with ``"chosen": true`` (added by hand) is chosen; where neither line of an id has it, the
  first file's answer is. Both marked is an error. Ids with the same text in both files are left out (no
  preference to learn), as are ids missing or failed in either file; the report counts each.

Notable choices
- Errors (``CaptionDataError``) name the file, line and id and say what to change; nothing is written then.
- One video per item (train/data.py takes one); a line that asked about several videos is an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..inputs.prompt import IMAGE, VIDEO

PathLike = str | os.PathLike


class CaptionDataError(ValueError):
    """A batch results file cannot become training data as it is; the message says where and what to do."""


@dataclass(frozen=True)
class Answer:
    """One ok line of a batch results file."""

    id: str
    where: str  # "results.jsonl line 3"
    prompt: str
    text: str
    video: str | None = None
    images: tuple[str, ...] = ()
    chosen: bool = False  # the user's mark: this answer is the better one of a pair


# ---- reading --------------------------------------------------------------------------------------
def read_results(path: PathLike) -> tuple[list[Answer], int]:
    """The ok lines of a ``llava-next batch`` results file, in order, and how many error lines it had."""
    answers, errors = [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CaptionDataError(f"{where}: not a UTF-8 JSON line ({e}); fix the line by hand (each line is one "
                                       f"JSON object) or delete it") from None
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise CaptionDataError(f"{where}: not a batch result (a JSON object with an \"id\"); is {path} the "
                                       f"--out file of llava-next batch?")
            if record.get("status") == "error":
                errors += 1
                continue
            answers.append(_answer(record, where))
    return answers, errors


def _answer(record: dict, where: str) -> Answer:
    text, prompt = record.get("text"), record.get("prompt")
    if not isinstance(text, str):
        raise CaptionDataError(f"{where} (id {record['id']!r}): no \"text\" string; write the answer there or "
                               f"delete the line")
    if not isinstance(prompt, str):
        raise CaptionDataError(f"{where} (id {record['id']!r}): no \"prompt\"; the results of llava-next batch "
                               f"carry it since it could caption --videos: run batch again to a new --out")
    video, images = record.get("video"), record.get("images") or []
    if isinstance(video, list):
        if len(video) != 1:
            raise CaptionDataError(f"{where} (id {record['id']!r}): {len(video)} videos; training items hold one "
                                   f"video: split it into one item per video")
        video = video[0]
    if video is not None and not isinstance(video, str) or not all(isinstance(p, str) for p in images):
        raise CaptionDataError(f"{where} (id {record['id']!r}): \"video\" must be a path and \"images\" a list of "
                               f"paths")
    if video is None and not images:
        raise CaptionDataError(f"{where} (id {record['id']!r}): no \"video\" or \"images\": a training item needs "
                               f"its media")
    chosen = record.get("chosen", False)
    if not isinstance(chosen, bool):
        raise CaptionDataError(f"{where} (id {record['id']!r}): \"chosen\" must be true or false, got {chosen!r}")
    return Answer(id=record["id"], where=where, prompt=prompt, text=text, video=video, images=tuple(images),
                  chosen=chosen)


# ---- media paths ----------------------------------------------------------------------------------
def _media(answer: Answer, media_root: PathLike, base: PathLike) -> dict:
    """``{"video": ...}`` and/or ``{"image": ...}``, each path relative to ``media_root``; checked on disk."""
    out: dict = {}

    def rel(path: str) -> str:
        full = Path(base, path)
        if not full.is_file():
            raise CaptionDataError(f"{answer.where} (id {answer.id!r}): {full}: no such file; the paths of batch "
                                   f"results are relative to the folder batch ran in: run this command there "
                                   f"(or fix the path in the line)")
        return os.path.relpath(os.path.abspath(full), os.path.abspath(media_root))

    if answer.images:
        paths = [rel(p) for p in answer.images]
        out["image"] = paths[0] if len(paths) == 1 else paths
    if answer.video is not None:
        out["video"] = rel(answer.video)
    return out


# ---- captions -> SFT items ------------------------------------------------------------------------
def caption_items(answers: Sequence[Answer], media_root: PathLike, base: PathLike = ".") -> list[dict]:
    """LLaVA conversation items (train/data.py), one per answer, in order."""
    items, seen = [], {}
    for a in answers:
        if a.id in seen:
            raise CaptionDataError(f"{a.where}: id {a.id!r} is already on {seen[a.id]}; ids must be unique (delete "
                                   f"one of the two lines)")
        seen[a.id] = a.where
        if not a.text.strip():
            raise CaptionDataError(f"{a.where} (id {a.id!r}): the text is empty; write the caption or delete the line")
        question = a.prompt
        if IMAGE not in question and VIDEO not in question:  # the placeholders, as train/data.py expects them
            question = f"{IMAGE}\n" * len(a.images) + f"{VIDEO}\n" * (a.video is not None) + question
        items.append({"id": a.id, **_media(a, media_root, base),
                      "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": a.text}]})
    return items


# ---- two answers -> preference pairs --------------------------------------------------------------
@dataclass
class PairReport:
    pairs: int = 0
    chosen_from_second: int = 0  # pairs whose chosen answer is the second file's (marked "chosen": true)
    same_text: int = 0  # left out: both answers equal
    unmatched: int = 0  # left out: the id is ok in only one of the files

    def line(self) -> str:
        return (f"{self.pairs} pair(s) ({self.pairs - self.chosen_from_second} chosen from the first file, "
                f"{self.chosen_from_second} marked \"chosen\" in the second); left out: {self.same_text} with the "
                f"same answer twice, {self.unmatched} answered in only one file")


def preference_pairs(first: Sequence[Answer], second: Sequence[Answer], media_root: PathLike,
                     base: PathLike = ".") -> tuple[list[dict], PairReport]:
    """``{"id", "video" | "image", "prompt", "chosen", "rejected"}`` per id answered in both, in the first file's
    order (module docstring: which answer is chosen)."""
    others = _by_id(second)
    report = PairReport(unmatched=len(set(others) - {a.id for a in first}))
    pairs = []
    for a in _by_id(first).values():
        b = others.get(a.id)
        if b is None:
            report.unmatched += 1
            continue
        if (a.prompt, a.video, a.images) != (b.prompt, b.video, b.images):
            raise CaptionDataError(f"id {a.id!r}: {a.where} and {b.where} asked different things (prompt or media); "
                                   f"pairs compare two answers to the same request")
        if a.chosen and b.chosen:
            raise CaptionDataError(f"id {a.id!r}: both {a.where} and {b.where} are marked \"chosen\": true; mark one")
        if a.text == b.text:
            report.same_text += 1
            continue
        chosen, rejected = (b, a) if b.chosen else (a, b)
        report.chosen_from_second += b.chosen
        pairs.append({"id": a.id, **_media(a, media_root, base), "prompt": a.prompt, "chosen": chosen.text,
                      "rejected": rejected.text})
    report.pairs = len(pairs)
    return pairs, report


def _by_id(answers: Sequence[Answer]) -> dict[str, Answer]:
    out: dict[str, Answer] = {}
    for a in answers:
        if a.id in out:
            raise CaptionDataError(f"{a.where}: id {a.id!r} is already on {out[a.id].where}; delete one of the lines")
        out[a.id] = a
    return out


# ---- writing --------------------------------------------------------------------------------------
def write_jsonl(items: Iterable[dict], path: PathLike) -> Path:
    """One JSON object per line, UTF-8, non-ASCII text as itself (Korean stays readable for hand edits);
    written to a temporary file and renamed, so ``path`` is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for item in items:
            try:
                f.write((json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate escape from an input line: escape that line instead
                f.write((json.dumps(item) + "\n").encode("utf-8"))
    os.replace(tmp, path)
    return path
