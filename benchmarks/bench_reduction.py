"""Every token-reduction method at its published default, side by side, on one real video and one 7B-shaped model.

    python benchmarks/bench_reduction.py                      # random 7B-shaped weights, 6 decoder layers
    python benchmarks/bench_reduction.py --model llava-hf/LLaVA-NeXT-Video-7B-hf --frames 16   # real weights

The model: LLaVA-NeXT-Video-7B's shapes (full CLIP ViT-L/14-336, the projector, decoder layers of the
Vicuna-7B shape, the real 32,064-row vocabulary) with ``--layers`` decoder layers (default 6: enough for
a pruning layer K=2 to leave most layers pruned) and random weights (cpu_models.py's recipe: N(0, 0.02),
norm scales 1 + N(0, 0.1)), built in memory in bfloat16. The video: bigbuckbunny.mp4 (tests/media.py),
``--frames`` frames (default 8).

Per method (one row each, in one process, the unreduced model first):
- visual tokens into the decoder, after in-decoder pruning, and the mean tokens per decoder layer;
- prefill FLOPs of the decoder: per layer 2 x (4 n d^2 + 2 n^2 d + 3 n d m) with the layer's own n
  (token-reduction-spec §8.1, SwiGLU's three matrices; attention counted as FastV's README does);
- measured prefill time and video file -> first token time (decode + frame selection + tower +
  reduction + prefill), peak RSS above the loaded model during the request (sampled every 5 ms), and
  the KV cache the prompt fills;
- agreement with the unreduced model: KL(unreduced || reduced) of the first token's distribution and
  greedy agreement over 32 tokens (fraction of equal tokens, and the first step that differs).

Agreement on RANDOM weights is a mechanics check (does pruning move the logits a little or a lot), not a
quality claim: random weights carry no meaning for any method to keep. For the real comparison, run the
command above with ``--model`` pointing at real weights (e.g. llava-hf/LLaVA-NeXT-Video-7B-hf, 32 layers;
~14 GB in bf16) and your own prompts.

Published defaults used (docs/reduction.md says where each comes from): fastv layer=2 keep=0.5 (and the
paper's all-queries score); framefusion cost=0.3 similarity=0.6; pllava 16-12-12 scaled to the frames
given (T' = F: the paper pools 16 frames to 16); slowfast 10 slow of 50 frames scaled to 1 of 5 frames
(slow_frames = F // 5), 4x4 fast; visionzip 54 + 10 per frame; dycoke ttm keep=0.3 with decode layer=3,
keep=0.2; maxinfo rank 8, tol 0.3 with half of the frames as its budget (its 64-of-n default is for
long videos; this clip has ~5 candidates at 1 fps).

Writes benchmarks/results/bench_reduction.csv (appended) and bench_reduction.png (tokens kept vs time to
first token, one point per method). Timings on a shared, busy machine vary by tens of percent: the
load average at the start is recorded in the CSV.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from common import append_csv, commit, save_plot  # noqa: E402
from cpu_models import _random_tensor, bench_config, bench_video  # noqa: E402

from llava_next.model.generate import generate  # noqa: E402
from llava_next.model.llava import LlavaNextModel  # noqa: E402
from llava_next.reduce import Reduction, parse_reduction  # noqa: E402
from llava_next.reduce.runner import ReducedRunner  # noqa: E402

PROMPT = "What happens in this video? Describe the main events."
NEW_TOKENS = 32
FIELDS = ["method", "frames", "layers", "visual_unreduced", "visual_into_decoder", "visual_after_pruning",
          "mean_tokens_per_layer", "prefill_gflops", "prefill_s", "video_to_first_token_s", "peak_rss_mib",
          "kv_cache_mib", "kl_first_token", "top1_agrees", "greedy_agreement", "first_difference", "load_average",
          "weights", "commit"]


def methods(frames: int) -> list[tuple[str, str | None, list[str]]]:
    """(label, --select-frames, --reduce list) at the published defaults, scaled to ``frames``."""
    return [
        ("unreduced", None, []),
        ("fastv", None, ["fastv:layer=2,keep=0.5"]),
        ("fastv (paper score)", None, ["fastv:layer=2,keep=0.5,score=all_queries"]),
        ("framefusion", None, ["framefusion:cost=0.3,similarity=0.6"]),
        ("pllava", None, [f"pllava:shape={frames}x12x12"]),
        ("pllava T/2", None, [f"pllava:shape={max(1, frames // 2)}x12x12"]),
        ("slowfast", None, [f"slowfast:slow_frames={max(1, frames // 5)}"]),
        ("visionzip", None, ["visionzip:dominant=54,contextual=10"]),
        ("dycoke", None, ["dycoke-ttm:keep=0.3", "dycoke:layer=3,keep=0.2"]),
        ("maxinfo", f"maxinfo:frames={max(1, frames // 2)}", []),
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

    import tempfile

    model = random_model(args.layers)
    d = Path(tempfile.mkdtemp())
    make_hf_tokenizer(d, model.config)
    return Pipeline(model, Tokenizer.load(d / "tokenizer.json"))


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms), in bytes."""

    def __enter__(self):
        self.peak = self.start = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prefill_flops(cfg, lengths: list[int]) -> float:
    d, m = cfg.hidden_size, cfg.intermediate_size
    return sum(2 * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m) for n in lengths)


def run_one(pipe, video: Path, frames: int, select: str | None, reduce: list[str]) -> dict:
    reduction = parse_reduction(select, reduce)
    decoder = pipe.model.language_model
    out: dict = {}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        req = pipe.prepare(PROMPT, video=video, frames=frames, reduction=reduction or None, max_new_tokens=NEW_TOKENS)
        embeds, mask, layout = pipe.embed_with_layout([req])
        t_encoded = time.perf_counter()
        runner = ReducedRunner(Reduction(pruner=reduction.pruner, decode=reduction.decode), layout)
        prefill = runner.prefill

        def timed_prefill(*a, **k):
            t = time.perf_counter()
            logits = prefill(*a, **k)
            out["prefill_s"] = time.perf_counter() - t
            out["first_token_s"] = time.perf_counter() - t0
            out["logits"] = logits.float()
            return logits

        runner.prefill = timed_prefill
        decoder.rope_scaling_factor = req.plan.factor
        tokens = generate(decoder, input_embeds=embeds, attention_mask=None, max_new_tokens=NEW_TOKENS,
                          eos_token_id=(), runner=runner)
    lengths = [seg.length for seg in runner.segments for _ in seg.layers]
    kv_bytes = 2 * sum(lengths) * decoder.config.num_kv_heads * decoder.config.head_dim * embeds.element_size()
    out.update(tokens=tokens[0].tolist(), visual_unreduced=req.unreduced_visual_tokens,
               visual_into_decoder=sum(req.video_token_counts), visual_after_pruning=runner.report.visual_after[0],
               mean_tokens_per_layer=sum(lengths) / len(lengths), prefill_gflops=prefill_flops(decoder.config, lengths) / 1e9,
               video_to_first_token_s=out["first_token_s"], encode_s=t_encoded - t0,
               peak_rss_mib=(mem.peak - mem.start) / 2**20, kv_cache_mib=kv_bytes / 2**20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="decoder layers of the random model (default 6)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--model", default=None, help="real weights (hub id or directory) instead of the random model")
    ap.add_argument("--only", nargs="*", default=None, help="run only these method labels (after 'unreduced')")
    args = ap.parse_args()
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    code = commit()  # once: the code this process imported (HEAD may move while it runs)
    pipe = pipeline(args)
    layers = pipe.config.text.num_layers
    video = bench_video()
    print(f"model: {'random 7B-shaped, ' if not args.model else args.model + ', '}{layers} decoder layers, bf16; "
          f"video {video.name}, {args.frames} frames; load average {load:.1f} (2 cores)", flush=True)
    run_one(pipe, video, args.frames, None, [])  # warm-up (allocator, oneDNN, decode-attention compile)
    rows, base = [], None
    for label, select, reduce in methods(args.frames):
        if args.only and label != "unreduced" and label not in args.only:
            continue
        r = run_one(pipe, video, args.frames, select, reduce)
        if base is None:
            base = r
        p, q = torch.log_softmax(base["logits"], -1), torch.log_softmax(r["logits"], -1)
        kl = float((p.exp() * (p - q)).sum())
        same = [a == b for a, b in zip(base["tokens"], r["tokens"])]
        row = dict(method=label, frames=args.frames, layers=layers, kl_first_token=kl,
                   top1_agrees=int(base["logits"].argmax() == r["logits"].argmax()),
                   greedy_agreement=sum(same) / len(same), first_difference=next((i for i, s in enumerate(same) if not s), len(same)),
                   load_average=round(load, 1), weights="random" if not args.model else args.model, commit=code,
                   **{k: r[k] for k in ("visual_unreduced", "visual_into_decoder", "visual_after_pruning",
                                        "mean_tokens_per_layer", "prefill_gflops", "prefill_s",
                                        "video_to_first_token_s", "peak_rss_mib", "kv_cache_mib")})
        rows.append(row)
        print(f"{label:20} visual {row['visual_into_decoder']:5} -> {row['visual_after_pruning']:5}  "
              f"{row['prefill_gflops']:8.0f} GFLOP  prefill {row['prefill_s']:6.2f} s  video->1st {row['video_to_first_token_s']:6.2f} s  "
              f"peak +{row['peak_rss_mib']:6.0f} MiB  KL {kl:8.4f}  agree {row['greedy_agreement']:.2f}", flush=True)
    path = append_csv("bench_reduction.csv", FIELDS, rows)
    plot(rows, layers, args)
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(rows: list[dict], layers: int, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x = r["mean_tokens_per_layer"]
        ax.scatter(x, r["video_to_first_token_s"], color="black" if r["method"] == "unreduced" else "tab:blue")
        ax.annotate(r["method"], (x, r["video_to_first_token_s"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("decoder tokens per layer (mean over layers)")
    ax.set_ylabel("video file -> first token (s)")
    weights = "random 7B-shaped weights" if not args.model else args.model
    ax.set_title(f"token reduction, {args.frames} frames, {layers} decoder layers, {weights}\n"
                 f"(one run each on a busy shared 2-core CPU)", fontsize=9)
    ax.grid(alpha=0.3)
    save_plot(fig, "bench_reduction")


if __name__ == "__main__":
    main()
