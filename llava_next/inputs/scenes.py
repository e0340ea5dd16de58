"""Scene cuts as PySceneDetect 0.7.2's ContentDetector finds them, and how a frame budget is spread over scenes.

Follows ``scenedetect/detectors/content_detector.py``, ``detector.py`` (``FlashFilter``) and
``scene_manager.py`` (``SceneManager.detect_scenes`` with its defaults) step for step, in numpy; OpenCV is
not imported: its two operations are reproduced bit for bit (tests/test_scene.py checks both against cv2).

    frame (H, W, 3) uint8 RGB                       decoded as PySceneDetect's PyAV backend does (swscale)
    -> downscale: factor max(W, H) / 256 when that side is >= 256 (``compute_downscale_factor``, auto
       downscale is on by default), size (round(W / f), round(H / f)), cv2.resize INTER_LINEAR: OpenCV's
       fixed-point path (11-bit coefficients; the vertical pass as its SIMD kernel rounds it)
    -> HSV as cv2.COLOR_BGR2HSV for uint8: H in 0..179, S and V in 0..255 (OpenCV's 12-bit division tables)
    -> score = (mean |dH| + mean |dS| + mean |dV|) / 3 between consecutive frames (weights 1, 1, 1; the edge
       component has weight 0 by default and is not computed); the first frame scores 0
    -> above = score >= threshold (27 by default)
    -> FlashFilter in MERGE mode with min_scene_len frames (15): a cut less than min_len frames after the
       previous frame above the threshold starts a merge that ends, with one cut at the last frame above
       the threshold, once min_len frames have passed below it; a merge still open at the end of the video
       gives no cut (ContentDetector has no post_process)
    -> cuts: indices of the first frame of each new scene (PySceneDetect's cut ``frame_num`` for a constant
       frame rate video; indices here are always decode order)

Spreading ``budget`` frames over the scenes (``spread_frames``):
- Every scene gets one frame; each further frame goes to the scene whose frames are furthest apart, the
  largest ``length / frames`` (ties: the earlier scene). This is proportional to scene length (D'Hondt's
  rule), a scene never gets more frames than it has, and a short scene still shows up once.
- Within a scene of length L with n frames, frame k sits at the centre of the k-th of n equal sub-spans:
  ``start + floor((k + 0.5) * L / n)``.
- More scenes than the budget: the ``budget`` longest scenes (ties: the earlier) get one frame each, at
  their centres; the rest get none (the cuts still say where they were).
- A budget larger than the video's frame count: the uniform rule (``np.linspace``, frames repeat), as
  uniform sampling does.
The frames come back in time order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import numpy as np

DOWNSCALE_MIN_WIDTH = 256  # scene_manager.DEFAULT_MIN_WIDTH
_COEF_SCALE = 2048  # OpenCV INTER_RESIZE_COEF_SCALE (11 bits)
_HSV_SHIFT = 12
_SDIV = np.array([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], np.int32)  # cvRound: half to even
_HDIV = np.array([0] + [round((180 << _HSV_SHIFT) / (6 * i)) for i in range(1, 256)], np.int32)


@dataclass(frozen=True)
class SceneOptions:
    """ContentDetector's knobs (its defaults): ``threshold`` on the mean HSV difference, ``min_len`` frames."""

    threshold: float = 27.0
    min_len: int = 15

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"scene threshold must be > 0, got {self.threshold!r} (PySceneDetect's default is 27)")
        if not isinstance(self.min_len, int) or self.min_len < 0:
            raise ValueError(f"scene minimum length must be an integer >= 0 frames, got {self.min_len!r} "
                             f"(PySceneDetect's default is 15)")


# --------------------------------------------------------------------------------------------------
# OpenCV's two operations
# --------------------------------------------------------------------------------------------------
def downscale_size(size_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) PySceneDetect detects at: the longer side brought to 256 when it is longer."""
    h, w = size_hw
    longest = max(h, w)
    if longest < DOWNSCALE_MIN_WIDTH:
        return h, w
    factor = longest / float(DOWNSCALE_MIN_WIDTH)
    return max(1, round(h / factor)), max(1, round(w / factor))


@functools.lru_cache(maxsize=16)  # one pair of sizes per video
def _taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's linear taps along one axis: (first index, second index, weight of first, of second), 11-bit."""
    scale = 1.0 / (dst / src)  # resizeGeneric: scale = 1 / inv_scale, inv_scale = dsize / ssize
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    edge = (s < 0) | (s >= src - 1)
    f[edge] = 0
    s = np.clip(s, 0, src - 1)
    a1 = np.rint(f * np.float32(_COEF_SCALE)).astype(np.int32)  # saturate_cast<short>(float)
    a0 = np.rint((np.float32(1) - f) * np.float32(_COEF_SCALE)).astype(np.int32)
    return s, np.minimum(s + 1, src - 1), a0, a1


def resize_linear(frame: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """cv2.resize(frame, (w, h), interpolation=INTER_LINEAR) for (H, W, C) uint8, bit for bit."""
    H, W = frame.shape[:2]
    h, w = size_hw
    if (h, w) == (H, W):
        return frame
    x0, x1, a0, a1 = _taps(W, w)
    y0, y1, b0, b1 = _taps(H, h)
    rows = np.take(frame, np.concatenate([y0, y1]), axis=0)  # (2h, W, C) uint8
    taps = np.take(rows, np.concatenate([x0, x1]), axis=1).astype(np.int32)  # (2h, 2w, C)
    horiz = taps[:, :w] * a0[None, :, None] + taps[:, w:] * a1[None, :, None]  # (2h, w, C), 22-bit
    top, bottom = horiz[:h], horiz[h:]
    # VResizeLinearVec_32s8u: ((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16), then (x + 2) >> 2
    out = (((top >> 4) * b0[:, None, None]) >> 16) + (((bottom >> 4) * b1[:, None, None]) >> 16)
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def rgb_to_hsv(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) uint8 hue (0..179), saturation, value: cv2 RGB2HSV_b, bit for bit."""
    r, g, b = (frame[..., k].astype(np.int32) for k in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v]).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Scores and cuts
# --------------------------------------------------------------------------------------------------
def content_score(prev_hsv: np.ndarray, hsv: np.ndarray) -> float:
    """ContentDetector's ``content_val``: the mean absolute H, S and V differences, averaged (weights 1)."""
    pixels = float(hsv.shape[1] * hsv.shape[2])
    delta = np.abs(hsv.astype(np.int32) - prev_hsv.astype(np.int32)).reshape(3, -1).sum(1)  # (3,) exact integers
    hue, sat, lum = (float(d) / pixels for d in delta)
    return (0 + hue * 1.0 + sat * 1.0 + lum * 1.0 + 0.0 * 0.0) / 3.0  # sum(component * weight) / sum(|weights|)


def frame_scores(frames: Iterable[np.ndarray]) -> list[float]:
    """The score of every (H, W, 3) uint8 RGB frame against the one before it (0 for the first)."""
    scores, prev = [], None
    for frame in frames:
        hsv = rgb_to_hsv(resize_linear(frame, downscale_size(frame.shape[:2])))
        scores.append(0.0 if prev is None else content_score(prev, hsv))
        prev = hsv
    return scores


def merge_cuts(scores: list[float], options: SceneOptions = SceneOptions()) -> list[int]:
    """FlashFilter's MERGE mode over the per-frame scores -> the cut frame indices."""
    threshold, min_len = options.threshold, options.min_len
    if min_len <= 0:
        return [i for i, s in enumerate(scores) if s >= threshold]
    cuts: list[int] = []
    last_above, merge_enabled, merging, merge_start = 0, False, False, 0
    for i, score in enumerate(scores):
        above = score >= threshold
        length_met = i - last_above >= min_len
        if above:
            last_above = i
        if merging:  # under the threshold long enough: one cut at the last frame above it
            if length_met and not above and last_above - merge_start >= min_len:
                merging = False
                cuts.append(last_above)
            continue
        if not above:
            continue
        if length_met:
            merge_enabled = True
            cuts.append(i)
        elif merge_enabled:
            merging, merge_start = True, i
    return cuts


# --------------------------------------------------------------------------------------------------
# The frame budget over the scenes
# --------------------------------------------------------------------------------------------------
def scene_spans(cuts: list[int], total_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame spans of the scenes the cuts make (one scene when there is no cut)."""
    bounds = [0, *cuts, total_frames]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def spread_frames(cuts: list[int], total_frames: int, budget: int) -> list[int]:
    """``budget`` frame indices spread over the scenes (the rule in the module docstring), in time order."""
    if total_frames < 1 or budget < 1:
        raise ValueError(f"need total_frames >= 1 and budget >= 1, got {total_frames} and {budget}")
    if budget > total_frames:
        return np.linspace(0, total_frames - 1, budget, dtype=int).tolist()
    spans = scene_spans(cuts, total_frames)
    lengths = [b - a for a, b in spans]
    if budget < len(spans):  # the longest scenes, one frame each
        order = sorted(range(len(spans)), key=lambda k: (-lengths[k], k))[:budget]
        counts = [1 if k in order else 0 for k in range(len(spans))]
    else:
        counts = [1] * len(spans)
        for _ in range(budget - len(spans)):
            k = max(range(len(spans)), key=lambda k: (lengths[k] / counts[k], -k))
            counts[k] += 1
    return [a + (2 * j + 1) * (b - a) // (2 * n) for (a, b), n in zip(spans, counts) for j in range(n)]
