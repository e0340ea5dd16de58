"""``tiny-random-interleave`` and ``tiny-random-onevision``: built-in SigLIP + Qwen checkpoints with random
weights, for running the LLaVA-NeXT-Interleave and LLaVA-OneVision / LLaVA-Video commands with no download.

    llava-next run --model tiny-random-interleave --image sample:cat sample:cat "Compare <image> and <image>."
    llava-next run --model tiny-random-onevision --video sample:bunny "What happens?"

The same on-disk format, cache scheme, weight recipe and random-weights notice as ``tiny-random``
(runtime/tiny.py builds and caches all three); only the architecture and the tokenizer differ, each as the
llava-hf checkpoints of the family have them (docs/references.md; the presets in config/presets.py):
- Vision: SigLIP (no CLS, no pre-LN, conv bias, tanh GELU, features of the last layer used, all tokens) at
  98 px tiles of 7x7 patches of 14 px -- an odd grid like so400m's 27x27 -- width 64, 2 layers.
- Decoder: Qwen with q/k/v biases, RoPE theta 1e6 over 32768 positions, tied embeddings (as the 0.5B
  models), tiny.py's shared width 128, 32 layers, MLP 384 (``--quantize int4`` works): Interleave 4 heads
  (Qwen1.5: no GQA), OneVision 4 heads over 2 KV heads (Qwen2: GQA).
- tiny-random-interleave (llava-hf interleave): every image resized to one tile (49 tokens), a video is its
  frames as images (one ``<image>`` each), ``qwen_interleave_hf`` template, no ``<video>`` id.
- tiny-random-onevision (llava-hf OneVision): anyres_max_9 over the pinpoints (a, b), a, b in 98 .. 588 px
  (llava-hf's 384 .. 2304 scaled by 98/384), one image: base + unpadded grid + a newline per row; several
  images: each padded to one tile + 1 newline (50); video: projector, then bilinear 7 -> 4 (16 tokens a
  frame), one newline after the video; ``qwen_onevision_hf`` template.
- Tokenizer: a byte-level BPE (Qwen's pre-tokenizer and decoder family) trained with ``tokenizers`` on
  tiny.CORPUS, fillers up to ``TEXT_IDS`` (special, never shown), then Qwen's specials in Qwen's order:
  <|endoftext|> 640 (pad), <|im_start|> 641, <|im_end|> 642 (eos), <image> 643, <video> 644; 704 embedding
  rows (as 151646 + 2 -> 152000). No BOS is added (as Qwen's).
"""

from __future__ import annotations

from ..config import LlavaNextConfig, TextConfig, VisionConfig
from ..config.readers import ONEVISION_FIELDS
from . import tiny

TEXT_IDS = 640  # byte-level pieces + trained merges + fillers (151643 in Qwen's vocabulary)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
PAD_ID, EOS_ID, IMAGE_ID, VIDEO_ID = TEXT_IDS, TEXT_IDS + 2, TEXT_IDS + 3, TEXT_IDS + 4
VOCAB = 704
TILE = 98  # px: 7 x 7 patches of 14 px
PINPOINTS = tuple((a, b) for a in range(TILE, 6 * TILE + 1, TILE) for b in range(TILE, 6 * TILE + 1, TILE))


def _vision() -> VisionConfig:
    return VisionConfig(kind="siglip", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        image_size=TILE, patch_size=14, layer_norm_eps=1e-6, feature_layer=-1, feature_strategy="full")


def _qwen(num_kv_heads: int) -> TextConfig:
    return TextConfig(vocab_size=VOCAB, **tiny.DECODER, num_kv_heads=num_kv_heads, rms_norm_eps=1e-6, rope_theta=1e6,
                      max_position_embeddings=32768, qkv_bias=True, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def interleave_config() -> LlavaNextConfig:
    """tiny-random-interleave: llava-hf LLaVA-NeXT-Interleave (SigLIP + Qwen1.5)."""
    return LlavaNextConfig(vision=_vision(), text=_qwen(4), image_grid_pinpoints=((TILE, TILE),),
                           image_token_id=IMAGE_ID, image_aspect_ratio="resize", video_as_images=True,
                           template="qwen_interleave_hf")


def onevision_config() -> LlavaNextConfig:
    """tiny-random-onevision: llava-hf LLaVA-OneVision / LLaVA-Video (SigLIP + Qwen2)."""
    return LlavaNextConfig(vision=_vision(), text=_qwen(2), image_grid_pinpoints=PINPOINTS, image_token_id=IMAGE_ID,
                           video_token_id=VIDEO_ID, anyres_max_patches=9, template="qwen_onevision_hf",
                           **ONEVISION_FIELDS)


def build_tokenizer():
    """The Qwen-style tokenizer of both models (module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.train_from_iterator(tiny.CORPUS.splitlines(keepends=True), trainers.BpeTrainer(
        vocab_size=TEXT_IDS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=[]))
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    fillers = [f"<unused_{k}>" for k in range(TEXT_IDS - bpe.get_vocab_size())]
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*fillers, *SPECIALS]])
    assert (bpe.token_to_id("<|endoftext|>"), bpe.token_to_id("<video>")) == (PAD_ID, VIDEO_ID)
    return bpe


_SPECIAL_TOKENS = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
BUILTINS = {tiny.INTERLEAVE: tiny.Builtin(tiny.INTERLEAVE, interleave_config, build_tokenizer, _SPECIAL_TOKENS),
            tiny.ONEVISION: tiny.Builtin(tiny.ONEVISION, onevision_config, build_tokenizer, _SPECIAL_TOKENS)}
