"""Teacher-forced log-probabilities of candidate answers: lm-evaluation-harness's ``loglikelihood`` request
for prompts with images and videos, one prefill per prompt shared by all of its candidates.

    from llava_next.eval import score, ScoreItem
    items = [ScoreItem("q1", "Which animal is this?", [" cat", " dog"], images=("chelsea.jpg",))]
    for result in score(pipe, items): print(result.id, [c.logprob for c in result.candidates])

What it computes, per candidate (lm-evaluation-harness, ``lm_eval/models/huggingface.py``
``HFLM._loglikelihood_tokens`` and ``lm_eval/api/task.py`` ``ConfigurableTask.process_results``):
- the request is (context, continuation) -> (log-probability, is_greedy): ``logprob`` is the sum over the
  continuation's tokens of log softmax(logits)[token], each token predicted from the context and the
  continuation tokens before it; ``is_greedy`` is True when every continuation token is the argmax of its
  position (what greedy decoding would have produced).
- the continuation is ``delimiter + candidate``: lm-eval's multiple-choice requests are
  ``(ctx, target_delimiter + choice)`` with ``target_delimiter`` " " by default, and its ``acc_norm``
  divides the sum by the *character* length of the choice (``completion_len = len(choice)``, the delimiter
  not counted); ``acc_bytes`` by its UTF-8 byte length. Both are reported (``per_char``, ``per_byte``), with
  the per-token mean (``per_token``).
- tokenization as lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the front of the
  continuation, then whole = encode(context + continuation), continuation ids = whole[len(encode(context)):],
  so a token that merges across the boundary belongs to the continuation. The context is the prompt rendered
  with the checkpoint's chat template, ending where the assistant's answer starts.

lmms-eval's multimodal wrappers (``lmms_eval/models/simple/llava*.py`` ``loglikelihood``) differ on purpose:
they append the candidate as the assistant turn of the conversation (so the template's end-of-turn
separator is scored too) and return the model's mean cross-entropy (``float(loss.item())``), not a sum. Here
``per_token`` is minus that mean for the candidate's own tokens, and the end-of-turn text can be scored by
making it part of the candidate.

How it runs (the speed): the prompts of a batch of items are encoded and prefilled once, left padded, into
the decoder's KV cache (B rows); the cache rows are then copied once per candidate (N rows: row r of item i
for each of its candidates, ``Decoder.select_cache_rows``) and all candidates of the batch run as one
(N, L - 1) forward over the cached prompts (L: the longest continuation, right padded: the padding sits after
every real token, so causal attention never lets a real token see it). The first continuation token is
scored from the prefill's last logits. Log-softmax is taken in float32.

Reductions: frame selection and token reduction before the decoder apply (``Pipeline.prepare``); an
in-decoder reduction (a prefill pruner, a decode selector) is refused (``ScoreError``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..inputs.prompt import IMAGE, VIDEO, render_prompt
from ..model.generate import positions_from_mask
from ..reduce.stages import Reduction
from ..runtime.files import check_media_file
from ..runtime.pipeline import Pipeline, Request

PathLike = str | os.PathLike


class ScoreError(ValueError):
    """A scoring request that cannot be scored as asked; the message says what to change."""


@dataclass(frozen=True)
class ScoreItem:
    """One prompt with its media and the candidate answers to score against it."""

    id: str
    prompt: str
    candidates: Sequence[str]
    images: Sequence[PathLike] = ()
    videos: Sequence[PathLike] = ()
    frames: int = 8
    template: str | None = None
    system: str | None = None
    sampling: str = "uniform"  # video frame sampling (inputs/video.py)
    rope_scale: object = "config"  # "config", "auto", "original" or a factor (inputs/tokens.py)
    max_image_pixels: int | None = None


@dataclass
class CandidateScore:
    """One candidate's teacher-forced log-probability (module docstring)."""

    text: str  # the candidate as given
    tokens: list[int]  # the continuation's token ids (delimiter included)
    logprob: float  # sum over the continuation tokens
    per_token: float  # logprob / len(tokens)
    per_char: float  # logprob / len(text): lm-eval's acc_norm
    per_byte: float  # logprob / len(text.encode()): lm-eval's acc_bytes
    is_greedy: bool  # every token the argmax of its position
    token_logprobs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(text=self.text, tokens=self.tokens, logprob=self.logprob, per_token=self.per_token,
                    per_char=self.per_char, per_byte=self.per_byte, is_greedy=self.is_greedy,
                    token_logprobs=self.token_logprobs)


@dataclass
class ItemScore:
    id: str
    candidates: list[CandidateScore]
    input_tokens: int  # the prompt's, placeholders expanded
    visual_tokens: int
    seconds: float  # this item's share of its batch's wall time (preprocessing included)

    def best(self, by: str = "logprob") -> int:
        """Index of the candidate with the highest ``by`` ("logprob", "per_token", "per_char", "per_byte")."""
        values = [getattr(c, by) for c in self.candidates]
        return max(range(len(values)), key=values.__getitem__)

    def to_dict(self) -> dict:
        return {"id": self.id, "candidates": [c.to_dict() for c in self.candidates],
                "best": {by: self.best(by) for by in ("logprob", "per_token", "per_char", "per_byte")},
                "input_tokens": self.input_tokens, "visual_tokens": self.visual_tokens,
                "seconds": round(self.seconds, 4)}


# ---- tokenization ---------------------------------------------------------------------------------
def continuation_ids(tokenizer, context: str, continuation: str) -> list[int]:
    """lm-eval's ``_encode_pair``: the continuation's ids as they tokenize after ``context``."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    return whole[len(tokenizer.encode(context)):]


def _context_text(pipe: Pipeline, item: ScoreItem, request: Request) -> str:
    """The prompt text as ``Pipeline.prepare`` rendered it (videos sent as frames: one <image> per frame)."""
    prompt = item.prompt
    for clip in request.frame_clips:
        prompt = prompt.replace(VIDEO, IMAGE * clip.num_frames, 1)
    template = pipe.config.template if item.template is None else item.template
    return render_prompt(prompt, len(request.images), len(request.videos), template, item.system)


# ---- scoring --------------------------------------------------------------------------------------
def score(pipe: Pipeline, items: Sequence[ScoreItem], *, batch_size: int = 4, delimiter: str = " ",
          reduction: Reduction | None = None) -> Iterator[ItemScore]:
    """Each item's candidates scored, ``batch_size`` items (all their candidates) per forward, in order. A bad
    item raises (``score_records`` turns each failure into that item's error record instead)."""
    for start in range(0, len(items), batch_size):
        chunk = list(items[start:start + batch_size])
        t0 = time.perf_counter()
        requests, conts = [], []
        for item in chunk:
            request, ids = prepare_item(pipe, item, delimiter=delimiter, reduction=reduction)
            requests.append(request)
            conts.append(ids)
        logprobs, greedy = score_requests(pipe, requests, conts)
        seconds = (time.perf_counter() - t0) / len(chunk)
        for item, request, ids, lps, gr in zip(chunk, requests, conts, logprobs, greedy):
            yield ItemScore(item.id, [candidate_score(text, c, lp, g) for text, c, lp, g in zip(item.candidates, ids, lps, gr)],
                            len(request.input_ids), sum(request.image_token_counts) + sum(request.video_token_counts),
                            seconds)


def prepare_item(pipe: Pipeline, item: ScoreItem, *, delimiter: str = " ",
                 reduction: Reduction | None = None) -> tuple[Request, list[list[int]]]:
    """The prepared prompt and each candidate's continuation ids (``delimiter + candidate``)."""
    if not item.candidates:
        raise ScoreError(f"item {item.id!r}: no candidate answers to score; give at least one")
    if reduction is not None and (reduction.pruner is not None or reduction.decode is not None):
        raise ScoreError("score runs the decoder over the whole prompt and candidates: an in-decoder reduction "
                         "(a prefill pruner such as fastv, a decode selector) does not apply; use a frame "
                         "selector or a token reducer before the decoder, or score without --reduce")
    for what, paths in (("image", item.images), ("video", item.videos)):
        for path in paths:  # the error run, batch and eval give for the same path
            if isinstance(path, (str, os.PathLike)) and not os.fspath(path).startswith("sample:"):
                check_media_file(path, what)
    conts_text = [delimiter + c for c in item.candidates]
    probe = pipe.prepare(item.prompt, images=list(item.images), videos=list(item.videos), frames=item.frames,
                         template=item.template, system=item.system, reduction=reduction, sampling=item.sampling,
                         rope_scale=item.rope_scale, max_image_pixels=item.max_image_pixels)
    context = _context_text(pipe, item, probe)
    ids = [continuation_ids(pipe.tokenizer, context, text) for text in conts_text]
    for text, c in zip(item.candidates, ids):
        if not c:
            raise ScoreError(f"item {item.id!r}: the candidate {text!r} tokenizes to no tokens after the prompt; "
                             f"give a non-empty candidate")
    longest = max(len(c) for c in ids)
    if probe.plan.new_tokens < longest:  # the context check with the candidates' length (no second decode)
        from ..inputs.tokens import check_context, plan_context

        plan = plan_context(probe.plan.text_tokens, probe.plan.visual_tokens, pipe.config, probe.plan.factor,
                            new_tokens=longest, video_tokens=probe.plan.video_tokens)
        check_context(plan)
    return probe, ids


@torch.no_grad()
def score_requests(pipe: Pipeline, requests: Sequence[Request],
                   conts: Sequence[Sequence[Sequence[int]]]) -> tuple[list[list[list[float]]], list[list[list[bool]]]]:
    """Per request, per candidate: the log-probability and greedy flag of each continuation token."""
    decoder = pipe.model.language_model
    rows = torch.tensor([i for i, cs in enumerate(conts) for _ in cs])  # (N,) the request of each candidate
    flat = [list(c) for cs in conts for c in cs]
    L = max(len(c) for c in flat)
    previous = decoder.rope_scaling_factor
    try:
        embeds, mask, _ = pipe.embed_with_layout(requests)  # (B, T, C), (B, T) left padded
        B, T, _ = embeds.shape
        decoder.rope_scaling_factor = max(r.plan.factor for r in requests)
        decoder.setup_caches(B, T + L, dtype=embeds.dtype, device=embeds.device)
        positions = positions_from_mask(mask)  # (B, T)
        key_mask = None if bool(mask.all()) else mask
        first = decoder(input_embeds=embeds, input_pos=torch.arange(T, device=embeds.device),
                        position_ids=positions, key_mask=key_mask, last_only=True)[:, -1]  # (B, V)
        rows_d = rows.to(embeds.device)
        logits = first[rows_d][:, None]  # (N, 1, V) predicts each continuation's first token
        tokens = torch.zeros(len(flat), L, dtype=torch.long, device=embeds.device)  # (N, L) right padded
        for n, c in enumerate(flat):
            tokens[n, :len(c)] = torch.tensor(c)
        if L > 1:
            decoder.select_cache_rows(rows_d)  # (N, Hkv, T + L, D): each candidate its item's prompt
            steps = torch.arange(1, L, device=embeds.device)  # (L - 1,)
            cont_mask = torch.cat([mask[rows_d], mask.new_ones(len(flat), L - 1)], dim=1)  # (N, T + L - 1)
            more = decoder(tokens[:, :-1], input_pos=T - 1 + steps, position_ids=positions[rows_d, -1:] + steps,
                           key_mask=None if bool(cont_mask.all()) else cont_mask)  # (N, L - 1, V)
            logits = torch.cat([logits, more], dim=1)  # (N, L, V)
    finally:
        decoder.rope_scaling_factor = previous
        decoder.clear_caches()
    logp = logits.float().log_softmax(dim=-1)  # (N, L, V)
    picked = logp.gather(-1, tokens[..., None])[..., 0]  # (N, L)
    greedy = logits.argmax(dim=-1) == tokens  # (N, L)
    out_lp: list[list[list[float]]] = [[] for _ in requests]
    out_gr: list[list[list[bool]]] = [[] for _ in requests]
    for n, (r, c) in enumerate(zip(rows.tolist(), flat)):
        out_lp[r].append(picked[n, :len(c)].tolist())
        out_gr[r].append(greedy[n, :len(c)].tolist())
    return out_lp, out_gr


def candidate_score(text: str, ids: list[int], token_logprobs: list[float], greedy: list[bool]) -> CandidateScore:
    total = float(sum(token_logprobs))
    return CandidateScore(text, list(ids), total, total / len(ids), total / max(len(text), 1),
                          total / max(len(text.encode("utf-8")), 1), all(greedy), token_logprobs)


# ---- files: the items of ``llava-next score`` -------------------------------------------------------
ITEM_KEYS = {"id", "prompt", "candidates", "image", "images", "video", "videos", "frames", "template", "system"}


def read_score_items(path: PathLike, *, media_root: PathLike | None = None, frames: int = 8) -> list[ScoreItem]:
    """The items of a JSON lines file: ``{"id", "prompt", "candidates": [...], "image" / "video": path or list,
    "frames"}``; media paths relative to ``media_root`` (default: the file's folder). Bad lines raise
    ``ScoreError`` naming the line."""
    import json
    from pathlib import Path

    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    items, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScoreError(f"{where}: not JSON ({e})") from None
            if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
                raise ScoreError(f"{where}: each line must be a JSON object with a non-empty string \"id\"")
            unknown = sorted(set(raw) - ITEM_KEYS)
            if unknown:
                raise ScoreError(f"{where}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(ITEM_KEYS))}")
            if raw["id"] in seen:
                raise ScoreError(f"{where}: id {raw['id']!r} is used twice; ids key the output")
            seen.add(raw["id"])
            cands = raw.get("candidates")
            if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
                raise ScoreError(f"{where}: \"candidates\" must be a non-empty list of answer texts")
            if not isinstance(raw.get("prompt"), str):
                raise ScoreError(f"{where}: \"prompt\" must be the question text")
            media = {k: [p if p.startswith("sample:") else str(root / p) for p in _strings(raw, k, where)]
                     for k in ("image", "images", "video", "videos")}
            n = raw.get("frames", frames)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ScoreError(f"{where}: \"frames\" must be an integer >= 1, got {n!r}")
            items.append(ScoreItem(raw["id"], raw["prompt"], cands, media["image"] + media["images"],
                                   media["video"] + media["videos"], n, raw.get("template"), raw.get("system")))
    return items


def _strings(raw: dict, key: str, where: str) -> list[str]:
    value = raw.get(key) or []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ScoreError(f"{where}: \"{key}\" must be a file path or a list of them")
    return value


def score_records(pipe: Pipeline, items: Sequence[ScoreItem], *, batch_size: int = 4, delimiter: str = " ",
                  reduction: Reduction | None = None) -> Iterator[dict]:
    """``score`` as output records: an ok record per item (``ItemScore.to_dict``), or its error record
    (runtime/batch.py's ``error_record``) when the item cannot be scored; a failed batch is retried item by item."""
    from ..runtime.batch import error_record

    for start in range(0, len(items), batch_size):
        chunk, prepared = list(items[start:start + batch_size]), []
        t0 = time.perf_counter()
        for item in chunk:
            try:
                prepared.append((item, *prepare_item(pipe, item, delimiter=delimiter, reduction=reduction)))
            except Exception as e:  # noqa: BLE001 — one item's failure is its error line
                yield error_record(item, e)
        if not prepared:
            continue
        try:
            lps, grs = score_requests(pipe, [r for _, r, _ in prepared], [c for _, _, c in prepared])
        except Exception as e:  # noqa: BLE001
            if len(prepared) == 1:
                yield error_record(prepared[0][0], e)
            else:
                for item, _, _ in prepared:
                    yield from score_records(pipe, [item], delimiter=delimiter, reduction=reduction)
            continue
        seconds = (time.perf_counter() - t0) / len(prepared)
        for (item, request, ids), lp, gr in zip(prepared, lps, grs):
            result = ItemScore(item.id, [candidate_score(t, c, l, g) for t, c, l, g in zip(item.candidates, ids, lp, gr)],
                               len(request.input_ids), sum(request.image_token_counts) + sum(request.video_token_counts),
                               seconds)
            yield {"id": item.id, "status": "ok", **result.to_dict()}
