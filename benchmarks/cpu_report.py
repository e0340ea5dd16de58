"""Rows of bench_cpu.py: the CSV (one row per measurement) and the Markdown tables built from them.

CSV columns (benchmarks/results/cpu.csv, appended):

    stage, provider, dtype, value, unit, p50, p20, p80, n, machine, versions, commit

``value`` is the p50 of repeated measurements (p20/p80 empty for single ones). For times p20 is the
faster 20%; for rates (tokens/s, GFLOP/s, GB/s) the quantiles are of the rate.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

from common import append_csv

REPO = Path(__file__).resolve().parent.parent
FIELDS = ["stage", "provider", "dtype", "value", "unit", "p50", "p20", "p80", "n", "machine", "versions", "commit"]


def quantiles(values: list[float]) -> tuple[float, float, float]:
    p50, p20, p80 = np.percentile(np.asarray(values, dtype=float), [50, 20, 80])
    return float(p50), float(p20), float(p80)


def machine() -> str:
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    isa = "+".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags) or "no avx2"
    return f"{model}, {isa}, {torch.get_num_threads()} threads, {decode_policy()}"


def decode_policy() -> str:
    """The one-row decode products this CPU uses per format (model/policy.py, measured at first use), with
    the probe rates the choice was made on: "decode: bf16 kernel (kernel 20.1 / torch 15.2 GB/s), ..."."""
    from llava_next.model import policy
    report = policy.gemv_report()
    parts = [f"{f} {report[f]['choice']} ({' / '.join(f'{k} {v}' for k, v in report[f]['GB/s'].items())} GB/s)"
             for f in policy.GEMV_FORMATS if f in report]
    text = "decode: " + (", ".join(parts) if parts else f"torch ({report['setting']})")
    if "prompt" in report:
        rates = " / ".join(f"{k} {v}" for k, v in report["prompt"]["GFLOP/s"].items())
        text += f"; bf16 prompts sum in {report['prompt']['choice']} ({rates} GFLOP/s)"
    return text


def versions() -> str:
    import importlib.metadata as md
    parts = [f"torch {torch.__version__}"]
    for pkg in ("transformers", "av"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return "; ".join(parts + [f"python {platform.python_version()}"])


def commit() -> str:
    """Short HEAD hash, '+dirty' when the model code or the benchmarks differ from it."""
    try:
        def run(*a: str) -> str:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = run("status", "--porcelain", "--", "llava_next", "weights", "benchmarks/*.py")
        return run("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.context = dict(machine=machine(), versions=versions(), commit=commit())

    def add(self, stage: str, provider: str, dtype: str, values: float | list[float], unit: str) -> float:
        """One row; a list is summarised by its quantiles. Returns the value (p50)."""
        row = dict(stage=stage, provider=provider, dtype=dtype, unit=unit, **self.context)
        if isinstance(values, list):
            p50, p20, p80 = quantiles(values)
            row.update(value=p50, p50=p50, p20=p20, p80=p80, n=len(values))
        else:
            row.update(value=float(values), p50="", p20="", p80="", n=1)
        self.rows.append(row)
        print(f"  {stage:28} {provider:13} {dtype:5} {row['value']:>12.4g} {unit}", flush=True)
        return row["value"]

    def get(self, stage: str, provider: str, dtype: str, unit: str) -> float | None:
        for r in reversed(self.rows):
            if (r["stage"], r["provider"], r["dtype"], r["unit"]) == (stage, provider, dtype, unit):
                return r["value"]
        return None

    def save_csv(self) -> Path:
        return append_csv("cpu.csv", FIELDS, self.rows)

    # ---- Markdown ------------------------------------------------------------------------------
    def markdown(self, dtypes: list[str], header: str) -> str:
        lines = [header, "", self.context["machine"] + "; " + self.context["versions"] + "; commit "
                 + self.context["commit"], ""]
        lines += self._versus(dtypes) + [""] + self._limits(dtypes) + [""] + self._memory(dtypes)
        return "\n".join(lines) + "\n"

    def _versus(self, dtypes: list[str]) -> list[str]:
        # (stage, unit, how to show, target on the time ratio)
        stages = [("vision (8 frames)", "s", "{:.2f} s", "≤ 1.0"),
                  ("pool + projector", "ms", "{:.1f} ms", "≤ 1.0"),
                  ("prefill", "s", "{:.2f} s", "≤ 1.0"),
                  ("decode", "tokens/s", "{:.2f} tok/s", "≤ 1.0 (bf16: ≤ 0.77, i.e. ≥ 1.3x tokens/s)"),
                  ("video -> first token", "s", "{:.2f} s", "≤ 0.85"),
                  ("load (llava-next: + CPU prepack)", "s", "{:.2f} s", "≤ 1.0"),
                  ("peak RSS, video -> first token", "GB", "{:.2f} GB", "≤ 1.0")]
        cols = " | ".join(f"{d} llava-next | {d} transformers | {d} ratio" for d in dtypes)
        head = f"| stage | {cols} | target (ratio) |"
        lines = ["**llava-next vs transformers** (same weights and inputs; ratio = our time / theirs, "
                 "< 1 is faster)", "", head, "|" + "---|" * (2 + 3 * len(dtypes))]
        for stage, unit, fmt, target in stages:
            key, cells = stage.removesuffix(" (llava-next: + CPU prepack)"), []
            for d in dtypes:
                ours, theirs = self.get(key, "ours", d, unit), self.get(key, "transformers", d, unit)
                if ours is None or theirs is None:
                    cells += ["–"] * 3
                    continue
                ratio = theirs / ours if unit == "tokens/s" else ours / theirs
                cells += [fmt.format(ours), fmt.format(theirs), f"**{ratio:.2f}**"]
            lines.append(f"| {stage} | " + " | ".join(cells) + f" | {target} |")
        return lines

    def _limits(self, dtypes: list[str]) -> list[str]:
        items = [("prefill", "GFLOP/s", "matmul", "GFLOP/s", "≥ 75%"),
                 ("vision (8 frames)", "GFLOP/s", "matmul (vision shapes)", "GFLOP/s", "≥ 75%"),
                 ("decode", "GB/s", "memory read", "GB/s", "≥ 80%")]
        lines = ["**Against this machine's limits** (achieved / limit measured in the same run, alternating with "
                 "the stage: plain `F.linear` at the stage's GEMM shapes, in the dtype the model sums them in (fp32 for "
                 "bf16 on a CPU without bf16 arithmetic), `sum` over 512 MB). llava-next's prepacked oneDNN GEMMs run "
                 "faster than plain `F.linear`, so its share can pass 100%.", "",
                 "| measure | dtype | llava-next | transformers | machine limit | llava-next % | transformers % "
                 "| target |",
                 "|---|---|---|---|---|---|---|---|"]
        for stage, unit, limit_stage, limit_unit, target in items:
            for d in dtypes:
                ours, theirs = self.get(stage, "ours", d, unit), self.get(stage, "transformers", d, unit)
                limit = self.get(limit_stage, "torch", d, limit_unit)
                if ours is None or limit is None:
                    continue
                theirs_s = "–" if theirs is None else f"{theirs:.1f} {unit}"
                theirs_p = "–" if theirs is None else f"{100 * theirs / limit:.0f}%"
                lines.append(f"| {stage} | {d} | {ours:.1f} {unit} | {theirs_s} | {limit:.1f} {limit_unit} "
                             f"({limit_stage}) | **{100 * ours / limit:.0f}%** | {theirs_p} | {target} |")
        return lines

    def _memory(self, dtypes: list[str]) -> list[str]:
        size = self.get("checkpoint", "files", "bf16", "GB")
        lines = [f"**Loading** the bf16 checkpoint ({size:.2f} GB of safetensors) in a fresh process per row: "
                 "time, peak RSS above the process's own baseline after imports (against the checkpoint's bytes, "
                 "and against the model's bytes in that dtype: fp32 is twice the bf16 files), then the first "
                 "video -> first token", "",
                 "| provider | dtype | load (+ prepack) | of which prepack | load peak RSS | / checkpoint (target ≤ 1.1x) "
                 "| / model in memory | first video -> first token | peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
        for d in dtypes:
            for p in ("ours", "transformers"):
                t, rss = self.get("load", p, d, "s"), self.get("load peak RSS", p, d, "GB")
                if t is None or rss is None:
                    continue
                pack = self.get("prepack for CPU (part of load)", p, d, "s")
                run = self.get("first video -> first token after load", p, d, "s")
                peak = self.get("peak RSS, video -> first token", p, d, "GB")
                name = "llava-next" if p == "ours" else p
                show = lambda v, fmt: "–" if v is None else fmt.format(v)
                model = size * (2 if d == "fp32" else 1)  # every tensor of the bench checkpoint is floating
                lines.append(f"| {name} | {d} | {t:.2f} s | {show(pack, '{:.2f} s')} | {rss:.2f} GB | "
                             f"**{rss / size:.2f}x** | {rss / model:.2f}x | {show(run, '{:.2f} s')} | "
                             f"{show(peak, '{:.2f} GB')} |")
        errors = [(p, self.get(f"bf16 {what} error", p, "bf16", "rel"))
                  for what in ("vision", "logits") for p in ("ours", "transformers")]
        if all(e is not None for _, e in errors):
            lines += ["", "**bf16 parity** against transformers fp32 on the same inputs (max |diff| / max |value|): "
                          f"vision features llava-next {errors[0][1]:.3g} vs transformers bf16 {errors[1][1]:.3g}; "
                          f"prefill logits llava-next {errors[2][1]:.3g} vs transformers bf16 {errors[3][1]:.3g}."]
        return lines
