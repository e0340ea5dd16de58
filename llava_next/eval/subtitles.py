"""Subtitles in a benchmark's prompt: Video-MME's lines shown at the uniformly sampled frames, and
LongVideoBench's subtitles interleaved with its frames (the second half of this file).

lmms-eval 0.7.3's ``videomme_doc_to_text_subtitle`` (``lmms_eval/tasks/videomme/utils.py``, "default" kwargs
``frame_num: 32``): the video's frame count and rate (OpenCV's ``CAP_PROP_FRAME_COUNT`` / ``CAP_PROP_FPS``;
here the container's same numbers through PyAV: ``stream.frames``, ``stream.average_rate``), each ``.srt``
block's start / end seconds turned into frames (``int(seconds * fps)``), ``frame_num`` frame indices spread
evenly over the video (``np.linspace(0, total - 1, frame_num, dtype=int)``), the blocks holding a sampled
frame (start <= frame < end) taken once each, in the order of ``list(set(...))`` as lmms-eval has it, and of
each the text inside ``<font color="white" size=".72c">...</font>`` (Video-MME's subtitle files); blocks
without that tag give nothing. No subtitle file: "No subtitles available".

These frames are lmms-eval's choice for the subtitles only; the model's own frames are ``--frames``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

FONT = re.compile(r'<font color="white" size=".72c">(.*?)</font>')
NONE = "No subtitles available"


def srt_seconds(stamp: str) -> float:
    """"HH:MM:SS,mmm" -> seconds (lmms-eval's ``parse_subtitle_time``)."""
    h, m, s_ms = stamp.split(":")
    s, ms = s_ms.split(",")
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def read_srt(path: Path) -> dict[tuple[float, float], str]:
    """{(start s, end s): text} of each block (lmms-eval's ``load_subtitles``: blocks split on blank lines, the
    text lines joined by spaces; a repeated time range keeps its last text)."""
    blocks = {}
    for section in path.read_text(encoding="utf-8").split("\n\n"):
        lines = section.split("\n")
        if section.strip() and len(lines) >= 3:
            start, end = lines[1].split(" --> ")
            blocks[(srt_seconds(start), srt_seconds(end))] = " ".join(lines[2:])
    return blocks


def video_frames(video: Path) -> tuple[int, float]:
    """(frame count, frames per second) from the container, as OpenCV reports them."""
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        return int(stream.frames), float(stream.average_rate or 0)


def subtitle_text(video: Path, srt: Path, frame_num: int = 32) -> str:
    """The subtitle lines at ``frame_num`` evenly sampled frames, one a line (module docstring)."""
    if not srt.exists():
        return NONE
    total, fps = video_frames(video)
    spans = [(int(a * fps), int(b * fps), text) for (a, b), text in read_srt(srt).items()]
    frames = np.linspace(0, total - 1, total if frame_num == -1 else frame_num, dtype=int).tolist()
    hit = list(set(i for f in frames for i, (a, b, _) in enumerate(spans) if a <= f < b))
    texts = [FONT.findall(spans[i][2]) for i in hit]
    return "\n".join(found[0] for found in texts if found)


# ---- LongVideoBench: subtitles interleaved with the frames ----------------------------------------------
# lmms-eval 0.7.3's longvideobench_val_i (``lmms_eval/tasks/longvideobench/utils.py``, ``insert_interleave_subtitles``):
# the video as up to ``max_num_frames`` (16) frames, each an image, and the prompt's prefix the "<image>" of each
# frame and the subtitle lines in time order, one a line.


def lvb_frame_indices(duration: float, fps: float, max_frames: int = 16) -> list[int]:
    """lmms-eval LongVideoBench's ``load_video`` frame indices (decord): min(max_frames, int(duration)) frames,
    ``int(total / n) * i`` with total = int(duration * fps)."""
    total, n = int(duration * fps), min(max_frames, int(duration))
    if n < 1:
        raise ValueError(f"a video of {duration} s has no frame to take (LongVideoBench takes one a second, up to "
                         f"{max_frames})")
    return [int(total / n) * i for i in range(n)]


def lvb_frame_times(duration: float, max_frames: int = 16) -> list[float]:
    """``compute_frame_timestamps``: the frames' times in seconds as lmms-eval places the subtitles against them."""
    if duration > max_frames:
        return [duration / max_frames * i for i in range(max_frames)]
    return [i for i in range(int(duration))]


def _hms(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def lvb_interleaved(frame_times: list[float], subtitles: list[dict], start_offset: float, duration: float) -> str:
    """``insert_subtitles_into_frames``: each subtitle (its middle time) after the frames before it, kept only when
    a frame falls inside it (a span under 1 s widened to 1 s around its middle); the remaining frames last."""
    out, cur = [], 0
    for sub in subtitles:
        if "timestamp" in sub:
            start, end = sub["timestamp"]
            end = end if isinstance(end, float) else duration
            text = sub["text"]
        else:
            start, end, text = _hms(sub["start"]), _hms(sub["end"]), sub["line"]
        start, end = start - start_offset, end - start_offset
        middle = (start + end) / 2
        while cur < len(frame_times) and frame_times[cur] <= middle:
            out.append("<image>")
            cur += 1
        if end - start < 1:
            start, end = middle - 0.5, middle + 0.5
        if any(start < t < end for t in frame_times):
            out.append(text)
    out += ["<image>"] * (len(frame_times) - cur)
    return "\n".join(out)


def lvb_frame_files(video: Path, duration: float, max_frames: int = 16) -> list[str]:
    """The frames lmms-eval's ``load_video`` takes, each written once as a PNG under the temporary folder (named by
    the video's path, size and modification time and the frame index); their paths, in order."""
    import hashlib
    import tempfile

    import av

    with av.open(str(video)) as container:
        fps = float(container.streams.video[0].average_rate or 0)
    indices = lvb_frame_indices(duration, fps, max_frames)
    stat = video.stat()
    key = hashlib.sha256(f"{video.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / "llava-next-frames"
    folder.mkdir(exist_ok=True)
    paths = [folder / f"{key}-{i}.png" for i in indices]
    missing = {i: p for i, p in zip(indices, paths) if not p.exists()}
    if missing:
        with av.open(str(video)) as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in missing:
                    part = missing[i].with_suffix(".part.png")
                    frame.to_image().convert("RGB").save(part)
                    part.replace(missing[i])
                if i >= max(missing):
                    break
    return [str(p) for p in paths]
