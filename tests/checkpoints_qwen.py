"""Tiny random SigLIP + Qwen2 checkpoints in the llava-hf formats, with a real Qwen-style tokenizer (test reference).

    directory, hf = make_interleave_checkpoint(tmp / "interleave")      # LlavaForConditionalGeneration
    directory, hf = make_onevision_checkpoint(tmp / "ov", "anyres_max_9")  # LlavaOnevisionForConditionalGeneration

Both are saved by transformers' ``save_pretrained`` (the llava-hf on-disk names) with a ``tokenizer.json``
+ ``tokenizer_config.json`` beside them: what a user downloads, at toy size. Sizes: SigLIP 70 px tiles of
5 x 5 patches of 14 px (25 tokens per tile; odd, so bilinear video pooling 5 -> 3 is exercised like
27 -> 14), width 32, 3 layers (all read: vision_feature_layer -1, "full"); Qwen2 width 64, 2 layers,
4 heads / 2 kv heads, theta 1e6, tied embeddings (as the 0.5B models). Vocabulary laid out like Qwen's:
320 byte-level BPE pieces, then <|endoftext|> 320, <|im_start|> 321, <|im_end|> 322 (eos), <image> 323,
<video> 324, padded to 384 rows (as 151646 + 2 -> 152000). Every 1-D parameter is re-randomised.

The tokenizer is a byte-level BPE (Qwen's pre-tokenizer and decoder family) trained in-test on the
corpus of tokenizers_fixture.py; no BOS is added (as Qwen's); eos is <|im_end|>, pad <|endoftext|>.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tokenizers_fixture import CORPUS

PIECES = 320
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
IMAGE_ID, VIDEO_ID = PIECES + 3, PIECES + 4
VOCAB = 384
TILE = 70


def build_qwen_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=PIECES, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    assert tok.get_vocab_size() == PIECES, tok.get_vocab_size()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert tok.token_to_id("<image>") == IMAGE_ID and tok.token_to_id("<video>") == VIDEO_ID
    return tok


def write_qwen_tokenizer(directory: Path):
    """tokenizer.json + tokenizer_config.json (via transformers); returns the PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    build_qwen_tokenizer().save(str(directory / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", bos_token=None)
    hf.save_pretrained(str(directory))
    return hf


def _configs(tie: bool = True):
    from transformers import Qwen2Config, SiglipVisionConfig

    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=TILE, patch_size=14, vision_use_head=False)
    tc = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                     max_position_embeddings=4096, tie_word_embeddings=tie, use_sliding_window=False,
                     eos_token_id=PIECES + 2, pad_token_id=PIECES, bos_token_id=None)
    return vc, tc


def _randomize_vectors(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = 0.1 * torch.randn(p.shape, generator=gen)
                p.copy_(1 + noise if "norm" in name and name.endswith(".weight") else noise)


def _save(model, directory: Path, seed: int):
    _randomize_vectors(model, seed)
    model = model.eval()
    model.set_attn_implementation("eager")
    model.save_pretrained(directory)
    write_qwen_tokenizer(directory)
    return directory, model


def make_interleave_checkpoint(directory, *, seed: int = 0, tie: bool = True):
    """A tiny llava-hf LLaVA-NeXT-Interleave checkpoint (LlavaForConditionalGeneration: SigLIP + Qwen2)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vc, tc = _configs(tie)
    config = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_ID, vision_feature_layer=-1,
                         vision_feature_select_strategy="full", projector_hidden_act="gelu", tie_word_embeddings=tie)
    return _save(LlavaForConditionalGeneration(config), Path(directory), seed)


def make_onevision_checkpoint(directory, aspect: str = "anyres_max_9", *, seed: int = 0):
    """A tiny llava-hf LLaVA-OneVision checkpoint (pinpoints: every (a, b), a, b in 70, 140, 210)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    vc, tc = _configs(True)
    config = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_ID,
                                  video_token_index=VIDEO_ID, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio=aspect,
                                  image_grid_pinpoints=[[a, b] for a in (70, 140, 210) for b in (70, 140, 210)],
                                  tie_word_embeddings=True)
    return _save(LlavaOnevisionForConditionalGeneration(config), Path(directory), seed)


# ---- the original lmms-lab layout (LlavaQwenForCausalLM) -------------------------------------------
ORIGINAL_VOCAB = IMAGE_ID  # the original vocabulary has no <image> / <video> rows (placeholders are -200)
TINY_SIGLIP_TOWER = "llava-next-tests/siglip-tiny-70"


def register_tiny_siglip_tower() -> None:
    """The original config names its tower by hub id; register the tiny one (test-only, cannot clash)."""
    import llava_next.config.readers as config

    config._ORIGINAL_SIGLIP_TOWERS.setdefault(TINY_SIGLIP_TOWER, dict(
        config._SIGLIP_DEFAULTS, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=TILE, patch_size=14))


def hf_disk_to_original_key(key: str) -> str:
    """llava-hf on-disk name -> lmms-lab name (the HF converters' KEYS_TO_MODIFY_MAPPING, reversed)."""
    if key.startswith("vision_tower."):
        return "model.vision_tower.vision_tower.vision_model." + key.removeprefix("vision_tower.").removeprefix("vision_model.")
    for old, new in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                     ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                     ("multi_modal_projector.linear_2.", "model.mm_projector.2."), ("image_newline", "model.image_newline")):
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(key)


def make_original_qwen_checkpoint(directory, from_hf_dir, **mm) -> Path:
    """The weights of a tiny llava-hf checkpoint in the lmms-lab layout with an lmms-lab config.json; ``mm``
    sets image_aspect_ratio / mm_patch_merge_type / image_grid_pinpoints / mm_newline_position ..."""
    import json

    from safetensors.torch import load_file, save_file

    register_tiny_siglip_tower()
    directory, src = Path(directory), Path(from_hf_dir)
    hf = json.loads((src / "config.json").read_text())
    tc = hf["text_config"]
    tensors = {}
    for key, t in load_file(src / "model.safetensors").items():
        name = hf_disk_to_original_key(key)
        if name == "model.image_newline" and mm.get("mm_patch_merge_type") == "flat":
            continue  # flat checkpoints have no image_newline
        tensors[name] = t[:ORIGINAL_VOCAB].clone() if name in ("model.embed_tokens.weight", "lm_head.weight") else t
    if "model.image_newline" not in tensors and mm.get("mm_patch_merge_type", "spatial_unpad") != "flat":
        tensors["model.image_newline"] = torch.randn(tc["hidden_size"], generator=torch.Generator().manual_seed(5))
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    rope = tc.get("rope_parameters") or {}
    cfg = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", "hidden_size": tc["hidden_size"],
           "intermediate_size": tc["intermediate_size"], "num_hidden_layers": tc["num_hidden_layers"],
           "num_attention_heads": tc["num_attention_heads"], "num_key_value_heads": tc["num_key_value_heads"],
           "rms_norm_eps": tc["rms_norm_eps"], "rope_theta": rope.get("rope_theta", 1e6), "rope_scaling": None,
           "max_position_embeddings": tc["max_position_embeddings"], "vocab_size": ORIGINAL_VOCAB,
           "tie_word_embeddings": tc.get("tie_word_embeddings", False), "use_sliding_window": False,
           "sliding_window": 4096, "bos_token_id": PIECES, "eos_token_id": PIECES + 2,
           "mm_vision_tower": TINY_SIGLIP_TOWER, "mm_hidden_size": 32, "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu", "mm_use_im_start_end": False,
           "mm_use_im_patch_token": False, "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
           "mm_tunable_parts": "mm_mlp_adapter,mm_language_model", **mm}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return directory


@functools.lru_cache(maxsize=4)
def real_clip(num_frames: int, tile: int = TILE):
    """The real test video (bigbuckbunny.mp4) sampled as SigLIP frames, decoded once per process (a 720p decode
    of every frame is the slowest step of these tests)."""
    from media import real_video

    from llava_next.inputs.image import SIGLIP_STATS
    from llava_next.inputs.video import load_video

    return load_video(real_video(), num_frames, size=tile, resize="squash", stats=SIGLIP_STATS)
