"""Configuration: three dataclasses (vision tower, decoder, whole model), config.json readers, named presets.

    schema.py   VisionConfig, TextConfig, LlavaNextConfig: typed switches, derived fields, checks
    readers.py  llava-hf and original config.json -> LlavaNextConfig
    presets.py  PRESETS for the real checkpoints

Every derived field is computed and checked once, in ``__post_init__``; a bad value fails there with
a message that names the field, instead of deep inside a forward pass. Choices that differ between
implementations (transformers vs the original LLaVA-NeXT code) are typed fields, never substring tests
on strings (docs/references.md says where the implementations differ).

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

from .presets import PRESETS, Preset
from .schema import (DEFAULT_PINPOINTS, MAX_LAYERS, MAX_SIZE, AnyresCompat, ConfigError, FeatureStrategy, ImageAspect,
                     LlavaNextConfig, PoolMode, PoolPosition, TemplateName, TextConfig, VideoNewline, VisionAct,
                     VisionConfig, VisionKind)

__all__ = ["PRESETS", "Preset", "DEFAULT_PINPOINTS", "MAX_LAYERS", "MAX_SIZE", "AnyresCompat", "ConfigError",
           "FeatureStrategy", "ImageAspect", "LlavaNextConfig", "PoolMode", "PoolPosition", "TemplateName",
           "TextConfig", "VideoNewline", "VisionAct", "VisionConfig", "VisionKind"]
