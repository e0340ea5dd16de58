"""Tiny random-weight checkpoints in the real on-disk formats, built with transformers (test reference).

    path, hf_model = make_llava_hf_checkpoint(tmp_path / "hf", kind="video", text="mistral", rope_factor=2.0)
    orig_path = make_original_checkpoint(tmp_path / "orig", path)
    converted = convert(path, tmp_path / "ours")          # then load into llava-next's model

- ``make_llava_hf_checkpoint`` saves a ``LlavaNextForConditionalGeneration`` (kind="image") or
  ``LlavaNextVideoForConditionalGeneration`` (kind="video") with ``save_pretrained``. ``names`` picks the
  key names written: "hub" (the llava-hf hub files: ``vision_tower.vision_model.*``), "save" (what
  transformers 5 writes: ``vision_tower.*``) or "memory" (transformers' in-memory names, ``model.*``).
  Every 1-D parameter is re-randomised (norm weights 1 + 0.1·N(0,1)), so swapped norms or biases are
  visible in value comparisons. Returns ``(dir, model)``; the model is in eval mode.
- ``make_original_checkpoint`` renames the same weights into the original LLaVA-NeXT release format
  (docs/references.md) with an original-format config.json. The original vocabulary has no
  ``<image>``/``<video>`` rows: embed_tokens and lm_head keep their first ``vocab_size`` rows
  (default: the smallest media token id, 128 here, like 32000 for the real checkpoints).
- ``tiny_config`` is the matching ``LlavaNextConfig``; ``transformers_config`` builds the transformers
  config for any ``LlavaNextConfig`` (used with the presets for real-shape checks on the meta device).

Tiny sizes: CLIP 56 px tiles of 4x4 patches of 14 px, width 32, 3 layers (2 used), 4 heads; decoder
width 64, 2 layers, 4 heads (mistral: 2 kv heads), MLP 128, vocabulary 192 = 128 + <image>/<video>
rows padded to a multiple of 64 (as 32000 -> 32064).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import llava_next.config.readers as _config
from llava_next.config import LlavaNextConfig, TextConfig, VisionConfig

TINY_PINPOINTS = ((56, 112), (112, 56), (112, 112), (168, 56), (56, 168))
BASE_VOCAB = 128  # the "original" vocabulary
HF_VOCAB = 192  # + <image> (+ <video>), padded to a multiple of 64
# The original config names its CLIP tower by hub id; register a name for the tiny tower.
# (llava_next.config.readers has no public registry yet; this test-only entry cannot clash with a real id.)
TINY_TOWER = "llava-next-tests/clip-vit-tiny-56"
_config._ORIGINAL_TOWERS.setdefault(TINY_TOWER, dict(
    _config._CLIP_DEFAULTS, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    image_size=56, patch_size=14))
_L14_336 = "openai/clip-vit-large-patch14-336"


def tiny_config(kind: str = "image", text: str = "llama", rope_factor: float | None = None,
                base_vocab: int = BASE_VOCAB) -> LlavaNextConfig:
    """The llava-next config of the tiny checkpoints (image token 128; video: video 128, image 129)."""
    _check(kind, text)
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=56, patch_size=14)
    t = TextConfig(vocab_size=HF_VOCAB if base_vocab == BASE_VOCAB else -(-(base_vocab + 2) // 64) * 64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2 if text == "mistral" else 4, rms_norm_eps=1e-5,
                   rope_theta=1e6 if text == "mistral" else 1e4, rope_scaling_factor=rope_factor or 1.0,
                   max_position_embeddings=512, pad_token_id=None)
    media = dict(image_token_id=base_vocab + 1, video_token_id=base_vocab) if kind == "video" else \
        dict(image_token_id=base_vocab)
    return LlavaNextConfig(vision=vision, text=t, image_grid_pinpoints=TINY_PINPOINTS,
                           template="llava_next_video" if kind == "video" else "llava_v1", **media)


def _check(kind: str, text: str) -> None:
    if kind not in ("image", "video") or text not in ("llama", "mistral"):
        raise ValueError(f"kind must be 'image'|'video' and text 'llama'|'mistral', got {kind!r}, {text!r}")


def transformers_config(config: LlavaNextConfig, *, kind: str = "image", text: str = "llama"):
    """A transformers LlavaNext(Video)Config with the sizes of ``config``."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, MistralConfig)
    from transformers import LlavaNextConfig as HfLlavaNextConfig

    _check(kind, text)
    v, t = config.vision, config.text
    vc = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                          num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
                          patch_size=v.patch_size, num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps,
                          projection_dim=v.hidden_size)
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling_factor != 1.0:
        rope = {"rope_type": "linear", "factor": t.rope_scaling_factor, "rope_theta": t.rope_theta}
    text_cls, extra = (MistralConfig, {"sliding_window": t.sliding_window}) if text == "mistral" else (LlamaConfig, {})
    tc = text_cls(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                  num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                  head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
                  rope_parameters=rope, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                  pad_token_id=t.pad_token_id, tie_word_embeddings=False, **extra)
    common = dict(vision_config=vc, text_config=tc, image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
                  image_token_index=config.image_token_id, vision_feature_layer=v.feature_layer,
                  vision_feature_select_strategy=v.feature_strategy, multimodal_projector_bias=config.projector_bias,
                  tie_word_embeddings=False)
    if kind == "video":
        return LlavaNextVideoConfig(**common, video_token_index=config.video_token_id,
                                    spatial_pool_stride=config.spatial_pool_stride,
                                    spatial_pool_mode=config.spatial_pool_mode)
    return HfLlavaNextConfig(**common)


def _randomize_vectors(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = 0.1 * torch.randn(p.shape, generator=gen)
                is_norm = "norm" in name or "layrnorm" in name
                p.copy_(1 + noise if is_norm and name.endswith(".weight") else noise)


# ---- key names ------------------------------------------------------------------------------------
def memory_to_disk_key(key: str, *, hub: bool = True) -> str:
    """transformers' in-memory name -> llava-hf on-disk name (hub: ``vision_tower.vision_model.*``)."""
    for old, new in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model." if hub else "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."), ("model.image_newline", "image_newline")):
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"not a transformers LlavaNext in-memory key: {key}")


def disk_to_original_key(key: str) -> str:
    """llava-hf on-disk name -> original LLaVA-NeXT name (the HF converter's rules, reversed; docs/references.md)."""
    if key.startswith("vision_tower."):
        rest = key.removeprefix("vision_tower.").removeprefix("vision_model.")
        return "model.vision_tower.vision_tower.vision_model." + rest
    for old, new in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                     ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                     ("multi_modal_projector.linear_2.", "model.mm_projector.2."), ("image_newline", "model.image_newline")):
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"not a llava-hf on-disk key: {key}")


def _rewrite_safetensors(directory: Path, rename) -> None:
    """Rename every key of a saved checkpoint in place (all shards and the index)."""
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata()
        tensors = {rename(k): v.clone() for k, v in load_file(file).items()}
        save_file(tensors, file, metadata=metadata)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


# ---- builders -------------------------------------------------------------------------------------
def make_llava_hf_checkpoint(directory, kind: str = "image", text: str = "llama", rope_factor: float | None = None,
                             *, names: str = "hub", dtype: torch.dtype = torch.float32,
                             max_shard_size: str | int | None = None, seed: int = 0, base_vocab: int = BASE_VOCAB):
    """Save a tiny random llava-hf checkpoint into ``directory``; returns ``(directory, model)``."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextVideoForConditionalGeneration

    if names not in ("hub", "save", "memory"):
        raise ValueError(f"names must be 'hub', 'save' or 'memory', got {names!r}")
    directory = Path(directory)
    torch.manual_seed(seed)
    cls = LlavaNextVideoForConditionalGeneration if kind == "video" else LlavaNextForConditionalGeneration
    model = cls(transformers_config(tiny_config(kind, text, rope_factor, base_vocab), kind=kind, text=text))
    _randomize_vectors(model)
    model = model.to(dtype).eval()
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, save_original_format=names != "memory", **extra)
    if names == "hub":  # the hub files nest the CLIP tower under vision_model.
        _rewrite_safetensors(directory, lambda k: "vision_tower.vision_model." + k.removeprefix("vision_tower.")
                             if k.startswith("vision_tower.") else k)
    return directory, model


def original_config(hf_config: dict, vocab_size: int) -> dict:
    """An original LLaVA-NeXT config.json (LlavaLlama/LlavaMistral + mm_* fields) for a llava-hf config dict."""
    tc, vc = hf_config["text_config"], hf_config["vision_config"]
    mistral = tc.get("model_type") == "mistral"
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    theta = rope.get("rope_theta", tc.get("rope_theta", 1e4))
    scaling = {"type": "linear", "factor": rope["factor"]} if rope.get("rope_type", rope.get("type")) == "linear" else None
    sizes = (vc["hidden_size"], vc["num_hidden_layers"], vc["image_size"], vc["patch_size"])
    tower = _L14_336 if sizes == (1024, 24, 336, 14) else TINY_TOWER
    cfg = {
        "architectures": ["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if mistral else "llava_llama",
        "hidden_size": tc["hidden_size"], "intermediate_size": tc["intermediate_size"],
        "num_hidden_layers": tc["num_hidden_layers"], "num_attention_heads": tc["num_attention_heads"],
        "num_key_value_heads": tc["num_key_value_heads"], "rms_norm_eps": tc["rms_norm_eps"], "rope_theta": theta,
        "rope_scaling": scaling, "max_position_embeddings": tc["max_position_embeddings"], "vocab_size": vocab_size,
        "bos_token_id": tc.get("bos_token_id"), "eos_token_id": tc.get("eos_token_id"),
        "pad_token_id": tc.get("pad_token_id"), "tie_word_embeddings": False,
        "mm_vision_tower": tower, "mm_hidden_size": vc["hidden_size"], "mm_vision_select_layer": hf_config.get("vision_feature_layer", -2),
        "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres", "image_grid_pinpoints": hf_config["image_grid_pinpoints"],
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "unfreeze_mm_vision_tower": True,
        "tokenizer_padding_side": "right", "tokenizer_model_max_length": 4096,
    }
    if mistral:
        cfg["sliding_window"] = tc.get("sliding_window")
    if hf_config.get("model_type") == "llava_next_video":
        cfg.update(mm_resampler_type="spatial_pool", mm_spatial_pool_stride=hf_config.get("spatial_pool_stride", 2),
                   mm_spatial_pool_mode=hf_config.get("spatial_pool_mode", "average"),
                   mm_newline_position="no_token", mm_pooling_position="before")
    return cfg


def make_original_checkpoint(directory, from_hf_dir, *, vocab_size: int | None = None) -> Path:
    """The weights of a llava-hf checkpoint (names "hub" or "save") renamed into the original format."""
    directory, src = Path(directory), Path(from_hf_dir)
    hf_config = json.loads((src / "config.json").read_text())
    if vocab_size is None:  # the added media tokens start right after the original vocabulary
        vocab_size = min(i for i in (hf_config.get("image_token_index"), hf_config.get("video_token_index")) if i is not None)
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        for key, t in load_file(file).items():
            name = disk_to_original_key(key)
            tensors[name] = t[:vocab_size].clone() if name in ("model.embed_tokens.weight", "lm_head.weight") else t
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(original_config(hf_config, vocab_size), indent=2))
    return directory


def replace_text(config: LlavaNextConfig, **changes) -> LlavaNextConfig:
    """``config`` with decoder fields changed (e.g. ``num_layers=1``)."""
    return config.replace(text=dataclasses.replace(config.text, **changes))


RUNNABLE_VOCAB = 512  # room for the test tokenizer: 259 byte/special pieces, its alphabet and merges


def make_runnable_checkpoint(directory, kind: str = "video", text: str = "llama", **kwargs):
    """A tiny llava-hf checkpoint with a real tokenizer.json (+ tokenizer_config.json) beside it: what a user
    downloads, at toy size, ready for ``llava-next run --model DIR``. Returns ``(dir, transformers model)``."""
    from tokenizers_fixture import make_hf_tokenizer

    directory, model = make_llava_hf_checkpoint(directory, kind, text, base_vocab=RUNNABLE_VOCAB, **kwargs)
    make_hf_tokenizer(directory, tiny_config(kind, text, base_vocab=RUNNABLE_VOCAB))
    return directory, model
