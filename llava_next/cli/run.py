"""The commands that use weights: ``llava-next run`` (the main job) and ``llava-next convert``.

    llava-next run --video clip.mp4 --frames 16 "What happens in this video?"
    llava-next run --model llava-hf/llava-v1.6-mistral-7b-hf --image a.jpg --image b.jpg "Compare them."
    llava-next convert llava-hf/LLaVA-NeXT-Video-7B-hf ./video-7b --dtype bf16

``run`` streams the answer to stdout; what it decided (the token plan, a RoPE factor chosen by
``--rope-scale auto``) goes to stderr, so stdout is the answer alone. ``--json`` prints one JSON object
instead: ``tokens`` (generated ids), ``text``, ``timings`` and ``plan``; errors are then JSON too.
Registered into the parser by ``llava_next.cli.main.build_parser``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

DEFAULT_MODEL = "llava-hf/LLaVA-NeXT-Video-7B-hf"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_run(sub, *, positive, rope_scale, user_error, max_image_pixels) -> None:
    from ..inputs.prompt import TEMPLATES

    p = sub.add_parser("run", help="answer a question about images and/or a video",
                       description="Answer PROMPT about the given images and/or video with a LLaVA-NeXT checkpoint "
                                   "(a hub id, a llava-hf or original checkpoint directory, or a converted one).")
    p.add_argument("prompt", metavar="PROMPT", help="the question (with --template none: the exact prompt text)")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="ID_OR_DIR", help=f"default: {DEFAULT_MODEL}")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeat for several)")
    p.add_argument("--video", metavar="FILE", help="a video file")
    p.add_argument("--frames", type=positive, default=8, help="frames sampled uniformly from the video (default 8)")
    p.add_argument("--pool-stride", type=positive, default=None, help="video spatial pool stride (checkpoint: 2)")
    p.add_argument("--rope-scale", type=rope_scale, default="config", metavar="config|auto|F",
                   help="linear RoPE factor: the checkpoint's (config), the smallest that fits (auto), or F")
    p.add_argument("--max-new-tokens", type=positive, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="weights and activations (default bf16: AMX on recent CPUs, half the memory of fp32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--template", choices=[*TEMPLATES, "none"], default=None,
                   help="chat template (default: the checkpoint's); 'none' sends PROMPT exactly as given")
    p.add_argument("--cache-dir", default=None, help="where converted checkpoints are kept "
                                                     "(default $LLAVA_NEXT_CACHE or ~/.cache/llava-next)")
    max_image_pixels(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (tokens, text, timings, plan)")
    p.set_defaults(func=lambda args: _run(args, user_error))


def add_convert(sub, *, user_error) -> None:
    p = sub.add_parser("convert", help="convert a llava-hf or original checkpoint into llava-next's layout",
                       description="Convert SRC (a directory or hub id; llava-hf or original LLaVA-NeXT format) into "
                                   "llava-next's safetensors layout at OUT. Strict: an unknown, missing or mis-shaped "
                                   "key is an error. Atomic: OUT appears only when complete.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=lambda args: _convert(args, user_error))


def _convert(args: argparse.Namespace, user_error) -> int:
    from pathlib import Path

    from llava_next_weights.convert import convert
    from llava_next_weights.hub import download

    src = Path(args.src)
    if not src.exists():
        if "/" not in args.src:
            raise user_error(f"{args.src}: no such directory (and not a hub id of the form org/name)")
        src = download(args.src)
    out = convert(src, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=True)
    print(f"converted {args.src} -> {out}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace, user_error) -> int:
    from ..runtime.pipeline import Pipeline
    from ..model.pooling import pooled_grid_hw

    if args.device == "cuda" and not torch.cuda.is_available():
        raise user_error("--device cuda: no CUDA device is available; use --device cpu")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise user_error(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature}, {args.top_p}")
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device,
                                    cache_dir=args.cache_dir, progress=not args.json)
    load_s = time.perf_counter() - t0
    if args.pool_stride is not None:
        cfg = pipe.model.config
        grid = (cfg.vision.grid_size, cfg.vision.grid_size)
        pooled_grid_hw(grid, args.pool_stride, cfg.spatial_pool_mode)  # validates the stride
        pipe.model.config = dataclasses.replace(cfg, spatial_pool_stride=args.pool_stride)
    request = pipe.prepare(args.prompt, images=args.image, video=args.video, frames=args.frames,
                           template=args.template, rope_scale=args.rope_scale, max_new_tokens=args.max_new_tokens,
                           max_image_pixels=args.max_image_pixels)
    plan = request.plan
    if not args.json:
        print(f"[llava-next] {plan.summary()}", file=sys.stderr)
        for note in request.notes:
            print(f"[llava-next] note: {note}", file=sys.stderr)
        if plan.factor_source == "auto":
            print(f"[llava-next] --rope-scale auto: using linear RoPE factor {plan.factor:g} "
                  f"(the checkpoint's is {plan.config_factor:g})", file=sys.stderr)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed, template=args.template)
    pieces = []
    for piece in pipe.stream(request, **options):
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    timings = {"load_s": load_s, **request.timings}
    if args.json:
        print(json.dumps({"tokens": request.tokens, "text": "".join(pieces), "timings": timings,
                          "plan": request.to_dict()}))
    else:
        sys.stdout.write("\n")
        print(f"[llava-next] {len(request.tokens)} tokens; first token {timings['first_token_s']:.2f} s, "
              f"{timings['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return 0
