"""Peak resident memory of one block of code in this process, from the kernel's own high-water mark.

    with PeakMemory() as mem:
        run_request()
    mem.peak      # VmHWM: the process's peak resident set while the block ran, bytes
    mem.baseline  # VmRSS just before the block (after freed memory went back to the kernel), bytes
    mem.delta     # peak - baseline: what the block itself needed on top of what was already resident

How, and why not by sampling: on entry the C allocator returns the memory it holds but nobody uses
(``malloc_trim(0)``: freed tensors of earlier requests otherwise stay resident and are silently
reused, so a later request's growth never shows), then ``echo 5 > /proc/self/clear_refs`` resets the
kernel's peak counter (VmHWM, man 5 proc) to the current RSS; on exit VmHWM is read from
/proc/self/status. The kernel updates VmHWM on every page it maps, so a short spike that a 5 ms
sampler misses is still counted. Linux only; ``PeakMemory.available()`` says whether this process can
reset the counter, and ``PeakMemory`` raises ``RuntimeError`` naming the reason when it cannot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    m = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    if m is None:
        raise RuntimeError(f"{STATUS} has no {field} line (peak memory needs Linux)")
    return int(m.group(1)) * 1024


def release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free pages back to the kernel (glibc ``malloc_trim``;
    a no-op where there is no glibc)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS."""
    CLEAR_REFS.write_text("5")


class PeakMemory:
    """Context manager: ``baseline``, ``peak`` and ``delta`` (bytes) of the block it wraps."""

    @staticmethod
    def available() -> str | None:
        """None when the peak counter can be reset here, else the reason it cannot."""
        try:
            status_bytes("VmHWM")
            reset_peak()
        except (OSError, RuntimeError) as e:
            return f"cannot reset the kernel's peak-RSS counter ({e})"
        return None

    def __enter__(self) -> "PeakMemory":
        release_free_memory()
        reset_peak()
        self.baseline = status_bytes("VmRSS")
        self.peak = self.delta = 0
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(status_bytes("VmHWM"), self.baseline)
        self.delta = self.peak - self.baseline
