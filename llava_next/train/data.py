"""Training data: LLaVA's conversation files -> ids with expanded placeholders, labels and media.

    data = TrainingData("train.jsonl", tokenizer, config, media_root="clips/", frames=8, seed=0)
    data.validate()                       # every item checked before step 1 (DataError names the line)
    data.set_epoch(epoch)                 # frames are drawn once per (seed, epoch, item)
    batch = collate([data[i] for i in idx], pad_id=pad_id(tokenizer))

The format (LLaVA's, as the original ``LazySupervisedDataset`` reads it): a JSON list or JSONL, each item
``{"id": ..., "image": PATH | [PATH, ...], "video": PATH, "conversations": [{"from": "human", "value":
"<video>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``, media paths relative to ``media_root``.

What is here, top to bottom
- ``read_records``: parse and check the file's structure; each item becomes a ``Record`` that knows where
  it came from (``train.jsonl line 7`` / ``train.json item [6]``).
- ``render_conversation``: the whole conversation in the model's chat template (the templates of
  inputs/prompt.py, rendered with their own functions) and the character spans that are supervised.
- ``encode_conversation``: tokenize that text once (as ``build_input_ids`` does, checked equal) and mark
  the tokens whose characters fall in a supervised span; everything else is ``IGNORE_INDEX``.
- ``frame_indices``: the seeded per-(seed, epoch, item) frame draw.
- ``TrainingData``: items -> ``Example`` (media preprocessed by inputs/image.py and inputs/video.py, each
  placeholder expanded to its visual-token count as ``Pipeline._token_plan`` does, labels aligned);
  ``validate`` checks every item, media decoded, before training.
- ``collate``: right-padded batches mixing images and videos.

Which tokens are supervised (the original llava/train/train.py, LLaVA-VL/LLaVA-NeXT):
- ``preprocess_v1`` (llava_v1 / vicuna_v1, SeparatorStyle.TWO): the conversation is split on ``sep2``
  ("</s>") into rounds; per round the "USER: ... ASSISTANT: " instruction is ``IGNORE_INDEX`` and the rest
  — the answer and the ``</s>`` that ended the round (``round_len`` counts a BOS in its place) — is
  supervised. BOS and the system prompt are masked (``target[:cur_len]`` with ``cur_len = 1``; the system
  text is part of the first instruction).
- ``preprocess_llama_2`` (mistral_instruct): the same with ``sep = "[/INST] "``: the answer, the space
  before ``</s>`` and ``</s>``.
- ``preprocess_mpt`` (chatml_direct): rounds split on "<|im_end|>"; the answer and its ``<|im_end|>``.
- ``preprocess_qwen`` (qwen_1_5 and the llava-hf Qwen templates): per message, the system and user
  messages are masked and the assistant message is supervised *with its header and newlines*; then every
  "\\n", ``<|im_start|>`` and ``<|im_end|>`` is unmasked, in user turns too (LLaVA-NeXT issue #212).
  ``supervise="answers"`` (the default) supervises the answer and its ``<|im_end|>`` only, as for the other
  templates (what TRL's assistant-only loss and LLaMA-Factory do); ``supervise="original"`` reproduces
  ``preprocess_qwen`` token for token.
In every template the whitespace the template puts between "ASSISTANT:" and the answer belongs to the
answer's first token (SentencePiece "▁", byte-level "Ġ"), so it is supervised too: the original's
``instruction_len = len(tokenize(parts[0])) - 2`` drops that token from the instruction for this reason.

Notable choices
- One tokenization of the whole text, labels from character spans (token offsets): the original
  tokenizes each round again to count its length and, when the counts disagree with the whole
  ("WARNING: tokenization mismatch"), silently masks the whole sample. Here nothing can disagree.
- ``llava_next_video`` (the llava-hf chat template) ends an answer with " " and no ``</s>``: a model
  trained on it would never learn to stop, so training appends ``</s>`` to each answer (supervised),
  as LLaMA-Factory's template does and as the original video model's ``vicuna_v1`` does.
- A video item whose text uses ``<image>`` (the original LLaVA-NeXT video data does) takes it as the
  video's placeholder. Placeholders at the front of the first question are put where the template
  puts media (``preprocess_multimodal`` moves the ``<image>`` there); placeholders elsewhere stay.
- A prompt longer than ``max_length`` or the RoPE context is an error, not a truncation: the original
  collator cuts at ``model_max_length``, which can cut visual tokens and the answer.
- Frames: ``frame_sampling="random"`` (default) draws one frame from each of ``frames`` equal segments
  of the video (TSN), from a generator seeded with (seed, epoch, item index): the same every run, new
  every epoch; ``"uniform"`` is the original's ``np.linspace`` (the same frames every epoch); ``"scene"``
  spreads the frames over the video's scenes (llava_next/inputs/scenes.py: PySceneDetect's cuts, found
  once per video file and kept for every epoch; the same frames every epoch).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from ..config import LlavaNextConfig
from ..inputs.image import ImageError, ImageInput, load_image, preprocess_image
from ..inputs.prompt import IMAGE, TEMPLATES, VIDEO, PromptError, TemplateChoice, Tokenizer, build_input_ids, \
    expand_placeholders
from ..inputs.tokens import ContextOverflowError, check_context, image_aspect, image_plan, plan_context, video_plan
from ..inputs.scenes import SceneOptions, spread_frames
from ..inputs.video import VideoClip, VideoError, frame_options, load_video, scene_cuts, uniform_indices

IGNORE_INDEX = -100  # the original llava/constants.py; torch's cross_entropy ignore_index default
FrameSampling = Literal["random", "uniform", "scene"]
Supervise = Literal["answers", "original"]
PathLike = str | os.PathLike

# The text each template writes after an answer, before the next user turn (inputs/prompt.py's render
# functions; checked against them for every conversation in render_conversation).
ANSWER_END = {"llava_v1": "</s>", "vicuna_v1": "</s>", "mistral_instruct": " </s>", "chatml_direct": "<|im_end|>",
              "llava_next_video": " ", "qwen_interleave_hf": "<|im_end|>\n", "qwen_onevision_hf": "<|im_end|>\n",
              "qwen_1_5": "<|im_end|>\n"}
assert set(ANSWER_END) == set(TEMPLATES)
ANSWER_STOP_ADDED = {"llava_next_video": "</s>"}  # appended to each answer where the template has no stop
CHATML = ("qwen_interleave_hf", "qwen_onevision_hf", "qwen_1_5")


class DataError(ValueError):
    """A training item that cannot be used; the message names the file and line (JSONL) or index (JSON)."""


# --------------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One item of the file, its media resolved against ``media_root`` (not yet checked on disk)."""

    index: int  # position in the file (0-based): the frame draw's key, stable under shuffling
    where: str  # "train.jsonl line 7" / "train.json item [6]": what every error about it names
    id: str
    images: tuple[Path, ...]
    video: Path | None
    turns: tuple[tuple[str, str], ...]  # (human value, gpt value), in order
    system: str | None  # a leading {"from": "system"} turn, else None (the template's default)


def _fail(where: str, problem: str, fix: str) -> DataError:
    return DataError(f"{where}: {problem}; {fix}")


def _media_paths(value: object, key: str, where: str, root: Path) -> list[Path]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(p, str) and p for p in items):
        raise _fail(where, f'"{key}" must be a path or a list of paths, got {json.dumps(value)[:80]}',
                    f"write the media file's path relative to the media root")
    return [root / p for p in items]


def parse_item(item: object, index: int, where: str, media_root: PathLike) -> Record:
    """Check one item's fields and turn order (no file is opened)."""
    if not isinstance(item, dict):
        raise _fail(where, f"expected a JSON object, got {type(item).__name__}",
                    'each item is {"id": ..., "image" or "video": ..., "conversations": [...]}')
    conv = item.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise _fail(where, 'no "conversations" list' if conv is None else '"conversations" must be a non-empty list',
                    'give [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]')
    for k, turn in enumerate(conv):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise _fail(where, f"conversation turn {k} is not {{\"from\": ..., \"value\": TEXT}}",
                        'write every turn as {"from": "human" | "gpt", "value": "..."}')
    system = None
    if conv[0]["from"] == "system":
        system, conv = conv[0]["value"], conv[1:]
    roles = [t["from"] for t in conv]
    expected = ["human", "gpt"] * (len(conv) // 2 + 1)
    if not roles or roles != expected[:len(roles)] or len(roles) % 2:
        got = " -> ".join(roles) or "nothing after the system turn"
        raise _fail(where, f"turns go {got}", 'turns must alternate "human", "gpt", starting with "human" and ending '
                                              'with "gpt" (an optional "system" turn first)')
    for k, turn in enumerate(conv):
        if turn["from"] == "gpt" and (IMAGE in turn["value"] or VIDEO in turn["value"]):
            raise _fail(where, f"answer {k // 2} contains a media placeholder", "media go in the human turns")
        if turn["from"] == "gpt" and not turn["value"].strip():
            raise _fail(where, f"answer {k // 2} is empty", "give every gpt turn a non-empty answer, or drop the turn")
    root = Path(media_root)
    images = _media_paths(item["image"], "image", where, root) if item.get("image") is not None else []
    video = item.get("video")
    if video is not None and not (isinstance(video, str) and video):
        raise _fail(where, f'"video" must be one path, got {json.dumps(video)[:80]}',
                    "give one video per item (several clips: one item each)")
    turns = tuple((conv[k]["value"], conv[k + 1]["value"]) for k in range(0, len(conv), 2))
    return Record(index, where, str(item.get("id", index)), tuple(images),
                  root / video if video else None, turns, system)


def read_records(path: PathLike, media_root: PathLike | None = None, parse=parse_item) -> list:
    """Every item of a JSON list or JSONL file (JSONL: a ``.jsonl`` name, or any file not starting with
    "["); blank lines are skipped. ``media_root`` defaults to the file's folder. Raises one ``DataError``
    naming every item whose structure is wrong (the media are checked by ``TrainingData.validate``).
    ``parse(item, index, where, root)``: what one item becomes (``parse_item``: a ``Record``; preference
    pairs: train/preferences.py)."""
    path = Path(path)
    root = path.parent if media_root is None else Path(media_root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; give the training data's path") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e}); fix the file, or write one item per line (JSONL)") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of items; write [item, item, ...] or JSONL")
        numbered = [(f"{path.name} item [{i}]", item, None) for i, item in enumerate(items)]
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((f"{path.name} line {n}", json.loads(line), None))
                except ValueError as e:
                    numbered.append((f"{path.name} line {n}", None, _fail(f"{path.name} line {n}", f"not valid JSON ({e})",
                                                                          "write one JSON object per line")))
    if not numbered:
        raise DataError(f"{path}: no items; the file is empty")
    records, errors = [], []
    for index, (where, item, error) in enumerate(numbered):
        try:
            if error is not None:
                raise error
            records.append(parse(item, index, where, root))
        except DataError as e:
            errors.append(str(e))
    if errors:
        raise_all(path, errors, len(numbered))
    return records


def raise_all(path: Path, errors: list[str], total: int, max_errors: int = 20) -> None:
    """One ``DataError`` for every bad item: the message itself when there is one."""
    if len(errors) == 1:
        raise DataError(errors[0])
    more = f"\n... and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
    raise DataError(f"{path}: {len(errors)} of {total} items cannot be used:\n" + "\n".join(errors[:max_errors]) + more)


# --------------------------------------------------------------------------------------------------
# Text: the conversation in the template, and which characters are supervised
# --------------------------------------------------------------------------------------------------
_LEADING_MEDIA = re.compile(rf"^(?:(?:{re.escape(IMAGE)}|{re.escape(VIDEO)})\n?)+")


def place_media(record: Record, n_images: int, n_videos: int) -> list[str]:
    """The human texts with placeholders checked against the media: a leading run that holds them all is
    removed (the template puts media there itself); otherwise they stay where they are written."""
    users = [h for h, _ in record.turns]
    if n_videos and not n_images and not any(VIDEO in u for u in users):
        users = [u.replace(IMAGE, VIDEO) for u in users]  # the original video data writes <image> for the video
    found = sum(u.count(IMAGE) for u in users), sum(u.count(VIDEO) for u in users)
    if found != (n_images, n_videos):
        raise _fail(record.where, f"the text has {found[0]} {IMAGE} and {found[1]} {VIDEO} but the item has "
                                  f"{n_images} image(s) and {n_videos} video(s)",
                    f"write one {IMAGE} per image and one {VIDEO} per video in the human turns")
    lead = _LEADING_MEDIA.match(users[0])
    if lead and lead.group(0).count("<") == n_images + n_videos:
        users[0] = users[0][lead.end():]
    return users


def render_conversation(users: Sequence[str], answers: Sequence[str], template: str, system: str | None,
                        n_images: int, n_videos: int) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the template renders it, and the (start, end) character span of each answer
    that is supervised: the whitespace before it, the answer, and the text up to and including the
    template's end-of-turn token."""
    if template not in TEMPLATES:
        raise PromptError(f"training needs a chat template; choose one of {list(TEMPLATES)}")
    spec = TEMPLATES[template]
    users = list(users)
    if not any(IMAGE in u or VIDEO in u for u in users):
        users[0] = spec.media(n_images, n_videos) + users[0]  # as render_prompt places media
    stop, added = spec.stop, ANSWER_STOP_ADDED.get(template, "")
    answers = [a + added for a in answers]
    system = spec.system if system is None else system
    text, spans = "", []
    for k in range(len(users)):
        prompt = spec.render(system, list(zip(users[:k], answers[:k])), users[k])  # ends where answer k starts
        if not prompt.startswith(text):
            raise AssertionError(f"template {template} does not render turn {k} after turn {k - 1}")
        after = ANSWER_END[template]
        # the next turn's render holds this answer as the template writes it (after the last answer: a
        # stand-in question, so the last turn is written exactly like the others)
        following = spec.render(system, list(zip(users[:k + 1], answers[:k + 1])),
                                users[k + 1] if k + 1 < len(users) else "?")
        rest = following[len(prompt):]
        lead = rest[:rest.find(answers[k])]
        if lead.strip() or not rest[len(lead):].startswith(answers[k] + after):
            raise AssertionError(f"template {template}: ANSWER_END {after!r} does not match its render")
        turn = lead + answers[k] + after
        end = turn.index(stop, len(lead) + len(answers[k]) - len(added)) + len(stop)
        spans.append((len(prompt), len(prompt) + end))
        text = prompt + turn
    return text, spans


def _encode_with_offsets(text: str, tokenizer: Tokenizer, placeholder_ids: dict[str, int]) -> tuple[list[int], list]:
    """``build_input_ids``' tokenization of ``text`` (template "none"), with each token's character span."""
    if all(tokenizer.added_token_id(p) is not None for p in placeholder_ids):
        enc = tokenizer.backend.encode(text)
        return enc.ids, enc.offsets
    ids, offsets, pos = [], [], 0  # the original tokenizer_image_token: chunks, one BOS, placeholder ids between
    pattern = "(" + "|".join(map(re.escape, placeholder_ids)) + ")"
    for k, part in enumerate(re.split(pattern, text)):
        if k % 2:
            ids.append(placeholder_ids[part])
            offsets.append((pos, pos + len(part)))
        else:
            enc = tokenizer.backend.encode(part)
            skip = int(bool(ids) and bool(enc.ids) and enc.ids[0] == tokenizer.bos_id and tokenizer.add_bos)
            ids += enc.ids[skip:]
            offsets += [(pos + a, pos + b) for a, b in enc.offsets[skip:]]
        pos += len(part)
    return ids, offsets


@dataclass
class Encoded:
    """One conversation tokenized: one id per placeholder (not yet expanded)."""

    text: str
    input_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]]  # (first, end) token range of each supervised answer


def encode_conversation(record: Record, tokenizer: Tokenizer, config: LlavaNextConfig, template: str, *,
                        n_images: int, n_videos: int, frames_as_images: int = 0,
                        supervise: Supervise = "answers") -> Encoded:
    """Render and tokenize ``record``'s conversation; labels are the ids of supervised tokens, else
    ``IGNORE_INDEX``. ``frames_as_images``: the video goes in as that many ``<image>`` (Interleave)."""
    users = place_media(record, n_images, n_videos)
    if frames_as_images:
        users = [u.replace(VIDEO, IMAGE * frames_as_images) for u in users]
        n_images, n_videos = n_images + frames_as_images, 0
    text, char_spans = render_conversation(users, [a for _, a in record.turns], template, record.system,
                                           n_images, n_videos)
    try:
        ids = build_input_ids(text, tokenizer, config, n_images, n_videos, template="none")
    except PromptError as e:
        raise _fail(record.where, str(e), "fix the item's text or media") from None
    wanted = {IMAGE: config.image_token_id} | ({VIDEO: config.video_token_id} if config.video_token_id is not None
                                               else {})
    own, offsets = _encode_with_offsets(text, tokenizer, {p: i for p, i in wanted.items() if p in text})
    if own != ids:
        raise AssertionError(f"{record.where}: tokenization with offsets differs from build_input_ids")
    labels, spans = [IGNORE_INDEX] * len(ids), []
    for s, e in char_spans:
        inside = [i for i, (a, b) in enumerate(offsets) if a < e and b > s and b > a]
        for i in inside:
            labels[i] = ids[i]
        spans.append((inside[0], inside[-1] + 1))
    if supervise == "original":
        labels = _qwen_original_labels(text, ids, offsets, labels, tokenizer, template)
    elif supervise != "answers":
        raise ValueError(f"supervise must be 'answers' or 'original', got {supervise!r}")
    return Encoded(text, ids, labels, spans)


def _qwen_original_labels(text: str, ids: list[int], offsets: list, labels: list[int], tokenizer: Tokenizer,
                          template: str) -> list[int]:
    """``preprocess_qwen``'s labels: whole assistant messages ("<|im_start|>assistant\\n...<|im_end|>\\n"),
    then every "\\n", "<|im_start|>" and "<|im_end|>" token wherever it is."""
    if template not in CHATML:
        raise ValueError(f"supervise='original' differs from 'answers' only for the Qwen templates {list(CHATML)}; "
                         f"the other templates' original preprocess supervises exactly the answers")
    labels = list(labels)
    header = "<|im_start|>assistant\n"
    for m in re.finditer(re.escape(header) + r".*?<\|im_end\|>\n?", text, re.S):
        for i, (a, b) in enumerate(offsets):
            if a < m.end() and b > m.start() and b > a:
                labels[i] = ids[i]
    unmask = {tokenizer.token_id("<|im_start|>"), tokenizer.token_id("<|im_end|>")}
    unmask |= set(tokenizer.backend.encode("\n", add_special_tokens=False).ids)
    return [t if t in unmask else label for t, label in zip(ids, labels)]


# --------------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------------
def frame_indices(total_frames: int, num_frames: int, *, seed: int, epoch: int, index: int,
                  sampling: FrameSampling = "random") -> list[int]:
    """The frames item ``index`` uses in ``epoch``: one random frame per equal segment ("random"), drawn from
    ``np.random.default_rng([seed, epoch, index])``; a video shorter than ``num_frames`` (or "uniform")
    gets the original ``uniform_indices`` (repeats included)."""
    if sampling == "uniform" or total_frames < num_frames:
        return uniform_indices(total_frames, num_frames)
    if sampling != "random":
        raise ValueError(f"frame_sampling must be 'random' or 'uniform', got {sampling!r}")
    rng = np.random.default_rng([seed, epoch, index])
    bounds = np.linspace(0, total_frames, num_frames + 1).astype(int)  # segment k: [bounds[k], bounds[k+1])
    return [int(rng.integers(lo, max(hi, lo + 1))) for lo, hi in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------------
@dataclass
class Example:
    """What one training step needs of one item."""

    input_ids: torch.Tensor  # (T,) long, placeholders expanded: one id per visual token
    labels: torch.Tensor  # (T,) long, IGNORE_INDEX except the supervised tokens
    images: list[ImageInput]  # in placeholder order (an Interleave video: its frames, after the images)
    videos: list[VideoClip]
    image_token_counts: list[int]
    video_token_counts: list[int]
    where: str
    id: str
    answer_spans: list[tuple[int, int]] = field(default_factory=list)  # token ranges in input_ids, per answer


@dataclass(frozen=True)
class Summary:
    """What ``validate`` found: the whole file is usable."""

    items: int
    images: int
    videos: int
    tokens: int  # all positions of all items (visual tokens included)
    supervised_tokens: int
    longest: int  # positions of the longest item
    longest_where: str


class TrainingData(torch.utils.data.Dataset):
    """The items of a LLaVA-format file, as ``Example``s. ``template`` defaults to the config's; ``frames``
    per video; ``max_length``: refuse items longer than this many positions (default: the RoPE context)."""

    def __init__(self, path: PathLike, tokenizer: Tokenizer, config: LlavaNextConfig, *,
                 media_root: PathLike | None = None, frames: int = 8, seed: int = 0,
                 frame_sampling: FrameSampling = "random", template: TemplateChoice | None = None,
                 supervise: Supervise = "answers", max_length: int | None = None,
                 scene: SceneOptions = SceneOptions()) -> None:
        self.path, self.tokenizer, self.config = Path(path), tokenizer, config
        self.records = self._read(path, media_root)
        self.frames, self.seed, self.frame_sampling, self.supervise = frames, seed, frame_sampling, supervise
        self.template = config.template if template is None else template
        if self.template not in TEMPLATES:
            raise PromptError(f"training needs a chat template; choose one of {list(TEMPLATES)}")
        self.max_length = max_length
        self.epoch = 0
        self.scene, self._cuts = scene, {}  # frame_sampling "scene": cuts per video path, found once

    def _read(self, path: PathLike, media_root: PathLike | None) -> list[Record]:
        """The file's items (train/preferences.py reads pairs here)."""
        return read_records(path, media_root)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Which epoch's frames ``__getitem__`` draws (as ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> Example:
        return self.example(self.records[i])

    # ---- one item ---------------------------------------------------------------------------------
    def _open_media(self, record: Record, keep_pixels: bool) -> tuple[list[ImageInput], list, VideoClip | None]:
        """(preprocessed images or None each when not ``keep_pixels``, image sizes, video clip)."""
        cfg = self.config
        for p in [*record.images, *([record.video] if record.video else [])]:
            if not p.is_file():
                raise _fail(record.where, f"{p}: no such file", "fix the path or the media root (--media-root)")
        if record.video is not None and cfg.video_token_id is None and not cfg.video_as_images:
            raise _fail(record.where, "a video item but this checkpoint is image-only", "use a video checkpoint")
        aspect = image_aspect(cfg, len(record.images))
        try:
            images = [preprocess_image(p, cfg, aspect=aspect) if keep_pixels else None for p in record.images]
            sizes = ([im.image_size for im in images] if keep_pixels else
                     [(im.height, im.width) for im in (load_image(p) for p in record.images)])
            clip = None
            if record.video is not None:
                def pick(total: int) -> list[int]:
                    if self.frame_sampling == "scene":
                        return spread_frames(self._scene_cuts(record.video), total, self.frames)
                    return frame_indices(total, self.frames, seed=self.seed, epoch=self.epoch, index=record.index,
                                         sampling=self.frame_sampling)
                clip = load_video(record.video, self.frames, pick=pick, keep_pixels=keep_pixels,
                                  **frame_options(cfg))
        except (ImageError, VideoError) as e:
            raise _fail(record.where, str(e), "replace or drop the item") from None
        return images, sizes, clip

    def _scene_cuts(self, video: Path) -> list[int]:
        if video not in self._cuts:
            self._cuts[video] = list(scene_cuts(video, self.scene).cuts)
        return self._cuts[video]

    def _encode(self, record: Record, sizes: list, clip: VideoClip | None):
        """Labels and expanded ids from media sizes and the frame count (``Pipeline._token_plan``'s counts)."""
        cfg = self.config
        as_images = self.frames if clip is not None and cfg.video_as_images else 0
        enc = encode_conversation(record, self.tokenizer, cfg, self.template, n_images=len(sizes),
                                  n_videos=int(clip is not None), frames_as_images=as_images,
                                  supervise=self.supervise)
        aspect = image_aspect(cfg, len(sizes))
        image_counts = [image_plan(hw, cfg, aspect).total for hw in sizes]
        image_counts += [image_plan(clip.size_hw, cfg, "resize").total] * as_images if clip is not None else []
        video_counts = [video_plan(self.frames, cfg).total] if clip is not None and not as_images else []
        ids = expand_placeholders(enc.input_ids, cfg.image_token_id, cfg.video_token_id, image_counts, video_counts)
        repeat = [1] * len(enc.input_ids)  # how many positions each unexpanded id became
        placeholders = [i for i, t in enumerate(enc.input_ids) if t in (cfg.image_token_id, cfg.video_token_id)]
        for pos, n in zip(placeholders, image_counts + video_counts):
            repeat[pos] = n
        labels = [label for label, n in zip(enc.labels, repeat) for _ in range(n)]  # placeholders: IGNORE_INDEX
        starts = np.concatenate([[0], np.cumsum(repeat)]).tolist()
        spans = [(starts[a], starts[b]) for a, b in enc.spans]
        visual = sum(image_counts) + sum(video_counts)
        plan = plan_context(len(ids) - visual, visual, cfg, video_tokens=sum(video_counts) + (
            sum(image_counts[len(sizes):])))
        try:
            check_context(plan)
        except ContextOverflowError as e:
            raise _fail(record.where, str(e), "drop the item, shorten it or use fewer --frames") from None
        if self.max_length is not None and len(ids) > self.max_length:
            raise _fail(record.where, f"{len(ids)} positions, more than max_length {self.max_length}",
                        "drop the item, shorten it, use fewer --frames or raise max_length")
        return ids, labels, spans, image_counts, video_counts

    def example(self, record: Record) -> Example:
        images, sizes, clip = self._open_media(record, keep_pixels=True)
        ids, labels, spans, image_counts, video_counts = self._encode(record, sizes, clip)
        videos = [clip] if clip is not None else []
        if clip is not None and self.config.video_as_images:  # each frame one untiled image (Pipeline's rule)
            tile = (self.config.tile_size,) * 2
            images += [ImageInput(clip.pixel_values[i:i + 1], clip.size_hw, tile, (0, 0))
                       for i in range(clip.num_frames)]
            videos = []
        return Example(torch.tensor(ids), torch.tensor(labels), images, videos, image_counts, video_counts,
                       record.where, record.id, spans)

    # ---- the whole file ---------------------------------------------------------------------------
    def validate(self, max_errors: int = 20) -> Summary:
        """Check every item before training: fields, turn order, placeholders, media files open and decode
        (every frame of every video), length. Raises one ``DataError`` listing every bad item (up to
        ``max_errors``, then how many more)."""
        errors, tokens, supervised, longest, longest_where, n_img, n_vid = [], 0, 0, 0, "", 0, 0
        for record in self.records:
            try:
                _, sizes, clip = self._open_media(record, keep_pixels=False)
                ids, labels, *_ = self._encode(record, sizes, clip)
            except (DataError, PromptError) as e:
                errors.append(str(e) if str(e).startswith(record.where) else f"{record.where}: {e}")
                continue
            tokens += len(ids)
            supervised += sum(label != IGNORE_INDEX for label in labels)
            n_img, n_vid = n_img + len(record.images), n_vid + (record.video is not None)
            if len(ids) > longest:
                longest, longest_where = len(ids), record.where
        if errors:
            raise_all(self.path, errors, len(self.records), max_errors)
        return Summary(len(self.records), n_img, n_vid, tokens, supervised, longest, longest_where)


def validate(path: PathLike, tokenizer: Tokenizer, config: LlavaNextConfig, **options) -> Summary:
    """``TrainingData(path, tokenizer, config, **options).validate()``: run it before training."""
    return TrainingData(path, tokenizer, config, **options).validate()


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Right-padded examples; media in row order (``LlavaNextModel.embed`` splices them in that order)."""

    input_ids: torch.Tensor  # (B, T) long, pad_id after each row's tokens
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX on padding
    images: list[ImageInput]
    videos: list[VideoClip]
    image_token_counts: list[int]
    video_token_counts: list[int]
    where: list[str]


def pad_id(tokenizer: Tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else 0 (the original collator's choice). Padded
    positions are masked and carry IGNORE_INDEX labels, so the id only has to be a valid embedding row."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


def collate(examples: Sequence[Example], pad: int = 0) -> Batch:
    """Stack examples, padding on the right (the original collator's ``padding_side="right"``): every row's
    positions then start at 0 as they did alone, causal attention keeps real tokens from seeing the pads
    after them, and the shifted loss never reads a pad as a target (labels IGNORE_INDEX). Left padding is
    for generation, where new tokens must line up at the end."""
    if not examples:
        raise ValueError("collate needs at least one example")
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n], labels[row, :n], mask[row, :n] = e.input_ids, e.labels, True
    return Batch(input_ids, mask, labels, [im for e in examples for im in e.images],
                 [v for e in examples for v in e.videos], [c for e in examples for c in e.image_token_counts],
                 [c for e in examples for c in e.video_token_counts], [e.where for e in examples])
