"""A small but real Llama-style ``tokenizer.json``, trained in-test with the `tokenizers` library.

No hub access is needed: a byte-fallback BPE is trained on a short built-in text and laid out the way
the LLaVA-NeXT (Llama / Vicuna / Mistral SentencePiece) tokenizers are (docs/references.md):

    0 <unk>   1 <s>   2 </s>   3..258 <0x00>..<0xFF> (byte fallback)   259.. trained pieces, then
    "<unused_k>" fillers up to the first placeholder id, then the added special tokens at the ids the
    LlavaNextConfig expects: <image> / <video> (and <pad> when text.pad_token_id is a new id).

Pre-tokenizer ``Metaspace("▁", prepend_scheme="first")`` (the non-legacy llava-hf layout, which gives
the HF test ids' ``… "▁", <video>, "\\n" …`` pattern), decoder ``Replace("▁"," ") → ByteFallback → Fuse →
Strip(1 leading space)``, post-processor ``<s> $A``. Placeholders are special AddedTokens
(normalized=False), so each is one id in any text.

- ``make_tokenizer_json(path, config_or_ids, vocab_size=None)`` writes ``tokenizer.json`` and returns
  its path. ``config_or_ids`` is a ``LlavaNextConfig`` or a dict ``{token: id}``.
- ``make_hf_tokenizer(directory, config_or_ids, ...)`` also writes ``tokenizer_config.json`` (via
  ``save_pretrained``) and returns ``(directory, PreTrainedTokenizerFast)`` for reference comparisons.
- ``CORPUS``: the training text; ``RARE_TEXT``: characters the tokenizer only knows as bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BASE_SPECIALS = ("<unk>", "<s>", "</s>")
N_BYTES = 256
CORPUS = """\
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the human's questions. USER: What is shown in this image? ASSISTANT:
The image shows a cat sitting on a red sofa next to a window. USER: Why is this video funny?
ASSISTANT: The humor comes from the baby wearing glasses and reading a book very seriously.
[INST] Describe the picture in detail. [/INST] A rocket stands on the launch pad under a blue sky.
system: Answer the questions. user: What color is the car? Tell me the color of the bus.
Café, naïve, façade, déjà vu: the tokenizer also learns a few accented letters. 1234567890 + - * / = ?!
Numbers, punctuation (parentheses), "quotes", and new
lines
  with indentation help too.
"""
# Characters the tokenizer never saw in training: they encode as byte-fallback tokens <0x..>
RARE_TEXT = "猫 and 🙂 — «ok» ∑"


def _placeholder_ids(config_or_ids: Any) -> dict[str, int]:
    if isinstance(config_or_ids, Mapping):
        return {str(k): int(v) for k, v in config_or_ids.items()}
    cfg = config_or_ids
    ids = {"<image>": cfg.image_token_id}
    if cfg.video_token_id is not None:
        ids["<video>"] = cfg.video_token_id
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"image and video placeholders share id {cfg.image_token_id}: a tokenizer cannot hold "
                         f"two tokens at one id (original-format configs use no placeholder tokens)")
    pad = cfg.text.pad_token_id
    if pad is not None and pad > 2 and pad not in ids.values():
        ids["<pad>"] = pad
    return ids


def _trained_pieces(n: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Train a BPE with at most ``n`` pieces (alphabet + merges) on CORPUS."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=n, show_progress=False, special_tokens=[])
    bpe.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    model = json.loads(bpe.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if set(pieces) & set(BASE_SPECIALS):
        raise AssertionError("CORPUS must not contain the special tokens")
    if len(pieces) > n:
        raise ValueError(f"the training alphabet alone has {len(pieces)} pieces but only {n} ids are free "
                         f"below the first placeholder id; use larger placeholder ids")
    return pieces, merges  # type: ignore[return-value]


def build_tokenizer(config_or_ids: Any, vocab_size: int | None = None) -> Tokenizer:
    """The in-memory `tokenizers.Tokenizer` (see the module docstring for its layout).

    ``vocab_size``: the embedding rows the ids must fit in (default: ``config.text.vocab_size``, or no
    bound for a dict); with an empty dict it is the size of the base vocabulary (a tokenizer without
    placeholders, like the original LLaVA-NeXT ones). Placeholder ids must leave room for the 259 base
    ids plus the trained pieces.
    """
    specials = _placeholder_ids(config_or_ids)
    if vocab_size is None and not isinstance(config_or_ids, Mapping):
        vocab_size = config_or_ids.text.vocab_size
    if not specials and vocab_size is None:
        raise ValueError("give vocab_size when no special ids are given (it is then the base vocabulary size)")
    first = min(specials.values(), default=vocab_size)
    if vocab_size is not None and max(specials.values(), default=-1) >= vocab_size:
        raise ValueError(f"special ids {specials} do not fit in vocab_size {vocab_size}")
    n_base = len(BASE_SPECIALS) + N_BYTES
    if first - n_base < 40:
        raise ValueError(f"first placeholder id {first} leaves {first - n_base} ids for trained pieces after the "
                         f"{n_base} base ids (<unk>, <s>, </s>, 256 bytes); give ids >= {n_base + 40}")

    pieces, merges = _trained_pieces(first - n_base)
    byte_tokens = [f"<0x{b:02X}>" for b in range(N_BYTES)]
    filler = [f"<unused_{k}>" for k in range(first - n_base - len(pieces))]
    vocab = {tok: i for i, tok in enumerate([*BASE_SPECIALS, *byte_tokens, *pieces, *filler])}
    assert len(vocab) == first
    if clash := set(specials) & set(vocab):
        raise ValueError(f"{sorted(clash)} are already trained pieces; they cannot be added at their own ids")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIALS])
    # added tokens get the next free id, so add them in id order and fill any gap with a filler
    for token, idx in sorted(specials.items(), key=lambda kv: kv[1]):
        while tok.get_vocab_size(with_added_tokens=True) < idx:
            gap = tok.get_vocab_size(with_added_tokens=True)
            tok.add_special_tokens([AddedToken(f"<added_{gap}>", special=True, normalized=False)])
        tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        assert tok.token_to_id(token) == idx, (token, idx, tok.token_to_id(token))
    return tok


def make_tokenizer_json(path: str | Path, config_or_ids: Any, vocab_size: int | None = None) -> Path:
    """Write ``tokenizer.json`` at ``path`` (a file path, or a directory to write it into)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    build_tokenizer(config_or_ids, vocab_size).save(str(path))
    return path


def make_hf_tokenizer(directory: str | Path, config_or_ids: Any, vocab_size: int | None = None,
                      **tokenizer_config: Any):
    """Write a checkpoint-style tokenizer folder and return ``(directory, PreTrainedTokenizerFast)``.

    The folder holds ``tokenizer.json`` and the ``tokenizer_config.json`` that transformers'
    ``save_pretrained`` writes. ``tokenizer_config`` entries (e.g. ``add_bos_token=False``,
    ``pad_token="<pad>"``) are passed to ``PreTrainedTokenizerFast`` and so land in that file.
    """
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = _placeholder_ids(config_or_ids)
    file = make_tokenizer_json(directory / "tokenizer.json", config_or_ids, vocab_size)
    kwargs: dict[str, Any] = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if "<pad>" in specials:
        kwargs["pad_token"] = "<pad>"
    kwargs.update(tokenizer_config)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(file), **kwargs)
    hf.save_pretrained(str(directory))
    return directory, hf
