"""Attention forward at the model's shapes: Triton flash attention beside PyTorch SDPA and eager attention.

    python benchmarks/bench_attention.py [--device cpu|cuda]

Cases (batch 1 unless noted; FLOPs = 4*B*H*Tq*Tk*D, halved for square causal — the FA2/FA3 convention):
- vision:  8 frames x 16 heads x 577 tokens x 64, full attention (CLIP ViT-L/14-336)
- prefill: 32 heads x T x 128 causal, T = 1k..8k (vicuna-7B decoder on a video prompt)
- decode:  one token x 32 heads x 128 against T = 1k..8k cached keys (also reported as GB/s of K/V read)
Providers: "triton" = llava_next_kernels (CUDA only), "sdpa" = torch.nn.functional.scaled_dot_product_attention,
"eager" = transformers' eager path (scores in the input dtype, fp32 softmax, cast back). On CPU the
long prefill shapes are dropped (and eager above 2k, whose (H, T, T) scores would need GBs).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import Results, pick_device, save_plot, time_ms, triton_runs_on
from llava_next_kernels.attention import decode_attention, flash_attention


def eager(q, k, v, causal):
    """transformers' eager_attention_forward: matmuls in the input dtype, softmax in fp32."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, H, Tq, Tk)
    if causal and q.shape[2] > 1:
        tq, tk = q.shape[2], k.shape[2]
        allowed = torch.arange(tk, device=q.device)[None, :] <= torch.arange(tk - tq, tk, device=q.device)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1)


def triton_attention(q, k, v, causal):
    return decode_attention(q, k, v) if q.shape[2] == 1 else flash_attention(q, k, v, causal=causal)


def cases(device: torch.device) -> list[tuple[str, tuple[int, int, int, int, int], bool]]:
    """(kernel, (B, H, Tq, Tk, D), causal)."""
    on_gpu = device.type == "cuda"
    prefill = (1024, 2048, 4096, 8192) if on_gpu else (1024, 2048, 4096)
    return ([("vision", (8, 16, 577, 577, 64), False)]
            + [("prefill", (1, 32, t, t, 128), True) for t in prefill]
            + [("decode", (1, 32, 1, t, 128), True) for t in (1024, 2048, 4096, 8192)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()
    device = pick_device(args.device)
    results = Results("attention", device)
    providers = {"sdpa": sdpa, "eager": eager}
    if triton_runs_on(device):
        providers = {"triton": triton_attention} | providers

    for dtype in (torch.bfloat16, torch.float32):
        for kernel, (B, H, Tq, Tk, D), causal in cases(device):
            g = torch.Generator(device).manual_seed(0)
            q = torch.randn(B, H, Tq, D, device=device, dtype=dtype, generator=g)
            k, v = (torch.randn(B, H, Tk, D, device=device, dtype=dtype, generator=g) for _ in range(2))
            flops = 4 * B * H * Tq * Tk * D / (2 if causal and Tq == Tk else 1)
            rates = {"TFLOP/s": flops / 1e12}
            if kernel == "decode":
                rates["GB/s"] = 2 * k.numel() * k.element_size() / 1e9  # the K/V cache is read once
            shape = f"B{B} H{H} Tq{Tq} Tk{Tk} D{D}" + (" causal" if causal and Tq > 1 else "")
            for provider, fn in providers.items():
                if provider == "eager" and device.type == "cpu" and Tq * Tk > 2048 * 2048:
                    continue  # (H, Tq, Tk) fp32 scores would take GBs and minutes here
                t = time_ms(lambda: fn(q, k, v, causal), device, min_run_time=0.3)
                results.add(kernel, provider, shape, dtype, t, rates)

    results.print_table(("ms", "TFLOP/s", "GB/s"))
    print(f"CSV: {results.save()}")
    print(f"plot: {plot(results)}")


def plot(results: Results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, kernel, xlabel in zip(axes, ("vision", "prefill", "decode"), ("", "tokens (causal)", "cached keys")):
        lines: dict[str, tuple[list, list]] = {}
        for r in results.rows:
            if r["kernel"] == kernel and r["unit"] == "TFLOP/s":
                xs, ys = lines.setdefault(f"{r['provider']} {r['dtype']}", ([], []))
                xs.append(int(r["shape"].split()[3][2:]))  # Tk
                ys.append(r["p50"])
        if kernel == "vision":
            ax.bar(range(len(lines)), [ys[0] for _, ys in lines.values()], tick_label=list(lines), color="C0")
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        else:
            for label, (xs, ys) in lines.items():
                ax.plot(xs, ys, marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=8)
        ax.set(title=kernel, xlabel=xlabel, ylabel="TFLOP/s (p50)")
    fig.suptitle(f"Attention forward — {results.context['device']}")
    return save_plot(fig, "attention")


if __name__ == "__main__":
    main()
