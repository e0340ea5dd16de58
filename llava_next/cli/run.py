"""The commands that use weights: ``llava-next run`` (the main job) and ``llava-next convert``.

    llava-next run --video clip.mp4 --frames 16 "What happens in this video?"
    llava-next run --model llava-hf/llava-v1.6-mistral-7b-hf --image a.jpg --image b.jpg "Compare them."
    llava-next convert llava-hf/LLaVA-NeXT-Video-7B-hf ./video-7b --dtype bf16

``run`` streams the answer to stdout; what it decided (the token plan, a RoPE factor chosen by
``--rope-scale auto``) and the progress of long work (runtime/progress.py: loading, frames decoded, the
vision tower, prefill, tokens/s) go to stderr, so stdout is the answer alone; ``--quiet`` turns both off.
``--json`` prints one JSON object instead: ``tokens`` (generated ids), ``text``, ``timings``, ``plan`` and
``overflow``; errors are then JSON too.
Registered into the parser by ``llava_next.cli.main.build_parser``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_run(sub, *, user_error) -> None:
    from . import options

    p = sub.add_parser("run", help="answer a question about images and/or videos",
                       description="Answer PROMPT about the given images and/or videos with a LLaVA-NeXT checkpoint "
                                   "(a hub id, a llava-hf or original checkpoint directory, a converted one, or "
                                   "tiny-random). Takes the same model, media and token-plan options as inspect.")
    options.add_prompt_options(p, positional=True)
    options.add_model_options(p)
    options.add_media_options(p)
    options.add_plan_options(p)
    options.add_reduction_options(p)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="weights and activations (default bf16: AMX on recent CPUs, half the memory of fp32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    _add_quantize(p, "quantize the decoder's linear weights once (cached like a conversion); CPU only")
    p.add_argument("--activations", choices=("float", "int8"), default="float",
                   help="int8 / int4 models: activations stay float (default: weight-only numbers) or are "
                        "quantized to int8 per row: int8 prompts and decode steps, int4 decode steps, in integer "
                        "arithmetic (faster on CPUs with VNNI / AMX-INT8, less exact; llava_next/model/quant.py)")
    p.add_argument("--compile-step", choices=("auto", "on", "off"), default="auto",
                   help="CPU: decode with one compiled graph per step (auto: unquantized models and answers of 2048+ "
                        "tokens, where it was measured to repay its compile; see llava_next/model/policy.py)")
    p.add_argument("--cache-dir", default=None, help="where converted checkpoints are kept "
                                                     "(default $LLAVA_NEXT_CACHE or ~/.cache/llava-next)")
    options.add_output_options(p, what="one object (tokens, text, timings, plan)")
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
    _add_quantize(p, "store the decoder's linear weights quantized (SRC may then be a converted directory)")
    p.set_defaults(func=lambda args: _convert(args, user_error))


def _add_quantize(p, what: str) -> None:
    p.add_argument("--quantize", choices=("int8", "int4", "nf4"), default=None,
                   help=f"{what}: int8 per output channel, int4 in groups of --group-size input features, or nf4 "
                        f"(QLoRA's 4-bit NormalFloat, as bitsandbytes; the base for LoRA training, any device)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128, 256), default=None,
                   help="int4 group (default 128; only with --quantize int4)")


def _convert(args: argparse.Namespace, user_error) -> int:
    from pathlib import Path

    from llava_next_weights.convert import convert
    from llava_next_weights.hub import download

    from . import options

    quantize, group_size = options.quantization(args)
    src, dtype = Path(args.src), args.dtype
    if options.is_tiny(args.src) and not src.exists():  # a built-in model, written in the chosen format
        from ..runtime import tiny

        print(f"[llava-next] {tiny.notice(args.src)}", file=sys.stderr)
        src, dtype = tiny.ensure(name=args.src), dtype or "fp32"  # float32 weights: a copy unless told otherwise
    elif not src.exists():
        if "/" not in args.src:
            from ..config.presets import did_you_mean

            raise user_error(f"{args.src}: no such directory (and not a hub id of the form org/name, nor "
                             f"a built-in {' / '.join(options.TINY_MODELS)}){did_you_mean(args.src, extra=options.TINY_MODELS)}")
        src = download(args.src)
    out = convert(src, args.out, dtype=dtype, overwrite=args.overwrite, progress=True, quantize=quantize,
                  group_size=group_size)
    print(f"converted {args.src} -> {out}", file=sys.stderr)
    return 0


def random_weights_notice(model: str) -> str | None:
    """The notice that ``model``'s weights are random: a built-in model (tiny-random, -interleave, -onevision),
    or a directory holding a copy of one (``convert`` copies its tiny-random.json marker along with the weights,
    quantized or cast); else None."""
    import os
    from pathlib import Path

    from ..runtime.tiny import NAME, NAMES, notice

    if model in NAMES and not os.path.exists(model):
        return notice(model)
    marker = Path(model).expanduser() / "tiny-random.json"
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        info = {"random_weights": True}  # a damaged marker still marks random weights
    if not isinstance(info, dict) or info.get("random_weights") is False:
        return None
    name = info.get("name") if info.get("name") in NAMES else NAME
    return f"{model} holds {name}'s weights: {notice(name)}"


def _run(args: argparse.Namespace, user_error) -> int:
    from ..config import PRESETS

    reduction, (quantize, group_size) = _check_run(args, user_error)
    model_id = PRESETS[args.model].hub_id if args.model in PRESETS else args.model
    notice = random_weights_notice(args.model)
    if notice:  # said plainly, whatever the output mode: the answer is noise
        print(f"[llava-next] {notice}", file=sys.stderr)
    from .options import adapter_summary

    adapter = adapter_summary(args.adapter)  # a bad adapter fails before loading
    pipe, load_s = _load(args, model_id, quantize, group_size)
    request = prepare_request(pipe, args, reduction, user_error)
    _say_plan(args, request, reduction)
    text = _answer(args, pipe, request)
    timings = {"load_s": load_s, **request.timings}
    if args.json:
        from . import options
        from .plan import media_plan, overflow

        media = media_plan(list(zip(args.image, request.image_plans)), list(zip(request.videos, request.video_plans)),
                           pipe.model.config, args.rope_scale, options.sampling(args))
        result = {"tokens": request.tokens, "text": text, "timings": timings,
                  "plan": {**request.to_dict(), **media}, "overflow": overflow(request.plan)}
        if adapter is not None:
            result["adapter"] = adapter
        if notice:
            result["random_weights"], result["notice"] = True, notice
        options.print_json(result)
    else:
        sys.stdout.write("\n")
        if not args.quiet:
            print(f"[llava-next] {len(request.tokens)} tokens; first token {timings['first_token_s']:.2f} s, "
                  f"{timings['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return 0


def _check_run(args: argparse.Namespace, user_error):
    """The flags checked before any loading: the reduction they ask for (or None), (quantize, group size)."""
    from ..parallel.launch import dist_env, rank0_output
    from . import options

    options.finish(args, needs_prompt=True)
    rank0_output(dist_env())  # under torchrun, ranks > 0 print nothing (the answer, plan and progress come once)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise user_error("--device cuda: no CUDA device is available; use --device cpu")
    bad_sampling = options.check_sampling(args)
    if bad_sampling:
        raise user_error(bad_sampling)
    reduction = options.reduction(args)  # a bad method or value fails before any loading
    return reduction, options.quantization(args)


def _load(args: argparse.Namespace, model_id: str, quantize, group_size):
    """The pipeline (under torchrun: the decoder split over the ranks) with its progress lines, and the
    seconds loading took."""
    from ..parallel.tensor_parallel import load_pipeline
    from ..runtime.progress import Progress
    from . import options

    tiny = options.is_tiny(args.model)
    # stderr only, so --json's stdout stays one object; in text mode the streamed answer shows the decoding
    progress = Progress(enabled=not args.quiet, skip=() if args.json else ("decoding",))
    progress.say("loading", f"{model_id} ({args.dtype}, {args.device}){' (built on first use)' if tiny else ''}")
    t0 = time.perf_counter()
    pipe = load_pipeline(model_id, dtype=DTYPES[args.dtype], device=args.device, cache_dir=args.cache_dir,
                         progress=not args.quiet, quantize=quantize, group_size=group_size, adapter=args.adapter,
                         activations=args.activations)
    load_s = time.perf_counter() - t0
    progress.say("loading", f"done in {load_s:.2f} s")
    pipe.progress = progress
    return pipe, load_s


def _say_plan(args: argparse.Namespace, request, reduction) -> None:
    """The plan on stderr: an overflow warning always (only with --allow-overflow), the rest unless --json or
    --quiet."""
    from .plan import overflow_warning

    plan = request.plan
    if not plan.fits:  # only with --allow-overflow; said even with --json or --quiet
        print(f"[llava-next] {overflow_warning(plan)}", file=sys.stderr)
    if args.json or args.quiet:
        return
    print(f"[llava-next] {plan.summary()}", file=sys.stderr)
    for note in request.notes:
        print(f"[llava-next] note: {note}", file=sys.stderr)
    if reduction:
        r = request.reduction_summary()
        print(f"[llava-next] reduction {', '.join(r['methods'])}: {r['visual_tokens_unreduced']} visual tokens "
              f"unreduced -> {r['visual_tokens_into_decoder']} into the decoder", file=sys.stderr)
    if plan.factor_source == "auto" and plan.factor == plan.config_factor:  # else a note above says why
        print(f"[llava-next] --rope-scale auto: using linear RoPE factor {plan.factor:g}, the checkpoint's",
              file=sys.stderr)


def _answer(args: argparse.Namespace, pipe, request) -> str:
    """The answer, streamed to stdout as it comes (not with --json)."""
    from ..model.attention import use_backend
    from . import options

    pieces = []
    # tiny-random on CPU: plain SDPA decode attention (compiling the fast one costs more than the whole answer)
    with use_backend("sdpa") if options.is_tiny(args.model) and args.device == "cpu" else contextlib.nullcontext():
        for piece in pipe.stream(request, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed, template=args.template,
                                 compile_step={"auto": None, "on": True, "off": False}[args.compile_step]):
            pieces.append(piece)
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    return "".join(pieces)


def prepare_request(pipe, args: argparse.Namespace, reduction, user_error):
    """The request ``run`` and ``trace`` make from the same flags: the plan switches applied to the model's
    config, the video plan and the reduction checked against it before any decoding, then ``pipe.prepare``."""
    from ..runtime.pipeline import with_overrides
    from . import options

    pipe.model.config = with_overrides(pipe.model.config, **options.plan_overrides(args))
    if args.video:  # validates the pool stride / mode against the patch grid before any decoding
        from ..inputs.tokens import video_plan

        video_plan(options.frames(args), pipe.model.config)
    if reduction:
        from ..reduce import ReductionError

        try:
            reduction.check(pipe.model.config)
        except ReductionError as e:
            raise user_error(str(e)) from None
    request = pipe.prepare(args.prompt, images=args.image, videos=args.video, frames=options.frames(args),
                           sampling=options.sampling(args), template=args.template, rope_scale=args.rope_scale,
                           max_new_tokens=args.max_new_tokens, max_image_pixels=args.max_image_pixels,
                           allow_overflow=getattr(args, "allow_overflow", False), reduction=reduction,
                           scene=options.scene(args))
    # what the command chose or the reducer changed, said as notes (stderr, and the JSON plan's "notes")
    from .plan import growth_note, per_crop, rope_note

    notes = [rope_note(request.plan)]
    if reduction:
        r = request.reduction_summary()
        notes.append(growth_note(r["methods"], r["visual_tokens_unreduced"], r["visual_tokens_into_decoder"],
                                 per_crop(reduction, pipe.model.config)))
    request.notes.extend(n for n in notes if n)
    return request
