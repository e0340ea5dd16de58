"""Video-MME's subtitles for a prompt: the lines shown at the uniformly sampled frames.

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
