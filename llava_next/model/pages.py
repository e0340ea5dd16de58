"""Mmapped weights' file pages: drop them from the process once a copy holds the values.

    is_file_mapped(t)       True when t's bytes lie in a file mapping (a tensor of a mmapped checkpoint)
    release_file_pages(t)   madvise(MADV_DONTNEED) the pages lying wholly inside t (a no-op off Linux)

The loader (``llava_next_weights.load``) drops the pages of each chunk it has cast or moved; the model's
``PackedLinear`` (model/llava.py) drops those of a weight it has prepacked for oneDNN. Here, in the model
layer, because the model uses them and the model imports nothing of the weights package
(docs/architecture.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch


def release_file_pages(t: torch.Tensor) -> None:
    """Drop the mmapped file pages lying wholly inside ``t`` from this process (madvise MADV_DONTNEED).

    Only for tensors of a file mapping (on anonymous memory the pages would come back as zeros): the
    pages stay in the page cache and are mapped again if touched, so ``t`` keeps its values. Not
    MADV_PAGEOUT, which also evicts the file from the page cache (the next load reads the disk), nor
    MADV_COLD, which lowers nothing until memory runs short. A no-op off Linux.
    """
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # 4 = MADV_DONTNEED


def is_file_mapped(t: torch.Tensor) -> bool:
    """True when ``t``'s bytes lie in a file mapping of this process (a tensor of a mmapped checkpoint),
    from /proc/self/maps; False for anonymous memory (copies, casts) and off Linux."""
    if not sys.platform.startswith("linux") or t.numel() == 0:
        return False
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:  # "start-end perms offset dev inode [path]"
                fields = line.split(maxsplit=5)
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                if lo <= start < hi:
                    return end <= hi and fields[4] != "0"
    except OSError:
        pass
    return False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
