"""Image pixels: loading, CLIP normalization and the AnyRes pixel pipeline (resize, pad, tiles).

(The AnyRes pipeline is being written; the normalization constants below are shared with video.py.)
"""

from __future__ import annotations

import numpy as np
import torch

# OpenAI CLIP normalization (CLIPImageProcessor defaults; reference-spec §2)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W): x / 255 (in float64, as transformers), then (x - mean) / std."""
    x = pixels.astype(np.float64) * (1 / 255)
    x = x.astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))
