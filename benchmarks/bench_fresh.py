"""What a user feels: process start -> first token, and -> 64 tokens, in fresh processes.

    python benchmarks/bench_fresh.py                 # 2 repeats, alternating
    python benchmarks/bench_fresh.py --repeats 1

`llava-next run` (the CLI as a user types it, default settings, then variants) against a plain
transformers script (from_pretrained, PyAV, its video processor, generate), both on the benchmark's
LLaVA-NeXT-Video-7B-shaped checkpoint (2 decoder layers of the 7B shape, random weights, bf16;
benchmarks/cpu_models.py) with a tokenizer written beside it, 8 frames of bigbuckbunny.mp4. Each row
is the wall time of a whole process asked for 1 token (-> first token) or 64 tokens, providers
alternating run by run, the page cache warm (files read before each run). Variants of ours:
``LLAVA_NEXT_COMPILE=1`` (the decode attention compiled whatever the answer length: the default before
its cost-based policy) and ``LLAVA_NEXT_COMPILE=step`` (the whole-step compiled decode forced).
Results: benchmarks/results/fresh.csv and fresh.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import append_csv
from cpu_models import FRAMES, bench_config, bench_video, declare_torchvision_ops, make_checkpoints
from cpu_report import FIELDS, Report

PROMPT = "What happens in this video?"

THEIRS = r'''
import sys, time
t0 = time.perf_counter()
import torch
sys.path.insert(0, {bench!r})
from cpu_models import declare_torchvision_ops, hf_read_video_pyav, hf_video_processor, prompt_ids, bench_config
declare_torchvision_ops()
from transformers import LlavaNextVideoForConditionalGeneration
model = LlavaNextVideoForConditionalGeneration.from_pretrained({path!r}, dtype=torch.bfloat16).eval()
clip = hf_read_video_pyav({video!r}, {frames})
pixels = hf_video_processor()(videos=clip, return_tensors="pt")["pixel_values_videos"].to(torch.bfloat16)
ids = prompt_ids(bench_config({layers}))
out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels,
                     max_new_tokens={n}, min_new_tokens={n}, do_sample=False, pad_token_id=0)
print(out.shape[1] - ids.shape[1], time.perf_counter() - t0)
'''


def with_tokenizer(src: Path, dst: Path, config) -> Path:
    """``dst``: symlinks to ``src``'s files plus a tokenizer.json for ``config``'s vocabulary."""
    if (dst / "tokenizer.json").is_file():
        return dst
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tokenizers_fixture import make_hf_tokenizer
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    make_hf_tokenizer(dst, config, vocab_size=config.text.vocab_size)
    return dst


def generated(name: str, stdout: str) -> int:
    """How many tokens a run generated: ``run --json``'s token list, or the count the transformers script prints."""
    if name == "transformers script":
        return int(stdout.split()[0])
    return len(json.loads(stdout)["tokens"])


def read_files(path: Path) -> None:
    for f in sorted(path.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    args = p.parse_args()
    declare_torchvision_ops()
    cfg = bench_config(args.layers)
    hf_dir, ours_dir = make_checkpoints(cfg)
    ours = with_tokenizer(ours_dir, ours_dir.parent / "run-llava-next", cfg)
    video = bench_video()
    llava_next = str(Path(sys.executable).parent / "llava-next")
    base = dict(os.environ, HF_HUB_OFFLINE="1", LLAVA_NEXT_CACHE=str(ours_dir.parent / "run-cache"))
    variants = {"llava-next run (defaults)": {},
                "llava-next run, LLAVA_NEXT_COMPILE=1": {"LLAVA_NEXT_COMPILE": "1"},
                "llava-next run, LLAVA_NEXT_COMPILE=step": {"LLAVA_NEXT_COMPILE": "step"}}
    report = Report()
    for n in args.tokens:
        cmds = {name: ([llava_next, "run", "--model", str(ours), "--video", str(video), "--frames", str(FRAMES),
                        "--max-new-tokens", str(n), "--template", "none", "--json", f"USER: <video>\n{PROMPT} ASSISTANT:"],
                       dict(base, **env), ours) for name, env in variants.items()}
        script = THEIRS.format(bench=str(Path(__file__).parent), path=str(hf_dir), video=str(video), frames=FRAMES,
                               layers=args.layers, n=n)
        cmds["transformers script"] = ([sys.executable, "-c", script], base, hf_dir)
        times: dict[str, list[float]] = {k: [] for k in cmds}
        names = list(cmds)
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                cmd, env, files = cmds[name]
                read_files(files)
                t = time.perf_counter()
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parent)
                wall = time.perf_counter() - t
                if out.returncode:
                    print(f"{name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                made = generated(name, out.stdout)
                if made != n:  # a row must time the tokens it names (ours stops at an end-of-sequence token)
                    print(f"{name} generated {made} tokens, not {n}: run left out", file=sys.stderr)
                    continue
                times[name].append(wall)
        for name, t in times.items():
            if t:
                report.add(f"process start -> {'first token' if n == 1 else f'{n} tokens'}", name, "bf16", t, "s")
    csv = append_csv("fresh.csv", FIELDS, report.rows)
    lines = [f"`python benchmarks/bench_fresh.py` — {args.layers} decoder layers of the 7B shape, bf16, 8 frames, "
             f"{args.repeats} repeats; {report.context['machine']}; commit {report.context['commit']}", "",
             "| row | provider | wall p50 | p20 | p80 |", "|---|---|---|---|---|"]
    for r in report.rows:
        lines.append(f"| {r['stage']} | {r['provider']} | {r['value']:.2f} s | "
                     f"{r['p20'] if r['p20'] == '' else format(r['p20'], '.2f')} | "
                     f"{r['p80'] if r['p80'] == '' else format(r['p80'], '.2f')} |")
    md = "\n".join(lines) + "\n"
    (csv.parent / "fresh.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
