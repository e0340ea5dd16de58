"""The cost of each research instrument (issue 28): time and peak memory above an untraced forward, at the 7B
shape with a few decoder layers and a 32-frame-sized video prompt.

    python benchmarks/bench_instruments.py [--frames 32] [--layers 2] [--vision-layers 2] [--dtype fp32]
    python benchmarks/bench_instruments.py --frames 8 --modes untraced,rollout,relevancy,relevancy-vision

The model is LLaVA-NeXT-Video-7B's shape (``cpu_models.bench_config``: vicuna-7B layers, hidden 4096, 32 heads of
128, MLP 11008, vocabulary 32064; CLIP ViT-L/14-336 layers, 2 x 2 average pooling: 144 tokens a frame) with
``--layers`` decoder layers and ``--vision-layers`` tower layers, random N(0, 0.02) weights built in memory,
parameters frozen (no weight gradients: the instruments differentiate with respect to inputs and attention).
The prompt: 35 prefix positions, ``--frames`` frames (144 pooled tokens each, + 1 newline token per frame
where the preset adds one), 65 question positions; random pixels. Each mode runs in a fresh process: the model
is built, warmed up on a one-frame prompt, the peak (VmHWM) is reset (/proc/self/clear_refs), then the mode runs
once; "peak above untraced" is the mode's peak minus the untraced forward's peak (both over the same resident
model). Modes:

    untraced          model(ids, videos=[pixels]) under no_grad: the whole-sequence forward the instruments wrap
    key-mass          + trace(attention=Attention(queries="all", key_mass=True, heads="mean"))
    segment-map       + trace(attention=Attention(queries="all", segments="frame", segment_map=True, heads="mean"))
    logit-lens        + trace(logit_lens=LogitLens(positions=sel.visual(), top_k=5)) on every layer
    causal-trace      causal_trace(units="segment", layers=[last]): clean + corrupt + one run per cell
    ixg-tokens        input_x_gradient(space="tokens")
    ixg-pixels        input_x_gradient(space="pixels"): the gradient through the tower too
    ig-tokens         integrated_gradients(space="tokens", steps=--ig-steps)
    rollout           rollout(): dense attention probabilities, T x T per head and layer
    relevancy         relevancy(): dense attention and its gradient
    relevancy-vision  relevancy(space="pixels"): + the tower's dense attention and gradients, per frame
    attr-patching     attribution_patching(hook="blocks.{last}.hook_resid_pre"), the corrupt run = noisy pixels

CPU time (process_time: all threads) is the figure to compare on a shared machine; wall time is printed too.
``--vision-layers 2`` with LLaVA's feature layer -2 builds and runs one tower layer (model/clip.py).
Results: benchmarks/results/instruments.csv (+ a Markdown table on stdout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from peak_memory import status_bytes  # benchmarks/ (the script's folder)

ROOT = Path(__file__).resolve().parent.parent
MODES = ["untraced", "key-mass", "segment-map", "logit-lens", "causal-trace", "ixg-tokens", "ixg-pixels", "ig-tokens",
         "rollout", "relevancy", "relevancy-vision", "attr-patching"]
FIELDS = ["mode", "frames", "positions", "layers", "vision_layers", "dtype", "cpu_seconds", "cpu_ratio", "seconds",
          "time_ratio", "peak_mib", "model_mib", "above_untraced_mib", "cells", "steps"]  # the CSV's columns


def build(frames: int, layers: int, vision_layers: int, dtype_name: str):
    """(model, ids (1, T), pixels (F, 3, 336, 336), provenance) at the 7B shape with few layers."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cpu_models import bench_config
    from llava_next.inputs.prompt import expand_placeholders
    from llava_next.inputs.tokens import video_tokens
    from llava_next.model.llava import LlavaNextModel
    from llava_next.research import Provenance

    torch.manual_seed(0)
    cfg = bench_config(layers)
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, num_layers=vision_layers))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model = LlavaNextModel(cfg).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.02)
    S = cfg.tile_size
    ids = [1] + [100 + i for i in range(34)] + [cfg.video_token_id] + [200 + i for i in range(65)]
    ids = expand_placeholders(ids, cfg.image_token_id, cfg.video_token_id, [], [video_tokens(frames, cfg)])
    pixels = torch.randn(frames, 3, S, S, generator=torch.Generator().manual_seed(1)).to(dtype)
    prov = Provenance.build(ids, cfg, videos=[{"num_frames": frames, "frame_hw": (S, S)}])
    return model, torch.tensor([ids]), pixels, prov


def run_mode(mode: str, model, ids, pixels, prov, ig_steps: int) -> dict:
    import torch

    from llava_next.research import (Attention, Inputs, LogitLens, Target, attribution_patching, input_x_gradient,
                                     integrated_gradients, relevancy, rollout, select as sel, trace)
    from llava_next.research.causal import causal_trace

    inputs, target, last = Inputs(ids, videos=[pixels]), Target(token=5), len(model.language_model.layers) - 1
    media = {"videos": [pixels]}
    spec = {"key-mass": dict(attention=Attention(queries="all", rows=False, key_mass=True, heads="mean")),
            "segment-map": dict(attention=Attention(queries="all", rows=False, heads="mean", segments="frame",
                                                    segment_map=True)),
            "logit-lens": dict(logit_lens=LogitLens(positions=sel.visual(), top_k=5))}
    extra = {}
    if mode == "untraced":
        with torch.no_grad():
            model(ids, **media)
    elif mode in spec:
        with torch.no_grad(), trace(model, provenance=prov, **spec[mode]):
            model(ids, **media)
    elif mode == "causal-trace":
        ct = causal_trace(model, ids, media, provenance=prov, target=5, units="segment", layers=[last])
        extra["cells"] = int(ct.scores.numel())
    elif mode == "ixg-tokens":
        input_x_gradient(model, inputs, target, space="tokens")
    elif mode == "ixg-pixels":
        input_x_gradient(model, inputs, target, space="pixels")
    elif mode == "ig-tokens":
        integrated_gradients(model, inputs, target, space="tokens", steps=ig_steps)
        extra["steps"] = ig_steps
    elif mode == "rollout":
        rollout(model, inputs, target)
    elif mode == "relevancy":
        relevancy(model, inputs, target)
    elif mode == "relevancy-vision":
        relevancy(model, inputs, target, space="pixels")
    elif mode == "attr-patching":
        noisy = Inputs(ids, videos=[pixels + 0.1 * torch.randn_like(pixels)])
        attribution_patching(model, f"blocks.{last}.hook_resid_pre", inputs, noisy, target)
    else:
        raise SystemExit(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    return extra


def child(args) -> dict:
    import torch

    model, ids, pixels, prov = build(args.frames, args.layers, args.vision_layers, args.dtype)
    short, short_px, short_prov = build_short(model, pixels)
    with torch.no_grad():  # warm up (allocator, oneDNN primitives) on a one-frame prompt
        model(short, videos=[short_px])
    rss_model = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) from here on
    t0, c0 = time.perf_counter(), time.process_time()
    extra = run_mode(args.child, model, ids, pixels, prov, args.ig_steps)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"mode": args.child, "seconds": seconds, "cpu_seconds": cpu, "peak_mib": status_bytes("VmHWM") / 2**20,
            "model_mib": rss_model / 2**20, "positions": int(ids.shape[1]), **extra}


def build_short(model, pixels):
    import torch

    from llava_next.inputs.prompt import expand_placeholders
    from llava_next.inputs.tokens import video_tokens

    cfg = model.config
    ids = expand_placeholders([1, cfg.video_token_id, 5], cfg.image_token_id, cfg.video_token_id, [],
                              [video_tokens(1, cfg)])
    return torch.tensor([ids]), pixels[:1], None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    ap.add_argument("--ig-steps", type=int, default=4)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    modes = args.modes.split(",")
    if "untraced" not in modes:
        modes.insert(0, "untraced")
    rows, base = [], None
    flags = ["--frames", str(args.frames), "--layers", str(args.layers), "--vision-layers", str(args.vision_layers),
             "--dtype", args.dtype, "--ig-steps", str(args.ig_steps)]
    for mode in modes:
        out = subprocess.run([sys.executable, __file__, "--child", mode, *flags], capture_output=True, text=True,
                             env=dict(os.environ))
        if out.returncode:
            print(f"  {mode}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or r
        r.update(frames=args.frames, layers=args.layers, vision_layers=args.vision_layers, dtype=args.dtype,
                 time_ratio=r["seconds"] / base["seconds"], cpu_ratio=r["cpu_seconds"] / base["cpu_seconds"],
                 above_untraced_mib=r["peak_mib"] - base["peak_mib"])
        rows.append(r)
        print(f"  {mode:<16} {r['seconds']:8.1f} s ({r['cpu_seconds']:8.1f} s CPU)  peak {r['peak_mib']:7.0f} MiB "
              f"(+{r['above_untraced_mib']:.0f} over untraced; model resident {r['model_mib']:.0f})", flush=True)
    print(f"\n7B layer shape, {args.layers} decoder + {args.vision_layers} tower layers, {args.frames} frames "
          f"({rows[0]['positions']} positions), {args.dtype}:")
    print("| instrument | CPU s | x untraced | wall s | peak MiB | above untraced MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['cpu_seconds']:.1f} | {r['cpu_ratio']:.1f} | {r['seconds']:.1f} "
              f"| {r['peak_mib']:.0f} "
              f"| {r['above_untraced_mib']:.0f} |")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import append_csv
    print(f"CSV: {append_csv('instruments.csv', FIELDS, [{k: r.get(k, '') for k in FIELDS} for r in rows])}")


if __name__ == "__main__":
    main()
