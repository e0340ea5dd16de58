"""Tracing cost at the 7B shape: peak memory and time of a prefill with per-frame attention statistics on
every layer, against the same prefill untraced (issue 11, part 3: targets <= 1.25x memory, <= 1.5x time).

    python benchmarks/bench_trace.py [--layers 3] [--tokens 4708] [--repeats 2] [--dtype bf16]
    python benchmarks/bench_trace.py --shape tiny --layers 2 --tokens 4096 --dtype fp32 --modes untraced,all-mass,all-map

The decoder has LLaVA-NeXT-Video-7B's layer shape (hidden 4096, 32 heads of 128, MLP 11008, vocab 32064,
random weights, linears prepacked for oneDNN as the pipeline does) and ``--layers`` layers. The prompt is
32-frame-sized: 35 system/prefix positions, 32 frames x 144 pooled video tokens, 65 question positions
(4,708). Segments: 0 = prefix, 1..32 = frames, 33 = question. Modes, each in a fresh process (peak RSS is
per process; VmHWM is reset by /proc/self/clear_refs after the model is built, so "peak" is the prefill's
own high-water mark over the resident model):

    untraced      prefill through the KV cache (what ``generate`` does), SDPA
    frames        + Attention(every layer, queries = the question, key_mass, per-frame segment sums per query)
    frames+map    + the all-query segment x segment map (layer x frame chart of every query group): a second
                    pass over all 4,708 queries per layer, exact, query-chunked
    all-mass      Attention(queries="all", key_mass, heads="mean"): every query's row, summed per key
    all-map       Attention(queries="all", segments, segment_map, heads="mean")

``--shape tiny``: the built-in tiny model's decoder width (hidden 128, 4 heads, MLP 384) instead of 7B's, where
the instruments' own memory (one chunk block, a copy of K, the outputs) is not hidden by the layer's.

Modes run in the order untraced, frames, frames+map, repeated; the faster time and the lower peak of each
are reported, wall and CPU time (process_time, all threads: steadier than wall time on a shared machine). Results: benchmarks/results/trace.csv (+ a Markdown line per mode on stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from peak_memory import status_bytes  # benchmarks/ (the script's folder)

ROOT = Path(__file__).resolve().parent.parent


def child(mode: str, layers: int, tokens: int, dtype_name: str, shape: str = "7b") -> dict:
    import torch
    from torch import nn

    from llava_next.config import TextConfig
    from llava_next.model.decoder import Decoder
    from llava_next.model.engines import EagerEngine
    from llava_next.model.llava import PackedLinear, can_pack_for_cpu
    from llava_next.research import Attention, trace

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    width = dict(hidden_size=128, intermediate_size=384, num_heads=4, num_kv_heads=4) if shape == "tiny" else {}
    cfg = TextConfig(num_layers=layers, max_position_embeddings=max(8192, tokens + 1), **width)
    torch.set_default_dtype(dtype)
    with torch.device("meta"):
        dec = Decoder(cfg)
    dec = dec.to_empty(device="cpu")
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
        if can_pack_for_cpu(dtype, torch.device("cpu")):
            slots = [(m, n) for m in dec.modules() for n, c in m.named_children() if type(c) is nn.Linear]
            for parent, n in slots:
                setattr(parent, n, PackedLinear(getattr(parent, n)))
    dec.eval()
    text = 35
    per_frame = 144
    frames = min(32, (tokens - text - 1) // per_frame)  # 32 at the default 4,708 positions
    question = tokens - text - frames * per_frame
    segments = torch.cat([torch.zeros(text, dtype=torch.long),
                          torch.arange(1, frames + 1).repeat_interleave(per_frame),
                          torch.full((question,), frames + 1)])
    q_positions = torch.arange(tokens - question, tokens)
    embeds = torch.randn(1, tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype) * 0.02
    positions = torch.arange(tokens)[None]
    dec.setup_caches(1, tokens + 1, dtype=dtype)
    spec = None
    if mode in ("frames", "frames+map"):
        spec = Attention(queries=q_positions, rows=False, key_mass=True, segments=segments,
                         segment_map=mode == "frames+map")
    elif mode in ("all-mass", "all-map"):
        spec = Attention(queries="all", rows=False, key_mass=mode == "all-mass", heads="mean",
                         segments=segments if mode == "all-map" else None, segment_map=mode == "all-map")
    with torch.no_grad():  # warm up (oneDNN primitives, allocator) on a short prompt, untraced
        EagerEngine().prefill(dec, embeds[:, :64], positions[:, :64], None)
    rss_model = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if spec is None:
            EagerEngine().prefill(dec, embeds, positions, None)
        else:
            with trace(dec, attention=spec) as tr:
                EagerEngine().prefill(dec, embeds, positions, None)
            if mode.startswith("frames"):
                per_frame_mass = tr.attention[layers - 1].segment_rows.sum(2).mean(1)  # (1, S): the chart's column
                assert per_frame_mass.shape[-1] == frames + 2
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"mode": mode, "seconds": seconds, "cpu_seconds": cpu, "peak_mib": status_bytes("VmHWM") / 2**20, "model_mib": rss_model / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4708)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    ap.add_argument("--modes", default="untraced,frames,frames+map")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.tokens, args.dtype, args.shape)))
        return
    modes = args.modes.split(",")
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--layers", str(args.layers), "--tokens",
                                  str(args.tokens), "--dtype", args.dtype, "--shape", args.shape], capture_output=True, text=True,
                                 env=dict(os.environ))
            if out.returncode:
                raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {mode:<11} {r['seconds']:7.2f} s ({r['cpu_seconds']:7.2f} s CPU)  peak {r['peak_mib']:7.0f} MiB (model resident {r['model_mib']:.0f})",
                  flush=True)
            b = best.setdefault(mode, r)
            for key in ("seconds", "cpu_seconds", "peak_mib"):
                b[key] = min(b[key], r[key])
    base = best["untraced"]
    rows = []
    print(f"\n{args.shape} layer shape, {args.layers} layers, {args.tokens} positions, {args.dtype}, best of {args.repeats}:")
    print("| mode | time s | x time | CPU s | x CPU | peak MiB | x peak | prefill-only MiB | x prefill-only |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in best.items():
        own, base_own = r["peak_mib"] - r["model_mib"], base["peak_mib"] - base["model_mib"]
        row = dict(mode=mode, layers=args.layers, tokens=args.tokens, dtype=args.dtype, seconds=r["seconds"],
                   time_ratio=r["seconds"] / base["seconds"], cpu_seconds=r["cpu_seconds"],
                   cpu_ratio=r["cpu_seconds"] / base["cpu_seconds"], peak_mib=r["peak_mib"],
                   peak_ratio=r["peak_mib"] / base["peak_mib"], prefill_mib=own, prefill_ratio=own / base_own)
        rows.append(row)
        print(f"| {mode} | {r['seconds']:.2f} | {row['time_ratio']:.2f} | {r['cpu_seconds']:.2f} | {row['cpu_ratio']:.2f} "
              f"| {r['peak_mib']:.0f} | {row['peak_ratio']:.3f} "
              f"| {own:.0f} | {row['prefill_ratio']:.2f} |")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import append_csv
    print(f"CSV: {append_csv('trace.csv', list(rows[0]), rows)}")


if __name__ == "__main__":
    main()
