"""Video input: decode with PyAV, pick frames, and turn them into CLIP pixels (F, 3, 336, 336).

What is in here, in data-flow order:
- ``uniform_indices`` / ``fps_indices`` / scene sampling: which frames to keep. Uniform is the original LLaVA-NeXT rule,
  ``np.linspace(0, total - 1, N, dtype=int)`` — deterministic, first and last frame included, indices
  repeat when the video has fewer than N frames. fps sampling is the original ``load_video``: one frame
  every ``round(avg_fps / target_fps)`` frames (target 1 fps), switching to uniform when that gives
  more than the cap. Scene sampling (``sampling="scene"``) first decodes every frame once to find the scene
  cuts as PySceneDetect's ContentDetector does (``scene_cuts``; the maths in scenes.py), then spreads the
  ``num_frames`` over the scenes (``scenes.spread_frames``); the clip carries the cuts and their times.
- ``load_video``: decodes the stream once, sequentially, and keeps only the sampled frames (already
  resized and cropped to 336 x 336), so a long video never sits in memory. Before decoding, the kept
  frames' bytes (F x 336 x 336 x 3, plus their float32 copy) are checked against the memory available
  (``check_frame_memory``): ``--frames 100000`` is refused at once, not after a 31 GiB ``np.stack``. The frame count
  (``estimate_total``) comes from the container's index (``stream.frames``) or, when that is missing, from counting
  packets; the
  decode pass then counts the frames for real and, if the estimate was wrong (edit lists, truncated
  files), samples again over the true count — indices always refer to the decoded stream.
- A folder of frame images (``.jpg``, ``.jpeg``, ``.png``; MVBench's episodic_reasoning keeps TVQA clips so) is a
  video too: its images in the order of the numbers in their names (``frame_files``: "2.jpg" before "10.jpg") are
  the stream, taken at ``FOLDER_FPS`` = 3 frames per second (TVQA's rate, which lmms-eval's llava_vid assumes for
  MVBench's frame folders), sampled by the same rules; only the sampled images are read (every one for scene cuts).
- Timestamps are presentation times (``pts * time_base``) in seconds, relative to the first frame, so
  they stay correct for variable-frame-rate video.
- ``preprocess_frame``: CLIPImageProcessor's steps — shortest edge to 336 (long side
  ``int(336 * long / short)``), PIL bicubic, centre crop 336 (top = (H - 336) // 2), then
  ``image.normalize`` (rescale 1/255 in float64, CLIP mean/std).

Rotation metadata (phone videos' display matrix) is ignored, as in both references (the llava-hf
model card's PyAV reader and the original decord loader): frames are used as stored;
``VideoClip.rotation`` and ``notes()`` say when a file asks for rotation.

Every failure is a ``VideoError`` whose one-line message names the file, the problem and what to do
(the table in docs/errors.md). An MP4/MOV whose boxes run past the end of the file (an interrupted
download) is an error, whatever still decodes; other containers cannot tell, so what decodes is
sampled and ``VideoClip.notes()`` says when fewer frames decode than the container lists. A video with fewer frames than requested is not an error: uniform
indices repeat (as ``np.linspace`` does in the original code) and ``VideoClip.repeated_frames`` says
how many; ``llava-next run`` prints a note.
Sizes are (height, width).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Literal

import av
import numpy as np
import torch
from PIL import Image

from ..config import LlavaNextConfig
from ..model.pages import available_memory
from .image import CLIP_STATS, ImageError, Stats, load_image, normalize, stats_for
from .scenes import SceneOptions, frame_scores, merge_cuts, spread_frames

Sampling = Literal["uniform", "fps", "scene"]
SAMPLINGS = ("uniform", "fps", "scene")
FrameResize = Literal["crop", "squash"]  # CLIP: shortest edge + centre crop; SigLIP: straight to size x size


class VideoError(ValueError):
    """A video cannot be used; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class VideoClip:
    """Sampled, preprocessed frames of one video plus what is known about where they came from."""

    pixel_values: torch.Tensor  # (F, 3, S, S) float32, CLIP-normalized (F = 0: loaded with keep_pixels=False)
    frames: np.ndarray  # (F, S, S, 3) uint8: exactly the pixels the model sees, before normalization (idem)
    frame_indices: list[int]  # into the decoded stream, 0-based
    timestamps: list[float]  # seconds from the first frame
    fps: float  # average frame rate
    total_frames: int  # frames the stream decodes to
    duration: float  # seconds
    size_hw: tuple[int, int]  # source frame size (height, width)
    path: str
    listed_frames: int = 0  # frames the container's index lists (0: no index); > total_frames: cut off
    rotation: int = 0  # degrees counter-clockwise the file asks players to rotate by (not applied)
    cuts: tuple[int, ...] | None = None  # scene sampling: the first frame of each new scene (None: not searched)
    cut_times: tuple[float, ...] | None = None  # their presentation times, seconds from the first frame

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    def notes(self) -> list[str]:
        """What a user should know about how this clip was sampled (empty when nothing is unusual)."""
        out = []
        if self.listed_frames > self.total_frames:
            out.append(f"{self.path}: the container lists {self.listed_frames} frames but only {self.total_frames} "
                       f"decode (a cut-off file?); sampled from those")
        if self.rotation:
            out.append(f"{self.path}: asks players to rotate it by {self.rotation} degrees; frames are used as "
                       f"stored, {self.size_hw[0]}x{self.size_hw[1]} (height x width), as the reference "
                       f"implementations do; re-encode it upright if that matters")
        if self.repeated_frames:
            out.append(f"{self.path}: has {self.total_frames} frame(s), fewer than the {self.num_frames} "
                       f"requested; {self.repeated_frames} sampled frame(s) repeat earlier ones (use --frames "
                       f"{self.total_frames} to avoid the repeats)")
        return out

    @property
    def repeated_frames(self) -> int:
        """Sampled frames that repeat an earlier one (the video has fewer frames than requested)."""
        return len(self.frame_indices) - len(set(self.frame_indices))


# --------------------------------------------------------------------------------------------------
# Which frames
# --------------------------------------------------------------------------------------------------
def uniform_indices(total_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread evenly over ``[0, total_frames - 1]``, both ends included."""
    if total_frames < 1 or num_frames < 1:
        raise ValueError(f"need total_frames >= 1 and num_frames >= 1, got {total_frames} and {num_frames}")
    return np.linspace(0, total_frames - 1, num_frames, dtype=int).tolist()


def fps_indices(total_frames: int, avg_fps: float, max_frames: int, target_fps: float = 1.0) -> list[int]:
    """``target_fps`` frames per second (every ``round(avg_fps / target_fps)``-th frame); uniform over
    the whole video when that would exceed ``max_frames`` (the original ``load_video``)."""
    step = max(1, round(avg_fps / target_fps))
    indices = list(range(0, total_frames, step))
    if len(indices) > max_frames:
        return uniform_indices(total_frames, max_frames)
    return indices


# --------------------------------------------------------------------------------------------------
# Frame preprocessing (CLIPImageProcessor, PIL path)
# --------------------------------------------------------------------------------------------------
def shortest_edge_size(size_hw: tuple[int, int], shortest: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``shortest`` (transformers' rule)."""
    h, w = size_hw
    if h <= w:
        return shortest, int(shortest * w / h)
    return int(shortest * h / w), shortest


def center_crop_offset(size_hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(top, left) px of the centred ``size`` x ``size`` crop of a ``size_hw`` frame (CLIPImageProcessor)."""
    return (size_hw[0] - size) // 2, (size_hw[1] - size) // 2


def preprocess_frame(frame: Image.Image | np.ndarray, size: int = 336, resize: FrameResize = "crop") -> np.ndarray:
    """RGB frame -> (size, size, 3) uint8: shortest edge to ``size`` (bicubic), centre crop; or with
    ``resize="squash"`` (SigLIP's processors: transformers' Siglip / LlavaOnevisionVideo, the original
    SigLipImageProcessor) resized straight to ``size`` x ``size``, bicubic, aspect not kept."""
    img = frame if isinstance(frame, Image.Image) else Image.fromarray(frame)
    img = img.convert("RGB")
    if resize == "squash":
        return np.asarray(img.resize((size, size), Image.BICUBIC) if img.size != (size, size) else img)
    h, w = shortest_edge_size((img.height, img.width), size)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.BICUBIC)
    top, left = center_crop_offset((h, w), size)
    return np.asarray(img)[top:top + size, left:left + size]


def frames_to_pixels(frames: np.ndarray, stats: Stats = CLIP_STATS) -> torch.Tensor:
    """(F, S, S, 3) uint8 -> (F, 3, S, S) float32, normalized (CLIP by default)."""
    return normalize(frames, stats)


def frame_options(config: LlavaNextConfig) -> dict:
    """``load_video`` keyword arguments for the config's vision tower (tile size, resize rule, normalization)."""
    siglip = config.vision.kind == "siglip"
    return dict(size=config.tile_size, resize="squash" if siglip else "crop", stats=stats_for(config))


# --------------------------------------------------------------------------------------------------
# Memory of the kept frames
# --------------------------------------------------------------------------------------------------
def frame_bytes(num_frames: int, size: int) -> int:
    """Bytes the kept frames take: (F, S, S, 3) uint8 pixels plus their (F, 3, S, S) float32 copy."""
    return num_frames * size * size * 3 * (1 + 4)


def _available_bytes() -> int | None:
    return available_memory(torch.device("cpu"))


def check_frame_memory(path: str, num_frames: int, size: int, total_frames: int = 0) -> None:
    """Refuse, before decoding, to keep more frames than the memory available can hold (a ``--frames
    100000`` typo would otherwise allocate tens of GiB after decoding the whole video)."""
    need, available = frame_bytes(num_frames, size), _available_bytes()
    if available is None or need <= available:
        return
    fit = max(1, available // frame_bytes(1, size))
    short = (f"the video has only {total_frames} frames (uniform sampling repeats them past that), so "
             if 0 < total_frames < num_frames else "")
    raise VideoError(f"{path}: {num_frames} frames of {size}x{size} px would take {_size(need)} in memory (uint8 "
                     f"pixels + float32 copy), more than the {_size(available)} available; {short}use --frames "
                     f"{min(fit, total_frames) if short else fit} or fewer")


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} bytes"


# --------------------------------------------------------------------------------------------------
# A folder of frame images (MVBench's episodic_reasoning: TVQA's frames at 3 fps)
# --------------------------------------------------------------------------------------------------
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
FOLDER_FPS = 3.0  # the rate a folder's frames are taken at: TVQA's (what lmms-eval's llava_vid assumes for them)


def _natural_key(name: str) -> tuple:
    """"frame_2.jpg" before "frame_10.jpg": the digit runs of a name compared as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)), name


def frame_files(folder: str) -> list[str]:
    """The frame images of ``folder`` (.jpg, .jpeg, .png, any case), in the order of the numbers in their names."""
    names = [n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
    frames = sorted((n for n in names if n.lower().endswith(FRAME_SUFFIXES)), key=_natural_key)
    if not names:
        raise VideoError(f"{folder}: is an empty folder; give a video file or a folder of frame images "
                         f"({', '.join(FRAME_SUFFIXES)})")
    if not frames:
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise VideoError(f"{folder}: holds no frame images ({', '.join(FRAME_SUFFIXES)}), only {len(names)} other "
                         f"file(s): {shown}; give a video file or a folder of frame images")
    return [os.path.join(folder, n) for n in frames]


def _read_frame(file: str) -> Image.Image:
    try:
        return load_image(file)
    except (ImageError, OSError) as e:  # the image's own message names the file
        raise VideoError(f"{e} (a frame of the folder given as a video: replace or remove it)") from None


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------
_AV_ERRORS = (av.error.FFmpegError, OSError)


def _open(path: str):
    if not os.path.exists(path):
        raise VideoError(f"{path}: no such file")
    if os.path.isdir(path):
        raise VideoError(f"{path}: is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: is an empty file")
    try:
        # metadata tags are informational: a damaged tag (invalid UTF-8, found by fuzzing) must not make a
        # playable file unreadable, so undecodable bytes become U+FFFD instead of a UnicodeDecodeError
        container = av.open(path, metadata_errors="replace")
    except av.error.FFmpegError as e:
        cut = _mp4_cut_off(path)
        if cut:
            raise VideoError(f"{path}: truncated MP4 ({cut}): the file is cut off, probably an incomplete "
                             f"download or copy; get it again") from None
        raise VideoError(f"{path}: not a readable video ({_reason(e)}): not a video file, or cut off (an "
                         f"incomplete download or copy); check that it plays, get it again, or re-encode it "
                         f"(ffmpeg -i IN -c:v libx264 OUT.mp4)") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams at all"]
        container.close()
        raise VideoError(f"{path}: has no video stream (it holds {', '.join(kinds)}); give a file with video")
    return container


def _mp4_cut_off(path: str) -> str | None:
    """Why an MP4/MOV file looks cut off ('' if it does not, None if it is no MP4): walk the top-level
    boxes (4-byte size + 4-byte type); a box running past the end of the file, or no ``moov`` box (the
    index, often written last), is what an interrupted download leaves."""
    size, pos, boxes = os.path.getsize(path), 0, []
    with open(path, "rb") as f:
        while pos + 8 <= size:
            f.seek(pos)
            n, kind = int.from_bytes(f.read(4), "big"), f.read(4)
            if n == 1 and pos + 16 <= size:  # 64-bit box size follows
                n = int.from_bytes(f.read(8), "big")
            if not boxes and kind != b"ftyp":  # every MP4/MOV starts with its file-type box
                return None
            boxes.append(kind)
            if n == 0:  # the last box, to the end of the file
                break
            if n < 8 or pos + n > size:
                return f"its {kind.decode('latin-1')!r} box needs {pos + n} bytes, the file has {size}"
            pos += n
    if not boxes:
        return None
    return "" if b"moov" in boxes else "no 'moov' box, the index of the video"


def _reason(e: Exception) -> str:
    return (getattr(e, "strerror", None) or str(e)).strip().rstrip(".")


def estimate_total(path: str) -> tuple[int, float]:
    """(frame count estimate, average fps) without decoding any frame: the container's index
    (``stream.frames``), else a count of the packets. A folder of frame images: its images, at ``FOLDER_FPS``."""
    if os.path.isdir(path):
        return len(frame_files(path)), FOLDER_FPS
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if stream.frames > 0:
            return stream.frames, fps
        try:  # no index (mkv, webm, raw streams): count the packets, still no decoding
            count = sum(1 for packet in container.demux(stream) if packet.size)
        except _AV_ERRORS as e:
            raise VideoError(f"{path}: corrupt video ({_reason(e)}); get it again or re-encode it") from None
        return count, fps




def _decode(path: str, indices: list[int], size: int, resize: FrameResize = "crop", total: int = 0,
            keep: bool = True):
    """One sequential pass: keep frames at ``indices`` (preprocessed; ``keep=False``: only their times),
    count every frame (``total``: what the container lists, for the error message).

    Returns (kept frames, their timestamps, decoded frame count, duration in s or None, frame size,
    display rotation in degrees).
    """
    wanted: dict[int, list[int]] = {}
    for slot, index in enumerate(indices):
        wanted.setdefault(index, []).append(slot)
    kept: list[np.ndarray | None] = [None] * len(indices)
    times: list[float | None] = [None] * len(indices)
    count, t0, t_end, size_hw, rotation = 0, None, None, None, 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                count, t = i + 1, frame.time
                if i == 0:
                    t0, size_hw, rotation = t, (frame.height, frame.width), int(frame.rotation or 0)
                if t is not None and t0 is not None:  # end of this frame, relative to the first
                    t_end = t - t0 + (float(frame.duration * frame.time_base) if frame.duration else 0.0)
                if i in wanted:
                    pixels = preprocess_frame(frame.to_image(), size, resize) if keep else None
                    for slot in wanted[i]:
                        kept[slot] = pixels
                        times[slot] = None if t is None or t0 is None else t - t0
        except _AV_ERRORS as e:
            cut = _mp4_cut_off(path)
            if cut:
                # the same words as load_video's check: whether FFmpeg raises at the cut or stops quietly
                # there depends on its frame threads (one CPU: raises; two: stops)
                of = f" of its {total}" if total > count else ""
                raise VideoError(f"{path}: truncated MP4 ({cut}; only {count}{of} frames decode): the file "
                                 f"is cut off, probably an incomplete download or copy; get it again") from None
            if count == 0:
                raise VideoError(f"{path}: not a readable video (decoding the first frame failed: {_reason(e)}); "
                                 f"get it again or re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)") from None
            raise VideoError(f"{path}: corrupt video, decoding failed after {count} frames ({_reason(e)}); get it "
                             f"again or re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)") from None
    return kept, times, count, t_end or None, size_hw, rotation


def original_frames(path: str | os.PathLike, indices: list[int]) -> list[np.ndarray]:
    """The frames at ``indices`` as the file stores them, (H, W, 3) uint8 each, in the order given: for figures
    on the original pixels (the model takes ``load_video``'s preprocessed frames). One pass, stopping after the
    last one wanted."""
    if os.path.isdir(path):  # a folder of frames
        files = frame_files(os.fspath(path))
        if not all(0 <= i < len(files) for i in indices):
            raise VideoError(f"{path}: frames {indices} are not all among its {len(files)} images; load it again")
        return [np.asarray(_read_frame(files[i])) for i in indices]
    wanted, found = set(indices), {}
    with _open(str(path)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in wanted:
                found[i] = np.asarray(frame.to_image().convert("RGB"))
                if len(found) == len(wanted):
                    break
    missing = [i for i in indices if i not in found]
    if missing:
        raise VideoError(f"{path}: frames {missing} do not decode (the file has fewer frames); load it again")
    return [found[i] for i in indices]


@dataclass(frozen=True)
class SceneCuts:
    """What the scene pass found: cut frame indices, their times (s), and the frames the stream decodes to."""

    cuts: tuple[int, ...]
    cut_times: tuple[float, ...]
    total_frames: int


def scene_cuts(path: str | os.PathLike, options: SceneOptions = SceneOptions()) -> SceneCuts:
    """Decode every frame (RGB, as PySceneDetect's PyAV backend converts it) and find the scene cuts."""
    path = os.fspath(path)
    if os.path.isdir(path):  # a folder of frames: every image, in name order, at FOLDER_FPS
        files = frame_files(path)
        cuts = merge_cuts(frame_scores(np.asarray(_read_frame(f)) for f in files), options)
        return SceneCuts(tuple(cuts), tuple(round(i / FOLDER_FPS, 6) for i in cuts), len(files))
    times: list[float | None] = []

    def frames():
        with _open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                times.append(frame.time)
                yield frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8

    try:
        scores = frame_scores(frames())
    except _AV_ERRORS as e:
        cut = _mp4_cut_off(path)
        if cut:  # the words of _decode's check
            raise VideoError(f"{path}: truncated MP4 ({cut}; only {len(times)} frames decode): the file is cut off, "
                             f"probably an incomplete download or copy; get it again") from None
        raise VideoError(f"{path}: corrupt video, decoding failed after {len(times)} frames ({_reason(e)}); get it "
                         f"again or re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)") from None
    if not scores:
        raise VideoError(f"{path}: the video stream has no decodable frames; give a video with at least one frame")
    cuts = merge_cuts(scores, options)
    t0 = times[0] or 0.0
    return SceneCuts(tuple(cuts), tuple(round(float(times[i] - t0), 6) if times[i] is not None else 0.0
                                        for i in cuts), len(scores))


def _load_frame_folder(folder: str, num_frames: int, sampling: Sampling, target_fps: float, size: int,
                       resize: FrameResize, stats: Stats, keep_pixels: bool, pick: Callable[[int], list[int]] | None,
                       scene: SceneOptions) -> VideoClip:
    """``load_video`` on a folder of frames: the files in name order are the stream, at ``FOLDER_FPS``; the same
    sampling rules pick among them, and only the picked files are read (all of them for scene cuts)."""
    files = frame_files(folder)
    total = len(files)
    kept_frames = num_frames if sampling != "fps" or pick is not None else \
        len(fps_indices(total, FOLDER_FPS, num_frames, target_fps))
    check_frame_memory(folder, kept_frames, size, total)
    found = scene_cuts(folder, scene) if sampling == "scene" and pick is None else None
    if pick is not None:
        indices = pick(total)
        if len(indices) != num_frames or not all(0 <= i < total for i in indices):
            raise VideoError(f"{folder}: pick gave {indices}, not {num_frames} indices in [0, {total})")
    elif sampling == "uniform":
        indices = uniform_indices(total, num_frames)
    elif found is not None:
        indices = spread_frames(list(found.cuts), total, num_frames)
    else:
        indices = fps_indices(total, FOLDER_FPS, num_frames, target_fps)
    read = {i: _read_frame(files[i]) for i in (sorted(set(indices)) if keep_pixels else indices[:1])}
    first = read[indices[0]]  # its size is the clip's size_hw
    pixels = {i: preprocess_frame(image, size, resize) for i, image in read.items()} if keep_pixels else {}
    frames = np.stack([pixels[i] for i in indices]) if keep_pixels else np.zeros((0, size, size, 3), np.uint8)
    return VideoClip(pixel_values=frames_to_pixels(frames, stats), frames=frames, frame_indices=list(indices),
                     timestamps=[round(i / FOLDER_FPS, 6) for i in indices], fps=FOLDER_FPS, total_frames=total,
                     duration=round(total / FOLDER_FPS, 6), size_hw=(first.height, first.width), path=folder,
                     listed_frames=total, cuts=found.cuts if found else None,
                     cut_times=found.cut_times if found else None)


def load_video(path: str | os.PathLike, num_frames: int = 8, *, sampling: Sampling = "uniform",
               target_fps: float = 1.0, size: int = 336, resize: FrameResize = "crop",
               stats: Stats = CLIP_STATS, keep_pixels: bool = True,
               pick: Callable[[int], list[int]] | None = None, scene: SceneOptions = SceneOptions()) -> VideoClip:
    """Decode ``path`` and return ``num_frames`` preprocessed frames (the cap, for ``sampling="fps"``);
    ``size``/``resize``/``stats`` as ``frame_options(config)`` gives them (default: CLIP's).
    ``pick``: the ``num_frames`` indices to keep, from the stream's frame count (training's seeded sampling,
    llava_next/train/data.py); it replaces ``sampling``. ``scene``: the cut detector's threshold and minimum
    scene length for ``sampling="scene"``.
    ``keep_pixels=False`` (a plan only, ``inspect``): the frames are sampled and timed but not preprocessed;
    ``frames`` and ``pixel_values`` are then empty (0 frames). The memory check applies either way: it is
    about the run the plan is for."""
    path = os.fspath(path)
    if num_frames < 1:
        raise VideoError(f"{path}: num_frames must be >= 1, got {num_frames}")
    if sampling not in SAMPLINGS:
        raise VideoError(f"{path}: sampling {sampling!r} is not supported; use one of {', '.join(SAMPLINGS)}")
    if os.path.isdir(path):  # a folder of frame images
        return _load_frame_folder(path, num_frames, sampling, target_fps, size, resize, stats, keep_pixels, pick, scene)
    total, fps = estimate_total(path)
    kept_frames = num_frames if sampling != "fps" or pick is not None else \
        len(fps_indices(max(total, 1), fps or 1.0, num_frames, target_fps))  # known before decoding a frame
    check_frame_memory(path, kept_frames, size, total)
    found = scene_cuts(path, scene) if sampling == "scene" and pick is None else None

    def choose(n_total: int) -> list[int]:
        if pick is not None:
            chosen = pick(n_total)
            if len(chosen) != num_frames or not all(0 <= i < n_total for i in chosen):
                raise VideoError(f"{path}: pick gave {chosen}, not {num_frames} indices in [0, {n_total})")
            return chosen
        if sampling == "uniform":
            return uniform_indices(n_total, num_frames)
        if found is not None:
            return spread_frames(list(found.cuts), n_total, num_frames)
        return fps_indices(n_total, fps or 1.0, num_frames, target_fps)

    n_first = found.total_frames if found else max(total, 1)  # the scene pass already counted every frame
    indices = choose(n_first)
    kept, times, count, duration, size_hw, rotation = _decode(path, indices, size, resize, total, keep_pixels)
    if count == 0:
        raise VideoError(f"{path}: the video stream has no decodable frames; give a video with at least one frame")
    cut = _mp4_cut_off(path) if count < total else ""
    if cut:  # a provably cut-off MP4: its index lists frames the file no longer holds
        raise VideoError(f"{path}: truncated MP4 ({cut}; only {count} of its {total} frames decode): the file "
                         f"is cut off, probably an incomplete download or copy; get it again")
    if count != n_first:  # the index lied (edit list, truncated file): sample the real stream
        indices = choose(count)
        kept, times, count2, duration, size_hw, rotation = _decode(path, indices, size, resize, keep=keep_pixels)
        if count2 != count:
            raise VideoError(f"{path}: corrupt video, decodes to {count} then {count2} frames")
    if not fps:
        fps = count / duration if duration else 1.0
    # frames without a pts: fall back to index / fps
    timestamps = [t if t is not None else i / fps for t, i in zip(times, indices)]
    if duration is None:
        duration = count / fps
    frames = np.stack(kept) if keep_pixels else np.zeros((0, size, size, 3), np.uint8)  # (F, S, S, 3)
    return VideoClip(pixel_values=frames_to_pixels(frames, stats), frames=frames, frame_indices=indices,
                     timestamps=[round(float(t), 6) for t in timestamps], fps=float(fps), total_frames=count,
                     duration=round(float(duration), 6), size_hw=size_hw, path=path, listed_frames=total,
                     rotation=rotation, cuts=found.cuts if found else None,
                     cut_times=found.cut_times if found else None)
