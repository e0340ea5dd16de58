"""Configuration: three dataclasses (vision tower, decoder, whole model) and named presets.

Every derived field is computed and checked once, in ``__post_init__``; a bad value fails there with
a message that names the field, instead of deep inside a forward pass. Choices that differ between
implementations (transformers vs the original LLaVA-NeXT code) are typed fields, never substring tests
on strings (see reference-spec §2.1, §3, §10).

Conventions
- Sizes are ``(height, width)``. ``image_grid_pinpoints`` is stored exactly as the config lists it;
  ``anyres_compat`` says how its pairs are read ("hf": (height, width); "original": (width, height)).
- A *tile* is an AnyRes crop of ``vision.image_size`` px (336); a *patch* is ``vision.patch_size`` px (14).

Construction
- ``LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")``: exact lookup; the error lists valid names.
- ``LlavaNextConfig.from_hf_config(dict)``: a llava-hf ``config.json`` (llava_next / llava_next_video).
- ``LlavaNextConfig.from_original_config(dict)``: an original LLaVA-NeXT ``config.json``
  (``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM`` with ``mm_*`` fields).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

FeatureStrategy = Literal["default", "full"]  # 'default' drops CLS (576 tokens), 'full' keeps it (577)
PoolMode = Literal["average", "max", "bilinear"]
PoolPosition = Literal["before_projector", "after_projector"]  # HF/vLLM/orig `inference` vs orig main
VideoNewline = Literal["none", "grid", "frame", "one_token"]
AnyresCompat = Literal["hf", "original"]  # pinpoint pair order + unpad rounding (reference-spec §2.1)
TemplateName = Literal["llava_v1", "vicuna_v1", "mistral_instruct", "chatml_direct", "llava_next_video"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what to do."""


def _check_literal(owner: str, name: str, value: Any, literal: Any) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        raise ConfigError(f"{owner}.{name} = {value!r} is not supported; choose one of {list(allowed)}")


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{owner}.{name} must be positive, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT as LLaVA uses it. Defaults are ViT-L/14-336 (openai/clip-vit-large-patch14-336)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336  # the tile size, px
    patch_size: int = 14  # px
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    feature_layer: int = -2  # index into hidden_states (0 = embeddings after pre-LN, i = after layer i)
    feature_strategy: FeatureStrategy = "default"

    # derived
    head_dim: int = field(init=False)
    grid_size: int = field(init=False)  # patches per side (24)
    num_patches: int = field(init=False)  # grid_size ** 2 (576)
    layers_used: int = field(init=False)  # transformer layers actually computed (23 for -2)
    tokens_per_tile: int = field(init=False)  # 576 ('default') or 577 ('full')

    def __post_init__(self) -> None:
        o = "VisionConfig"
        _check_positive(o, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                        num_layers=self.num_layers, num_heads=self.num_heads, image_size=self.image_size,
                        patch_size=self.patch_size, num_channels=self.num_channels,
                        layer_norm_eps=self.layer_norm_eps)
        _check_literal(o, "feature_strategy", self.feature_strategy, FeatureStrategy)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{o}.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{o}.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        # hidden_states has num_layers + 1 entries; accept python-style negative indices
        n = self.num_layers + 1
        if not -n <= self.feature_layer < n:
            raise ConfigError(f"{o}.feature_layer {self.feature_layer} is out of range for "
                              f"{self.num_layers} layers (valid: {-n}..{n - 1})")
        grid = self.image_size // self.patch_size
        set_ = object.__setattr__
        set_(self, "head_dim", self.hidden_size // self.num_heads)
        set_(self, "grid_size", grid)
        set_(self, "num_patches", grid * grid)
        set_(self, "layers_used", self.feature_layer % n)
        set_(self, "tokens_per_tile", grid * grid + (1 if self.feature_strategy == "full" else 0))


# --------------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextConfig:
    """Llama-style decoder (Llama / Vicuna / Mistral / Yi): RMSNorm, RoPE, GQA, SwiGLU, untied lm_head."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # linear RoPE scaling: positions are divided by this
    max_position_embeddings: int = 4096  # trained context (before linear scaling)
    sliding_window: int | None = None  # Mistral; None = full attention. Not implemented otherwise.
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0

    # derived
    kv_groups: int = field(init=False)  # query heads per kv head
    max_scaled_positions: int = field(init=False)  # max_position_embeddings * rope_scaling_factor

    def __post_init__(self) -> None:
        o = "TextConfig"
        _check_positive(o, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                        intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                        rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                        max_position_embeddings=self.max_position_embeddings)
        if self.rope_scaling_factor < 1.0:
            raise ConfigError(f"{o}.rope_scaling_factor must be >= 1.0 (1.0 = no scaling), got {self.rope_scaling_factor}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{o}.num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"{o}.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ConfigError(f"{o}.head_dim must be even for RoPE, got {self.head_dim}")
        object.__setattr__(self, "kv_groups", self.num_heads // self.num_kv_heads)
        object.__setattr__(self, "max_scaled_positions",
                           int(self.max_position_embeddings * self.rope_scaling_factor))


# --------------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------------
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class LlavaNextConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    image_token_id: int = 32000
    video_token_id: int | None = None  # None: an image-only checkpoint
    projector_bias: bool = True
    # video path (reference-spec §3)
    spatial_pool_stride: int = 2
    spatial_pool_mode: PoolMode = "average"
    pool_position: PoolPosition = "before_projector"
    video_newline: VideoNewline = "none"
    # AnyRes compatibility with the original repo (pinpoint pair order, unpad rounding)
    anyres_compat: AnyresCompat = "hf"
    template: TemplateName = "llava_v1"

    # derived
    tile_size: int = field(init=False)  # px, == vision.image_size

    def __post_init__(self) -> None:
        o = "LlavaNextConfig"
        _check_literal(o, "spatial_pool_mode", self.spatial_pool_mode, PoolMode)
        _check_literal(o, "pool_position", self.pool_position, PoolPosition)
        _check_literal(o, "video_newline", self.video_newline, VideoNewline)
        _check_literal(o, "anyres_compat", self.anyres_compat, AnyresCompat)
        _check_literal(o, "template", self.template, TemplateName)
        if self.spatial_pool_stride < 1:
            raise ConfigError(f"{o}.spatial_pool_stride must be >= 1, got {self.spatial_pool_stride}")
        pins = tuple(tuple(int(v) for v in p) for p in self.image_grid_pinpoints)
        if not pins:
            raise ConfigError(f"{o}.image_grid_pinpoints is empty; LLaVA-NeXT uses {list(DEFAULT_PINPOINTS)}")
        tile = self.vision.image_size
        for p in pins:
            if len(p) != 2 or p[0] % tile or p[1] % tile or min(p) <= 0:
                raise ConfigError(f"{o}.image_grid_pinpoints entry {list(p)} must be two positive multiples "
                                  f"of the tile size {tile} px")
        object.__setattr__(self, "image_grid_pinpoints", pins)
        object.__setattr__(self, "tile_size", tile)

    # ---- construction -------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "LlavaNextConfig":
        """A copy with fields changed (``text=...``/``vision=...`` take whole sub-configs)."""
        return dataclasses.replace(self, **changes)

    def with_rope_scaling(self, factor: float) -> "LlavaNextConfig":
        """The same model with a different linear RoPE factor (a run-time choice, reference-spec §3)."""
        return self.replace(text=dataclasses.replace(self.text, rope_scaling_factor=float(factor)))

    def to_dict(self) -> dict:
        """JSON-ready dict of the init fields (derived fields are recomputed on load)."""
        def init_fields(obj: Any) -> dict:
            return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
        d = init_fields(self)
        d["vision"], d["text"] = init_fields(self.vision), init_fields(self.text)
        d["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        return d

    @staticmethod
    def from_dict(d: dict) -> "LlavaNextConfig":
        """Inverse of ``to_dict`` (llava-next's own config.json); unknown fields are an error."""
        d = dict(d)
        try:
            vision = VisionConfig(**d.pop("vision", {}))
            text = TextConfig(**d.pop("text", {}))
            return LlavaNextConfig(vision=vision, text=text, **d)
        except TypeError as e:  # unexpected keyword
            raise ConfigError(f"llava-next config.json has a field this version does not know: {e}") from None

    @staticmethod
    def from_name(name: str) -> "LlavaNextConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid names: {', '.join(PRESETS)}")
        return PRESETS[name].config

    @staticmethod
    def from_hf_config(cfg: dict) -> "LlavaNextConfig":
        return _from_hf_config(cfg)

    @staticmethod
    def from_original_config(cfg: dict) -> "LlavaNextConfig":
        return _from_original_config(cfg)


# --------------------------------------------------------------------------------------------------
# config.json readers
# --------------------------------------------------------------------------------------------------
# transformers' defaults for fields a config.json omits (CLIPVisionConfig, LlamaConfig, MistralConfig)
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
_CLIP_L14_336 = dict(_CLIP_DEFAULTS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, image_size=336, patch_size=14)
_TEXT_DEFAULTS = {
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
    theta, factor = _rope(dict(d, _default_theta=d["rope_theta"]))
    return TextConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"], head_dim=d.get("head_dim"),
        rms_norm_eps=d["rms_norm_eps"], rope_theta=theta, rope_scaling_factor=factor,
        max_position_embeddings=d["max_position_embeddings"], sliding_window=d.get("sliding_window"),
        bos_token_id=d.get("bos_token_id", 1), eos_token_id=d.get("eos_token_id", 2),
        pad_token_id=d.get("pad_token_id", 0),
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


# The original config names its vision tower by hub id; these are the towers LLaVA-NeXT uses.
_ORIGINAL_TOWERS = {"openai/clip-vit-large-patch14-336": _CLIP_L14_336}
_ORIG_STRATEGY = {"patch": "default", "cls_patch": "full"}
_ORIG_NEWLINE = {"grid": "grid", "frame": "frame", "one_token": "one_token", "no_token": "none"}
_ORIG_POOL_MODE = {"average": "average", "max": "max", "bilinear": "bilinear"}


def _from_original_config(cfg: dict) -> LlavaNextConfig:
    tower = cfg.get("mm_vision_tower")
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


# --------------------------------------------------------------------------------------------------
# Presets for the real checkpoints
# --------------------------------------------------------------------------------------------------
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
]}
