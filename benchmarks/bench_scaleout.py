"""Tensor parallelism on this machine: one process vs the decoder split over 2 (torchrun, gloo), and the
memory each rank needs for the real 7B/13B/34B models at N = 1, 2, 4, 8.

    .venv/bin/python benchmarks/bench_scaleout.py                 # ~5-10 minutes on 2 busy cores
    .venv/bin/python benchmarks/bench_scaleout.py --memory-only   # the memory table alone (seconds)

What it measures (a correctness-and-overhead figure, not a speed-up): on one 2-core machine, 2 ranks
share the same two cores and the same memory bandwidth that 1 process with 2 threads uses, and every
decoder layer adds two all-reduces over gloo's TCP loopback (plus DTensor's per-op dispatch). So N = 2
here shows what the split costs and that it answers the same; it speeds up only when the ranks have
cores, memory bandwidth and memory of their own (several sockets, machines or GPUs).

Model: the random LLaVA-NeXT-Video-7B-shaped checkpoint of bench_cpu.py (full CLIP-L/336 tower,
projector, ``--layers`` decoder layers of the 7B shape, the real 32064-token vocabulary), bf16;
bigbuckbunny.mp4, 8 frames, the 1,200-token prompt; greedy decoding of ``--new-tokens`` tokens.
LLAVA_NEXT_COMPILE=0 for both (the compiled decode attention is single-process tuning; its one-time
compile would dominate a short run). Each configuration runs ``--repeats`` times in one process (first
run discarded as warm-up when repeats > 1); the best run is reported. Tokens of N = 2 are checked
against N = 1.

Configurations: N = 1 with all cores as threads (how one process runs), N = 1 with half of them (what
each rank of N = 2 has: on a contended machine 2 spinning OpenMP threads can be much slower than 1),
and N = 2 with half the cores per rank.

Columns: video -> first token (decode 8 frames, vision tower, pool + projector, splice, prefill, first
sample), decode tokens/s, the CPU time of the same two stages summed over the ranks (``time.process_time``:
what the work costs, much less sensitive to other processes than wall time — on a shared machine a job
of 2 processes also gets a larger share of the cores than a job of 1, which flatters N = 2's wall
time), load seconds, peak RSS per rank, decoder weight bytes per rank.
Results: benchmarks/results/scaleout.csv (appended) and scaleout.md (latest run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, append_csv, commit, versions  # noqa: E402

PRESET_ROWS = (("7B", "LLaVA-NeXT-Video-7B"), ("13B", "llava-v1.6-vicuna-13b"), ("34B", "LLaVA-NeXT-Video-34B"))


def memory_table(prompt_tokens: int = 1200, new_tokens: int = 256) -> str:
    """Markdown: GiB per rank (weights + KV cache + prefill activations), bf16, from memory_per_rank."""
    from llava_next.config import LlavaNextConfig
    from llava_next.parallel.tensor_parallel import memory_per_rank

    lines = [f"| model (preset) | N = 1 | N = 2 | N = 4 | N = 8 |", "|---|---|---|---|---|"]
    for label, name in PRESET_ROWS:
        config = LlavaNextConfig.from_name(name)
        cells = []
        for n in (1, 2, 4, 8):
            m = memory_per_rank(config, n, torch.bfloat16, prompt_tokens, new_tokens)
            cells.append(f"{m['total'] / 2**30:.1f} GiB ({m['decoder'] / 2**30:.1f} decoder + "
                         f"{m['vision'] / 2**30:.2f} vision + {(m['kv_cache'] + m['activations']) / 2**30:.2f} run)")
        lines.append(f"| {label} ({name}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- one configuration, in its own process(es) ----------------------------------------------------
def child(args) -> None:
    from cpu_models import bench_video, load_ours, prompt_ids

    from llava_next.inputs.video import load_video
    from llava_next.model.generate import stream
    from llava_next.parallel.launch import dist_env, init_mesh
    from llava_next.parallel.tensor_parallel import load_model, local_decoder_bytes

    env = dist_env()
    t0 = time.perf_counter()
    if env.is_distributed:
        model = load_model(args.checkpoint, init_mesh("cpu"), dtype=torch.bfloat16)
        decoder_bytes = local_decoder_bytes(model)
    else:
        model = load_ours(Path(args.checkpoint), torch.bfloat16, pack=False)
        decoder_bytes = local_decoder_bytes(model)  # before packing: packed layers hold no parameters
        model.pack_for_cpu()
    load_s = time.perf_counter() - t0
    config, video = model.config, bench_video()
    ids = prompt_ids(config, args.frames)
    runs = []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        clip = load_video(video, args.frames, size=config.tile_size)
        with torch.no_grad():
            embeds = model.embed(ids, [], [model.video_features(clip.pixel_values)])
        tokens, first = [], None
        for step in stream(model.language_model, input_embeds=embeds, max_new_tokens=args.new_tokens,
                           eos_token_id=()):
            tokens.append(int(step[0]))
            if first is None:
                first, c_first = time.perf_counter(), time.process_time()
        end, c_end = time.perf_counter(), time.process_time()
        runs.append({"first_token_s": first - t0, "tokens_per_s": (len(tokens) - 1) / (end - first), "tokens": tokens,
                     "first_token_cpu_s": c_first - c0, "decode_cpu_ms": 1e3 * (c_end - c_first) / (len(tokens) - 1)})
    kept = runs[1:] if len(runs) > 1 else runs
    best = {"first_token_s": min(r["first_token_s"] for r in kept),
            "tokens_per_s": max(r["tokens_per_s"] for r in kept), "tokens": kept[0]["tokens"],
            "first_token_cpu_s": min(r["first_token_cpu_s"] for r in kept),
            "decode_cpu_ms": min(r["decode_cpu_ms"] for r in kept)}
    result = {**best, "rank": env.rank, "world": env.world_size, "load_s": load_s,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
              "decoder_gb": decoder_bytes / 1e9, "threads": torch.get_num_threads()}
    Path(f"{args.result}.rank{env.rank}").write_text(json.dumps(result))


def run_config(n: int, threads: int, checkpoint: Path, args) -> list[dict]:
    result = Path(tempfile.mkdtemp()) / "result.json"
    env = dict(os.environ, LLAVA_NEXT_COMPILE="0", OMP_NUM_THREADS=str(threads))
    cmd = [__file__, "--child", "--checkpoint", str(checkpoint), "--result", str(result), "--frames", str(args.frames),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    if n == 1:
        cmd = [sys.executable, *cmd]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *cmd]
    subprocess.run(cmd, env=env, check=True)
    return [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    table = memory_table()
    md = ["# Scale-out: tensor parallelism", "",
          "Memory per rank, bf16, a 1,200-token prompt (an 8-frame video) + 256 new tokens, batch 1 "
          "(`llava_next.parallel.tensor_parallel.memory_per_rank`: the plan's weight shares + "
          "`runtime.memory.memory_budget` with one rank's head and MLP counts):", "", table, ""]
    if not args.memory_only:
        from cpu_models import bench_config, make_checkpoints

        _, checkpoint = make_checkpoints(bench_config(args.layers))
        cores = os.cpu_count() or 2
        configs = [(1, cores), (1, max(1, cores // 2)), (2, max(1, cores // 2))]  # (N, threads per rank)
        results = [(n, t, run_config(n, t, checkpoint, args)) for n, t in dict.fromkeys(configs)]
        reference = results[0][2][0]["tokens"]
        same = all(r["tokens"] == reference for _, _, res in results for r in res)
        load = os.getloadavg()
        rows = []
        md += [f"Random LLaVA-NeXT-Video-7B-shaped checkpoint ({args.layers} decoder layers), bf16, {args.frames} frames, "
               f"{args.new_tokens} greedy tokens; load average {load[0]:.1f} at the end (a shared machine: other "
               f"processes were running, so absolute times are several times an idle machine's); commit {commit()}.",
               "", "| N | threads per rank | video -> first token | decode tokens/s | CPU s to first token (all ranks) | "
               "CPU ms per decoded token (all ranks) | load | peak RSS per rank | decoder weights per rank |",
               "|---|---|---|---|---|---|---|---|---|"]
        for n, threads, res in results:
            r0 = res[0]
            cpu_first, cpu_token = sum(r["first_token_cpu_s"] for r in res), sum(r["decode_cpu_ms"] for r in res)
            md.append(f"| {n} | {threads} | {r0['first_token_s']:.2f} s | {r0['tokens_per_s']:.2f} | {cpu_first:.1f} | "
                      f"{cpu_token:.0f} | {r0['load_s']:.2f} s | {max(r['peak_rss_gb'] for r in res):.2f} GB | "
                      f"{r0['decoder_gb']:.3f} GB |")
            rows.append({"n": n, "threads": threads, "first_token_s": r0["first_token_s"],
                         "tokens_per_s": r0["tokens_per_s"], "first_token_cpu_s": cpu_first,
                         "decode_cpu_ms_per_token": cpu_token, "load_s": r0["load_s"],
                         "peak_rss_gb": max(r["peak_rss_gb"] for r in res), "decoder_gb": r0["decoder_gb"],
                         "same_tokens": same, "loadavg": load[0], "layers": args.layers, "frames": args.frames,
                         "versions": versions(), "commit": commit()})
        md += ["", f"Greedy tokens of every configuration and rank {'are equal' if same else 'DIFFER'}."]
        append_csv("scaleout.csv", list(rows[0]), rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaleout.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
