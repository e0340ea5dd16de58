"""Scene frames: ``--select-frames scene`` picks frames by scene, as ``--sampling scene`` does.

The cuts are PySceneDetect 0.7.2's ContentDetector's (HSV differences of consecutive frames against
``threshold``, scenes of at least ``min_len`` frames; llava_next/inputs/scenes.py) and the budget is spread
over the scenes by ``inputs.scenes.spread_frames`` (every scene one frame, the rest proportional to scene
length, each frame at the centre of an equal sub-span of its scene).

Unlike MaxInfo it needs no model and no candidates: the cuts come from every decoded frame, so the
selector hands ``Pipeline`` the ``load_video`` arguments (``video_sampling``) instead of choosing among
uniformly sampled candidates. ``frames`` (0 = the request's --frames) caps the budget, as MaxInfo's does;
``--select-frames scene`` and ``--sampling scene`` then give the same frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..inputs.scenes import SceneOptions
from .stages import FrameSelector, ReductionError


@dataclass(frozen=True)
class SceneFrames(FrameSelector):
    """Defaults are PySceneDetect's ContentDetector's: threshold 27, min_len 15 frames."""

    frames: int = 0  # the frame budget; 0: the number of frames the request asks for
    threshold: float = 27.0
    min_len: int = 15

    name: ClassVar[str] = "scene"

    def __post_init__(self) -> None:
        if not isinstance(self.frames, int) or self.frames < 0:
            raise ReductionError(f"scene: frames must be an integer >= 0 (0 = --frames), got {self.frames!r}")
        try:
            SceneOptions(self.threshold, self.min_len)
        except ValueError as e:
            raise ReductionError(f"scene: {e}") from None

    def budget(self, requested: int) -> int:
        return self.frames or requested

    def video_sampling(self) -> dict:
        return {"sampling": "scene", "scene": SceneOptions(self.threshold, self.min_len)}

    def candidate_count(self, requested: int, total_frames: int, fps: float) -> int:
        return self.budget(requested)  # the scene pass sees every frame; these are already the picks

    def select(self, pixel_values: torch.Tensor, model, frames: int) -> list[int]:
        return list(range(min(pixel_values.shape[0], self.budget(frames))))
