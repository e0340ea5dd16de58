"""CPU benchmark: llava-next vs transformers on the same weights and inputs, beside the machine's limits.

    python benchmarks/bench_cpu.py                      # fp32 and bf16, 2 decoder layers, 3 repeats
    python benchmarks/bench_cpu.py --dtype bf16 --quick # one repeat, short decode, no subprocess runs

Model: LLaVA-NeXT-Video-7B shapes with random weights (benchmarks/cpu_models.py): the full CLIP
ViT-L/14-336 tower, the projector, and ``--layers`` decoder layers of the 7B shape with the real
vocabulary. transformers' LlavaNextVideoForConditionalGeneration loads the llava-hf checkpoint with
``from_pretrained``; llava-next loads the same weights converted by its own converter.

Stages (ours / transformers, same dtype, same inputs; each a ratio, < 1 = llava-next faster):
- vision: 8 frames (8, 3, 336, 336) -> features. transformers runs its tower with hidden states and
  takes layer -2 (what get_video_features does); llava-next builds only the layers it reads.
- pool + projector: (8, 576, 1024) -> (1152, 4096).
- prefill / decode: one ``generate`` of 65 tokens over the same ~1,200 prompt embeddings
  (8 x 144 video tokens + text): prefill = start -> first logits, decode = the next 64 tokens. Each
  provider first runs one short warm-up generate (where llava-next compiles its one-query decode attention,
  it does so there, once per process; a bf16 cache on a CPU with AVX-512 is read by the C loop instead:
  llava_next/model/engines.py).
  transformers: ``model.generate(inputs_embeds=...)`` (greedy, its default dynamic cache, lm_head on
  the last position: generate sets logits_to_keep=1); llava-next: ``generate.stream``.
- video -> first token: from the .mp4 file, each provider's documented path (cpu_models.py):
  decode + preprocess 8 frames, encode, prefill, first token (one repeat fewer than the others).
- load (fresh subprocesses, two per provider and dtype in the order ours, theirs, theirs, ours, the
  faster of each reported; the files are read just before, so both load from the page cache): time and peak RSS of loading the bf16 safetensors checkpoint (fp32: cast
  while loading), RSS above the process's own baseline after
  imports, against the checkpoint's bytes; llava-next's load includes its CPU prepack (bf16), also shown on its own row.
  In bf16 the same process then runs one video -> first token and reports its peak RSS.

Machine limits (measured here): plain ``F.linear`` throughput at the prefill and vision GEMM shapes (with the
model's own weight matrices), in the dtype the model sums them in (a bf16 model's in fp32 on a CPU without bf16
arithmetic: cpu_limits.prompt_sum_dtype), and memory-read bandwidth (``sum`` over 512 MB).
Prefill and vision are reported as GFLOP/s against the matmul figure; decode as bytes read per token
(weights + KV cache) x tokens/s against the read bandwidth.

Timing: every heavy stage alternates providers (ours, theirs, then theirs, ours, ...) so slow spells
of a shared machine hit both; p50/p20/p80 are over the repeats. Results are appended to
benchmarks/results/cpu.csv (one row per measurement) and the Markdown table is written to
benchmarks/results/cpu.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from cpu_models import (FRAMES, bench_config, bench_video, checkpoint_bytes, describe, declare_torchvision_ops,
                        load_hf, load_ours, make_checkpoints, prompt_ids)
from cpu_limits import (MatmulProbe, ReadProbe, decode_bytes, decoder_layer_weights, prefill_flops, prompt_sum_dtype,
                        vision_flops, vision_layer_weights)
from cpu_report import Report

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- timing --------------------------------------------------------------------------------------
def alternate(fns: dict, repeats: int) -> dict[str, list[tuple[float, object]]]:
    """Run each provider ``repeats`` times, alternating the order: {name: [(seconds, output), ...]}."""
    runs: dict[str, list[tuple[float, object]]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            out = fns[name]()
            runs[name].append((time.perf_counter() - t, out))
    return runs


def small(fns: dict, min_time: float = 2.0) -> dict[str, list[float]]:
    """Seconds per call of fast functions: one warm-up each, then rounds of one call each (alternating
    the order) until ``min_time`` has passed."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names, start, r = list(fns), time.perf_counter(), 0
    while time.perf_counter() - start < min_time or r < 5:
        for name in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
        r += 1
    return times


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---- the two providers' stage functions ----------------------------------------------------------
class Ours:
    def __init__(self, model):
        from llava_next.model.pooling import add_video_newlines, pool_and_project, pooled_grid_hw
        self.model, self.cfg = model, model.config
        c = self.cfg
        grid = (c.vision.grid_size, c.vision.grid_size)
        pooled = pooled_grid_hw(grid, c.spatial_pool_stride, c.spatial_pool_mode)
        self.pool_project = lambda f: add_video_newlines(
            pool_and_project(f, model.projector, grid, c.spatial_pool_stride, c.spatial_pool_mode, c.pool_position),
            pooled, model.image_newline, c.video_newline)

    @torch.no_grad()
    def vision(self, pixels):
        return self.model.vision_tower(pixels)

    def generate(self, embeds, n: int) -> list[float]:
        """Timestamps: start, then one per new token."""
        from llava_next.model.generate import stream
        stamps = [time.perf_counter()]
        for _ in stream(self.model.language_model, input_embeds=embeds, max_new_tokens=n, eos_token_id=()):
            stamps.append(time.perf_counter())
        return stamps

    @torch.no_grad()
    def prefill_logits(self, embeds):
        from llava_next.model.engines import EagerEngine
        dec = self.model.language_model
        dec.setup_caches(1, embeds.shape[1])
        return EagerEngine().prefill(dec, embeds, torch.arange(embeds.shape[1]).expand(1, -1), None).float()

    def video_first_token(self, path, ids):
        from llava_next.model.generate import generate
        from llava_next.inputs.video import load_video
        clip = load_video(path, FRAMES, size=self.cfg.tile_size)
        embeds = self.model.embed(ids, video_features=[self.model.video_features(clip.pixel_values)])
        return generate(self.model.language_model, input_embeds=embeds, max_new_tokens=1, eos_token_id=())


class Theirs:
    def __init__(self, model):
        self.model = model
        self.processor = None
        m = model.model
        self.pool_project = lambda f: m.multi_modal_projector(m.vision_resampler(f)).flatten(0, 1)

    def layer(self, kind: str):
        """Layer 0 of the vision tower or the decoder (plain nn.Linear weights, for the matmul probes)."""
        suffix = "encoder.layers.0" if kind == "vision" else "language_model.layers.0"
        return next(m for n, m in self.model.named_modules() if n.endswith(suffix))

    @torch.no_grad()
    def vision(self, pixels):
        out = self.model.model.vision_tower(pixels, output_hidden_states=True)
        return out.hidden_states[self.model.config.vision_feature_layer][:, 1:]  # as get_video_features

    @torch.no_grad()
    def generate(self, embeds, n: int) -> list[float]:
        from transformers import LogitsProcessor

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        stamps = [time.perf_counter()]
        self.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                            max_new_tokens=n, min_new_tokens=n, do_sample=False, logits_processor=[Stamp()],
                            pad_token_id=0)
        return stamps

    @torch.no_grad()
    def prefill_logits(self, embeds):
        return self.model(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1].float()

    @torch.no_grad()
    def video_first_token(self, path, ids):
        from cpu_models import hf_read_video_pyav, hf_video_processor
        if self.processor is None:
            self.processor = hf_video_processor()
        clip = hf_read_video_pyav(path, FRAMES)
        pixels = self.processor(videos=clip, return_tensors="pt")["pixel_values_videos"]
        return self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   pixel_values_videos=pixels.to(self.model.dtype), max_new_tokens=1,
                                   do_sample=False, pad_token_id=0)[:, -1]


# ---- one dtype -----------------------------------------------------------------------------------
def run_dtype(name: str, args, report: Report, dirs: tuple[Path, Path], video: Path, refs: dict) -> None:
    dtype, (hf_dir, ours_dir) = DTYPES[name], dirs
    cfg = bench_config(args.layers)
    t = time.perf_counter()
    providers = {"ours": Ours(load_ours(ours_dir, dtype)), "transformers": Theirs(load_hf(hf_dir, dtype))}
    ours, theirs = providers["ours"], providers["transformers"]
    print(f"[{name}] both models loaded in {time.perf_counter() - t:.1f} s", flush=True)
    ids = prompt_ids(cfg)
    with torch.no_grad():
        from llava_next.inputs.video import load_video
        pixels = load_video(video, FRAMES, size=cfg.tile_size).pixel_values.to(dtype)  # (8, 3, 336, 336)

        # vision: 8 frames -> (8, 576, 1024); the matmul probe runs 2 layers' GEMMs at the same shapes
        stage = "vision (8 frames)"
        probe = MatmulProbe(vision_layer_weights(theirs.layer("vision")), FRAMES * (cfg.vision.num_patches + 1), 2,
                            dtype=prompt_sum_dtype(dtype))
        fns = {k: (lambda p=p: p.vision(pixels)) for k, p in providers.items()}
        runs = alternate(fns | {"matmul": probe}, args.repeats)
        flops = vision_flops(cfg, FRAMES)
        for k in providers:
            report.add(stage, k, name, [s for s, _ in runs[k]], "s")
            report.add(stage, k, name, [flops / s / 1e9 for s, _ in runs[k]], "GFLOP/s")
            refs[("vision", name, k)] = runs[k][-1][1].float()
        rates = [probe.flops / s / 1e9 for s, _ in runs["matmul"]]
        report.add("matmul (vision shapes)", "torch", name, rates, "GFLOP/s")
        feats = runs["ours"][-1][1].contiguous()
        del probe

        # pool + projector: (8, 576, 1024) -> (1152, 4096)
        for k, t in small({k: (lambda p=p: p.pool_project(feats)) for k, p in providers.items()}).items():
            report.add("pool + projector", k, name, [1e3 * s for s in t], "ms")
        embeds = ours.model.embed(ids, video_features=[ours.pool_project(feats)])  # (1, T, 4096)
        T = embeds.shape[1]

        # prefill + decode: one generate of n tokens; prefill = start -> first token, decode = the rest.
        # Probes: one decoder layer's GEMMs at T tokens; reading 5 x 512 MB.
        n = args.decode_tokens + 1
        mm = MatmulProbe(decoder_layer_weights(theirs.layer("decoder")), T, dtype=prompt_sum_dtype(dtype))
        read = ReadProbe()
        fns = {k: (lambda p=p: p.generate(embeds, n)) for k, p in providers.items()}
        for p in providers.values():  # warm-up: llava-next compiles its CPU decode kernels on first use
            p.generate(embeds[:, :32], 3)
        runs = alternate(fns | {"matmul": mm, "memory read": read}, args.repeats)
        pf, kv_mean = prefill_flops(cfg, T), T + n / 2
        per_token = decode_bytes(cfg, kv_mean, torch.finfo(dtype).bits // 8)
        for k in providers:
            prefill_s = [st[1] - st[0] for _, st in runs[k]]
            tok_s = [(n - 1) / (st[-1] - st[1]) for _, st in runs[k]]
            report.add("prefill", k, name, prefill_s, "s")
            report.add("prefill", k, name, [pf / s / 1e9 for s in prefill_s], "GFLOP/s")
            report.add("decode", k, name, tok_s, "tokens/s")
            report.add("decode", k, name, [per_token * x / 1e9 for x in tok_s], "GB/s")
        report.add("matmul", "torch", name, [mm.flops / s / 1e9 for s, _ in runs["matmul"]], "GFLOP/s")
        report.add("memory read", "torch", name, [read.bytes / s / 1e9 for s, _ in runs["memory read"]], "GB/s")
        del mm, read
        for k, p in providers.items():  # parity of the last-position logits on identical embeddings
            refs[("logits", name, k)] = p.prefill_logits(embeds)

        # video file -> first token, each provider's own input path
        # (one repeat fewer: this stage is vision + prefill again, timed through each provider's own path)
        runs = alternate({k: (lambda p=p: p.video_first_token(video, ids)) for k, p in providers.items()},
                         max(1, args.repeats - 1))
        for k, r in runs.items():
            report.add("video -> first token", k, name, [s for s, _ in r], "s")
        print(f"[{name}] prompt {T} tokens; first token ours {runs['ours'][-1][1].tolist()} "
              f"transformers {runs['transformers'][-1][1].tolist()}", flush=True)
    del providers, ours
    gc.collect()


def parity(report: Report, refs: dict) -> None:
    """bf16 error of each provider against transformers fp32, on the same inputs (vision, logits)."""
    for what in ("vision", "logits"):
        ref = refs.get((what, "fp32", "transformers"))
        if ref is None:
            return
        for d, p in (("bf16", "ours"), ("bf16", "transformers"), ("fp32", "ours")):
            out = refs.get((what, d, p))
            if out is not None:
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                report.add(f"{d} {what} error", p, d, err, "rel")


# ---- load in a fresh process ---------------------------------------------------------------------
def child(args) -> None:
    """Load the checkpoint in this fresh process (then, with --child-run, one video -> first token); print JSON."""
    dtype = DTYPES[args.dtype]
    cfg = bench_config(args.layers)
    video = bench_video()
    if args.child == "transformers":
        declare_torchvision_ops()
        from cpu_models import hf_video_processor
        hf_video_processor()  # import everything it needs before the baseline
    else:
        import llava_next.model.generate, llava_next.inputs.video, llava_next_weights.load  # noqa: E401,F401
    base = rss_bytes()
    t = time.perf_counter()
    path = Path(args.path)
    model = load_ours(path, dtype, pack=False) if args.child == "ours" else load_hf(path, dtype)
    load_s, t = time.perf_counter() - t, time.perf_counter()
    packed = args.child == "ours" and model.pack_for_cpu()
    pack_s = time.perf_counter() - t
    load_rss = rss_bytes() - base
    result = {"load_s": load_s, "pack_s": pack_s if packed else None, "load_rss": load_rss, "base_rss": base}
    if args.child_run:
        provider = Ours(model) if args.child == "ours" else Theirs(model)
        t = time.perf_counter()
        provider.video_first_token(video, prompt_ids(cfg))
        result.update(run_s=time.perf_counter() - t, peak_rss=rss_bytes())
    print(json.dumps(result))


def read_files(path: Path) -> None:
    for f in sorted(path.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def load_stage(args, report: Report, name: str, dirs: tuple[Path, Path]) -> None:
    """Each provider loads twice, in the order ours, theirs, theirs, ours; the faster run of each is
    reported. (Fresh memory costs the first process that touches it on a VM more than the next one: one
    run each in a fixed order favours whoever goes second, by up to 2x on this machine.)"""
    hf_dir, ours_dir = dirs
    paths = {"ours": ours_dir, "transformers": hf_dir}
    best: dict[str, dict] = {}
    for provider in ("ours", "transformers", "transformers", "ours"):
        read_files(paths[provider])  # both load from the page cache, whatever ran before
        cmd = [sys.executable, __file__, "--child", provider, "--dtype", name, "--path", str(paths[provider]),
               "--layers", str(args.layers), "--threads", str(args.threads)]
        if name == "bf16":  # the fp32 rows only load (a cast from the bf16 files): the run costs minutes
            cmd.append("--child-run")
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
        if out.returncode:
            raise RuntimeError(f"load child ({provider}, {name}) failed:\n{out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if provider not in best or res["load_s"] < best[provider]["load_s"]:
            best[provider] = res
    for provider, res in best.items():
        # what a process pays before its first prompt: llava-next's load row includes the CPU prepack
        report.add("load", provider, name, res["load_s"] + (res["pack_s"] or 0.0), "s")
        if res["pack_s"] is not None:
            report.add("prepack for CPU (part of load)", provider, name, res["pack_s"], "s")
        report.add("load peak RSS", provider, name, res["load_rss"] / 1e9, "GB")
        if "run_s" in res:
            report.add("first video -> first token after load", provider, name, res["run_s"], "s")
            report.add("peak RSS, video -> first token", provider, name, res["peak_rss"] / 1e9, "GB")


def main_run(args) -> None:
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    cfg = bench_config(args.layers)
    print(f"model: {describe(cfg)}", flush=True)
    dirs = make_checkpoints(cfg)
    video = bench_video()
    report = Report()
    report.add("checkpoint", "files", "bf16", checkpoint_bytes(dirs[1]) / 1e9, "GB")
    if not args.quick:
        for d in dtypes:
            load_stage(args, report, d, dirs)
    refs: dict = {}
    for d in dtypes:
        run_dtype(d, args, report, dirs, video, refs)
    parity(report, refs)
    csv_path = report.save_csv()
    flags = ("" if args.dtype == "both" else f" --dtype {args.dtype}")
    header = (f"CPU benchmark: `python benchmarks/bench_cpu.py{flags}"
              f"{'' if args.layers == 2 else f' --layers {args.layers}'}` — LLaVA-NeXT-Video-7B shapes, "
              f"{args.layers} decoder layers, random weights, 8-frame video, {args.repeats} repeats")
    md = report.markdown(dtypes, header)
    (csv_path.parent / "cpu.md").write_text(md)
    print("\n" + md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B shape (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="1 repeat, 16 decode tokens, no load subprocesses")
    parser.add_argument("--child", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--child-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    if args.quick:
        args.repeats, args.decode_tokens = 1, 16
    main_run(args)


if __name__ == "__main__":
    main()
