"""Preference pairs for DPO: one prompt (with its media), a chosen answer and a rejected one.

    data = PreferenceData("prefs.jsonl", tokenizer, config, media_root="clips/", frames=8)
    data.validate()                              # every item checked before step 1 (DataError names the line)
    pair = data[i]                               # Pair(chosen=Example, rejected=Example), same prompt, same frames
    batch = collate_pairs([data[i] for i in idx], pad_id(tokenizer))   # rows: the chosen ones, then the rejected

Two forms, JSON list or JSONL, media paths relative to ``media_root`` as in train/data.py:
- flat (LLaVA-Hound's DPO data, TRL's "prompt" / "chosen" / "rejected"):
  ``{"id": ..., "video": PATH | "image": PATH or [PATH, ...], "prompt": "...", "chosen": "...", "rejected": "..."}``;
  a prompt without ``<video>`` / ``<image>`` gets one per media item in front (``<image>`` first).
- conversations (LLaVA's training format, several turns): ``{"id": ..., "video": ..., "conversations":
  [{"from": "human", "value": "<video>\\n..."}, {"from": "gpt", "value": "..."}, ..., {"from": "human",
  "value": "..."}, {"from": "gpt", "chosen": "...", "rejected": "..."}]}``: the last turn is the pair; the
  turns before it are the prompt (earlier answers are context, never learned).

Each pair becomes two conversations (train/data.py's ``parse_item``, so every check and error of the SFT
data applies, naming the same line), rendered and tokenized by ``TrainingData``'s machinery; only the last
answer is supervised (its tokens and the template's stop: the completion whose log-probability DPO sums).
Both conversations share the item's index, so they get the same frames; the frames are drawn once (epoch
0) and kept every epoch, because the reference log-probabilities are computed once for those frames
(train/dpo.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..inputs.prompt import IMAGE, VIDEO
from .data import IGNORE_INDEX, Batch, DataError, Example, Record, _fail, collate, parse_item, read_records, \
    TrainingData

PAIR_KEYS = ("chosen", "rejected")


def _answer(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f'"{key}" must be a non-empty string, got {str(value)[:80]!r}',
                    'give {"chosen": "the better answer", "rejected": "the worse answer"}')
    return value


def _flat_prompt(item: dict, where: str) -> str:
    """The flat form's prompt, with the media placeholders put in front when it has none."""
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _fail(where, '"prompt" must be a non-empty string', 'give the question as "prompt": "..."')
    if IMAGE in prompt or VIDEO in prompt:
        return prompt
    images = item.get("image")
    n_images = 0 if images is None else len(images) if isinstance(images, list) else 1
    return (IMAGE + "\n") * n_images + (VIDEO + "\n" if item.get("video") is not None else "") + prompt


def parse_pair(item: object, index: int, where: str, media_root) -> tuple[Record, Record]:
    """One preference item -> (chosen, rejected) ``Record``s: the same prompt and media, the two answers."""
    if not isinstance(item, dict):
        raise _fail(where, f"expected a JSON object, got {type(item).__name__}",
                    'each item is {"id": ..., "image" or "video": ..., "prompt": ..., "chosen": ..., "rejected": ...}')
    if ("prompt" in item) == ("conversations" in item):
        found = "not both" if "prompt" in item else "found neither"
        raise _fail(where, f'give either "prompt" (with "chosen" and "rejected") or "conversations" (whose last '
                           f'turn holds "chosen" and "rejected"), {found}', "see docs/training.md, DPO")
    if "prompt" in item:
        answers = {k: _answer(item, k, where) for k in PAIR_KEYS}
        prompt = _flat_prompt(item, where)
        turns = {k: [{"from": "human", "value": prompt}, {"from": "gpt", "value": answers[k]}] for k in PAIR_KEYS}
    else:
        conv = item["conversations"]
        last = conv[-1] if isinstance(conv, list) and conv else None
        if not (isinstance(last, dict) and last.get("from") == "gpt" and "value" not in last):
            raise _fail(where, 'the last conversation turn is not the pair {"from": "gpt", "chosen": TEXT, '
                               '"rejected": TEXT}', "end the conversation with the two answers to compare")
        answers = {k: _answer(last, k, where) for k in PAIR_KEYS}
        turns = {k: [*conv[:-1], {"from": "gpt", "value": answers[k]}] for k in PAIR_KEYS}
    if answers["chosen"] == answers["rejected"]:
        raise _fail(where, '"chosen" and "rejected" are the same text', "a pair needs two different answers")
    rest = {k: v for k, v in item.items() if k not in ("prompt", "conversations", *PAIR_KEYS)}
    chosen, rejected = (parse_item({**rest, "conversations": turns[k]}, index, where, media_root) for k in PAIR_KEYS)
    return chosen, rejected


@dataclass
class Pair:
    """One item: the chosen and the rejected conversation, labels on the last answer only."""

    chosen: Example
    rejected: Example


def last_answer_only(example: Example) -> Example:
    """``example`` with the labels of every answer but the last set to ``IGNORE_INDEX`` (earlier answers are
    the prompt's context)."""
    labels = example.labels.clone()
    labels[:example.answer_spans[-1][0]] = IGNORE_INDEX
    example.labels = labels
    return example


class PreferenceData(TrainingData):
    """The pairs of a preference file (module docstring); ``len`` counts pairs, ``records`` holds both
    conversations of every pair (``validate`` checks them all)."""

    def _read(self, path, media_root) -> list[Record]:
        self.pairs = read_records(path, media_root, parse=parse_pair)
        return [r for pair in self.pairs for r in pair]

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Frames stay epoch 0's: the cached reference log-probabilities were computed for them."""

    def __getitem__(self, i: int) -> Pair:
        chosen, rejected = self.pairs[i]
        return Pair(last_answer_only(self.example(chosen)), last_answer_only(self.example(rejected)))


def collate_pairs(pairs: Sequence[Pair], pad: int = 0) -> Batch:
    """B pairs -> one right-padded batch of 2B rows: the B chosen conversations, then the B rejected ones (TRL's
    concatenated forward: ``chosen, rejected = logps.chunk(2)``)."""
    if not pairs:
        raise DataError("collate_pairs needs at least one pair")
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad)
