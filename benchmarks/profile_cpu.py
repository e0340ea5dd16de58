"""Where llava-next's CPU time goes, stage by stage: a torch.profiler breakdown on the bench_cpu.py model.

    python benchmarks/profile_cpu.py                 # bf16 (the CPU default)
    python benchmarks/profile_cpu.py --dtype fp32

Same model and inputs as bench_cpu.py (LLaVA-NeXT-Video-7B shapes, 2 decoder layers, 8-frame video,
~1,200-token prompt). Each stage runs once to warm up, then once under the profiler:

- vision: the tower on 8 frames;
- prefill: the decoder over the prompt embeddings, writing the KV cache, logits for the last position;
- decode: ``--steps`` one-token steps after that prefill.

For every stage: the operators by self time (their share of the stage, calls, and for the two kinds
that dominate — linear layers and attention — the rate they ran at: GFLOP/s for vision and prefill,
GB/s of weights or KV cache read for decode). Written to benchmarks/results/cpu_profile.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from cpu_limits import decode_bytes, prefill_flops, vision_flops
from cpu_models import FRAMES, bench_config, bench_video, load_ours, make_checkpoints, prompt_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULTS = Path(__file__).parent / "results"


def kind(name: str) -> str:
    """Group operator names into what a reader cares about."""
    if "linear" in name or name in ("aten::addmm", "aten::mm", "aten::matmul", "aten::bmm"):
        return "linear layers (GEMM / GEMV)"
    if "attention" in name or "Compiled" in name or "compiled" in name or "cpp_fused" in name:
        return "attention"
    return name


def run_profiled(fn, setup=lambda: None) -> tuple[float, list[tuple[str, float, int]]]:
    """(wall seconds, [(operator, self seconds, calls)] by self time) of ``fn(setup())``, after a warm-up;
    ``setup`` runs outside the profiler."""
    fn(setup())
    state = setup()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        fn(state)
        wall = time.perf_counter() - t
    rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    return wall, sorted(rows, key=lambda r: -r[1])


def table(stage: str, wall: float, rows, rate_of: dict) -> list[str]:
    total = sum(s for _, s, _ in rows)
    grouped: dict[str, list[float]] = {}  # kind -> [self seconds, calls of its largest operator]
    for name, s, n in rows:  # rows come largest first
        g = grouped.setdefault(kind(name), [0.0, n])
        g[0] += s
    lines = [f"**{stage}**: {wall * 1e3:.0f} ms wall (profiled: {total * 1e3:.0f} ms of operator self time)", "",
             "| operator | self time | share | calls | rate |", "|---|---|---|---|---|"]
    for name, (s, n) in sorted(grouped.items(), key=lambda kv: -kv[1][0])[:8]:
        rate = rate_of.get(name)
        lines.append(f"| {name} | {s * 1e3:.1f} ms | {100 * s / total:.0f}% | {n} | "
                     f"{rate(s) if rate else ''} |")
    return lines + [""]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int, default=16, help="decode steps profiled (default 16)")
    args = parser.parse_args()
    dtype, cfg = DTYPES[args.dtype], bench_config(2)
    model = load_ours(make_checkpoints(cfg)[1], dtype)  # prepacked for CPU, as Pipeline.from_pretrained does
    decoder = model.language_model
    from llava_next.inputs.video import load_video
    pixels = load_video(bench_video(), FRAMES, size=cfg.tile_size).pixel_values.to(dtype)
    ids = prompt_ids(cfg)
    embeds = model.embed(ids, video_features=[model.video_features(pixels)])  # (1, T, 4096)
    T, size = embeds.shape[1], torch.finfo(dtype).bits // 8
    out = [f"CPU profile: `python benchmarks/profile_cpu.py --dtype {args.dtype}` — llava-next, "
           f"LLaVA-NeXT-Video-7B shapes (2 decoder layers), {FRAMES} frames, {T}-token prompt, {torch.get_num_threads()} "
           f"threads", ""]

    wall, rows = run_profiled(lambda _: model.vision_tower(pixels))
    attn_flops = 4 * FRAMES * cfg.vision.num_heads * (cfg.vision.num_patches + 1) ** 2 * cfg.vision.head_dim * \
        cfg.vision.layers_used
    linear_flops = vision_flops(cfg, FRAMES) - attn_flops
    out += table("vision (8 frames)", wall, rows, {
        "linear layers (GEMM / GEMV)": lambda s: f"{linear_flops / s / 1e9:.0f} GFLOP/s",
        "attention": lambda s: f"{attn_flops / s / 1e9:.0f} GFLOP/s"})

    def prefill(_=None) -> torch.Tensor:
        decoder.setup_caches(1, T + args.steps + 1)
        return decoder(input_embeds=embeds, input_pos=torch.arange(T), last_only=True)

    wall, rows = run_profiled(prefill)
    out += table(f"prefill ({T} tokens)", wall, rows, {
        "linear layers (GEMM / GEMV)": lambda s: f"{prefill_flops(cfg, T) / s / 1e9:.0f} GFLOP/s (all FLOPs)"})

    def decode(logits: torch.Tensor) -> None:  # after a prefill (not profiled)
        for i in range(args.steps):
            logits = decoder(logits[:, -1:].argmax(-1), input_pos=torch.tensor([T + i]))

    wall, rows = run_profiled(decode, prefill)
    weights = decode_bytes(cfg, 0, size) * args.steps  # every weight read once per step
    kv = (decode_bytes(cfg, T + args.steps / 2, size) - decode_bytes(cfg, 0, size)) * args.steps
    out += table(f"decode ({args.steps} steps, {args.steps / wall:.1f} tokens/s)", wall, rows, {
        "linear layers (GEMM / GEMV)": lambda s: f"{weights / s / 1e9:.1f} GB/s of weights",
        "attention": lambda s: f"{kv / s / 1e9:.1f} GB/s of KV cache"})
    text = "\n".join(out)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_profile.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
