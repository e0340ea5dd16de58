"""Every token-reduction method at its published default, side by side, on one real video and one 7B-shaped model.

    python benchmarks/bench_reduction.py                       # random 7B-shaped weights, 6 decoder layers, 8 frames
    python benchmarks/bench_reduction.py --frames 32           # LLaVA-NeXT-Video's own 32 frames (~4x the prefill)
    python benchmarks/bench_reduction.py --model llava-hf/LLaVA-NeXT-Video-7B-hf --frames 32   # real weights
    python benchmarks/bench_reduction.py --eval benchmarks/tasks/bunny8.yaml --model tiny-random   # accuracy
    python benchmarks/bench_reduction.py --eval benchmarks/tasks/bunny4_caption.yaml --model tiny-random  # CIDEr

``--eval TASK`` runs the methods below on a benchmark task through the eval job instead, and plots accuracy
(a caption task: CIDEr) against visual tokens and seconds per sample (eval_reduction.py; docs/reduction.md
"Measured in accuracy").

The model: LLaVA-NeXT-Video-7B's shapes (full CLIP ViT-L/14-336, the projector, decoder layers of the
Vicuna-7B shape, the real 32,064-row vocabulary) with ``--layers`` decoder layers (default 6: FastV's
K=2 leaves 4 of 6 layers pruned, DyCoke's L=3 half of them; 6 bf16 layers keep the process under ~4 GB)
and random weights (cpu_models.py's recipe: N(0, 0.02), norm scales 1 + N(0, 0.1)), built in memory in
bfloat16. The video: bigbuckbunny.mp4 (tests/media.py; 132 frames, 5.3 s), ``--frames`` frames (default 8).

Published defaults (docs/reduction.md gives the source of each):
- fastv layer=2 keep=0.5 (the README's "K=2 R=50%"), the code's last-query score; and the paper's
  all-queries score as a second row;
- framefusion cost=0.3 similarity=0.6 ratio_floor=0.1 (``apply_framefusion``'s defaults), the budget over
  the model's own layer count;
- pllava shape=Fx12x12: the paper pools its 16 input frames to 16x12x12 (no temporal pooling, which its
  ablation found always hurts); with F frames that is F x 12 x 12;
- slowfast: 10 slow frames of 50 (every 5th, 1-D max pool -> 24x12), every frame 4x4 fast; with F
  frames, round(F / 5) slow frames in the same layout;
- visionzip dominant=54 contextual=10 (the README's 64 tokens), per frame;
- dycoke-ttm keep=0.3 + dycoke layer=3 keep=0.2 (lmms-eval's k=0.7, l=3, p=0.8);
- maxinfo rank=8 tol=0.3 at 1 fps candidates with the request's frames as its budget (the code's max_n=64
  is for long videos). On this 5.3 s clip that is 8 candidates for 8 frames, so it keeps them all and the
  row shows the selector's cost; a second row, ``frames=F/2``, shows a selection (4 of 6 candidates).

Timing: after one warm-up request, ``--repeats`` rounds; each round runs every method once, the order
reversed every other round (as bench_cpu.py does), so a busy spell of the shared machine hits all
methods alike. Round 1 decodes 32 tokens (agreement, memory); later rounds stop at the first token.
Reported: median wall seconds over rounds, and the method's median over the unreduced model's (two
rounds in opposite orders cancel a load that drifts linearly); the same in CPU seconds of all this
process's threads (``time.process_time``), which count less of the time a niced process waits for the
CPU. The ratios are what is meaningful on a shared machine. ``--max-minutes`` stops starting rounds
once the next would end past it (fewer repeats, never fewer frames).

Memory (round 1, one request at a time in this process, peak_memory.py): before each request the KV
caches are dropped (every request allocates its own, as a fresh process would), freed memory goes back to
the kernel, and the kernel's peak-RSS counter is reset; after it, VmHWM is read. Reported: the absolute
peak, and the delta above the RSS just before the request (the loaded model). Check: the delta must be
at least the bytes of the KV cache the kept tokens need (sum over layers of kept length + decoded tokens,
x 2 (K, V) x kv heads x head dim x 2 bytes); a row that fails it is flagged. The runner allocates every
layer's cache at the prompt's length before pruning, so ``kv_allocated_mib`` is also shown.

Agreement: KL(unreduced || reduced) of the first token's distribution, top-1 agreement, and greedy
agreement over 32 tokens (fraction of equal tokens, first step that differs). On RANDOM weights this is
a mechanics check (how far each method moves this model's logits), NOT a quality claim: random weights
carry nothing for any method to keep. The real comparison needs real weights and real questions: the
``--model`` command above (llava-hf/LLaVA-NeXT-Video-7B-hf, 32 layers, ~14 GB in bf16).

Prefill FLOPs: per decoder layer 2 x (4 n d^2 + 2 n^2 d + 3 n d m) with the layer's own cached length n
(FastV's count 4nd^2 + 2n^2 d + 2ndm, arXiv:2403.06764, with SwiGLU's three matrices). Writes
benchmarks/results/bench_reduction.csv (appended), bench_reduction.md (the table) and bench_reduction.png
(visual tokens per decoder layer vs video file -> first token, one point per method).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from common import RESULTS, append_csv, commit, save_plot  # noqa: E402
from cpu_models import _random_tensor, bench_config, bench_video  # noqa: E402
from peak_memory import PeakMemory, status_bytes  # noqa: E402

from llava_next.model.generate import generate  # noqa: E402
from llava_next.model.llava import LlavaNextModel  # noqa: E402
from llava_next.reduce import Reduction, parse_reduction  # noqa: E402
from llava_next.reduce.engine import ReducedEngine  # noqa: E402

PROMPT = "What happens in this video? Describe the main events."
NEW_TOKENS = 32
MIB = 2**20
FIELDS = ["method", "spec", "frames", "layers", "repeats", "visual_unreduced", "visual_into_decoder",
          "visual_after_pruning", "visual_per_layer", "prefill_gflops", "prefill_s", "prefill_ratio",
          "video_to_first_token_s", "first_token_ratio", "prefill_cpu_s", "prefill_cpu_ratio",
          "video_to_first_token_cpu_s", "first_token_cpu_ratio", "decode_s", "peak_rss_mib", "peak_delta_mib",
          "kv_needed_mib", "kv_allocated_mib", "memory_check", "kl_first_token", "top1_agrees",
          "greedy_agreement", "first_difference", "load_start", "load_end", "weights", "commit"]


@dataclass(frozen=True)
class Method:
    label: str  # table row
    select: str | None  # --select-frames
    reduce: tuple[str, ...]  # --reduce, one per stage

    @property
    def spec(self) -> str:
        select = [f"--select-frames {self.select}"] if self.select else []
        return " ".join(select + [f"--reduce {r}" for r in self.reduce])


def methods(frames: int) -> list[Method]:
    """Each method at its published default (module docstring), in the layout scaled to ``frames``."""
    return [
        Method("unreduced", None, ()),
        Method("FastV (K=2, keep 0.5)", None, ("fastv:layer=2,keep=0.5",)),
        Method("FastV, paper's all-queries score", None, ("fastv:layer=2,keep=0.5,score=all_queries",)),
        Method("FrameFusion (cost 0.3, sim 0.6)", None, ("framefusion:cost=0.3,similarity=0.6,ratio_floor=0.1",)),
        Method(f"PLLaVA ({frames}x12x12)", None, (f"pllava:shape={frames}x12x12",)),
        Method(f"SlowFast ({max(1, round(frames / 5))} slow + {frames} fast 4x4)", None,
               (f"slowfast:slow_frames={max(1, round(frames / 5))},slow_pool=1d_max,fast_grid=4",)),
        Method("VisionZip (54 + 10 per frame)", None, ("visionzip:dominant=54,contextual=10",)),
        Method("DyCoke (TTM keep 0.3, decode L=3 keep 0.2)", None, ("dycoke-ttm:keep=0.3", "dycoke:layer=3,keep=0.2")),
        Method(f"MaxInfo (rank 8, tol 0.3, budget {frames})", "maxinfo:rank=8,tol=0.3", ()),
        Method(f"MaxInfo, budget {max(1, frames // 2)}", f"maxinfo:frames={max(1, frames // 2)},rank=8,tol=0.3", ()),
    ]


def random_model(layers: int) -> LlavaNextModel:
    """LLaVA-NeXT-Video-7B shapes with ``layers`` decoder layers, random bf16 weights, built in memory."""
    config = bench_config(layers)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlavaNextModel(config)
        model = model.to_empty(device="cpu")
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_random_tensor(name, tuple(p.shape), gen))
    model.eval().pack_for_cpu()
    return model


def pipeline(args):
    from llava_next.inputs.prompt import Tokenizer
    from llava_next.runtime.pipeline import Pipeline

    if args.model:
        return Pipeline.from_pretrained(args.model, dtype=torch.bfloat16)
    from tokenizers_fixture import make_hf_tokenizer  # a real BPE tokenizer.json; text ids are meaningless here

    model = random_model(args.layers)
    d = Path(tempfile.mkdtemp())
    make_hf_tokenizer(d, model.config)
    return Pipeline(model, Tokenizer.load(d / "tokenizer.json"))


def prefill_flops(cfg, lengths: list[int]) -> float:
    d, m = cfg.hidden_size, cfg.intermediate_size
    return sum(2 * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m) for n in lengths)


def run_one(pipe, video: Path, frames: int, method: Method, new_tokens: int) -> dict:
    """One request from the video file to ``new_tokens`` greedy tokens, timed and memory-measured."""
    reduction = parse_reduction(method.select, list(method.reduce))
    decoder = pipe.model.language_model
    decoder.clear_caches()  # every request allocates its own KV cache (else a longer earlier one is reused)
    out: dict = {}
    with PeakMemory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()  # wall, and CPU seconds of all this process's threads
        req = pipe.prepare(PROMPT, video=video, frames=frames, reduction=reduction or None, max_new_tokens=NEW_TOKENS)
        embeds, mask, layout = pipe.embed_with_layout([req])
        runner = ReducedEngine(Reduction(pruner=reduction.pruner, decode=reduction.decode), layout)
        prefill = runner.prefill

        def timed_prefill(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            logits = prefill(*a, **k)
            out["prefill_s"], out["prefill_cpu_s"] = time.perf_counter() - t, time.process_time() - c
            out["first_token_s"], out["first_token_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            out["logits"] = logits.float()
            return logits

        runner.prefill = timed_prefill
        decoder.rope_scaling_factor = req.plan.factor
        tokens = generate(decoder, input_embeds=embeds, attention_mask=None, max_new_tokens=new_tokens,
                          eos_token_id=(), engine=runner)
        out["decode_s"] = time.perf_counter() - t0 - out["first_token_s"]
    cfg = decoder.config
    lengths = [seg.length for seg in runner.segments for _ in seg.layers]  # cached prompt tokens per layer
    T = embeds.shape[1]
    into = sum(req.video_token_counts)
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * embeds.element_size()  # K and V of one token in one layer
    decoded = new_tokens - 1  # the last token is sampled, never cached
    out.update(tokens=tokens[0].tolist(), visual_unreduced=req.unreduced_visual_tokens, visual_into_decoder=into,
               visual_after_pruning=runner.report.visual_after[0],
               visual_per_layer=sum(n - (T - into) for n in lengths) / len(lengths),
               prefill_gflops=prefill_flops(cfg, lengths) / 1e9,
               peak_rss_mib=mem.peak / MIB, peak_delta_mib=mem.delta / MIB,
               kv_needed_mib=sum(n + decoded for n in lengths) * per_token / MIB,
               kv_allocated_mib=len(lengths) * (T + new_tokens) * per_token / MIB)
    return out


def rounds(pipe, video: Path, frames: int, todo: list[Method], repeats: int, max_s: float) -> dict[str, list[dict]]:
    """Round 0 decodes NEW_TOKENS, later rounds stop at the first token; the order reverses each round."""
    runs: dict[str, list[dict]] = {m.label: [] for m in todo}
    start, next_round = time.perf_counter(), 0.0  # expected seconds of a first-token-only round
    for r in range(repeats):
        if r >= 1 and time.perf_counter() - start + next_round > max_s:
            print(f"stopping after {r} round(s): another would end past --max-minutes", flush=True)
            break
        for m in (todo if r % 2 == 0 else todo[::-1]):
            res = run_one(pipe, video, frames, m, NEW_TOKENS if r == 0 else 1)
            runs[m.label].append(res)
            print(f"  round {r + 1} {m.label:45} prefill {res['prefill_s']:6.2f} s  "
                  f"video->1st {res['first_token_s']:6.2f} s"
                  + (f"  peak +{res['peak_delta_mib']:5.0f} MiB (KV needs {res['kv_needed_mib']:4.0f})"
                     if r == 0 else "")
                  + f"  load {os.getloadavg()[0]:.1f}", flush=True)
        next_round = sum(runs[m.label][-1]["first_token_s"] for m in todo)
    return runs


def timing(rs: list[dict], base: list[dict]) -> dict:
    """Median seconds over rounds, wall and CPU, and each over the unreduced model's median. With two rounds
    in opposite orders the medians are means, and a load that drifts linearly through the run cancels."""
    out = {}
    for key, name in (("prefill_s", "prefill"), ("first_token_s", "first_token"), ("prefill_cpu_s", "prefill_cpu"),
                      ("first_token_cpu_s", "first_token_cpu")):
        mine, theirs = statistics.median(r[key] for r in rs), statistics.median(r[key] for r in base)
        column = {"prefill_s": "prefill_s", "first_token_s": "video_to_first_token_s", "prefill_cpu_s": "prefill_cpu_s",
                  "first_token_cpu_s": "video_to_first_token_cpu_s"}[key]
        out[column], out[f"{name}_ratio"] = mine, mine / theirs
    return out


def summarise(todo: list[Method], runs: dict[str, list[dict]], frames: int, layers: int, load_start: float,
              weights: str, code: str) -> list[dict]:
    base_runs = runs["unreduced"]
    base = base_runs[0]
    rows = []
    for m in todo:
        rs = runs[m.label]
        first = rs[0]
        p, q = torch.log_softmax(base["logits"], -1), torch.log_softmax(first["logits"], -1)
        same = [a == b for a, b in zip(base["tokens"], first["tokens"])]
        n = len(rs)
        ok = first["peak_delta_mib"] >= first["kv_needed_mib"]
        rows.append(dict(
            method=m.label, spec=m.spec, frames=frames, layers=layers, repeats=n,
            **{k: first[k] for k in ("visual_unreduced", "visual_into_decoder", "visual_after_pruning",
                                     "visual_per_layer",
                                     "prefill_gflops", "decode_s", "peak_rss_mib", "peak_delta_mib", "kv_needed_mib",
                                     "kv_allocated_mib")},
            **timing(rs, base_runs),
            memory_check="ok" if ok else "FAILED: peak delta below the kept tokens' KV bytes",
            kl_first_token=float((p.exp() * (p - q)).sum()),
            top1_agrees=int(base["logits"].argmax() == first["logits"].argmax()),
            greedy_agreement=sum(same) / len(same),
            first_difference=next((i for i, s in enumerate(same) if not s), len(same)),
            load_start=round(load_start, 1), load_end=round(os.getloadavg()[0], 1), weights=weights, commit=code))
    return rows


def cpu(r: dict) -> str:
    if "first_token_cpu_ratio" not in r or r["first_token_cpu_ratio"] == "":  # rows of runs before CPU seconds
        return "-"
    return (f"{r['prefill_cpu_s']:.1f} ({r['prefill_cpu_ratio']:.2f}), "
            f"{r['video_to_first_token_cpu_s']:.1f} ({r['first_token_cpu_ratio']:.2f})")


def table(rows: list[dict]) -> str:
    head = ("| method | visual tokens into decoder → after pruning | visual tokens per layer | prefill GFLOP | "
            "prefill s (× unreduced) | video → first token s (× unreduced) | "
            "CPU s: prefill, video → first token (×) | "
            "peak RSS GiB (+ MiB above model) | "
            "KV MiB needed / allocated | first-token KL | top-1 same | greedy agreement /32 |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        tokens = (f"{r['visual_into_decoder']}" if r["visual_after_pruning"] == r["visual_into_decoder"]
                  else f"{r['visual_into_decoder']} → {r['visual_after_pruning']}")
        lines.append(f"| {r['method']} | {tokens} | {r['visual_per_layer']:.0f} | {r['prefill_gflops']:.0f} | "
                     f"{r['prefill_s']:.1f} ({r['prefill_ratio']:.2f}) | {r['video_to_first_token_s']:.1f} "
                     f"({r['first_token_ratio']:.2f}) | {cpu(r)} | "
                     f"{r['peak_rss_mib'] / 1024:.2f} (+{r['peak_delta_mib']:.0f}) | "
                     f"{r['kv_needed_mib']:.0f} / {r['kv_allocated_mib']:.0f} | {r['kl_first_token']:.3g} | "
                     f"{'yes' if r['top1_agrees'] else 'no'} | {r['greedy_agreement']:.2f} |")
    return "\n".join(lines)


def eval_main(args) -> None:
    """``--eval TASK``: every method on a benchmark task through the eval job (eval_reduction.py)."""
    import json

    import eval_reduction as er

    from llava_next.eval.tasks import load_task
    from llava_next.runtime.loading import resolve_checkpoint

    task = load_task(args.eval, data=args.data, media_root=args.media_root)
    frames = args.frames or task.frames
    todo = [m for m in methods(frames) if args.only is None or m.label == "unreduced"
            or any(w.lower() in m.label.lower() for w in args.only)]
    pipe = pipeline(args)
    random = args.model in (None, "tiny-random")
    weights = "random 7B-shaped" if args.model is None else args.model
    out = Path(args.out)
    points = er.run_methods(pipe, task, todo, out, model=args.model or "random-7b-shaped",
                            checkpoint_dir=resolve_checkpoint(args.model) if args.model else None,
                            limit=args.limit, frames=frames, batch_size=args.batch_size, progress=sys.stderr)
    title = (f"token reduction on {task.name}: {weights} weights, {frames} frames, "
             f"{points[0].answered + points[0].errors} sample(s), seconds on a shared {os.cpu_count()}-core CPU")
    note = er.RANDOM_NOTE if random else ""
    md = "\n\n".join([er.table(points), title + "."] + ([note[0].upper() + note[1:] + "."] if note else [])) + "\n"
    er.write_csv(out / "eval_reduction.csv", points)
    (out / "eval_reduction.md").write_text(md)
    er.draw(points, title, note).save(out / "eval_reduction.png")
    print("\n" + md)
    print(json.dumps({"csv": str(out / "eval_reduction.csv"), "md": str(out / "eval_reduction.md"),
                      "png": str(out / "eval_reduction.png")}))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="decoder layers of the random model (default 6)")
    ap.add_argument("--frames", type=int, default=None,
                    help="frames sampled from the video (default 8, with --eval the task's; the model's own: 32)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timing rounds (default 3; round 1 also measures agreement and memory)")
    ap.add_argument("--max-minutes", type=float, default=25.0,
                    help="start no round that would end past this (default 25)")
    ap.add_argument("--model", default=None, help="real weights (hub id or directory) instead of the random model")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only the methods whose label contains one of these words (and the unreduced model)")
    ap.add_argument("--eval", default=None, metavar="TASK",
                    help="run every method on this task (a YAML file or a bundled task's name) through the eval "
                         "job and plot accuracy (a caption task: CIDEr) vs visual tokens and time per sample "
                         "(eval_reduction.py)")
    ap.add_argument("--data", default=None, help="--eval: the task's data file (the eval command's --data)")
    ap.add_argument("--media-root", default=None, help="--eval: where the media are (the eval's --media-root)")
    ap.add_argument("--limit", type=int, default=None, help="--eval: only the first N samples")
    ap.add_argument("--batch-size", type=int, default=4, help="--eval: samples per forward (default 4)")
    ap.add_argument("--out", default=str(RESULTS / "eval_reduction"),
                    help="--eval: one resumable eval directory per method under this, and the table and plot")
    args = ap.parse_args()
    if (args.frames is not None and args.frames < 1) or args.repeats < 1 or args.layers < 4:
        ap.error("--frames and --repeats must be >= 1 and --layers >= 4 (DyCoke decodes from layer 3)")
    return args


def main() -> None:
    args = parse_args()
    if args.eval:
        return eval_main(args)
    args.frames = args.frames or 8
    unusable = PeakMemory.available()
    if unusable:
        sys.exit(f"bench_reduction: {unusable}; the peak-memory column needs Linux's /proc/self/clear_refs")
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]
    code = commit()  # once: the code this process imported (HEAD may move while it runs)
    weights = args.model or "random"
    pipe = pipeline(args)
    layers = pipe.config.text.num_layers
    video = bench_video()
    todo = [m for m in methods(args.frames) if args.only is None or m.label == "unreduced"
            or any(w.lower() in m.label.lower() for w in args.only)]
    print(f"model: {'random 7B-shaped' if not args.model else args.model}, {layers} decoder layers, bf16; video "
          f"{video.name}, {args.frames} frames; {len(todo)} methods x {args.repeats} rounds; load average "
          f"{load_start:.1f} on {os.cpu_count()} cores at the start", flush=True)
    run_one(pipe, video, args.frames, Method("warm-up", None, ()), NEW_TOKENS)  # allocator, oneDNN, decode compile
    pipe.model.language_model.clear_caches()
    print(f"loaded model + warm-up: RSS {status_bytes('VmRSS') / 2**30:.2f} GiB", flush=True)
    runs = rounds(pipe, video, args.frames, todo, args.repeats, args.max_minutes * 60)
    rows = summarise(todo, runs, args.frames, layers, load_start, weights, code)
    path = append_csv("bench_reduction.csv", FIELDS, rows)
    note = (f"{weights} weights, {layers} decoder layers, bf16, {video.name} at {args.frames} frames, "
            f"{rows[0]['repeats']} round(s) (median; ratio = method median / unreduced median), load average "
            f"{load_start:.1f} at the start and {rows[-1]['load_end']:.1f} at the end on {os.cpu_count()} shared "
            "cores: "
            "absolute seconds depend on the load, the ratios are what is meaningful.")
    warning = ("Agreement on random weights is a mechanics check (how far each method moves this model's logits), "
               "not a quality claim. The real comparison: python benchmarks/bench_reduction.py --model "
               "llava-hf/LLaVA-NeXT-Video-7B-hf --frames 32")
    failed = [r["method"] for r in rows if r["memory_check"] != "ok"]
    check = ("Memory check: every row's peak above the loaded model is at least the KV bytes its kept tokens need."
             if not failed else
             f"Memory check FAILED for: {', '.join(failed)} (peak delta below the kept tokens' KV bytes).")
    md = "\n\n".join([table(rows), note, check, warning]) + "\n"
    (RESULTS / "bench_reduction.md").write_text(md)
    print("\n" + md)
    plot(rows, layers, args, load_start)
    print(f"wrote {path}, {path.with_suffix('.md')} and {path.with_suffix('.png')}")


def plot(rows: list[dict], layers: int, args, load: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    markers = "os^Dv<>pPX*h"
    for i, r in enumerate(rows):  # one colour + marker per method, named in the legend: no labels to overlap
        ax.scatter(r["visual_per_layer"], r["video_to_first_token_s"], s=50, zorder=3, color=f"C{i % 10}",
                   marker=markers[i % len(markers)],
                   label=f"{r['method']}: {r['first_token_ratio']:.2f}x"
                         + (f" ({r['first_token_cpu_ratio']:.2f}x CPU)" if "first_token_cpu_ratio" in r else ""))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title_fontsize=7,
              title="video -> first token / unreduced (wall)")
    ax.set_xlabel("visual tokens per decoder layer (mean over layers)")
    ax.set_ylabel("video file -> first token (s, median)")
    weights = "random 7B-shaped weights" if not args.model else args.model
    ax.set_title(f"token reduction: {args.frames} frames, {layers} decoder layers, {weights}\n"
                 f"(median of {rows[0]['repeats']} round{'s' if rows[0]['repeats'] > 1 else ''} on a shared "
                 f"{os.cpu_count()}-core CPU, load average {load:.1f} at the start)", fontsize=9)
    ax.grid(alpha=0.3)
    save_plot(fig, "bench_reduction")


if __name__ == "__main__":
    main()
