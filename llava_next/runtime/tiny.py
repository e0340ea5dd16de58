"""The built-in random-weight checkpoints, for a first run with no download: ``tiny-random``
(LLaVA-NeXT-Video: CLIP + Llama), and ``tiny-random-interleave`` / ``tiny-random-onevision`` (SigLIP + Qwen:
runtime/tiny_qwen.py).

    llava-next run --model tiny-random --video sample:bunny "What happens in this video?"

Like the ``tiny-random`` checkpoints the transformers ecosystem uses for smoke tests: the real
LLaVA-NeXT-Video architecture (CLIP tower, 2-layer GELU projector, pooled video frames, AnyRes images,
Llama decoder with linear RoPE 2.5 over 4096 positions, the ``llava_next_video`` chat template, the
placeholder ids laid out as in llava-hf's Video-7B: ``<video>`` then ``<image>`` right after the text
vocabulary) in llava-next's converted on-disk format (``config.json`` + ``model.safetensors`` +
``tokenizer.json``), at a toy size. **Its weights are random: the answers are meaningless**; what it
shows is that the command line, the token plan, the media pipeline and generation work.

Choices
- Sizes: CLIP 112 px tiles of 8x8 patches of 14 px, width 64, 3 layers (2 used, feature layer -2);
  pinpoints are llava-hf's scaled by 112/336; vocabulary 704 (672 text ids, ``<video>`` 672, ``<image>``
  673, padded like 32000 -> 32064). A frame becomes 4x4 = 16 tokens after 2x2 pooling, an image 64 + up
  to ~260 tokens.
- Decoder (the same for all three built-in models): width 128, **32 layers** (the 7B's depth, so every
  layer index the docs use for a 7B model -- ``--layers 2,15,31``, ``fastv:layer=2``, ``range(8, 17)`` --
  is valid here too; at width 128 the 32 layers stay cheap), 4 heads of 32, MLP 384:
  every linear's input features are a multiple of 128 and its output features of 16, so ``--quantize
  int4`` works with group sizes 32, 64 and 128 (the default; model/quant.py's ``check_int4_shape``).
- Weights: every tensor of the layout (``llava_next_weights.shapes.expected_shapes``) drawn in sorted
  key order from one ``torch.Generator`` seeded with ``seed`` (matrices N(0, 0.02); norm weights
  1 + N(0, 0.02); biases and vectors N(0, 0.02)), so the checkpoint depends on the seed and the shapes
  only, never on module init code. Same seed, same bytes (a test checks it). The output rows (lm_head, or
  the tied embedding) of ids no text decodes to -- the tokenizer's fillers and the vocabulary padding -- are
  zero: their logit is 0 while the max over the ~650 random text rows is ~+0.7, so greedy decoding always
  prints something (with seed 0 and v2's rows, README's first question was answered by 32 invisible
  fillers).
- Tokenizer: a real byte-fallback BPE trained with ``tokenizers`` on the built-in ``CORPUS``, laid out
  like the Llama / Vicuna SentencePiece tokenizers (0 <unk>, 1 <s>, 2 </s>, 3..258 bytes, trained
  pieces, a few fillers up to id 672, marked special so they never show in an answer; Metaspace
  pre-tokenizer, ``<s> $A`` post-processor); the same layout as tests/tokenizers_fixture.py, which the
  parity tests check against transformers.
- Cache: built on first use into ``$LLAVA_NEXT_CACHE/<name>/<VERSION>-seed<seed>/`` (default
  ``~/.cache/llava-next``), written into a temporary directory beside it and renamed into place, so a
  directory that exists is complete and concurrent first runs are safe. Building takes about a second
  and ~28 MB (float32).

Runtime code: no transformers. ``config.json`` is ``LlavaNextConfig.to_dict()``; ``tiny-random.json``
says what this is (its name, version, seed and the random-weights notice).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import LlavaNextConfig, TextConfig, VisionConfig

NAME = "tiny-random"
INTERLEAVE, ONEVISION = "tiny-random-interleave", "tiny-random-onevision"  # runtime/tiny_qwen.py
NAMES = (NAME, INTERLEAVE, ONEVISION)
VERSION = "v3"  # bump when a shape, a tokenizer or the weight recipe changes (v3: 32 decoder layers, MLP 384,
# silent output rows zeroed, the SigLIP + Qwen models)
DEFAULT_SEED = 0
DECODER = dict(hidden_size=128, intermediate_size=384, num_layers=32, num_heads=4)  # all three (docstring)


def notice(name: str = NAME) -> str:
    """What every command says when it runs a built-in model."""
    real = {NAME: "the default --model", INTERLEAVE: "e.g. --model llava-hf/llava-interleave-qwen-0.5b-hf",
            ONEVISION: "e.g. --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf"}[name]
    return (f"{name} has RANDOM weights (a built-in smoke-test model, no download): the answer is "
            f"meaningless; use a real checkpoint ({real}) for real answers")


NOTICE = notice(NAME)

BASE_SPECIALS = ("<unk>", "<s>", "</s>")
N_BYTES = 256
TEXT_IDS = 672  # ids below the placeholders (32000 in the real vocabulary): 259 base + ~410 trained + fillers
VOCAB = 704  # embedding rows: text ids + <video>, <image>, padded to a multiple of 64 (as 32000 -> 32064)
CORPUS = """\
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the human's questions. USER: What is shown in this image? ASSISTANT:
The image shows a cat sitting on a red sofa next to a window. USER: What happens in this video?
ASSISTANT: A large rabbit wakes up in a green meadow, stretches, and watches a butterfly fly past.
USER: Describe the picture in detail. ASSISTANT: A rocket stands on the launch pad under a blue sky.
USER: Compare the two images. ASSISTANT: The first one is brighter; the second shows more people.
What color is the car? Tell me the color of the bus. How many birds are there? There are three.
Numbers 0 1 2 3 4 5 6 7 8 9, punctuation (parentheses), "quotes", commas, and new
lines with indentation help too.
"""


def video_config() -> LlavaNextConfig:
    """tiny-random: LLaVA-NeXT-Video (CLIP + Llama)."""
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, image_size=112,
                          patch_size=14)
    text = TextConfig(vocab_size=VOCAB, **DECODER, num_kv_heads=4, rms_norm_eps=1e-5, rope_theta=1e4,
                      rope_scaling_factor=2.5, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    pinpoints = ((112, 224), (224, 112), (224, 224), (336, 112), (112, 336))
    return LlavaNextConfig(vision=vision, text=text, image_grid_pinpoints=pinpoints, image_token_id=TEXT_IDS + 1,
                           video_token_id=TEXT_IDS, spatial_pool_stride=2, spatial_pool_mode="average",
                           pool_position="before_projector", video_newline="none", template="llava_next_video")


def random_weights(config: LlavaNextConfig, seed: int = DEFAULT_SEED,
                   silent_ids: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of llava-next's layout for ``config``, float32, deterministic from ``seed``; the output rows
    of ``silent_ids`` zeroed (module docstring)."""
    from llava_next_weights.shapes import expected_shapes

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in sorted(expected_shapes(config).items()):
        t = torch.randn(shape, generator=gen) * 0.02
        if len(shape) == 1 and key.endswith(".weight") and ("norm" in key or "layernorm" in key):
            t += 1.0
        tensors[key] = t.contiguous()
    head = "language_model." + ("embed_tokens" if config.text.tie_word_embeddings else "lm_head") + ".weight"
    tensors[head][list(silent_ids)] = 0.0
    return tensors


def silent_ids(tokenizer, vocab_size: int) -> list[int]:
    """Embedding rows no text decodes to: the tokenizer's fillers and the vocabulary's padding rows."""
    return [i for i in range(vocab_size) if (tok := tokenizer.id_to_token(i)) is None or tok.startswith("<unused_")]


def build_tokenizer():
    """The tiny model's ``tokenizers.Tokenizer`` (module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_free = TEXT_IDS - len(BASE_SPECIALS) - N_BYTES
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.train_from_iterator(CORPUS.splitlines(keepends=True),
                            trainers.BpeTrainer(vocab_size=n_free, show_progress=False, special_tokens=[]))
    trained = json.loads(bpe.to_str())["model"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokens = [*BASE_SPECIALS, *(f"<0x{b:02X}>" for b in range(N_BYTES)), *pieces]
    fillers = [f"<unused_{k}>" for k in range(TEXT_IDS - len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens + fillers)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*BASE_SPECIALS, *fillers]])
    tok.add_special_tokens([AddedToken("<video>", special=True, normalized=False)])  # id 672
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])  # id 673
    assert (tok.token_to_id("<video>"), tok.token_to_id("<image>")) == (TEXT_IDS, TEXT_IDS + 1)
    return tok


@dataclass(frozen=True)
class Builtin:
    """One built-in model: its config, its tokenizer and the special tokens of its tokenizer_config.json."""

    name: str
    config: Callable[[], LlavaNextConfig]
    tokenizer: Callable[[], object]  # -> tokenizers.Tokenizer
    special_tokens: dict


def builtin(name: str = NAME) -> Builtin:
    if name == NAME:
        return Builtin(NAME, video_config, build_tokenizer,
                       {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    from . import tiny_qwen

    if name in tiny_qwen.BUILTINS:
        return tiny_qwen.BUILTINS[name]
    raise ValueError(f"{name!r} is not a built-in model; the built-in models are {', '.join(NAMES)}")


def tiny_config(name: str = NAME) -> LlavaNextConfig:
    """The config of the built-in model ``name`` (no weights built)."""
    return builtin(name).config()


def write(out: str | os.PathLike, seed: int = DEFAULT_SEED, name: str = NAME) -> Path:
    """Write the checkpoint of the built-in model ``name`` into the directory ``out`` (which must not exist yet)."""
    from safetensors.torch import save_file

    spec = builtin(name)
    out = Path(out)
    out.mkdir(parents=True)
    config, tokenizer = spec.config(), spec.tokenizer()
    weights = random_weights(config, seed, silent_ids(tokenizer, config.text.vocab_size))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(spec.special_tokens, indent=2) + "\n")
    (out / "tiny-random.json").write_text(json.dumps(
        {"name": name, "version": VERSION, "seed": seed, "random_weights": True, "notice": notice(name)},
        indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")  # last: marks it complete
    return out


def ensure(cache_dir: str | os.PathLike | None = None, seed: int = DEFAULT_SEED, name: str = NAME) -> Path:
    """The directory of the built-in model ``name`` in the cache, built atomically on first use."""
    from llava_next_weights.hub import cache_root
    from llava_next_weights.load import is_llava_next_dir

    builtin(name)  # an unknown name fails before anything is written
    final = cache_root(cache_dir) / name / f"{VERSION}-seed{seed}"
    if is_llava_next_dir(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        write(stage / "out", seed, name)
        try:
            os.rename(stage / "out", final)
        except OSError:  # another process finished first (the target exists and is not empty)
            if not is_llava_next_dir(final):
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final


def is_tiny(model: str | os.PathLike) -> bool:
    """Whether ``model`` names a built-in model (``tiny-random``, ``tiny-random-interleave``, ...)."""
    return str(model) in NAMES
