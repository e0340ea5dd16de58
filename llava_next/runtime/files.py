"""The first check of a media path, shared by every command (``run``, ``inspect``, ``trace`` through
cli/options.py, and each item of ``batch``), so the same problem is the same error everywhere: the same
message, the same class (``FileNotFoundError`` / ``IsADirectoryError``, errno set, ``filename`` the path) and,
in JSON, the same ``{"error": "PATH: no such file", "kind": "user", "type": "FileNotFoundError"}``."""

from __future__ import annotations

import errno
import os


def check_media_file(path: str | os.PathLike, what: str) -> None:
    """Raise if ``path`` (an image or video, ``what``) is missing or a directory; say nothing of its content.
    A video may be a folder of frame images (read by ``load_video``, which says what is wrong with it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such file", os.fspath(path))
    if os.path.isdir(path) and what != "video":
        raise IsADirectoryError(errno.EISDIR, f"is a directory, not {'an' if what[0] in 'aeiou' else 'a'} {what} file",
                                os.fspath(path))
