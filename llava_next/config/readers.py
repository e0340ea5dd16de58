"""config.json readers: llava-hf (llava_next, llava_next_video, llava, llava_onevision) and the original
LLaVA-NeXT release (``mm_*`` fields), CLIP and SigLIP towers, with transformers' defaults for the fields
a config.json omits. Each returns a checked ``LlavaNextConfig`` (schema.py); ``LlavaNextConfig.from_hf_config``
and ``from_original_config`` call them and turn a malformed value into a ``ConfigError``.
"""

from __future__ import annotations

import re
from typing import Any

from .schema import DEFAULT_PINPOINTS, ConfigError, LlavaNextConfig, TextConfig, VisionConfig

# transformers' defaults for fields a config.json omits (CLIPVisionConfig, LlamaConfig, MistralConfig)
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
_CLIP_L14_336 = dict(_CLIP_DEFAULTS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, image_size=336, patch_size=14)
# transformers' SiglipVisionConfig defaults (the interleave-onevision checkpoints list every field anyway)
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                        hidden_act="gelu_pytorch_tanh")
# google/siglip-so400m-patch14-384 as LLaVA keeps it: 26 of its 27 layers (docs/references.md, SigLIP vision tower)
_SIGLIP_SO400M = dict(_SIGLIP_DEFAULTS, hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                      num_attention_heads=16, image_size=384, patch_size=14)
_TEXT_DEFAULTS = {
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=32768, sliding_window=None, hidden_act="silu",
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                  sliding_window=None, hidden_act="silu"),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                    max_position_embeddings=4096 * 32, sliding_window=4096, hidden_act="silu"),
}


def _rope(tc: dict) -> tuple[float, float]:
    """(rope_theta, linear factor) from legacy `rope_scaling` or transformers-5 `rope_parameters`."""
    theta = float(tc.get("rope_theta", tc["_default_theta"]))
    factor = 1.0
    for key in ("rope_parameters", "rope_scaling"):
        params = tc.get(key)
        if not params:
            continue
        kind = params.get("rope_type", params.get("type", "default"))
        theta = float(params.get("rope_theta", theta))
        if kind == "linear":
            factor = float(params["factor"])
        elif kind != "default":
            raise ConfigError(f"text config {key}.rope_type {kind!r} is not supported; llava-next implements "
                              f"'default' and 'linear' RoPE")
    return theta, factor


def _text_from_dict(tc: dict, model_type: str) -> TextConfig:
    if model_type not in _TEXT_DEFAULTS:
        raise ConfigError(f"text model_type {model_type!r} is not supported; expected one of {list(_TEXT_DEFAULTS)}")
    d = dict(_TEXT_DEFAULTS[model_type], **tc)
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"text hidden_act {d['hidden_act']!r} is not supported (LLaVA-NeXT decoders use 'silu')")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ConfigError("text attention_bias / mlp_bias are not supported (LLaVA-NeXT decoders have no biases)")
    is_qwen = model_type == "qwen2"
    if is_qwen and not d.get("use_sliding_window", False):
        d["sliding_window"] = None  # Qwen2: sliding_window is only read when use_sliding_window is true
    theta, factor = _rope(dict(d, _default_theta=d["rope_theta"]))
    return TextConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"], head_dim=d.get("head_dim"),
        rms_norm_eps=d["rms_norm_eps"], rope_theta=theta, rope_scaling_factor=factor,
        max_position_embeddings=d["max_position_embeddings"], sliding_window=d.get("sliding_window"),
        qkv_bias=is_qwen, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=_one_id(d.get("bos_token_id", 1)), eos_token_id=_one_id(d.get("eos_token_id", 2)),
        pad_token_id=_one_id(d.get("pad_token_id", 0)),
    )


def _one_id(value: Any) -> int | None:
    """A token id from a config (Qwen generation configs may list several eos ids: the first)."""
    return value[0] if isinstance(value, list) and value else value


def _siglip_from_dict(vc: dict, feature_layer: Any, strategy: str) -> VisionConfig:
    d = dict(_SIGLIP_DEFAULTS, **vc)
    if d["hidden_act"] != "gelu_pytorch_tanh":
        raise ConfigError(f"vision hidden_act {d['hidden_act']!r} is not supported (SigLIP uses 'gelu_pytorch_tanh')")
    if not isinstance(feature_layer, int):
        raise ConfigError(f"vision_feature_layer {feature_layer!r} is not supported; give a single layer index")
    return VisionConfig(
        kind="siglip", hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"], image_size=d["image_size"],
        patch_size=d["patch_size"], num_channels=d["num_channels"], layer_norm_eps=d["layer_norm_eps"],
        feature_layer=feature_layer, feature_strategy=strategy,  # type: ignore[arg-type]
    )


def _vision_from_dict(vc: dict, feature_layer: Any, strategy: str) -> VisionConfig:
    d = dict(_CLIP_DEFAULTS, **vc)
    if d["hidden_act"] != "quick_gelu":
        raise ConfigError(f"vision hidden_act {d['hidden_act']!r} is not supported (CLIP uses 'quick_gelu')")
    if not isinstance(feature_layer, int):
        raise ConfigError(f"vision_feature_layer {feature_layer!r} is not supported; give a single layer index")
    return VisionConfig(
        hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"], image_size=d["image_size"], patch_size=d["patch_size"],
        num_channels=d["num_channels"], layer_norm_eps=d["layer_norm_eps"], feature_layer=feature_layer,
        feature_strategy=strategy,  # type: ignore[arg-type]
    )


def _from_hf_config(cfg: dict) -> LlavaNextConfig:
    model_type = cfg.get("model_type")
    if model_type in ("llava", "llava_onevision"):
        return _from_hf_siglip_config(cfg)
    if model_type not in ("llava_next", "llava_next_video"):
        raise ConfigError(f"config model_type {model_type!r} is not a LLaVA-NeXT config "
                          f"(expected 'llava_next' or 'llava_next_video')")
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"projector_hidden_act {cfg['projector_hidden_act']!r} is not supported (expected 'gelu')")
    tc = dict(cfg.get("text_config") or {})
    vc = cfg.get("vision_config")
    vision_dict = _CLIP_L14_336 if vc is None else {k: v for k, v in vc.items() if k != "model_type"}
    if vc is not None and vc.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConfigError(f"vision_config.model_type {vc['model_type']!r} is not supported (expected clip_vision_model)")
    is_video = model_type == "llava_next_video"
    mode = cfg.get("spatial_pool_mode", "average")
    if mode not in ("average", "max"):
        raise ConfigError(f"spatial_pool_mode {mode!r} is not supported; transformers' checkpoints use "
                          f"'average' or 'max' (set bilinear through the config's spatial_pool_mode field)")
    return LlavaNextConfig(
        vision=_vision_from_dict(vision_dict, cfg.get("vision_feature_layer", -2),
                                 cfg.get("vision_feature_select_strategy", "default")),
        text=_text_from_dict(tc, tc.get("model_type", "llama")),
        image_grid_pinpoints=tuple(tuple(p) for p in cfg.get("image_grid_pinpoints", DEFAULT_PINPOINTS)),
        image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32001 if is_video else 32000)),
        video_token_id=cfg.get("video_token_index", cfg.get("video_token_id", 32000)) if is_video else None,
        projector_bias=cfg.get("multimodal_projector_bias", True),
        spatial_pool_stride=cfg.get("spatial_pool_stride", 2),
        spatial_pool_mode=mode,
        # chatml_direct (34B) cannot be told from the config alone: pick it with --template or a preset
        template="llava_next_video" if is_video else ("mistral_instruct" if tc.get("model_type") == "mistral"
                                                      else "llava_v1"),
    )


def _from_hf_siglip_config(cfg: dict) -> LlavaNextConfig:
    """llava-hf LLaVA-NeXT-Interleave (model_type "llava": LlavaForConditionalGeneration) and LLaVA-OneVision
    (model_type "llava_onevision"): a SigLIP tower and a Qwen decoder."""
    model_type = cfg["model_type"]
    vc, tc = dict(cfg.get("vision_config") or {}), dict(cfg.get("text_config") or {})
    if vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ConfigError(f"{model_type} config with vision_config.model_type {vc.get('model_type')!r}: llava-next "
                          f"reads the SigLIP ones (LLaVA-NeXT-Interleave, LLaVA-OneVision); LLaVA-1.5 is not supported")
    if tc.get("model_type", "qwen2") != "qwen2":
        raise ConfigError(f"{model_type} config with text_config.model_type {tc.get('model_type')!r} is not supported "
                          f"(LLaVA-NeXT-Interleave and LLaVA-OneVision use qwen2)")
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"projector_hidden_act {cfg['projector_hidden_act']!r} is not supported (expected 'gelu')")
    if "tie_word_embeddings" not in tc and "tie_word_embeddings" in cfg:  # transformers lifts it to the top level
        tc["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    vision = _siglip_from_dict({k: v for k, v in vc.items() if k != "model_type"},
                               cfg.get("vision_feature_layer", -1 if model_type == "llava_onevision" else -2),
                               cfg.get("vision_feature_select_strategy", "full" if model_type == "llava_onevision"
                                       else "default"))
    text = _text_from_dict(tc, "qwen2")
    tile = vision.image_size
    if model_type == "llava":  # every image, frame and view: one 384 px tile, 729 tokens, no newline
        return LlavaNextConfig(
            vision=vision, text=text, image_grid_pinpoints=((tile, tile),),
            image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
            projector_bias=cfg.get("multimodal_projector_bias", True), image_aspect_ratio="resize",
            video_as_images=True, template="qwen_interleave_hf")
    aspect = cfg.get("vision_aspect_ratio", "anyres_max_9")
    if not re.fullmatch(r"anyres_max_\d+", aspect):
        raise ConfigError(f"vision_aspect_ratio {aspect!r} is not supported (LLaVA-OneVision uses 'anyres_max_9')")
    return LlavaNextConfig(
        vision=vision, text=text,
        image_grid_pinpoints=tuple(tuple(p) for p in cfg.get("image_grid_pinpoints", ONEVISION_PINPOINTS)),
        image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 151646)),
        video_token_id=cfg.get("video_token_index", cfg.get("video_token_id", 151647)),
        projector_bias=cfg.get("multimodal_projector_bias", True), **ONEVISION_FIELDS,
        anyres_max_patches=int(aspect.removeprefix("anyres_max_")), template="qwen_onevision_hf")


# LLaVA-OneVision image/video handling as transformers' LlavaOnevisionForConditionalGeneration does it
# (docs/references.md, anyres_max_N and Video): anyres_max (base first, unpad, bilinear downscale, newline per row); more
# than one image: each padded to a square, one tile + one newline (730); video: projector, then bilinear
# 27 -> 14 pooling (196 per frame), one newline after the whole video. Public: the presets and the built-in
# tiny OneVision model (runtime/tiny_qwen.py) build on the same fields.
ONEVISION_FIELDS = dict(image_aspect_ratio="anyres", multi_image_aspect_ratio="pad", untiled_image_newline=True,
                        spatial_pool_stride=2, spatial_pool_mode="bilinear", pool_position="after_projector",
                        video_newline="one_token")
ONEVISION_PINPOINTS = tuple((a, b) for a in range(384, 2305, 384) for b in range(384, 2305, 384))


# The original config names its vision tower by hub id; these are the towers LLaVA-NeXT uses.
_ORIGINAL_TOWERS = {"openai/clip-vit-large-patch14-336": _CLIP_L14_336}
_ORIG_STRATEGY = {"patch": "default", "cls_patch": "full"}
_ORIG_NEWLINE = {"grid": "grid", "frame": "frame", "one_token": "one_token", "no_token": "none"}
_ORIG_POOL_MODE = {"average": "average", "max": "max", "bilinear": "bilinear"}


def _from_original_config(cfg: dict) -> LlavaNextConfig:
    tower = cfg.get("mm_vision_tower")
    if tower in _ORIGINAL_SIGLIP_TOWERS:
        return _from_original_siglip_config(cfg)
    if tower not in _ORIGINAL_TOWERS:
        raise ConfigError(f"mm_vision_tower {tower!r} is not supported; known towers: {list(_ORIGINAL_TOWERS)}")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConfigError(f"mm_projector_type {cfg['mm_projector_type']!r} is not supported (expected 'mlp2x_gelu')")
    if cfg.get("image_aspect_ratio", "anyres") != "anyres":
        raise ConfigError(f"image_aspect_ratio {cfg['image_aspect_ratio']!r} is not supported (expected 'anyres')")
    if cfg.get("mm_patch_merge_type", "spatial_unpad") != "spatial_unpad":
        raise ConfigError(f"mm_patch_merge_type {cfg['mm_patch_merge_type']!r} is not supported "
                          f"(expected 'spatial_unpad')")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in _ORIG_STRATEGY:
        raise ConfigError(f"mm_vision_select_feature {feature!r} is not supported; expected {list(_ORIG_STRATEGY)}")
    archs = cfg.get("architectures") or ["LlavaLlamaForCausalLM"]
    text_type = "mistral" if "LlavaMistralForCausalLM" in archs else "llama"
    text_fields = {k: v for k, v in cfg.items() if not k.startswith("mm_")}
    text_fields.pop("model_type", None)
    is_video = cfg.get("mm_resampler_type") == "spatial_pool" or "mm_spatial_pool_stride" in cfg
    newline = cfg.get("mm_newline_position", "no_token" if is_video else "grid")
    if newline not in _ORIG_NEWLINE:
        raise ConfigError(f"mm_newline_position {newline!r} is not supported; expected {list(_ORIG_NEWLINE)}")
    mode = cfg.get("mm_spatial_pool_mode", "average")
    if mode not in _ORIG_POOL_MODE:
        raise ConfigError(f"mm_spatial_pool_mode {mode!r} is not supported; expected {list(_ORIG_POOL_MODE)}")
    position = {"before": "before_projector", "after": "after_projector"}.get(cfg.get("mm_pooling_position", "before"))
    if position is None:
        raise ConfigError(f"mm_pooling_position {cfg['mm_pooling_position']!r} is not supported; expected 'before' or 'after'")
    text = _text_from_dict(text_fields, text_type)
    return LlavaNextConfig(
        vision=_vision_from_dict(_ORIGINAL_TOWERS[tower], cfg.get("mm_vision_select_layer", -2), _ORIG_STRATEGY[feature]),
        text=text,
        image_grid_pinpoints=tuple(tuple(p) for p in cfg.get("image_grid_pinpoints", DEFAULT_PINPOINTS)),
        # the original checkpoints splice features at id -200 and have no placeholder rows in the embedding
        # table; llava-next gives the placeholders the first ids past the vocabulary (never embedded)
        image_token_id=text.vocab_size,
        video_token_id=text.vocab_size + 1 if is_video else None,
        spatial_pool_stride=cfg.get("mm_spatial_pool_stride", 2),
        spatial_pool_mode=_ORIG_POOL_MODE[mode],  # type: ignore[arg-type]
        pool_position=position,  # type: ignore[arg-type]
        video_newline=_ORIG_NEWLINE[newline] if is_video else "none",  # type: ignore[arg-type]
        template=("mistral_instruct" if text_type == "mistral" else "vicuna_v1" if is_video else "llava_v1"),
    )


# SigLIP towers of the lmms-lab Qwen checkpoints (LLaVA-NeXT-Interleave, OneVision, LLaVA-Video). The original
# SigLipVisionTower drops the last of the google tower's 27 layers and reads the output of the 26th, before
# post_layernorm, whatever mm_vision_select_layer says; its checkpoints hold those 26 layers.
_ORIGINAL_SIGLIP_TOWERS = {"google/siglip-so400m-patch14-384": _SIGLIP_SO400M}


def _from_original_siglip_config(cfg: dict) -> LlavaNextConfig:
    """An lmms-lab LlavaQwenForCausalLM config. Each way its image handling
    differs from llava-hf's is a field of the result:
    - image_aspect_ratio "anyres" (interleave 0.5b/7b) or "anyres_max_N" (OneVision, LLaVA-Video): AnyRes for
      a single image, pinpoints read as (width, height) and unpad truncating (``anyres_compat="original"``);
      "pad" (interleave 7b-dpo): one tile padded to a square with the mean colour;
    - more than one image in a prompt: padded to one tile each (the original training rule);
    - mm_patch_merge_type "spatial_unpad": a newline after every untiled image (730 tokens), "flat": none;
    - video: OneVision / LLaVA-Video pool each frame bilinearly (``get_2dPool``: stride 2 whatever
      mm_spatial_pool_stride says) after the projector, newline placement from mm_newline_position (default
      one_token, only with spatial_unpad); the interleave checkpoints read a video as its frames (the demo);
    - the "qwen_1_5" conversation template (a system prompt)."""
    archs = cfg.get("architectures") or ["LlavaQwenForCausalLM"]
    if "LlavaQwenForCausalLM" not in archs:
        raise ConfigError(f"architectures {archs} with a SigLIP tower: llava-next reads LlavaQwenForCausalLM")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConfigError(f"mm_projector_type {cfg['mm_projector_type']!r} is not supported (expected 'mlp2x_gelu')")
    aspect = cfg.get("image_aspect_ratio", "anyres")
    max_patches = None
    if m := re.fullmatch(r"anyres_max_(\d+)", str(aspect)):
        aspect, max_patches = "anyres", int(m.group(1))
    if aspect not in ("anyres", "pad"):
        raise ConfigError(f"image_aspect_ratio {aspect!r} is not supported; expected 'anyres', 'anyres_max_N' or 'pad'")
    merge = cfg.get("mm_patch_merge_type", "spatial_unpad")
    if merge not in ("spatial_unpad", "flat") or (merge == "flat" and aspect == "anyres"):
        raise ConfigError(f"mm_patch_merge_type {merge!r} with image_aspect_ratio {cfg.get('image_aspect_ratio')!r} is "
                          f"not supported; the released checkpoints use spatial_unpad, or flat with pad")
    unpad = merge == "spatial_unpad"
    text_fields = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k != "model_type"}
    text = _text_from_dict(text_fields, "qwen2")
    tower = dict(_ORIGINAL_SIGLIP_TOWERS[cfg["mm_vision_tower"]])
    vision = _siglip_from_dict(tower, -1, "full")  # mm_vision_select_layer / _feature are ignored by the original
    tile = vision.image_size
    pins = cfg.get("image_grid_pinpoints") if aspect == "anyres" else None
    if isinstance(pins, str):  # training scripts' "(1x1),...,(6x6)": every (i * tile, j * tile)
        grid = [tuple(map(int, g)) for g in re.findall(r"\((\d+)x(\d+)\)", pins)]
        rows = range(min(g[0] for g in grid), max(g[0] for g in grid) + 1)
        cols = range(min(g[1] for g in grid), max(g[1] for g in grid) + 1)
        pins = [(i * tile, j * tile) for i in rows for j in cols]
    video_pooled = max_patches is not None  # OneVision / LLaVA-Video; interleave: frames as images
    newline = cfg.get("mm_newline_position", "one_token")
    if newline not in _ORIG_NEWLINE:
        raise ConfigError(f"mm_newline_position {newline!r} is not supported; expected {list(_ORIG_NEWLINE)}")
    mode = cfg.get("mm_spatial_pool_mode", "bilinear")
    if mode not in _ORIG_POOL_MODE:
        raise ConfigError(f"mm_spatial_pool_mode {mode!r} is not supported; expected {list(_ORIG_POOL_MODE)}")
    video = dict(spatial_pool_stride=2, spatial_pool_mode=mode, pool_position="after_projector",
                 video_newline=_ORIG_NEWLINE[newline] if unpad else "none") if video_pooled else {}
    return LlavaNextConfig(
        vision=vision, text=text, image_grid_pinpoints=tuple(tuple(p) for p in (pins or [(tile, tile)])),
        image_token_id=text.vocab_size, video_token_id=text.vocab_size + 1 if video_pooled else None,
        anyres_compat="original", image_aspect_ratio=aspect, anyres_max_patches=max_patches,  # type: ignore[arg-type]
        multi_image_aspect_ratio="pad", untiled_image_newline=unpad, video_as_images=not video_pooled,
        template="qwen_1_5", **video)  # type: ignore[arg-type]
