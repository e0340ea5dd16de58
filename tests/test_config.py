"""llava_next/config/ (schema, readers, presets): presets, derived fields, validation, and the two config.json readers
(llava-hf via transformers' own LlavaNextConfig / LlavaNextVideoConfig, and the original LLaVA-NeXT)."""

import dataclasses
import json

import pytest
from transformers import LlamaConfig, MistralConfig
from transformers import LlavaNextConfig as HFLlavaNextConfig
from transformers import LlavaNextVideoConfig as HFLlavaNextVideoConfig

from llava_next.config import DEFAULT_PINPOINTS, PRESETS, ConfigError, LlavaNextConfig, TextConfig, VisionConfig
from llava_next.inputs.tokens import smallest_rope_factor


def arch(text: TextConfig) -> dict:
    """The decoder's architecture: every TextConfig field except special token ids."""
    d = dataclasses.asdict(text)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        d.pop(k)
    return d


# ---- presets -------------------------------------------------------------------------------------
# docs/references.md: (layers, hidden, heads, kv heads, mlp, rope_theta, max positions, vocab, rope factor,
#                          image token, video token)
SPEC = {
    "llava-v1.6-vicuna-7b": (32, 4096, 32, 32, 11008, 1e4, 4096, 32064, 1.0, 32000, None),
    "llava-v1.6-vicuna-13b": (40, 5120, 40, 40, 13824, 1e4, 4096, 32064, 1.0, 32000, None),
    "llava-v1.6-mistral-7b": (32, 4096, 32, 8, 14336, 1e6, 32768, 32064, 1.0, 32000, None),
    "llava-v1.6-34b": (60, 7168, 56, 8, 20480, 5e6, 4096, 64064, 1.0, 64000, None),
    "LLaVA-NeXT-Video-7B": (32, 4096, 32, 32, 11008, 1e4, 4096, 32064, 2.5, 32001, 32000),
    "LLaVA-NeXT-Video-7B-DPO": (32, 4096, 32, 32, 11008, 1e4, 4096, 32064, 2.5, 32001, 32000),
    "LLaVA-NeXT-Video-34B": (60, 7168, 56, 8, 20480, 5e6, 4096, 64064, 1.0, 64001, 64000),
}


@pytest.mark.parametrize("name", list(SPEC))
def test_presets_match_the_reference_spec(name):
    c = LlavaNextConfig.from_name(name)
    t = c.text
    got = (t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.intermediate_size, t.rope_theta,
           t.max_position_embeddings, t.vocab_size, t.rope_scaling_factor, c.image_token_id, c.video_token_id)
    assert got == SPEC[name]
    assert t.rms_norm_eps == 1e-5 and t.head_dim == 128 and t.sliding_window is None
    assert c.vision == VisionConfig() and c.image_grid_pinpoints == DEFAULT_PINPOINTS
    assert PRESETS[name].source.startswith("https://huggingface.co/") and PRESETS[name].hub_id in PRESETS[name].source


def test_from_name_is_an_exact_lookup_listing_valid_names():
    from test_qwen import QWEN_SPEC  # the SigLIP + Qwen presets (issue 13)

    assert set(PRESETS) == set(SPEC) | set(QWEN_SPEC)
    for wrong in ("llava-v1.6-Vicuna-7b", "vicuna-7b", "LLaVA-NeXT-Video-7B "):
        with pytest.raises(ConfigError) as e:
            LlavaNextConfig.from_name(wrong)
        assert repr(wrong) in str(e.value) and all(n in str(e.value) for n in PRESETS)


# ---- derived fields ------------------------------------------------------------------------------
def test_derived_fields():
    v = VisionConfig()
    assert (v.head_dim, v.grid_size, v.num_patches, v.layers_used, v.tokens_per_tile) == (64, 24, 576, 23, 576)
    assert VisionConfig(feature_strategy="full").tokens_per_tile == 577
    assert VisionConfig(feature_layer=24).layers_used == 24 and VisionConfig(feature_layer=-25).layers_used == 0
    t = LlavaNextConfig.from_name("llava-v1.6-34b").text
    assert (t.head_dim, t.kv_groups, t.max_scaled_positions) == (128, 7, 4096)
    assert LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B").text.max_scaled_positions == 10240  # 4096 * 2.5
    assert TextConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32).head_dim == 32  # explicit wins
    assert LlavaNextConfig(vision=VisionConfig(image_size=56, patch_size=14),
                           image_grid_pinpoints=((56, 112),)).tile_size == 56


def test_with_rope_scaling_returns_a_new_config():
    c = LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")
    d = c.with_rope_scaling(2)
    assert d.text.rope_scaling_factor == 2.0 and d.text.max_scaled_positions == 8192
    assert c.text.rope_scaling_factor == 2.5  # frozen original unchanged
    assert dataclasses.replace(d.text, rope_scaling_factor=2.5) == c.text and d.vision == c.vision
    with pytest.raises(ConfigError, match="rope_scaling_factor"):
        c.with_rope_scaling(0.5)


def test_smallest_rope_factor():
    # the original video demo: 32 frames x 144 tokens + 1000 -> factor 2 (docs/references.md)
    assert smallest_rope_factor(32 * 144 + 1000, 4096) == 2.0
    assert smallest_rope_factor(8 * 144 + 1000, 4096) == 1.0
    assert smallest_rope_factor(4097, 4096) == 2.0


def test_own_config_json_round_trip():
    for name in PRESETS:
        c = LlavaNextConfig.from_name(name)
        assert LlavaNextConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    d = LlavaNextConfig().to_dict()
    d["text"]["rope_sclaing_factor"] = 2.0
    with pytest.raises(ConfigError, match="rope_sclaing_factor"):
        LlavaNextConfig.from_dict(d)


# ---- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make,field", [
    (lambda: TextConfig(hidden_size=0), "TextConfig.hidden_size"),
    (lambda: TextConfig(num_heads=32, num_kv_heads=5), "num_kv_heads"),
    (lambda: TextConfig(hidden_size=100, num_heads=3, num_kv_heads=1), "num_heads"),
    (lambda: TextConfig(hidden_size=96, num_heads=32, num_kv_heads=32), "head_dim"),  # head_dim 3: odd
    (lambda: TextConfig(rms_norm_eps=0.0), "rms_norm_eps"),
    (lambda: TextConfig(rope_scaling_factor=0.9), "rope_scaling_factor"),
    (lambda: VisionConfig(num_heads=5), "num_heads"),
    (lambda: VisionConfig(image_size=340), "patch_size"),
    (lambda: VisionConfig(feature_layer=25), "feature_layer"),
    (lambda: VisionConfig(feature_strategy="cls"), "feature_strategy"),
    (lambda: LlavaNextConfig(image_grid_pinpoints=((336, 600),)), "image_grid_pinpoints"),
    (lambda: LlavaNextConfig(image_grid_pinpoints=()), "image_grid_pinpoints"),
    (lambda: LlavaNextConfig(spatial_pool_mode="median"), "spatial_pool_mode"),
    (lambda: LlavaNextConfig(spatial_pool_stride=0), "spatial_pool_stride"),
    (lambda: LlavaNextConfig(template="vicuna"), "template"),
    (lambda: LlavaNextConfig(anyres_compat="orig"), "anyres_compat"),
])
def test_validation_errors_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


# ---- llava-hf config.json (transformers' own config classes) -------------------------------------
def hf_video_7b(**text) -> dict:
    """LLaVA-NeXT-Video-7B-hf as transformers writes it (to_dict)."""
    tc = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0,
                     **text or dict(rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 1e4}))
    return HFLlavaNextVideoConfig(text_config=tc.to_dict(), image_token_index=32001, video_token_index=32000).to_dict()


def test_from_hf_config_video_7b_equals_the_preset():
    assert LlavaNextConfig.from_hf_config(hf_video_7b()) == LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")


def test_from_hf_config_reads_legacy_rope_scaling_too():
    legacy = hf_video_7b(rope_scaling={"type": "linear", "factor": 2.5})
    assert LlavaNextConfig.from_hf_config(legacy).text.rope_scaling_factor == 2.5
    # the hub's raw JSON form: legacy key, defaults omitted, and the converter's stray top-level "type"
    raw = {"model_type": "llava_next_video", "image_token_index": 32001, "video_token_index": 32000,
           "type": "linear", "spatial_pool_mode": "average", "spatial_pool_stride": 2,
           "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
                           "pad_token_id": 0, "rope_scaling": {"factor": 2.5, "type": "linear"},
                           "vocab_size": 32064},
           "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                             "model_type": "clip_vision_model", "num_attention_heads": 16,
                             "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}}
    assert LlavaNextConfig.from_hf_config(raw) == LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")


def test_from_hf_config_mistral_text_config():
    tc = MistralConfig(vocab_size=32064, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    c = LlavaNextConfig.from_hf_config(HFLlavaNextConfig(text_config=tc.to_dict()).to_dict())
    preset = LlavaNextConfig.from_name("llava-v1.6-mistral-7b")
    assert arch(c.text) == arch(preset.text)
    assert (c.image_token_id, c.video_token_id, c.vision) == (32000, None, preset.vision)
    # transformers' MistralConfig default keeps a 4096-token sliding window: read, not dropped
    default = LlavaNextConfig.from_hf_config(HFLlavaNextConfig(text_config=MistralConfig().to_dict()).to_dict())
    assert default.text.sliding_window == 4096 and default.text.rope_theta == 1e4
    raw = {"model_type": "llava_next", "text_config": {"model_type": "mistral"}}  # fields omitted: Mistral's defaults
    assert arch(LlavaNextConfig.from_hf_config(raw).text) == arch(default.text)


def test_from_hf_config_without_vision_config_is_clip_l14_336():
    d = hf_video_7b()
    del d["vision_config"]
    assert LlavaNextConfig.from_hf_config(d).vision == VisionConfig()


def test_from_hf_config_image_model_defaults():
    c = LlavaNextConfig.from_hf_config(HFLlavaNextConfig().to_dict())
    assert c.video_token_id is None and c.image_token_id == 32000 and c.template == "llava_v1"
    assert c.text.max_position_embeddings == 2048 and c.text.rms_norm_eps == 1e-6  # LlamaConfig's defaults


@pytest.mark.parametrize("change,field", [
    (lambda d: d.update(model_type="llava"), "model_type"),
    (lambda d: d["text_config"].update(model_type="gemma"), "model_type"),  # qwen2 is supported (issue 13)
    (lambda d: d["text_config"].update(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_type"),
    (lambda d: d["text_config"].update(hidden_act="gelu"), "hidden_act"),
    (lambda d: d["text_config"].update(attention_bias=True), "attention_bias"),
    (lambda d: d["vision_config"].update(hidden_act="gelu"), "hidden_act"),
    (lambda d: d.update(projector_hidden_act="relu"), "projector_hidden_act"),
    (lambda d: d.update(spatial_pool_mode="conv"), "spatial_pool_mode"),
    (lambda d: d.update(vision_feature_layer=[-2, -5]), "vision_feature_layer"),
])
def test_from_hf_config_errors_name_the_field(change, field):
    d = hf_video_7b()
    change(d)
    with pytest.raises(ConfigError, match=field):
        LlavaNextConfig.from_hf_config(d)


# ---- original LLaVA-NeXT config.json -------------------------------------------------------------
def original_vicuna_7b() -> dict:
    """liuhaotian/llava-v1.6-vicuna-7b config.json (the fields of docs/references.md, Checkpoint keys)."""
    return {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
        "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
        "image_aspect_ratio": "anyres", "image_crop_resolution": 224,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "image_split_resolution": 224, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "mm_hidden_size": 1024, "mm_patch_merge_type": "spatial_unpad", "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_tower_lr": 2e-06, "model_type": "llava",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 0,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16", "transformers_version": "4.36.2", "unfreeze_mm_vision_tower": True,
        "use_cache": True, "use_mm_proj": True, "vocab_size": 32000,
    }


def test_from_original_config_vicuna():
    c = LlavaNextConfig.from_original_config(original_vicuna_7b())
    preset = LlavaNextConfig.from_name("llava-v1.6-vicuna-7b")
    assert arch(c.text) == dict(arch(preset.text), vocab_size=32000)  # original vocabulary, no added rows
    assert c.vision == preset.vision and c.image_grid_pinpoints == preset.image_grid_pinpoints
    assert (c.image_token_id, c.video_token_id, c.template) == (32000, None, "llava_v1")


def test_from_original_config_mistral_and_video():
    mistral = dict(original_vicuna_7b(), architectures=["LlavaMistralForCausalLM"], intermediate_size=14336,
                   num_key_value_heads=8, rope_theta=1e6, max_position_embeddings=32768, sliding_window=None)
    c = LlavaNextConfig.from_original_config(mistral)
    assert arch(c.text) == dict(arch(LlavaNextConfig.from_name("llava-v1.6-mistral-7b").text), vocab_size=32000)
    assert c.template == "mistral_instruct"
    video = dict(original_vicuna_7b(), mm_resampler_type="spatial_pool", mm_spatial_pool_stride=2,
                 mm_spatial_pool_mode="average", mm_spatial_pool_out_channels=1024, mm_newline_position="one_token",
                 mm_pooling_position="after")
    v = LlavaNextConfig.from_original_config(video)
    assert (v.spatial_pool_stride, v.spatial_pool_mode) == (2, "average")
    # placeholders: ids past the original vocabulary (the original code splices at -200), one per kind
    assert min(v.image_token_id, v.video_token_id) >= 32000 and v.image_token_id != v.video_token_id
    assert (v.video_newline, v.pool_position, v.template) == ("one_token", "after_projector", "vicuna_v1")
    assert v.text.rope_scaling_factor == 1.0  # the original demo picks the factor at run time


@pytest.mark.parametrize("change,field", [
    (dict(mm_vision_tower="google/siglip-base-patch16-224"), "mm_vision_tower"),  # so400m is supported (issue 13)
    (dict(mm_projector_type="linear"), "mm_projector_type"),
    (dict(image_aspect_ratio="pad"), "image_aspect_ratio"),
    (dict(mm_patch_merge_type="flat"), "mm_patch_merge_type"),
    (dict(mm_vision_select_feature="cls"), "mm_vision_select_feature"),
    (dict(mm_resampler_type="spatial_pool", mm_newline_position="row"), "mm_newline_position"),
    (dict(mm_resampler_type="spatial_pool", mm_spatial_pool_mode="conv"), "mm_spatial_pool_mode"),
    (dict(mm_pooling_position="middle"), "mm_pooling_position"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_type"),
])
def test_from_original_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        LlavaNextConfig.from_original_config(dict(original_vicuna_7b(), **change))
