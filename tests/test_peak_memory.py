"""benchmarks/peak_memory.py: the peak-RSS reading of bench_reduction.py counts what a block allocates,
even when earlier freed memory could have hidden it (the defect of the sampled-RSS column it replaced)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from peak_memory import PeakMemory  # noqa: E402

MIB = 2**20
CHUNK = 64 * 1024  # below glibc's mmap threshold: served from the heap, so freed chunks stay with malloc

pytestmark = pytest.mark.skipif(PeakMemory.available() is not None, reason="needs Linux /proc/self/clear_refs")


def fragmented_free(n: int) -> list[bytearray]:
    """Allocate n chunks interleaved with small live ones, free the big ones: heap holes malloc keeps
    (the live ones stop the heap's top from shrinking), resident until trimmed."""
    pins, big = [], []
    for _ in range(n):
        big.append(bytearray(CHUNK))  # zero-filled: touched, so resident
        pins.append(bytearray(1024))
    del big
    return pins


def test_peak_counts_a_spike_and_resets_between_blocks():
    with PeakMemory() as mem:
        spike = bytearray(200 * MIB)
        del spike
    assert mem.delta >= 190 * MIB  # 200 MiB touched, less a few pages other code released meanwhile
    with PeakMemory() as quiet:  # the counter was reset: the earlier spike is not this block's peak
        pass
    assert quiet.delta < 20 * MIB


def test_memory_freed_before_the_block_does_not_hide_its_growth():
    pins = fragmented_free(2000)  # ~125 MiB of freed heap chunks
    with PeakMemory() as mem:
        again = [bytearray(CHUNK) for _ in range(2000)]  # would reuse the holes without the trim
    assert mem.delta >= 100 * MIB, f"block allocated 125 MiB, measured {mem.delta / MIB:.0f} MiB"
    del again, pins
