"""llava-next: a from-scratch, modular PyTorch reimplementation of LLaVA-NeXT and LLaVA-NeXT-Video."""

from .config import PRESETS, ConfigError, LlavaNextConfig, TextConfig, VisionConfig

__all__ = ["PRESETS", "ConfigError", "LlavaNextConfig", "TextConfig", "VisionConfig"]
__version__ = "0.1.0"
