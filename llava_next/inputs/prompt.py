"""Prompts: the chat templates the checkpoints were trained with, and text <-> token ids.

What is here, top to bottom
- ``Tokenizer``: a thin wrapper over ``tokenizers.Tokenizer`` loaded from a checkpoint's
  ``tokenizer.json`` (+ ``tokenizer_config.json`` beside it): encode with BOS as the checkpoint says,
  decode without special tokens, streaming decode, bos/eos/pad ids. The runtime never imports
  transformers.
- ``StreamDecoder``: incremental decode that yields text pieces whose concatenation is exactly the
  full decode, for any ids: it decodes each new token together with the previous ones (so
  SentencePiece "▁" spaces come out right) and holds back runs of byte-fallback pieces until they end
  (so multi-byte characters arrive whole and an invalid byte never rewrites text already shown).
- ``render_prompt``: the templates of docs/references.md (``TemplateName`` in config/schema.py), or
  ``"none"`` (the prompt is sent exactly as given).
- ``build_input_ids``: render + tokenize, with each ``<image>`` / ``<video>`` placeholder as one id.
- ``expand_placeholders``: each placeholder id -> its visual-token count copies (what transformers'
  processors do to the text), so parity tests can feed identical ids to both implementations.
- ``stop_token_ids``: eos plus the template's end-of-turn token.

Notable choices
- Media placeholders: one ``<image>`` per image, then one ``<video>`` per video, each followed by "\\n",
  at the front of the first user turn (the original code moves the image there; llava-hf chat
  templates render images, then videos, then text). If the user's text already contains placeholders
  they are used where they are, and their counts must equal the media counts (error names both).
- Placeholder ids: if the tokenizer has the placeholder as an added token (llava-hf tokenizers) the
  whole string is encoded at once and that id must equal the config's. Otherwise (an original
  LLaVA-NeXT SentencePiece tokenizer) we tokenize like the original ``tokenizer_image_token``: split on
  placeholders, encode each chunk on its own, keep only the first chunk's BOS and put the config's
  placeholder id between chunks. The two differ by a "▁" after each placeholder (docs/references.md, Tokenizers).
  (The original video code also writes "<image>" for a video; we write "<video>" and use the config's
  video id, so the model knows which medium each placeholder stands for.)
- BOS/EOS: tokenizer.json's post-processor decides (as in transformers 5); tokenizer_config.json's
  add_bos_token/add_eos_token only apply to a tokenizer.json without one. eos defaults to "</s>".
- ``llava_next_video`` is the llava-hf chat template: no system prompt by default, and earlier answers
  end with " " (no ``</s>``), unlike ``vicuna_v1``, the original video model's template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence, get_args

import tokenizers

from ..config import LlavaNextConfig, TemplateName

IMAGE, VIDEO = "<image>", "<video>"
TemplateChoice = TemplateName | Literal["none"]


class PromptError(ValueError):
    """The prompt, its media or its tokenizer do not fit together; the message says what to change."""


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: "<s>", {"content": "<s>", ...} or null."""
    return value.get("content") if isinstance(value, dict) else value  # type: ignore[return-value]


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _read_special(path: Path) -> dict:
    """The special-token fields of a tokenizer_config.json / special_tokens_map.json, checked (a damaged
    file is an error naming it, not a traceback from deep inside the tokenizer)."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError; RecursionError: absurd nesting
        raise PromptError(f"{path}: not valid JSON ({_first_line(e)}); the file is damaged or cut off: get the "
                          f"checkpoint's {path.name} again") from None
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a JSON object, got {type(data).__name__}; get the checkpoint's "
                          f"{path.name} again")
    for key in ("bos_token", "eos_token", "pad_token"):
        value = data.get(key)
        if not (value is None or isinstance(value, str)
                or isinstance(value, dict) and isinstance(value.get("content"), (str, type(None)))):
            raise PromptError(f"{path}: {key} must be a token string (or {{\"content\": token}}), got "
                              f"{str(value)[:60]}; get the checkpoint's {path.name} again")
    return data


class Tokenizer:
    """Text <-> ids for one checkpoint. Build with ``Tokenizer.load(dir_or_tokenizer_json)``."""

    def __init__(self, backend: tokenizers.Tokenizer, special: dict | None = None) -> None:
        """``special``: tokenizer_config.json fields (bos/eos/pad token, add_bos_token, add_eos_token)."""
        special = special or {}
        self.backend = backend
        plain, full = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
        start = next(k for k in range(len(full)) if full[k:k + len(plain)] == plain)
        prefix, suffix = full[:start], full[start + len(plain):]  # what the post-processor adds around a text

        def token_id(key: str, default: str | None) -> int | None:
            text = _token_text(special.get(key, default))
            return None if text is None else backend.token_to_id(text)

        self.bos_id = token_id("bos_token", None) if "bos_token" in special else (prefix[0] if prefix else None)
        self.eos_id = token_id("eos_token", "</s>")
        self.pad_id = token_id("pad_token", None)
        # The tokenizer.json post-processor decides BOS/EOS, as in transformers 5 (which ignores the
        # add_bos_token/add_eos_token of tokenizer_config.json when tokenizer.json exists; llava-hf files
        # agree with it). Only a tokenizer.json without post-processor takes the flags (as transformers 4).
        self._manual = backend.post_processor is None
        if self._manual:
            self.add_bos = bool(special.get("add_bos_token", False)) and self.bos_id is not None
            self.add_eos = bool(special.get("add_eos_token", False)) and self.eos_id is not None
        else:
            self.add_bos = self.bos_id is not None and self.bos_id in prefix
            self.add_eos = self.eos_id is not None and self.eos_id in suffix
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        # SentencePiece byte-fallback pieces "<0x41>": their runs are decoded together (see StreamDecoder)
        self.byte_ids = frozenset(i for t, i in backend.get_vocab().items() if _BYTE_PIECE.fullmatch(t))

    @staticmethod
    def load(path: str | Path) -> "Tokenizer":
        """From a checkpoint folder or a ``tokenizer.json`` (its folder's tokenizer_config.json is read)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            hint = (" It has a SentencePiece tokenizer.model: convert it once with transformers "
                    "(AutoTokenizer.from_pretrained(dir).save_pretrained(dir)); the runtime reads tokenizer.json only."
                    if (file.parent / "tokenizer.model").is_file() else "")
            raise PromptError(f"no tokenizer.json at {file}.{hint}")
        special: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (file.parent / name).is_file():
                special.update(_read_special(file.parent / name))
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust parser raises a bare Exception ("expected value at line 1 column 5")
            raise PromptError(f"{file}: not a tokenizer.json the tokenizers library can read ({_first_line(e)}); "
                              f"the file is damaged or cut off: get the checkpoint's tokenizer.json again") from None
        try:
            return Tokenizer(backend, special)
        except StopIteration:  # the post-processor does not keep the text it wraps
            raise PromptError(f"{file}: its post-processor drops the text it should wrap with special tokens; "
                              f"get the checkpoint's tokenizer.json again") from None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def added_token_id(self, token: str) -> int | None:
        """The id of ``token`` if the tokenizer matches it as one unit anywhere in a text, else None."""
        for idx, added in self.backend.get_added_tokens_decoder().items():
            if added.content == token:
                return idx
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not self._manual or not add_special_tokens:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * self.add_bos + ids + [self.eos_id] * self.add_eos  # type: ignore[list-item]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
        """Text pieces as ``ids`` arrive (empty pieces are not yielded); "".join(...) == decode(ids)."""
        decoder = self.stream(skip_special_tokens)
        for idx in ids:
            if piece := decoder.step(idx):
                yield piece
        if piece := decoder.finish():
            yield piece


class StreamDecoder:
    """Incremental decode (the text-generation-inference scheme, made exact for byte fallback).

    ``ids[prefix:read]`` is text already emitted; each step decodes ``ids[prefix:]`` and emits what it
    adds to the decode of ``ids[prefix:read]``. Decoding from ``prefix`` (not from ``read``) keeps the
    context a SentencePiece decoder needs ("▁" → space, first-space stripping only at the very start).
    Text is held back while it ends in U+FFFD (a partial UTF-8 character) or while the last token the
    decoder sees is a byte-fallback piece: the decoder turns a whole run of byte pieces into text at
    once, and one invalid byte makes the whole run U+FFFD, so a run is only emitted once it has ended.
    That keeps ``"".join(pieces) == decode(ids)`` for any ids, even a random model's.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.in_byte_run = False

    def step(self, idx: int) -> str:
        """Add one id; return the new text ("" while held back)."""
        idx = int(idx)
        self.ids.append(idx)
        if not (self.skip and idx in self.tokenizer.special_ids):  # skipped ids are invisible to the decoder
            self.in_byte_run = idx in self.tokenizer.byte_ids
        return self._emit(final=False)

    def finish(self) -> str:
        """The text still held back at the end (e.g. an incomplete character, decoded as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.in_byte_run and not final:
            return ""
        decode = self.tokenizer.decode
        done = decode(self.ids[self.prefix:self.read], self.skip)
        text = decode(self.ids[self.prefix:], self.skip)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]


# --------------------------------------------------------------------------------------------------
# Templates (docs/references.md; original `llava/conversation.py` and the llava-hf chat templates)
# --------------------------------------------------------------------------------------------------
Turns = Sequence[tuple[str, str]]  # earlier (user text, assistant answer) pairs


def _sep_two(system: str, turns: Turns, question: str) -> str:
    """Original SeparatorStyle.TWO (llava_v1, vicuna_v1): sep " ", sep2 "</s>"."""
    history = "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in turns)
    return f"{system} {history}USER: {question} ASSISTANT:"


def _llama_2(system: str, turns: Turns, question: str) -> str:
    """Original SeparatorStyle.LLAMA_2 (mistral_instruct): "[INST] q [/INST]", answers " a </s>"."""
    users = [q for q, _ in turns] + [question]
    if system:
        users[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{users[0]}"
    history = "".join(f"[INST] {q} [/INST] {a} </s>" for q, (_, a) in zip(users, turns))
    return f"{history}[INST] {users[-1]} [/INST]"


def _mpt(system: str, turns: Turns, question: str) -> str:
    """Original SeparatorStyle.MPT (chatml_direct): sep "<|im_end|>", no newline after it."""
    history = "".join(f"<|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n{a}<|im_end|>" for q, a in turns)
    return (f"<|im_start|>system\n{system}<|im_end|>{history}"
            f"<|im_start|>user\n{question}<|im_end|><|im_start|>assistant\n")


def _hf_chat(system: str, turns: Turns, question: str) -> str:
    """The llava-hf LLaVA-NeXT-Video chat template: "ROLE: " + text + " ", then "ASSISTANT:"."""
    history = "".join(f"USER: {q} ASSISTANT: {a} " for q, a in turns)
    return f"{system + ' ' if system else ''}{history}USER: {question} ASSISTANT:"


def _chatml(system_sep: str, text_sep: str, leading_media: bool) -> Callable[[str, Turns, str], str]:
    """Qwen's ChatML turns "<|im_start|>role\n...<|im_end|>\n".

    ``system_sep`` goes between a system turn's header and its text; ``text_sep`` before every user and
    assistant text; with ``leading_media`` the placeholders at the front of a user turn come before that
    separator (the llava-hf interleave template renders a turn's images first, then "\n" + its text)."""
    media = re.compile(rf"^((?:{re.escape(IMAGE)}|{re.escape(VIDEO)})*)(.*)$", re.S)

    def user(text: str) -> str:
        head, rest = media.match(text).groups() if leading_media else ("", text)  # type: ignore[union-attr]
        return f"<|im_start|>user\n{head}{text_sep}{rest}<|im_end|>\n"

    def render(system: str, turns: Turns, question: str) -> str:
        out = f"<|im_start|>system\n{system_sep}{system}<|im_end|>\n" if system else ""
        out += "".join(user(q) + f"<|im_start|>assistant\n{text_sep}{a}<|im_end|>\n" for q, a in turns)
        return out + user(question) + "<|im_start|>assistant\n"

    return render


def _images_then_videos(n_images: int, n_videos: int) -> str:
    return f"{IMAGE}\n" * n_images + f"{VIDEO}\n" * n_videos


def _media_run(n_images: int, n_videos: int) -> str:
    return IMAGE * n_images + VIDEO * n_videos


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # default system prompt ("" = none)
    stop: str  # the text that ends an assistant turn
    render: Callable[[str, Turns, str], str]
    media: Callable[[int, int], str] = _images_then_videos  # the placeholders put before the first user text


_HUMAN = "A chat between a curious {0} and an artificial intelligence assistant. " \
         "The assistant gives helpful, detailed, and polite answers to the {0}'s questions."
TEMPLATES: dict[str, Template] = {t.name: t for t in [
    Template("llava_v1", _HUMAN.format("human"), "</s>", _sep_two),
    Template("vicuna_v1", _HUMAN.format("user"), "</s>", _sep_two),
    Template("mistral_instruct", "", "</s>", _llama_2),
    Template("chatml_direct", "Answer the questions.", "<|im_end|>", _mpt),
    Template("llava_next_video", "", "</s>", _hf_chat),
    # llava-hf llava-interleave-qwen-*-hf chat_template.json: "<|im_start|>user\n<image><image>\nText<|im_end|>\n"
    # (images first, no newline between them; "\n" before every text, a system text too), no system prompt
    Template("qwen_interleave_hf", "", "<|im_end|>", _chatml("\n", "\n", leading_media=True), _media_run),
    # llava-hf OneVision (converter's chat template): "<image>\n" per image, "<video>\n" per video, then text
    Template("qwen_onevision_hf", "", "<|im_end|>", _chatml("", "", leading_media=False)),
    # the original conv_qwen ("qwen_1_5" / "qwen_2", SeparatorStyle.CHATML): always a system prompt
    Template("qwen_1_5", "You are a helpful assistant.", "<|im_end|>", _chatml("", "", leading_media=False)),
]}
assert set(TEMPLATES) == set(get_args(TemplateName))


def _check_media(texts: Sequence[str], n_images: int, n_videos: int, why: str) -> None:
    found = sum(t.count(IMAGE) for t in texts), sum(t.count(VIDEO) for t in texts)
    if found != (n_images, n_videos):
        raise PromptError(f"the prompt has {found[0]} {IMAGE} and {found[1]} {VIDEO} placeholders but "
                          f"{n_images} image(s) and {n_videos} video(s) were given; {why}")


def render_prompt(question: str, n_images: int = 0, n_videos: int = 0, template: TemplateChoice = "llava_v1",
                  system: str | None = None, history: Turns = ()) -> str:
    """The text the checkpoint was trained on, ending where the assistant's answer starts.

    ``system=None`` uses the template's default system prompt. ``history``: earlier (user, answer)
    turns. Media placeholders go at the front of the first user turn, unless the user texts already
    contain placeholders (then their counts must match the media). ``template="none"`` returns
    ``question`` unchanged; it must then carry one placeholder per medium.
    """
    if n_images < 0 or n_videos < 0:
        raise PromptError(f"media counts must be >= 0, got {n_images} image(s) and {n_videos} video(s)")
    if template == "none":
        if system is not None or history:
            raise PromptError("template 'none' sends the prompt exactly as given: system/history are not used; "
                              "put them in the prompt text or choose a template")
        _check_media([question], n_images, n_videos, "template 'none' sends the prompt as given, so it must "
                                                   "carry one placeholder per image and per video")
        return question
    if template not in TEMPLATES:
        raise PromptError(f"unknown template {template!r}; choose one of {[*TEMPLATES, 'none']}")
    spec = TEMPLATES[template]
    users = [q for q, _ in history] + [question]
    if any(IMAGE in u or VIDEO in u for u in users):
        _check_media(users, n_images, n_videos,
                     "write exactly one placeholder per image and per video, or none at all (the template then "
                     "puts them at the front of the first user turn)")
    else:
        users[0] = spec.media(n_images, n_videos) + users[0]
    turns = [(u, a) for u, (_, a) in zip(users, history)]
    return spec.render(spec.system if system is None else system, turns, users[-1])


# --------------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------------
def build_input_ids(prompt_text: str, tokenizer: Tokenizer, config: LlavaNextConfig, n_images: int = 0,
                    n_videos: int = 0, template: TemplateChoice | None = None, *, system: str | None = None,
                    history: Turns = ()) -> list[int]:
    """Render ``prompt_text`` with ``template`` (default: ``config.template``) and tokenize it.

    Each placeholder becomes one id (``config.image_token_id`` / ``config.video_token_id``); expand
    them into visual tokens with ``expand_placeholders`` or let the model splice features there.
    """
    if n_videos and config.video_token_id is None:
        raise PromptError(f"{n_videos} video(s) given but this checkpoint is image-only (no video_token_id); "
                          f"use a LLaVA-NeXT-Video checkpoint")
    text = render_prompt(prompt_text, n_images, n_videos, config.template if template is None else template,
                         system, history)
    wanted = {IMAGE: config.image_token_id}
    if config.video_token_id is not None:
        wanted[VIDEO] = config.video_token_id
    used = {p: i for p, i in wanted.items() if p in text}
    known = {p: tokenizer.added_token_id(p) for p in used}
    for p, idx in known.items():
        if idx is not None and idx != used[p]:
            raise PromptError(f"the tokenizer has {p} at id {idx} but the model config expects "
                              f"{used[p]}: tokenizer and checkpoint do not belong together")
    if all(idx is not None for idx in known.values()):
        ids = tokenizer.encode(text)  # llava-hf: placeholders are added tokens
    else:
        ids = _encode_chunks(text, tokenizer, used)  # original LLaVA-NeXT tokenizer
    _check_ids(ids, used, n_images, n_videos, config)
    return ids


def _encode_chunks(text: str, tokenizer: Tokenizer, placeholder_ids: dict[str, int]) -> list[int]:
    """Original ``tokenizer_image_token``: chunks encoded separately, one BOS, placeholder ids between."""
    parts = re.split("(" + "|".join(map(re.escape, placeholder_ids)) + ")", text)
    chunks = [tokenizer.encode(part) for part in parts[0::2]]
    offset = int(bool(chunks[0]) and chunks[0][0] == tokenizer.bos_id)
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(placeholder_ids[parts[2 * i - 1]])
        ids.extend(chunk[offset:])
    return ids


def _check_ids(ids: list[int], used: dict[str, int], n_images: int, n_videos: int,
               config: LlavaNextConfig) -> None:
    image, video = config.image_token_id, config.video_token_id
    got = (ids.count(image), 0) if image == video else (ids.count(image), ids.count(video))
    want = (n_images + n_videos, 0) if image == video else (n_images, n_videos)
    if got != want:
        raise PromptError(f"tokenization produced {got[0]} image and {got[1]} video placeholder ids but {want[0]} "
                          f"and {want[1]} were expected: the tokenizer splits {list(used)} into pieces")
    placeholders = {image, video}
    outside = [i for i in ids if i not in placeholders and not 0 <= i < config.text.vocab_size]
    if outside:
        raise PromptError(f"token id {outside[0]} is outside the model's vocabulary (vocab_size "
                          f"{config.text.vocab_size}): the tokenizer does not belong to this checkpoint")


def expand_placeholders(ids: Sequence[int], image_token_id: int, video_token_id: int | None,
                        counts_per_image: Sequence[int], counts_per_video: Sequence[int] = ()) -> list[int]:
    """Repeat the k-th image (video) placeholder ``counts_per_image[k]`` (``counts_per_video[k]``) times.

    This is what transformers' LlavaNext(Video)Processor does to the text before tokenizing. If the two
    ids are equal (original-format configs), placeholders are taken as images first, then videos.
    """
    image_pos = [i for i, t in enumerate(ids) if t == image_token_id]
    video_pos = [i for i, t in enumerate(ids) if t == video_token_id]
    if image_token_id == video_token_id:
        image_pos, video_pos = image_pos[:len(counts_per_image)], image_pos[len(counts_per_image):]
    if (len(image_pos), len(video_pos)) != (len(counts_per_image), len(counts_per_video)):
        raise PromptError(f"the ids hold {len(image_pos)} image and {len(video_pos)} video placeholders but "
                          f"counts were given for {len(counts_per_image)} image(s) and {len(counts_per_video)} "
                          f"video(s) (already expanded ids cannot be expanded again)")
    repeat = dict(zip(image_pos, counts_per_image)) | dict(zip(video_pos, counts_per_video))
    if any(n < 1 for n in repeat.values()):
        raise PromptError(f"visual token counts must be >= 1, got images {list(counts_per_image)}, "
                          f"videos {list(counts_per_video)}")
    out: list[int] = []
    for i, t in enumerate(ids):
        out.extend([t] * repeat.get(i, 1))
    return out


def stop_token_ids(tokenizer: Tokenizer, template: TemplateChoice) -> tuple[int, ...]:
    """Ids that end generation: the tokenizer's eos and the template's end-of-turn token."""
    stops = [tokenizer.eos_id]
    if template != "none":
        if template not in TEMPLATES:
            raise PromptError(f"unknown template {template!r}; choose one of {[*TEMPLATES, 'none']}")
        stops.append(tokenizer.token_id(TEMPLATES[template].stop))
    return tuple(dict.fromkeys(i for i in stops if i is not None))
