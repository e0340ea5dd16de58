"""The three configuration dataclasses (vision tower, decoder, whole model), their typed switches and checks.

Every derived field is computed and checked once, in ``__post_init__``; a bad value fails there with
a message that names the field, instead of deep inside a forward pass. Choices that differ between
implementations (transformers vs the original LLaVA-NeXT code) are typed fields, never substring tests
on strings (docs/references.md says where the implementations differ). The config.json readers are in readers.py, the presets
for the real checkpoints in presets.py; ``LlavaNextConfig.from_*`` reach them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
AnyresCompat = Literal["hf", "original"]  # pinpoint pair order + unpad rounding (docs/references.md, AnyRes images)
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

    ``kind="siglip"`` is SigLIP so400m as LLaVA-NeXT-Interleave / OneVision use it (docs/references.md,
    SigLIP vision tower): no CLS token, no pre-LayerNorm, a patch conv with bias, LayerNorm eps 1e-6, tanh GELU; every token
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
                              f"'default' would drop the first patch, 728 of 729 tokens; docs/references.md)")
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

    Qwen (docs/references.md, Decoders) is the same block with ``qkv_bias=True``, RoPE theta 1e6, and for
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
    # video path (docs/references.md, Video)
    spatial_pool_stride: int = 2
    spatial_pool_mode: PoolMode = "average"
    pool_position: PoolPosition = "before_projector"
    video_newline: VideoNewline = "none"
    # AnyRes compatibility with the original repo (pinpoint pair order, unpad rounding)
    anyres_compat: AnyresCompat = "hf"
    template: TemplateName = "llava_v1"
    # SigLIP + Qwen family: how an image becomes tiles
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
        """The same model with a different linear RoPE factor (a run-time choice, docs/references.md, Video)."""
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
        from .presets import PRESETS  # presets.py builds on this module
        if name not in PRESETS:
            from .presets import did_you_mean

            raise ConfigError(f"unknown preset {name!r}; valid names: {', '.join(PRESETS)}{did_you_mean(name)}")
        return PRESETS[name].config

    @staticmethod
    def from_hf_config(cfg: dict) -> "LlavaNextConfig":
        from .readers import _from_hf_config  # readers.py builds on this module
        with _malformed("llava-hf"):
            return _from_hf_config(cfg)

    @staticmethod
    def from_original_config(cfg: dict) -> "LlavaNextConfig":
        from .readers import _from_original_config
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
