"""LoRA / QLoRA training step on CPU: llava-next against transformers + PEFT (+ bitsandbytes NF4), same weights and batch.

    python benchmarks/bench_train.py                   # tiny + 7B-shaped, bf16 + nf4, 2 repeats, profiles
    python benchmarks/bench_train.py --quick           # tiny only, one repeat, no profile: a smoke test
    python benchmarks/bench_train.py --models 7b --bases nf4 --repeats 3

One step = forward + loss + backward + gradient clipping + AdamW step + zero_grad on the LoRA weights, as
``llava_next/train/sft.py`` runs it (``SFTRun.train``) and as a transformers ``Trainer`` runs it. LoRA rank 16,
alpha 32, dropout 0.05 (the ``llava-next train`` defaults) on the decoder's q/k/v/o/gate/up/down.

Models (random weights, written once as a llava-hf checkpoint and converted by our converter, so both load
the same numbers: benchmarks/cpu_models.py):
- ``tiny``: the built-in tiny-random's shapes (CLIP width 64 at 112 px, 2 used layers; Llama decoder width
  128, 32 layers, MLP 384, vocabulary 704).
- ``7b``: LLaVA-NeXT-Video-7B's widths with few layers: CLIP ViT-L/14-336 widths with ``--vision-layers``
  used layers, ``--layers`` decoder layers of hidden 4096, 32 heads, MLP 11008, vocabulary 32064.

Batch: one video of ``--frames`` real frames (bigbuckbunny.mp4, tests/media.py) and a caption: BOS, 19 prompt
tokens, the video's tokens (frames x 144 for 7b, x 16 for tiny), 9 more prompt tokens, a 32-token caption;
labels -100 everywhere but the caption. Tokens/s counts every position of the sequence.

Providers, each in bf16 and with an NF4 base (QLoRA: decoder linears and lm_head in NF4, blocksize 64,
double-quantized absmax, bf16 compute; vision tower and projector bf16):
- llava-next: the ``llava-next train`` path: ``materialize_trainable`` (bf16), ``quantize_model(nf4)``,
  ``apply_lora(dtype=float32)``, ``TrainingEngine``, ``causal_lm_loss``; the attention mask that ``collate`` gives.
- transformers + PEFT: ``LlavaNextVideoForConditionalGeneration.from_pretrained(dtype=bf16)`` (nf4:
  ``BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute, llm_int8_skip_modules=[vision_tower,
  multi_modal_projector])`` so that the same layers are 4-bit), ``peft.get_peft_model`` with its defaults
  (``autocast_adapter_dtype=True``: PEFT keeps the adapters in float32), ``model(..., labels=...).loss``.
  No ``prepare_model_for_kbit_training``: it casts every bf16 weight to float32 (a different model).
The LoRA A matrices are drawn from one seed per (layer, module) in both, B is zero (as both initialise it).

Memory: every (model, base, provider, repeat) runs in a fresh subprocess. "peak RSS" is the kernel's
high-water mark (VmHWM) while the warm-up step and the timed steps run, reset after the model is loaded
(benchmarks/peak_memory.py: malloc_trim, then /proc/self/clear_refs), so it holds the resident model,
the activations, the gradients and AdamW's moments, not the loading spike; "above the loaded model" is
that peak minus the RSS just before the first step. ``ru_maxrss`` (the whole process, loading included)
is in the CSV too. Time: the p50 over repeats of each child's median timed step, the children of the two
providers alternating (ours, theirs, then theirs, ours). The machine's limit, measured in the parent between
children: plain ``F.linear`` at one decoder layer's GEMM shapes (benchmarks/cpu_limits.py ``MatmulProbe``);
GFLOP/s counts forward + input-gradient GEMMs of the decoder and lm_head (2 x 2 T x weights) and attention.

Where the time goes: ``torch.profiler`` over one step in a separate child per provider (top ops by self CPU
time). Results: benchmarks/results/train.csv (rows) and train.md (tables and profiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

from cpu_models import bench_config, declare_torchvision_ops, make_checkpoints
from cpu_report import FIELDS, Report, quantiles
from common import append_csv

LORA = dict(r=16, alpha=32.0, dropout=0.05)
PEFT_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
PROMPT, TAIL, CAPTION = 19, 9, 32  # text tokens before the video, after it, and the caption's


# ---- models and the batch ------------------------------------------------------------------------
def model_config(name: str, layers: int, vision_layers: int):
    """The llava-next config of ``name`` ("tiny" or "7b") and its checkpoint cache name."""
    if name == "tiny":
        from llava_next.runtime.tiny import video_config
        return video_config(), "train-tiny-random"
    cfg = bench_config(layers)  # feature layer -2: num_layers = used + 1
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, num_layers=vision_layers + 1))
    return cfg, f"train-video7b-{layers}layers-vision{vision_layers}"


def make_batch(cfg, frames: int):
    """(ids (1, T), labels (1, T), pixels (F, 3, S, S) bf16): real frames, random but fixed text ids."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from media import real_video
    from llava_next.inputs.video import load_video

    gen = torch.Generator().manual_seed(0)
    top = min(cfg.text.vocab_size, cfg.video_token_id, cfg.image_token_id)  # ordinary text ids only
    text = torch.randint(3, top, (PROMPT + TAIL + CAPTION,), generator=gen).tolist()
    per_frame = (cfg.vision.grid_size // cfg.spatial_pool_stride) ** 2
    ids = [1] + text[:PROMPT] + [cfg.video_token_id] * (frames * per_frame) + text[PROMPT:]
    labels = [-100] * (len(ids) - CAPTION) + ids[-CAPTION:]
    pixels = load_video(real_video(), frames, size=cfg.tile_size).pixel_values.to(torch.bfloat16)
    return torch.tensor([ids]), torch.tensor([labels]), pixels


def lora_init(named_params) -> None:
    """A ~ N(0, 0.02) from a seed per (layer, module), B = 0: the same adapter in llava-next and PEFT."""
    with torch.no_grad():
        for name, p in named_params:
            m = re.search(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])", name)
            if m is None or not p.requires_grad:
                continue
            if m.group(3) == "B":
                p.zero_()
            else:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{m.group(1)}.{m.group(2)}".encode()))
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def ours_step(ours_dir: Path, base: str, batch):
    """llava-next's model as ``llava-next train`` builds it, and its step function (returns the loss)."""
    from llava_next.model.lora import LoraConfig, apply_lora
    from llava_next.model.quant import QuantConfig
    from llava_next.model.quant_model import quantize_model
    from llava_next.model.training import TrainingEngine, causal_lm_loss
    from llava_next.train.sft import materialize_trainable
    from llava_next_weights.load import read_config

    model = materialize_trainable(ours_dir, read_config(ours_dir), torch.bfloat16, "cpu")
    if base == "nf4":
        quantize_model(model, QuantConfig("nf4"))
    apply_lora(model, LoraConfig(**LORA), dtype=torch.float32)  # as llava-next train (and PEFT) make them
    lora_init(model.named_parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    engine = TrainingEngine(checkpointing=False)
    ids, labels, pixels = batch
    mask = torch.ones(ids.shape, dtype=torch.bool)  # what collate gives a batch of one
    model.train()

    def step() -> float:
        loss = causal_lm_loss(model(ids, videos=[pixels], attention_mask=mask, engine=engine), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def theirs_step(hf_dir: Path, base: str, batch):
    """transformers + PEFT (+ bitsandbytes NF4) on the same checkpoint, and its step function."""
    declare_torchvision_ops()
    import logging

    import peft
    from transformers import BitsAndBytesConfig, LlavaNextVideoForConditionalGeneration

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # the offline kernel-hub lookup's warning
    extra = {}
    if base == "nf4":
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["vision_tower", "multi_modal_projector"])
    hf = LlavaNextVideoForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.bfloat16, **extra)
    cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=PEFT_TARGETS)
    model = peft.get_peft_model(hf, cfg)
    lora_init(model.named_parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    ids, labels, pixels = batch
    mask = torch.ones(ids.shape, dtype=torch.long)  # what transformers' collators give
    video = pixels[None]  # (1, F, 3, S, S)
    model.train()

    def step() -> float:
        loss = model(input_ids=ids, attention_mask=mask, pixel_values_videos=video, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


# ---- one child: load, step, measure ----------------------------------------------------------------
def child(args) -> None:
    from peak_memory import PeakMemory, status_bytes

    cfg, name = model_config(args.models, args.layers, args.vision_layers)
    hf_dir, ours_dir = make_checkpoints(cfg, name=name)
    batch = make_batch(cfg, args.frames)
    t = time.perf_counter()
    step = (ours_step(ours_dir, args.bases, batch) if args.provider == "ours"
            else theirs_step(hf_dir, args.bases, batch))
    out = {"load_s": time.perf_counter() - t, "tokens": batch[0].shape[1], "load_start": os.getloadavg()[0]}
    if args.profile:
        step()  # warm-up
        out["profile"] = profile(step)
    else:
        with PeakMemory() as mem:
            out["loss"] = step()  # warm-up: the first step also creates AdamW's moments
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
        out.update(times=times, peak=mem.peak, baseline=mem.baseline, rss_end=status_bytes("VmRSS"),
                   ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out["load_end"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(out))


def profile(step, rows: int = 12) -> list[dict]:
    """One step under torch.profiler: the top ops by self CPU time (ms, share of the step)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:rows]] + [{"op": "(step total)", "self_ms": total / 1e3,
                                                           "share": 1.0, "calls": 1}]


def run_child(args, model: str, base: str, provider: str, profile_only: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--provider", provider, "--models", model, "--bases", base,
           "--layers", str(args.layers), "--vision-layers", str(args.vision_layers), "--frames", str(args.frames),
           "--steps", str(args.steps), "--threads", str(args.threads)] + (["--profile"] if profile_only else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"child {provider} {model} {base} failed:\n{r.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ---- the parent: alternate the children, beside the machine's matmul limit ---------------------------
def step_flops(cfg, tokens: int, frames: int) -> float:
    """Forward + input-gradient GEMMs of the decoder and lm_head, attention (backward = 2x its forward),
    the frozen vision forward; the rank-16 adapters (< 1%) are left out."""
    from cpu_limits import vision_flops
    t, T = cfg.text, tokens
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    weights = t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size
    attention = 2 * 2 * (T * (T + 1) / 2) * q
    return t.num_layers * (2 * 2 * T * weights + 3 * attention) + 2 * 2 * T * t.hidden_size * t.vocab_size \
        + vision_flops(cfg, frames)


def matmul_probe(cfg, tokens: int):
    """plain F.linear at one decoder layer's GEMM shapes (bf16, random weights of those shapes)."""
    from cpu_limits import MatmulProbe
    t = cfg.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    shapes = [(q, t.hidden_size), (kv, t.hidden_size), (kv, t.hidden_size), (t.hidden_size, q),
              (t.intermediate_size, t.hidden_size), (t.intermediate_size, t.hidden_size),
              (t.hidden_size, t.intermediate_size)]
    return MatmulProbe([torch.randn(s, dtype=torch.bfloat16) for s in shapes], tokens)


def measure(args, model: str, base: str, report: Report, cfg) -> dict:
    """Alternate the two providers' children ``repeats`` times, the matmul probe after each pair."""
    runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
    probe, rates = None, []
    for r in range(args.repeats):
        for provider in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            runs[provider].append(run_child(args, model, base, provider))
            print(f"  {model} {base} {provider}: step {sorted(runs[provider][-1]['times'])} s", flush=True)
        probe = probe or matmul_probe(cfg, runs["ours"][0]["tokens"])
        probe()
        t = time.perf_counter()
        probe()
        rates.append(probe.flops / (time.perf_counter() - t) / 1e9)
    tokens = runs["ours"][0]["tokens"]
    flops = step_flops(cfg, tokens, args.frames)
    limit = report.add("plain matmul (decoder GEMM shapes)", "torch", base, rates, "GFLOP/s")
    out = {"tokens": tokens, "limit": limit}
    for provider, rs in runs.items():
        steps = [float(quantiles(x["times"])[0]) for x in rs]
        tag = f"{model} {base}"
        out[provider] = {
            "step": report.add(f"{tag}: step", provider, base, steps, "s"),
            "tok_s": report.add(f"{tag}: tokens/s", provider, base, [tokens / s for s in steps], "tokens/s"),
            "gflops": report.add(f"{tag}: GEMM rate", provider, base, [flops / s / 1e9 for s in steps], "GFLOP/s"),
            "peak": report.add(f"{tag}: peak RSS while training", provider, base, [x["peak"] / 1e9 for x in rs], "GB"),
            "above": report.add(f"{tag}: peak above the loaded model", provider, base,
                                [(x["peak"] - x["baseline"]) / 1e9 for x in rs], "GB"),
            "maxrss": report.add(f"{tag}: ru_maxrss (whole process)", provider, base,
                                 [x["ru_maxrss"] / 1e9 for x in rs], "GB"),
            "load": report.add(f"{tag}: load", provider, base, [x["load_s"] for x in rs], "s"),
            "loss": rs[0]["loss"],
            "load_avg": max(max(x["load_start"], x["load_end"]) for x in rs),
        }
    return out


def table(results: dict) -> list[list[str]]:
    """The published table: one row per (model, base), ours / theirs and the ratios."""
    head = ["model, base", "tokens", "step s llava-next", "transformers + PEFT", "time ratio", "tokens/s llava-next",
            "GFLOP/s (% of matmul)", "peak RSS GB llava-next", "transformers + PEFT", "memory ratio",
            "above loaded model GB (llava-next / theirs)", "step-1 loss (llava-next / theirs)"]
    rows = [head]
    for (model, base), r in results.items():
        o, t = r["ours"], r["theirs"]
        rows.append([f"{model}, {base}", str(r["tokens"]), f"{o['step']:.3g}", f"{t['step']:.3g}",
                     f"**{o['step'] / t['step']:.2f}**", f"{o['tok_s']:.0f}",
                     f"{o['gflops']:.0f} ({100 * o['gflops'] / r['limit']:.0f}%)", f"{o['peak']:.2f}",
                     f"{t['peak']:.2f}", f"**{o['peak'] / t['peak']:.2f}**", f"{o['above']:.2f} / {t['above']:.2f}",
                     f"{o['loss']:.4f} / {t['loss']:.4f}"])
    return rows


def profile_lines(profiles: dict) -> list[str]:
    lines = []
    for (model, base, provider), prof in profiles.items():
        lines += ["", f"**Profile, {model} {base}, {provider}** (one step, top ops by self CPU time)", "",
                  "| op | self ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{e['op']}` | {e['self_ms']:.1f} | {100 * e['share']:.1f}% | {e['calls']} |" for e in prof]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,7b", help="tiny, 7b or both (comma-separated)")
    p.add_argument("--bases", default="bf16,nf4", help="bf16, nf4 or both")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B shape")
    p.add_argument("--vision-layers", type=int, default=2, help="CLIP ViT-L/14-336 layers used (7b)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per child (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=2, help="children per provider and configuration")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny model, one repeat of 2 steps, no profile")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--provider", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    if args.quick:
        args.models, args.repeats, args.steps, args.no_profile = "tiny", 1, 2, True
    report, results, profiles = Report(), {}, {}
    for model in args.models.split(","):
        cfg, name = model_config(model, args.layers, args.vision_layers)
        make_checkpoints(cfg, name=name)  # once, before the children read it
        for base in args.bases.split(","):
            results[(model, base)] = measure(args, model, base, report, cfg)
            if not args.no_profile:
                for provider in ("ours", "theirs"):
                    profiles[(model, base, provider)] = run_child(args, model, base, provider, True)["profile"]
    write(args, report, results, profiles)


def write(args, report: Report, results: dict, profiles: dict) -> None:
    csv_path = append_csv("train.csv", FIELDS, report.rows)
    rows = table(results)
    with open(csv_path.parent / "train_table.csv", "w", newline="") as f:
        import csv
        csv.writer(f).writerows(rows)
    load = max(r[p]["load_avg"] for r in results.values() for p in ("ours", "theirs"))
    lines = [f"`python benchmarks/bench_train.py` — frames {args.frames}, LoRA r 16 on q/k/v/o/gate/up/down, "
             f"{args.repeats} children x {args.steps} timed steps per provider, {args.layers} decoder layers / "
             f"{args.vision_layers} vision layers (7b); {report.context['machine']}; {report.context['versions']}; "
             f"commit {report.context['commit']}; highest load average seen {load:.1f}", "",
             "|" + "|".join(rows[0]) + "|", "|" + "---|" * len(rows[0])]
    lines += ["|" + "|".join(r) + "|" for r in rows[1:]]
    lines += profile_lines(profiles)
    md = "\n".join(lines) + "\n"
    (csv_path.parent / "train.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
