"""Spatial pooling of video frames (F, 576, 1024) -> (F*144, 1024), written into a sequence buffer.

    python benchmarks/bench_pooling.py [--device cpu|cuda] [--frames 8 16 32]

Providers: "torch" = the path every peer uses (view -> permute to NCHW -> avg_pool2d -> flatten -> copy
into the sequence buffer; spatial_pool_reference); "triton" = the fused kernel (spatial_pool, CUDA only).
Pooling is bandwidth-bound, so the figure of merit is effective bandwidth: the minimum traffic (read
every input once, write every pooled token once) divided by the time, and its fraction of the device's
measured copy bandwidth ("peak": dst.copy_(src) of 256 MiB — counts reads + writes the same way).
"""

from __future__ import annotations

import argparse

import torch

from common import Results, copy_bandwidth, pick_device, save_plot, time_ms, triton_runs_on
from llava_next_kernels.pooling import pooled_token_count, spatial_pool, spatial_pool_reference

SIZE, CHANNELS, STRIDE = (24, 24), 1024, 2  # CLIP-336 patch grid (height, width), ViT-L width, LLaVA-NeXT-Video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()
    device = pick_device(args.device)
    results = Results("pooling", device)

    peak = copy_bandwidth(device)
    peak_gbs = peak.rate(2 * 256 * 2**20 / 1e9)[0]
    results.add("copy", "torch", "256 MiB", "float32", peak, {"GB/s": 2 * 256 * 2**20 / 1e9})
    providers = {"torch": spatial_pool_reference}
    if triton_runs_on(device):
        providers["triton"] = spatial_pool

    for dtype in (torch.bfloat16, torch.float32):
        for frames in args.frames:
            x = torch.randn(frames, SIZE[0] * SIZE[1], CHANNELS, device=device, dtype=dtype)
            n = pooled_token_count(frames, SIZE, STRIDE)
            out = torch.empty(n + 64, CHANNELS, device=device, dtype=dtype)  # text tokens around the video
            gb = (x.numel() + n * CHANNELS) * x.element_size() / 1e9  # minimum traffic
            shape = f"{frames}x{SIZE[0] * SIZE[1]}x{CHANNELS} s{STRIDE}"
            for provider, pool in providers.items():
                t = time_ms(lambda: pool(x, STRIDE, "average", size=SIZE, out=out, offset=32), device)
                results.add("pool", provider, shape, dtype, t, {"GB/s": gb, "%peak": 100 * gb / peak_gbs})

    results.print_table(("ms", "GB/s", "%peak"))
    print(f"peak = measured copy bandwidth {peak_gbs:.1f} GB/s; CSV: {results.save()}")
    print(f"plot: {plot(results, peak_gbs)}")


def plot(results: Results, peak_gbs: float):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[str, tuple[list, list]] = {}
    for r in results.rows:
        if r["kernel"] == "pool" and r["unit"] == "GB/s":
            xs, ys = lines.setdefault(f"{r['provider']} {r['dtype']}", ([], []))
            xs.append(int(r["shape"].split("x")[0]))
            ys.append(r["p50"])
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.axhline(peak_gbs, color="gray", linestyle="--", label=f"copy peak {peak_gbs:.0f} GB/s")
    ax.set(xlabel="frames (576 tokens x 1024 ch each, 2x2 average)", ylabel="effective GB/s (p50)",
           title=f"Spatial pooling — {results.context['device']}", ylim=(0, None))
    ax.legend(fontsize=8)
    return save_plot(fig, "pooling")


if __name__ == "__main__":
    main()
