"""Shared benchmark plumbing: timing, the device's measured copy bandwidth, CSV rows and plots.

Timing: on CUDA `triton.testing.do_bench` (quantiles over many launches, L2 flushed); on CPU
`torch.utils.benchmark.Timer.blocked_autorange` (quantiles over its blocks — fewer blocks for slow
statements, so CPU quantiles are coarse). Every measurement becomes rows in benchmarks/results/<name>.csv:

    kernel, provider, shape, dtype, p50, p20, p80, unit, device, versions, commit

one row per unit (long format: filter on `unit`). For "ms" the quantiles are of the time; for a rate
("GB/s", "TFLOP/s", "%peak") they are the rate at those times, so p20 is the *slower* 20% (rate at the
80th-percentile time) and p80 the faster.
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["kernel", "provider", "shape", "dtype", "p50", "p20", "p80", "unit", "device", "versions", "commit"]
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Timing:
    """Run time quantiles in milliseconds."""
    p50: float
    p20: float
    p80: float

    def rate(self, amount: float) -> tuple[float, float, float]:
        """(p50, p20, p80) of amount / time-in-seconds; p20 is the slower rate."""
        return amount / (self.p50 / 1e3), amount / (self.p80 / 1e3), amount / (self.p20 / 1e3)


def pick_device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    return device


def triton_runs_on(device: torch.device) -> bool:
    """Triton rows need a GPU. The interpreter is a correctness tool; it is never benchmarked."""
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return True
    print(f"triton: skipped — Triton kernels need a CUDA GPU (device here: {device_name(device)}); "
          "the CPU interpreter is for tests, not timing", file=sys.stderr)
    return False


def time_ms(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> Timing:
    fn()  # warm-up (and compile, for Triton)
    if device.type == "cuda":
        import triton.testing
        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return Timing(p50, p20, p80)
    from torch.utils.benchmark import Timer
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    times = torch.tensor(m.times) * 1e3  # per-run ms of each block
    p50, p20, p80 = (torch.quantile(times, q).item() for q in (0.5, 0.2, 0.8))
    return Timing(p50, p20, p80)


def copy_bandwidth(device: torch.device, mib: int = 256) -> Timing:
    """Time dst.copy_(src) of `mib` MiB: the bandwidth a streaming kernel can hope for (reads + writes)."""
    src = torch.empty(mib * 2**20 // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device, min_run_time=1.0)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({torch.get_num_threads()} threads)"


def versions() -> str:
    import triton
    return f"torch {torch.__version__}; triton {triton.__version__}; python {platform.python_version()}"


def commit() -> str:
    """Short HEAD hash, '+dirty' when the kernels or benchmarks differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "benchmarks/*.py"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


class Results:
    """Collects rows for one benchmark; `save()` appends them to results/<name>.csv."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.rows = name, []
        self.context = dict(device=device_name(device), versions=versions(), commit=commit())

    def add(self, kernel: str, provider: str, shape: str, dtype: torch.dtype | str, timing: Timing,
            rates: dict[str, float]) -> None:
        """One "ms" row plus one row per rate unit, e.g. rates={"GB/s": bytes / 1e9}."""
        dtype = str(dtype).removeprefix("torch.")
        base = dict(kernel=kernel, provider=provider, shape=shape, dtype=dtype, **self.context)
        self.rows.append(base | dict(p50=timing.p50, p20=timing.p20, p80=timing.p80, unit="ms"))
        for unit, amount in rates.items():
            p50, p20, p80 = timing.rate(amount)
            self.rows.append(base | dict(p50=p50, p20=p20, p80=p80, unit=unit))

    def save(self) -> Path:
        return append_csv(f"{self.name}.csv", FIELDS, self.rows)

    def print_table(self, units: tuple[str, ...]) -> None:
        print(f"{'kernel':10} {'provider':9} {'shape':34} {'dtype':9}" + "".join(f"{u:>12}" for u in units))
        keyed: dict[tuple, dict] = {}
        for r in self.rows:
            keyed.setdefault((r["kernel"], r["provider"], r["shape"], r["dtype"]), {})[r["unit"]] = r["p50"]
        for (kernel, provider, shape, dtype), vals in keyed.items():
            cells = "".join(f"{vals[u]:>12.4g}" if u in vals else f"{'-':>12}" for u in units)
            print(f"{kernel:10} {provider:9} {shape:34} {dtype:9}{cells}")


def save_plot(fig, name: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def append_csv(name: str, fields: list[str], rows: list[dict]) -> Path:
    """Append rows to benchmarks/results/NAME (header written once; floats to 4 significant digits)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()})
    return path
