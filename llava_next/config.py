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
import functools
import math
import re
import types
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

FeatureStrategy = Literal["default", "full"]  # 'default' drops CLS (576 tokens), 'full' keeps it (577)
VisionKind = Literal["clip", "siglip"]  # CLIP ViT (CLS, pre-LN, quick-GELU) / SigLIP (no CLS, no pre-LN, tanh GELU)
VisionAct = Literal["quick_gelu", "gelu_pytorch_tanh", "gelu"]  # transformers' hidden_act names; gelu = erf
ImageAspect = Literal["anyres", "resize", "pad"]  # AnyRes tiles / one squashed tile / padded to square, one tile
PoolMode = Literal["average", "max", "bilinear"]
PoolPosition = Literal["before_projector", "after_projector"]  # HF/vLLM/orig `inference` vs orig main
VideoNewline = Literal["none", "grid", "frame", "one_token"]
AnyresCompat = Literal["hf", "original"]  # pinpoint pair order + unpad rounding (reference-spec §2.1)
TemplateName = Literal["llava_v1", "vicuna_v1", "mistral_instruct", "chatml_direct", "llava_next_video",
                       "qwen_interleave_hf", "qwen_onevision_hf", "qwen_1_5"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what to do."""


def _check_literal(owner: str, name: str, value: Any, literal: Any) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        raise ConfigError(f"{owner}.{name} = {value!r} is not supported; choose one of {list(allowed)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: float) -> bool:
    """A number torch can use as a float (10**400 is a valid JSON integer but not a float)."""
    try:
        return math.isfinite(float(value)) and abs(float(value)) < 1e300
    except OverflowError:
        return False


@functools.cache
def _hints(cls: type) -> dict:
    return get_type_hints(cls)


def _check_types(owner: str, obj: Any) -> None:
    """Every int / float / bool / optional init field of ``obj`` holds that type (config.json values arrive
    untyped: "64", 6.5, [], true, 1e999). Literal switches, sub-configs and tuples are checked elsewhere."""
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        hint, value = _hints(type(obj))[f.name], getattr(obj, f.name)
        options = get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if not set(options) & {int, float, bool}:
            continue
        if (value is None and type(None) in options) or (bool in options and isinstance(value, bool)) \
                or (int in options and _is_int(value) and abs(value) < 2**31) \
                or (float in options and (_is_int(value) or isinstance(value, float)) and _finite(value)):
            if float in options and int not in options and _is_int(value):  # 10**100 as a float: torch.pow
                object.__setattr__(obj, f.name, float(value))              # cannot take the integer
            continue
        names = " or ".join("null" if o is type(None) else "a finite number" if o is float else
                            "an integer below 2**31 in magnitude" if o is int else o.__name__ for o in options)
        text = repr(value)
        raise ConfigError(f"{owner}.{f.name} = {text[:60]}{'...' if len(text) > 60 else ''} is not supported; "
                          f"it must be {names}")


# Sanity limits on config.json numbers (found by fuzzing: 10^100 layers hung the key planner, a 10^100-wide
# layer overflowed torch). Far above any real checkpoint (80 layers, widths ~30k, vocabularies ~260k).
MAX_LAYERS = 1024
MAX_SIZE = 2**24  # any width, head count, vocabulary size, tile or patch size


def _check_at_most(owner: str, limit: int, **values: int) -> None:
    for name, value in values.items():
        if value > limit:
            raise ConfigError(f"{owner}.{name} = {value} is over llava-next's sanity limit of {limit}; the config "
                              f"is damaged: restore the config.json that came with the checkpoint")


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{owner}.{name} must be positive, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionConfig:
    """The vision tower as LLaVA uses it. Defaults are CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336).

    ``kind="siglip"`` is SigLIP so400m as LLaVA-NeXT-Interleave / OneVision use it (interleave-onevision-spec
    §1): no CLS token, no pre-LayerNorm, a patch conv with bias, LayerNorm eps 1e-6, tanh GELU; every token
    is a patch (``feature_strategy`` must be "full": "default" would drop a patch, not a CLS token).
    ``hidden_act=None`` takes the kind's activation (CLIP quick_gelu, SigLIP gelu_pytorch_tanh); open_clip's
    timm SigLIP trunk uses the erf GELU ("gelu"), a switch so it can be loaded exactly (model/siglip.py)."""

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
    kind: VisionKind = "clip"
    hidden_act: VisionAct | None = None  # None: the kind's (clip: quick_gelu, siglip: gelu_pytorch_tanh)

    # derived
    head_dim: int = field(init=False)
    grid_size: int = field(init=False)  # patches per side (24)
    num_patches: int = field(init=False)  # grid_size ** 2 (576)
    layers_used: int = field(init=False)  # transformer layers actually computed (23 for -2)
    tokens_per_tile: int = field(init=False)  # 576 ('default') or 577 ('full'); SigLIP: 729
    has_cls: bool = field(init=False)  # CLIP prepends a CLS token; SigLIP has none

    def __post_init__(self) -> None:
        o = "VisionConfig"
        _check_types(o, self)
        _check_literal(o, "kind", self.kind, VisionKind)
        if self.hidden_act is None:
            object.__setattr__(self, "hidden_act", "quick_gelu" if self.kind == "clip" else "gelu_pytorch_tanh")
        _check_literal(o, "hidden_act", self.hidden_act, VisionAct)
        if self.kind == "siglip" and self.feature_strategy != "full":
            raise ConfigError(f"{o}.feature_strategy must be 'full' for a SigLIP tower (it has no CLS token: "
                              f"'default' would drop the first patch, 728 of 729 tokens; interleave-onevision-spec §8.2)")
        _check_positive(o, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                        num_layers=self.num_layers, num_heads=self.num_heads, image_size=self.image_size,
                        patch_size=self.patch_size, num_channels=self.num_channels,
                        layer_norm_eps=self.layer_norm_eps)
        _check_at_most(o, MAX_LAYERS, num_layers=self.num_layers)
        _check_at_most(o, MAX_SIZE, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                       num_heads=self.num_heads, image_size=self.image_size, patch_size=self.patch_size,
                       num_channels=self.num_channels)
        _check_literal(o, "feature_strategy", self.feature_strategy, FeatureStrategy)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{o}.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size and self.kind == "clip":  # SigLIP: 384 // 14 = 27, the conv's
            raise ConfigError(f"{o}.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        # "valid" padding drops the last 384 - 27 * 14 = 6 px rows/columns, as the checkpoint was trained
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
        set_(self, "has_cls", self.kind == "clip")
        set_(self, "tokens_per_tile", grid * grid + (1 if self.has_cls and self.feature_strategy == "full" else 0))


# --------------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextConfig:
    """Llama-style decoder (Llama / Vicuna / Mistral / Yi / Qwen1.5 / Qwen2): RMSNorm, RoPE, GQA, SwiGLU.

    Qwen (interleave-onevision-spec §3) is the same block with ``qkv_bias=True``, RoPE theta 1e6, and for
    the 0.5B models ``tie_word_embeddings=True``; Qwen2 adds GQA (``num_kv_heads`` < ``num_heads``)."""

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
    qkv_bias: bool = False  # Qwen1.5 / Qwen2: q/k/v projections have a bias (o_proj and the MLP do not)
    tie_word_embeddings: bool = False  # Qwen 0.5B: lm_head is embed_tokens (one tensor, not saved twice)
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0

    # derived
    kv_groups: int = field(init=False)  # query heads per kv head
    max_scaled_positions: int = field(init=False)  # max_position_embeddings * rope_scaling_factor

    def __post_init__(self) -> None:
        o = "TextConfig"
        _check_types(o, self)
        _check_positive(o, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                        intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                        rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                        max_position_embeddings=self.max_position_embeddings)
        _check_at_most(o, MAX_LAYERS, num_layers=self.num_layers)
        _check_at_most(o, MAX_SIZE, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                       intermediate_size=self.intermediate_size, num_heads=self.num_heads,
                       num_kv_heads=self.num_kv_heads, head_dim=self.head_dim or 1)
        if self.rope_scaling_factor < 1.0:
            raise ConfigError(f"{o}.rope_scaling_factor must be >= 1.0 (1.0 = no scaling), got {self.rope_scaling_factor}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{o}.num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is not None:
            _check_positive(o, head_dim=self.head_dim)
        if self.sliding_window is not None:
            _check_positive(o, sliding_window=self.sliding_window)
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
    # SigLIP + Qwen family (interleave-onevision-spec §4, §7): how an image becomes tiles
    image_aspect_ratio: ImageAspect = "anyres"  # resize: one squashed 384 px tile (llava-hf interleave, 729)
    anyres_max_patches: int | None = None  # OneVision "anyres_max_9": 9; None = plain anyres (no downscale)
    multi_image_aspect_ratio: ImageAspect | None = None  # with > 1 image in a prompt (OneVision: "pad"); None = same
    untiled_image_newline: bool = False  # image_newline after a resize/pad image (729 -> 730: OneVision, ORIG unpad)
    video_as_images: bool = False  # a video is its frames as images, one <image> each (Interleave)

    # derived
    tile_size: int = field(init=False)  # px, == vision.image_size
    uses_image_newline: bool = field(init=False)  # False: no image_newline parameter (llava-hf interleave has none)

    def __post_init__(self) -> None:
        o = "LlavaNextConfig"
        _check_types(o, self)
        _check_literal(o, "spatial_pool_mode", self.spatial_pool_mode, PoolMode)
        _check_literal(o, "pool_position", self.pool_position, PoolPosition)
        _check_literal(o, "video_newline", self.video_newline, VideoNewline)
        _check_literal(o, "anyres_compat", self.anyres_compat, AnyresCompat)
        _check_literal(o, "template", self.template, TemplateName)
        _check_literal(o, "image_aspect_ratio", self.image_aspect_ratio, ImageAspect)
        if self.multi_image_aspect_ratio is not None:
            _check_literal(o, "multi_image_aspect_ratio", self.multi_image_aspect_ratio, ImageAspect)
        if self.anyres_max_patches is not None and self.anyres_max_patches < 1:
            raise ConfigError(f"{o}.anyres_max_patches must be >= 1 (or None), got {self.anyres_max_patches}")
        if self.video_as_images and self.video_token_id is not None:
            raise ConfigError(f"{o}.video_as_images sends frames as images, so the config must have no video_token_id "
                              f"(got {self.video_token_id})")
        if self.spatial_pool_stride < 1:
            raise ConfigError(f"{o}.spatial_pool_stride must be >= 1, got {self.spatial_pool_stride}")
        pins = self.image_grid_pinpoints
        if not isinstance(pins, (list, tuple)) or not all(
                isinstance(p, (list, tuple)) and all(_is_int(v) for v in p) for p in pins):
            raise ConfigError(f"{o}.image_grid_pinpoints must be a list of [height, width] integer pairs, got "
                              f"{str(pins)[:80]}")
        pins = tuple(tuple(int(v) for v in p) for p in pins)
        if not pins:
            raise ConfigError(f"{o}.image_grid_pinpoints is empty; LLaVA-NeXT uses {list(DEFAULT_PINPOINTS)}")
        tile = self.vision.image_size
        for p in pins:
            if len(p) != 2 or p[0] % tile or p[1] % tile or min(p) <= 0:
                raise ConfigError(f"{o}.image_grid_pinpoints entry {list(p)} must be two positive multiples "
                                  f"of the tile size {tile} px")
        object.__setattr__(self, "image_grid_pinpoints", pins)
        object.__setattr__(self, "tile_size", tile)
        object.__setattr__(self, "uses_image_newline", "anyres" in (self.image_aspect_ratio, self.multi_image_aspect_ratio)
                           or self.untiled_image_newline or self.video_newline != "none")

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
        vision, text = d.pop("vision", {}), d.pop("text", {})
        if not isinstance(vision, dict) or not isinstance(text, dict):
            raise ConfigError("llava-next config.json: 'vision' and 'text' must be JSON objects")
        try:
            return LlavaNextConfig(vision=VisionConfig(**vision), text=TextConfig(**text), **d)
        except TypeError as e:  # unexpected keyword
            raise ConfigError(f"llava-next config.json has a field this version does not know: {e}") from None

    @staticmethod
    def from_name(name: str) -> "LlavaNextConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid names: {', '.join(PRESETS)}")
        return PRESETS[name].config

    @staticmethod
    def from_hf_config(cfg: dict) -> "LlavaNextConfig":
        with _malformed("llava-hf"):
            return _from_hf_config(cfg)

    @staticmethod
    def from_original_config(cfg: dict) -> "LlavaNextConfig":
        with _malformed("original LLaVA-NeXT"):
            return _from_original_config(cfg)


class _malformed:
    """A config.json value of the wrong kind (a list where an object belongs, a string where a number
    does, a missing required field) reaching the readers below as TypeError / KeyError / AttributeError /
    OverflowError becomes a ConfigError that says so, instead of a traceback (found by fuzzing)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, e, tb) -> bool:
        if e is None or isinstance(e, ConfigError) or not isinstance(e, (TypeError, ValueError, KeyError, AttributeError,
                                                                         OverflowError, IndexError)):
            return False
        what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:160]}"
        raise ConfigError(f"a malformed {self.kind} config ({what}); a field has the wrong type or is "
                          f"missing: restore the config.json that came with the checkpoint") from None


# --------------------------------------------------------------------------------------------------
# config.json readers
# --------------------------------------------------------------------------------------------------
# transformers' defaults for fields a config.json omits (CLIPVisionConfig, LlamaConfig, MistralConfig)
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
_CLIP_L14_336 = dict(_CLIP_DEFAULTS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, image_size=336, patch_size=14)
# transformers' SiglipVisionConfig defaults (the interleave-onevision checkpoints list every field anyway)
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                        hidden_act="gelu_pytorch_tanh")
# google/siglip-so400m-patch14-384 as LLaVA keeps it: 26 of its 27 layers (interleave-onevision-spec §1)
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
    (model_type "llava_onevision"): a SigLIP tower and a Qwen decoder (interleave-onevision-spec §4, §7)."""
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
        image_grid_pinpoints=tuple(tuple(p) for p in cfg.get("image_grid_pinpoints", _OV_PINPOINTS)),
        image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 151646)),
        video_token_id=cfg.get("video_token_index", cfg.get("video_token_id", 151647)),
        projector_bias=cfg.get("multimodal_projector_bias", True), **_ONEVISION,
        anyres_max_patches=int(aspect.removeprefix("anyres_max_")), template="qwen_onevision_hf")


# LLaVA-OneVision image/video handling as transformers' LlavaOnevisionForConditionalGeneration does it
# (interleave-onevision-spec §7): anyres_max (base first, unpad, bilinear downscale, newline per row); more
# than one image: each padded to a square, one tile + one newline (730); video: projector, then bilinear
# 27 -> 14 pooling (196 per frame), one newline after the whole video
_ONEVISION = dict(image_aspect_ratio="anyres", multi_image_aspect_ratio="pad", untiled_image_newline=True,
                  spatial_pool_stride=2, spatial_pool_mode="bilinear", pool_position="after_projector",
                  video_newline="one_token")
_OV_PINPOINTS = tuple((a, b) for a in range(384, 2305, 384) for b in range(384, 2305, 384))


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
    """An lmms-lab LlavaQwenForCausalLM config (interleave-onevision-spec §3, §4, §7). Each way its image handling
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
_OV = dict(image_grid_pinpoints=_OV_PINPOINTS, image_token_id=151646, video_token_id=151647, anyres_max_patches=9,
           template="qwen_onevision_hf", **_ONEVISION)

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

    # ---- SigLIP + Qwen (interleave-onevision-spec §1, §3, §4, §7) ----------------------------------
    # llava-hf interleave configs: 26 SigLIP layers, vision_feature_layer -1 "full", image_token_index 151646,
    # vocabulary 151936 + <image> padded to 152000 (the extra rows are random: never generated in practice)
    _preset("llava-interleave-qwen-0.5b", "llava-hf/llava-interleave-qwen-0.5b-hf",
            "lmms-lab/llava-next-interleave-qwen-0.5b", vision=_SO400M, text=_QWEN15_05B, **_INTERLEAVE),
    _preset("llava-interleave-qwen-7b", "llava-hf/llava-interleave-qwen-7b-hf",
            "lmms-lab/llava-next-interleave-qwen-7b", vision=_SO400M, text=_QWEN15_7B, **_INTERLEAVE),
    _preset("llava-interleave-qwen-7b-dpo", "llava-hf/llava-interleave-qwen-7b-dpo-hf",
            "lmms-lab/llava-next-interleave-qwen-7b-dpo", vision=_SO400M, text=_QWEN15_7B, **_INTERLEAVE),
    # OneVision: <video> 151647; OV-0.5B vocabulary 152000, OV-7B 152064 + 2 padded to 152128 (computed from the
    # converter, spec §3); LLaVA-Video-7B-Qwen2 is OneVision-7B's architecture (its llava-hf id is not verified)
    _preset("llava-onevision-qwen2-0.5b-ov", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
            "lmms-lab/llava-onevision-qwen2-0.5b-ov", vision=_SO400M, text=_QWEN2_05B, **_OV),
    _preset("llava-onevision-qwen2-7b-ov", "llava-hf/llava-onevision-qwen2-7b-ov-hf",
            "lmms-lab/llava-onevision-qwen2-7b-ov", vision=_SO400M, text=_QWEN2_7B, **_OV),
    _preset("LLaVA-Video-7B-Qwen2", "llava-hf/LLaVA-Video-7B-Qwen2-hf", "lmms-lab/LLaVA-Video-7B-Qwen2",
            vision=_SO400M, text=_QWEN2_7B, **_OV),
]}
