"""Memory pages: what the process can still allocate, and mmapped weights' file pages dropped once a copy
holds the values.

    available_memory(device) bytes that can still be allocated (None when unknown)
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
import os
import sys

import torch


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when unknown): /proc/meminfo's MemAvailable on
    CPU (Linux), ``torch.cuda.mem_get_info`` on CUDA. The frames check (inputs/video.py), the request budget
    (runtime/memory.py) and the compiled engine's room check (model/engines.py) all ask here."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:  # Linux: what can be allocated without swapping
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
