"""Named presets for the real checkpoints: ``PRESETS[name].config``, each citing the config.json its
numbers come from (``LlavaNextConfig.from_name(name)``; the error lists the valid names).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .readers import ONEVISION_FIELDS, ONEVISION_PINPOINTS
from .schema import LlavaNextConfig, TextConfig, VisionConfig

@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str  # llava-hf format (what `llava-next run --model` downloads by default)
    original_id: str  # the original LLaVA-NeXT release
    source: str  # the config.json the numbers come from
    config: LlavaNextConfig


_VICUNA_7B = TextConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        num_kv_heads=32, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=4096)
_VICUNA_13B = TextConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                         num_kv_heads=40, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=4096)
_MISTRAL_7B = TextConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
                         sliding_window=None, pad_token_id=32001)
_YI_34B = TextConfig(vocab_size=64064, hidden_size=7168, intermediate_size=20480, num_layers=60, num_heads=56,
                     num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=5e6, max_position_embeddings=4096,
                     bos_token_id=1, eos_token_id=7, pad_token_id=0)

_HF = "https://huggingface.co/{}/blob/main/config.json"


def _preset(name: str, hub_id: str, original_id: str, **fields: Any) -> Preset:
    return Preset(name, hub_id, original_id, _HF.format(hub_id), LlavaNextConfig(**fields))


_VIDEO = dict(spatial_pool_stride=2, spatial_pool_mode="average", pool_position="before_projector",
              video_newline="none")

_SO400M = VisionConfig(kind="siglip", hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16,
                       image_size=384, patch_size=14, layer_norm_eps=1e-6, feature_layer=-1, feature_strategy="full")
_QWEN = dict(rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, qkv_bias=True, bos_token_id=None,
             eos_token_id=151645, pad_token_id=151643)  # <|im_end|>, <|endoftext|>; Qwen adds no BOS
_QWEN15_05B = TextConfig(vocab_size=152000, hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16,
                         num_kv_heads=16, tie_word_embeddings=True, **_QWEN)
_QWEN15_7B = TextConfig(vocab_size=152000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        num_kv_heads=32, **_QWEN)
_QWEN2_05B = TextConfig(vocab_size=152000, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                        num_kv_heads=2, tie_word_embeddings=True, **_QWEN)
_QWEN2_7B = TextConfig(vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, **_QWEN)
_INTERLEAVE = dict(image_grid_pinpoints=((384, 384),), image_token_id=151646, image_aspect_ratio="resize",
                   video_as_images=True, template="qwen_interleave_hf")
_OV = dict(image_grid_pinpoints=ONEVISION_PINPOINTS, image_token_id=151646, video_token_id=151647, anyres_max_patches=9,
           template="qwen_onevision_hf", **ONEVISION_FIELDS)

PRESETS: dict[str, Preset] = {p.name: p for p in [
    _preset("llava-v1.6-vicuna-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", "liuhaotian/llava-v1.6-vicuna-7b",
            text=_VICUNA_7B, image_token_id=32000, template="llava_v1"),
    _preset("llava-v1.6-vicuna-13b", "llava-hf/llava-v1.6-vicuna-13b-hf", "liuhaotian/llava-v1.6-vicuna-13b",
            text=_VICUNA_13B, image_token_id=32000, template="llava_v1"),
    _preset("llava-v1.6-mistral-7b", "llava-hf/llava-v1.6-mistral-7b-hf", "liuhaotian/llava-v1.6-mistral-7b",
            text=_MISTRAL_7B, image_token_id=32000, template="mistral_instruct"),
    _preset("llava-v1.6-34b", "llava-hf/llava-v1.6-34b-hf", "liuhaotian/llava-v1.6-34b",
            text=_YI_34B, image_token_id=64000, template="chatml_direct"),
    # Video-7B(-DPO): the hub config carries text_config.rope_scaling {linear, 2.5} (commits 8edf6dd, b35fd71)
    _preset("LLaVA-NeXT-Video-7B", "llava-hf/LLaVA-NeXT-Video-7B-hf", "lmms-lab/LLaVA-NeXT-Video-7B",
            text=dataclasses.replace(_VICUNA_7B, rope_scaling_factor=2.5), image_token_id=32001,
            video_token_id=32000, template="llava_next_video", **_VIDEO),
    _preset("LLaVA-NeXT-Video-7B-DPO", "llava-hf/LLaVA-NeXT-Video-7B-DPO-hf", "lmms-lab/LLaVA-NeXT-Video-7B-DPO",
            text=dataclasses.replace(_VICUNA_7B, rope_scaling_factor=2.5), image_token_id=32001,
            video_token_id=32000, template="llava_next_video", **_VIDEO),
    _preset("LLaVA-NeXT-Video-34B", "llava-hf/LLaVA-NeXT-Video-34B-hf", "lmms-lab/LLaVA-NeXT-Video-34B",
            text=dataclasses.replace(_YI_34B, vocab_size=64064), image_token_id=64001, video_token_id=64000,
            template="chatml_direct", **_VIDEO),

    # ---- SigLIP + Qwen (docs/references.md: SigLIP vision tower, Decoders) ---------------------------
    # llava-hf interleave configs: 26 SigLIP layers, vision_feature_layer -1 "full", image_token_index 151646,
    # vocabulary 151936 + <image> padded to 152000 (the extra rows are random: never generated in practice)
    _preset("llava-interleave-qwen-0.5b", "llava-hf/llava-interleave-qwen-0.5b-hf",
            "lmms-lab/llava-next-interleave-qwen-0.5b", vision=_SO400M, text=_QWEN15_05B, **_INTERLEAVE),
    _preset("llava-interleave-qwen-7b", "llava-hf/llava-interleave-qwen-7b-hf",
            "lmms-lab/llava-next-interleave-qwen-7b", vision=_SO400M, text=_QWEN15_7B, **_INTERLEAVE),
    _preset("llava-interleave-qwen-7b-dpo", "llava-hf/llava-interleave-qwen-7b-dpo-hf",
            "lmms-lab/llava-next-interleave-qwen-7b-dpo", vision=_SO400M, text=_QWEN15_7B, **_INTERLEAVE),
    # OneVision: <video> 151647; OV-0.5B vocabulary 152000, OV-7B 152064 + 2 padded to 152128 (the
    # converter pads to a multiple of 64); LLaVA-Video-7B-Qwen2 is OneVision-7B's architecture (its llava-hf id is not verified)
    _preset("llava-onevision-qwen2-0.5b-ov", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
            "lmms-lab/llava-onevision-qwen2-0.5b-ov", vision=_SO400M, text=_QWEN2_05B, **_OV),
    _preset("llava-onevision-qwen2-7b-ov", "llava-hf/llava-onevision-qwen2-7b-ov-hf",
            "lmms-lab/llava-onevision-qwen2-7b-ov", vision=_SO400M, text=_QWEN2_7B, **_OV),
    _preset("LLaVA-Video-7B-Qwen2", "llava-hf/LLaVA-Video-7B-Qwen2-hf", "lmms-lab/LLaVA-Video-7B-Qwen2",
            vision=_SO400M, text=_QWEN2_7B, **_OV),
]}


def did_you_mean(name: str, extra: tuple[str, ...] = ()) -> str:
    """``"; did you mean 'LLaVA-NeXT-Video-7B'?"`` for a model name close to a preset name or a preset's hub id
    (case-insensitive, difflib), else ``""``: the tail of a "no such model" message. ``extra``: more valid
    names (the command line adds ``tiny-random``)."""
    import difflib

    names = [*extra, *PRESETS, *(p.hub_id for p in PRESETS.values()), *(p.original_id for p in PRESETS.values())]
    by_lower = {n.lower(): n for n in reversed(names)}  # the first spelling of a name wins
    key = str(name).strip().lower()
    match = [key] if key in by_lower else difflib.get_close_matches(key, list(by_lower), n=1, cutoff=0.75)
    if not match or by_lower[match[0]] == name:
        return ""
    return f"; did you mean {by_lower[match[0]]!r}?"
