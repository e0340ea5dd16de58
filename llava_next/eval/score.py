"""Teacher-forced log-probabilities of candidate answers: lm-evaluation-harness's ``loglikelihood`` request
for prompts with images and videos, one prefill per prompt shared by all of its candidates.

    from llava_next.eval import score, ScoreItem
    items = [ScoreItem("q1", "Which animal is this?", ["cat", "dog"], images=("chelsea.jpg",))]  # " cat", " dog"
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

How it runs (the speed and the memory): the prompts of a batch of items are encoded and prefilled once, left
padded, into the decoder's KV cache (B rows, one per prompt). The candidates then run as one (B, S) forward:
row b holds its prompt's candidates one after another (each but its last token, whose logits are never
needed), written into the same row's cache after the prompt, and a per-query mask (``CandidateTree``) lets
each candidate token see its prompt and its own earlier tokens only — a tree of continuations over one
prefill, attention through SDPA with that mask. No KV cache is copied per candidate (a 7B prompt of 2,400
positions holds 1.2 GB of bf16 keys and values; four copies would add 5 GB). Each candidate's first token is
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
from ..model.attention import sdpa_attention
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
    previous = decoder.rope_scaling_factor
    try:
        embeds, mask, _ = pipe.embed_with_layout(requests)  # (B, T, C), (B, T) left padded
        B, T, _ = embeds.shape
        tree = CandidateTree.build(conts, positions_from_mask(mask)[:, -1], T, embeds.device)  # (B, S) fed tokens
        decoder.rope_scaling_factor = max(r.plan.factor for r in requests)
        decoder.setup_caches(B, T + max(tree.width, 1), dtype=embeds.dtype, device=embeds.device)
        first = decoder(input_embeds=embeds, input_pos=torch.arange(T, device=embeds.device),
                        position_ids=positions_from_mask(mask), key_mask=None if bool(mask.all()) else mask,
                        last_only=True)[:, -1]  # (B, V): predicts each candidate's first token
        more = None
        if tree.width:
            allowed = tree.allowed(mask)  # (B, 1, S, T + S)
            more = decoder(tree.tokens, input_pos=torch.arange(T, T + tree.width, device=embeds.device),
                           position_ids=tree.positions,
                           kernel=lambda q, k, v, _: sdpa_attention(q, k, v, causal=False, mask=allowed))  # (B, S, V)
    finally:
        decoder.rope_scaling_factor = previous
        decoder.clear_caches()
    return tree.gather(first, more)


@dataclass
class CandidateTree:
    """The candidates of each prompt laid one after another in its row, after the prompt: candidate c of row b
    feeds its tokens but the last (their logits predict the next ones) at columns [start, start + n). Each
    attends to its row's prompt and to itself, causally, never to the other candidates: a tree of
    continuations over one prefilled prompt, so no KV cache is copied (the row's cache is T + S long)."""

    conts: list[list[list[int]]]
    spans: list[list[tuple[int, int]]]  # per row, per candidate: (start column, fed tokens)
    tokens: torch.Tensor  # (B, S) fed tokens, 0 past a row's last
    positions: torch.Tensor  # (B, S) RoPE positions: the prompt's last + 1 + the token's index in its candidate
    prompt_len: int

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def build(cls, conts, last_position: torch.Tensor, prompt_len: int, device) -> "CandidateTree":
        spans, rows = [], []
        for cs in conts:
            start, row, mine = 0, [], []
            for c in cs:
                mine.append((start, len(c) - 1))
                row += list(c[:-1])
                start += len(c) - 1
            spans.append(mine)
            rows.append(row)
        S = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), S, dtype=torch.long)
        positions = torch.zeros(len(rows), S, dtype=torch.long)
        for b, (row, mine) in enumerate(zip(rows, spans)):
            tokens[b, :len(row)] = torch.tensor(row, dtype=torch.long)
            for start, n in mine:
                positions[b, start:start + n] = int(last_position[b]) + 1 + torch.arange(n)
        return cls([[list(c) for c in cs] for cs in conts], spans, tokens.to(device), positions.to(device), prompt_len)

    def allowed(self, prompt_mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, T + S) bool: every column sees its row's real prompt keys, a candidate's tokens also its own
        earlier tokens (columns past a row's last see only the prompt: their outputs are never read)."""
        B, S, T = self.tokens.shape[0], self.width, self.prompt_len
        allowed = torch.zeros(B, 1, S, T + S, dtype=torch.bool, device=prompt_mask.device)
        allowed[:, 0, :, :T] = prompt_mask[:, None, :]
        for b, mine in enumerate(self.spans):
            for start, n in mine:
                allowed[b, 0, start:start + n, T + start:T + start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        return allowed

    def gather(self, first: torch.Tensor, more: torch.Tensor | None) -> tuple[list, list]:
        """Per row, per candidate: each token's log-probability (log-softmax in float32) and greedy flag."""
        lp_first, top_first = first.float().log_softmax(-1), first.argmax(-1)  # (B, V), (B,)
        lp_more = more.float().log_softmax(-1) if more is not None else None  # (B, S, V)
        top_more = more.argmax(-1) if more is not None else None  # (B, S)
        out_lp, out_gr = [], []
        for b, (cs, mine) in enumerate(zip(self.conts, self.spans)):
            lps, grs = [], []
            for c, (start, n) in zip(cs, mine):
                lp, gr = [float(lp_first[b, c[0]])], [int(top_first[b]) == c[0]]
                if n:
                    rest = torch.tensor(c[1:], device=first.device)
                    lp += lp_more[b, start:start + n].gather(-1, rest[:, None])[:, 0].tolist()
                    gr += (top_more[b, start:start + n] == rest).tolist()
                lps.append(lp)
                grs.append(gr)
            out_lp.append(lps)
            out_gr.append(grs)
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
