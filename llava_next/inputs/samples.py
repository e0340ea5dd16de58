"""The sample media shipped in the package (llava_next/samples/README.md: sources, licences), by name.

    sample_path("sample:bunny") -> ".../llava_next/samples/bigbuckbunny.mp4"  (a 5 s clip, CC-BY 3.0)
    sample_path("sample:cat")   -> ".../llava_next/samples/chelsea.jpg"       (a photo, CC0)
    resolve(x)                  -> sample_path(x) for a "sample:" name, x itself for anything else

The one resolver behind ``--image sample:cat`` (cli/options.py) and ``Pipeline.prepare(images=
["sample:cat"], video="sample:bunny")``, so a name that works on the command line works in Python.
"""

from __future__ import annotations

import os
from pathlib import Path

SAMPLES = {"bunny": "bigbuckbunny.mp4", "cat": "chelsea.jpg"}
PREFIX = "sample:"
_DIR = Path(__file__).resolve().parents[1] / "samples"


class SampleError(ValueError):
    """An unknown sample name; the message lists the samples."""


def is_sample(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def sample_path(name: str) -> str:
    """``sample:bunny`` / ``sample:cat`` (or the file names) -> the packaged sample file (an existing file of
    that name in the current directory wins: it is what the user wrote)."""
    if os.path.exists(name):
        return name
    key = name.removeprefix(PREFIX)
    file = SAMPLES.get(key, key if key in SAMPLES.values() else None)
    path = _DIR / (file or "")
    if file is None or not path.is_file():
        raise SampleError(f"{name}: no such sample; the samples are {', '.join(PREFIX + k for k in SAMPLES)} "
                          f"(llava_next/samples)")
    return str(path)


def resolve(media):
    """A ``sample:`` name -> its file's path; anything else (a path, a PIL image, an array) unchanged."""
    return sample_path(media) if is_sample(media) else media
