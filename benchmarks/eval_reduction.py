"""The reduction harness in accuracy: every method of bench_reduction.py at its published default, run on a
benchmark task through the eval job (llava_next/eval/run.py), one output directory per method.

    python benchmarks/bench_reduction.py --eval videomme --model llava-hf/LLaVA-NeXT-Video-7B-hf \\
        --data videomme.parquet --media-root videos/ --limit 300 --out runs/reduction

Per method (and once without reduction, the baseline): OUT/<method>/ holds the eval job's run.json,
samples.jsonl and summary.json, so a killed harness resumes each method where it stopped (and a larger
``--limit`` continues them). Collected from each summary: accuracy with its bootstrap 95% interval, mean
visual tokens per sample (the tokens the decoder receives: an in-decoder pruner, FastV or DyCoke, shows the
unreduced count here; its saving is in the prefill, i.e. in seconds per sample) and mean seconds per sample.
Written: OUT/eval_reduction.csv, OUT/eval_reduction.md (the table) and OUT/eval_reduction.png (accuracy vs
visual tokens and vs seconds per sample, one labelled point per method with its interval, the Pareto front
- higher accuracy for fewer tokens - joined and ringed).

A caption task (``answer: caption``) has no accuracy: its points are the corpus CIDEr of each method (the
task's first caption metric if CIDEr is not among them) with its bootstrap interval, on a y axis from 0 to 1,
or to the largest value shown when one is larger (CIDEr-D is not bounded by 1).

A log-likelihood task (``answer: mc_loglikelihood``) refuses in-decoder reductions: those methods' samples
are error lines and their row says so, with no point. On random weights (tiny-random, or the 7B-shaped
random model bench_reduction.py builds) every accuracy is chance: a mechanics check, said on the plot.
"""

from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from llava_next.research.plots import BG, DIM, FG, PAD, _font

FIELDS = ["method", "spec", "score", "ci_low", "ci_high", "answered", "errors", "visual_tokens",
          "seconds", "pareto", "out", "metric"]
RANDOM_NOTE = "random weights: a mechanics check, not a quality claim (the scores carry no information)"


@dataclass
class Point:
    """One method's result on the task: its ``metric`` (accuracy, or a caption task's CIDEr), None when no sample
    was answered (e.g. refused by the task)."""

    method: str
    spec: str
    score: float | None
    ci_low: float | None
    ci_high: float | None
    answered: int
    errors: int
    visual_tokens: float | None
    seconds: float | None
    pareto: bool = False
    out: str = ""
    metric: str = "accuracy"


def slug(label: str) -> str:
    """A method's label as a directory name: 'FastV (K=2, keep 0.5)' -> 'fastv-k-2-keep-0-5'."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point dominates (at least as good a score with at most as many visual tokens, better
    in one); points without a score are never on it. Sorted by tokens."""
    scored = [p for p in points if p.score is not None and p.visual_tokens is not None]

    def dominated(p: Point) -> bool:
        return any(q.score >= p.score and q.visual_tokens <= p.visual_tokens
                   and (q.score > p.score or q.visual_tokens < p.visual_tokens) for q in scored)
    return sorted((p for p in scored if not dominated(p)), key=lambda p: (p.visual_tokens, -p.score))


def task_metric(task) -> str:
    """What the points measure: accuracy, or for a caption task CIDEr (else its first caption metric)."""
    if task.answer != "caption":
        return "accuracy"
    return "CIDEr" if "CIDEr" in task.caption_metrics else task.caption_metrics[0]


def point(label: str, spec: str, summary: dict, out: Path, metric: str = "accuracy") -> Point:
    if metric == "accuracy":
        value, ci = summary["accuracy"], summary.get("accuracy_ci95") or [None, None]
    else:  # a caption task's corpus metric (no "caption" entry: no sample answered)
        caption = summary.get("caption") or {"metrics": {}, "ci95": {}}
        value, ci = caption["metrics"].get(metric), caption["ci95"].get(metric) or [None, None]
    return Point(label, spec, value, ci[0], ci[1], summary["answered"], summary["errors"],
                 summary["visual_tokens_per_sample"], summary["seconds_per_sample"], out=str(out), metric=metric)


def run_methods(pipe, task, todo, out_root: Path, *, model: str, checkpoint_dir, limit: int | None,
                frames: int | None, batch_size: int = 4, progress=None) -> list[Point]:
    """Each method through run_eval into out_root/<slug>, all sharing ``pipe``; the Pareto flags set. One
    unrecorded warm-up answer first, so the first method's seconds do not carry the process's warm-up."""
    from llava_next.eval.records import provenance
    from llava_next.eval.run import EvalOptions, Evaluator, run_eval
    from llava_next.eval.tasks import read_samples
    from llava_next.reduce import parse_reduction

    list(Evaluator(pipe, task, EvalOptions(frames=frames)).answer(read_samples(task)[:1]))
    points = []
    for m in todo:
        reduction = parse_reduction(m.select, list(m.reduce)) if m.select or m.reduce else None
        switches = {k: v for k, v in (("frames", frames), ("select_frames", m.select),
                                      ("reduce", list(m.reduce))) if v}
        record = provenance(model=model, checkpoint_dir=checkpoint_dir, dtype=pipe.model.dtype, device="cpu",
                            seed=0, switches=switches)
        options = EvalOptions(limit=limit, batch_size=batch_size, frames=frames, reduction=reduction)
        out = out_root / slug(m.label)
        summary = run_eval(lambda: pipe, task, out, record=record, options=options, progress=progress)
        points.append(point(m.label, m.spec, summary, out, task_metric(task)))
    front = {id(p) for p in pareto_front(points)}
    for p in points:
        p.pareto = id(p) in front
    return points


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _value(x: float | None, metric: str) -> str:
    """A score as written: accuracy in %, a caption metric as pycocoevalcap gives it."""
    return _pct(x) if metric == "accuracy" else "-" if x is None else f"{x:.3f}"


def _unit(metric: str) -> str:
    return "accuracy %" if metric == "accuracy" else metric


def _with_ci(p: Point) -> str:
    ci = "" if p.ci_low is None else f" ({_value(p.ci_low, p.metric)}-{_value(p.ci_high, p.metric)})"
    return _value(p.score, p.metric) + ci


def table(points: Sequence[Point]) -> str:
    metric = points[0].metric if points else "accuracy"
    lines = [f"| method | {_unit(metric)} (95% CI) | answered / errors | visual tokens per sample | s per sample | "
             "Pareto |", "|---|---|---|---|---|---|"]
    for p in points:
        acc = "n/a (every sample refused: see errors)" if p.score is None else _with_ci(p)
        tokens = "-" if p.visual_tokens is None else f"{p.visual_tokens:.0f}"
        secs = "-" if p.seconds is None else f"{p.seconds:.2f}"
        lines.append(f"| {p.method} | {acc} | {p.answered} / {p.errors} | {tokens} | {secs} | "
                     f"{'yes' if p.pareto else ''} |")
    return "\n".join(lines)


def write_csv(path: Path, points: Sequence[Point]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(asdict(p) for p in points)


# ---- the picture (Pillow, in research/plots.py's style) -------------------------------------------
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
W, H, M = 460, 340, 56  # panel size, margin for the axes


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.1, 1e-3)
    return lo - pad, hi + pad


def _y_range(points: Sequence[Point]) -> tuple[float, float]:
    """Accuracy: 0..1, fixed, so intervals compare across runs; a caption metric: 0..1 too unless a value shown
    is larger (CIDEr-D goes past 1), then 0 to that value."""
    if not points or points[0].metric == "accuracy":
        return 0.0, 1.0
    values = [v for p in points for v in (p.score, p.ci_high) if v is not None]
    return 0.0, max(values + [1 / 1.05]) * 1.05


def _axes(d: ImageDraw.ImageDraw, xs: tuple[float, float], ys: tuple[float, float], xlabel: str, fmt: str,
          metric: str) -> None:
    font = _font(11)
    d.rectangle([M, PAD, W - PAD, H - M], outline=DIM)
    for v in _ticks(*ys):
        y = _y(v, ys)
        d.line([M - 4, y, M, y], fill=DIM)
        d.text((M - 8, y), f"{100 * v:.0f}" if metric == "accuracy" else f"{v:.2f}", fill=DIM, font=font, anchor="rm")
    for v in _ticks(*xs):
        x = _x(v, xs)
        d.line([x, H - M, x, H - M + 4], fill=DIM)
        d.text((x, H - M + 6), format(v, fmt), fill=DIM, font=font, anchor="mt")
    d.text(((M + W - PAD) // 2, H - 22), xlabel, fill=FG, font=_font(12), anchor="mt")
    d.text((M + 6, PAD + 4), _unit(metric), fill=FG, font=_font(12))


def _x(v: float, xs: tuple[float, float]) -> float:
    return M + (v - xs[0]) / (xs[1] - xs[0]) * (W - PAD - M)


def _y(v: float, ys: tuple[float, float]) -> float:
    return H - M - (v - ys[0]) / (ys[1] - ys[0]) * (H - M - PAD)


def panel(points: Sequence[Point], key: str, xlabel: str, fmt: str) -> Image.Image:
    """The score (with its 95% interval) vs ``key`` per method; the Pareto front over ``key`` joined, ringed."""
    img = Image.new("RGB", (W, H), BG)
    d = ImageDraw.Draw(img)
    shown = [(i, p) for i, p in enumerate(points) if p.score is not None and getattr(p, key) is not None]
    xs, ys = _span([getattr(p, key) for _, p in shown] or [0.0, 1.0]), _y_range([p for _, p in shown])
    _axes(d, xs, ys, xlabel, fmt, points[0].metric if points else "accuracy")
    front = pareto_front([Point(**{**asdict(p), "visual_tokens": getattr(p, key)}) for _, p in shown])
    d.line([(_x(p.visual_tokens, xs), _y(p.score, ys)) for p in front], fill=FG, width=2)
    labels: dict[tuple[int, int], list[int]] = {}  # methods drawn at the same pixel share one label
    for i, p in shown:
        x, colour = _x(getattr(p, key), xs), COLOURS[i % len(COLOURS)]
        if p.ci_low is not None:  # no interval: a caption task run with caption_bootstrap: 0
            d.line([x, _y(p.ci_low, ys), x, _y(p.ci_high, ys)], fill=colour, width=2)
        y = _y(p.score, ys)
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
        if any(q.method == p.method for q in front):
            d.ellipse([x - 9, y - 9, x + 9, y + 9], outline=FG, width=2)
        labels.setdefault((round(x / 6), round(y / 6)), []).append(i)
    for k, (spot, idx) in enumerate(labels.items()):
        x, y = spot[0] * 6, spot[1] * 6
        d.text((x + 4, y - 16 - 12 * (k % 2)), ",".join(str(i + 1) for i in idx), fill=FG, font=_font(11))
    return img


def draw(points: Sequence[Point], title: str, note: str) -> Image.Image:
    """Two panels (vs visual tokens, vs seconds per sample) over a numbered legend of the methods."""
    panels = [panel(points, "visual_tokens", "visual tokens per sample (into the decoder)", ".0f"),
              panel(points, "seconds", "seconds per sample", ".2f")]
    font = _font(12)
    metric = points[0].metric if points else "accuracy"
    legend = [f"{i + 1}. {p.method}: " + ("refused by this task" if p.score is None else
                                          _with_ci(p) + ("%" if metric == "accuracy" else f" {metric}"))
              + ("  [Pareto, tokens]" if p.pareto else "") for i, p in enumerate(points)]
    head = [title, note, f"ringed + joined: the Pareto front of each panel (higher {metric}, fewer tokens / "
                         "seconds); bars: bootstrap 95% intervals"]
    top = PAD + 17 * len(head)
    img = Image.new("RGB", (2 * W, top + H + 17 * ((len(legend) + 1) // 2) + PAD), BG)
    d = ImageDraw.Draw(img)
    for j, line in enumerate(head):
        d.text((PAD, PAD // 2 + 17 * j), line, fill=FG if j == 0 else (200, 30, 30) if j == 1 else DIM, font=font)
    for k, p in enumerate(panels):
        img.paste(p, (k * W, top))
    half = (len(legend) + 1) // 2  # two columns, read down
    for j, line in enumerate(legend):
        d.text((PAD + (j // half) * W, top + H + 17 * (j % half)), line, fill=COLOURS[j % len(COLOURS)], font=font)
    return img
