"""Command line: ``llava-next COMMAND ...`` (also ``python -m llava_next.cli.main``).

Commands
- ``run`` / ``convert`` (run.py): answer a question with a checkpoint; convert a checkpoint.
- ``trace`` (trace.py): token provenance, exact attention and logit lens of one request (JSON, PNG).
- ``batch`` (batch.py): answer every request of a JSONL file into a JSONL file, resumably.
- ``score`` / ``eval`` (eval.py): log-probabilities of candidate answers; a benchmark task (YAML) into
  per-sample JSONL and a summary, resumably.
- ``inspect``: the token plan of images and/or videos, without weights — AnyRes canvas, tiles, unpadded
  features and newlines per image; sampled frames, timestamps and pooled tokens per frame for a video;
  and whether the prompt fits the RoPE context with which factor. ``--json`` for scripts, ``--png`` for
  a picture of the plan. ``inspect --train-memory GIB``: instead, the memory a LoRA fine-tuning step needs
  (llava_next/train/memory.py) and the most frames that fit a device of GIB GiB.

Adding a command: write ``_add_NAME(subparsers)`` that builds its parser and calls
``parser.set_defaults(func=_NAME)``, where ``_NAME(args) -> int`` returns the exit code, and call it
from ``build_parser``. Take the shared option groups from options.py (``--model``, ``--image``/``--video``,
every token-plan switch, ``--json``/``--quiet``), so a flag means the same in every command. Raise
``UserError`` for anything the user can fix (bad file, bad option): ``main``
prints it as one line and exits with status 2, argparse's own code for usage errors.

Exit status (docs/errors.md has every message): 0 success; 2 a user error — bad option (argparse),
file, checkpoint, prompt, context, memory or dtype problem, one line on stderr; 3 an internal error
(a bug in llava-next: traceback, then a line asking to report it); 130 interrupted (Ctrl-C, from the first
moment: ``main`` wraps the heavy imports too); 141 stdout was closed by its reader (``| head``), quietly. With
``--json`` every error, usage errors included, is one JSON object on stdout:
``{"error": message, "kind": "user" | "internal" | "interrupted", "type": exception class}``
(internal errors add ``"traceback"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from typing import Sequence

from ..config import PRESETS, LlavaNextConfig
from . import options
from .options import UserError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


# --------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------
def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show the token plan of images and/or videos (no weights needed)",
                       description="Show how many tokens images and videos become and whether they fit the "
                                   "model's RoPE context. Sizes are printed as height x width. Takes the same "
                                   "model, media and token-plan options as run.")
    options.add_model_options(p)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, metavar="NAME",
                   help=f"a model preset (the same as --model NAME); one of: {', '.join(sorted(PRESETS))}")
    options.add_media_options(p)
    options.add_plan_options(p)
    options.add_reduction_options(p)
    options.add_prompt_options(p, positional=False, max_new_tokens=None)
    p.add_argument("--text-tokens", type=int, default=None,
                   help="positions to reserve for the prompt text when no --prompt is given (default 100); the "
                        "answer's --max-new-tokens (default 256, as run) are counted on top")
    options.add_output_options(p, what="the plan", quiet=False)  # inspect writes nothing to stderr
    p.add_argument("--png", metavar="OUT", help="draw the plan into a PNG file (images, or one video)")
    g = p.add_argument_group("training memory (docs/training.md, 'Memory: what fits')")
    g.add_argument("--train-memory", type=_memory_gib, default=None, metavar="GIB",
                   help="plan a LoRA fine-tuning step for a device of GIB GiB instead of media: the most video frames "
                        "per item that fit with a bf16, int8 or nf4 base, with and without gradient checkpointing, "
                        "and the breakdown at --frames (default 8) and --text-tokens (default 128)")
    g.add_argument("--lora-rank", type=options.positive, default=None,
                   help="with --train-memory: the LoRA rank on the decoder's q/k/v/o/gate/up/down (default 16)")
    p.set_defaults(func=_inspect, _parser=p)


def _memory_gib(value: str) -> float:
    try:
        gib = float(value)
    except ValueError:
        gib = float("nan")
    if not 0 < gib < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a memory size in GiB (e.g. 24), got {value!r}")
    return gib


def _inspect(args: argparse.Namespace) -> int:
    if args.train_memory is not None:
        return _inspect_training(args)
    if args.lora_rank is not None:
        raise UserError("--lora-rank: the rank of a planned training step; add --train-memory GIB")
    if not args.image and not args.video:
        args._parser.error("give at least one --image or --video")
    options.finish(args)
    model, config, preset = _inspected_config(args)
    if args.text_tokens is not None and args.text_tokens < 0:
        raise UserError(f"--text-tokens must be >= 0, got {args.text_tokens}")
    if args.text_tokens is not None and args.prompt is not None:
        raise UserError("--text-tokens and --prompt: give one (with --prompt the text is counted exactly)")
    if args.template is not None and args.prompt is None:  # no switch is accepted and ignored
        raise UserError(f"--template {args.template}: inspect renders a template only around --prompt TEXT "
                        f"(without it the text is --text-tokens positions); add --prompt")
    if args.allow_overflow:
        raise UserError("--allow-overflow: inspect never refuses a prompt that does not fit, it reports it "
                        "(\"fits\": false and the fixes); the switch is for run, trace and batch")
    if args.png and (args.image and args.video or len(args.video) > 1):
        raise UserError("--png draws the plan of images or of one video; give only those")
    adapter = options.adapter_summary(args.adapter)  # read and checked; the plan's token counts do not change
    report, draw = _inspect_media(args, config, model, preset)
    if adapter is not None:
        report["adapter"] = adapter
    if args.png:
        from ..research.plots import PNG_LEVEL

        try:
            draw().save(args.png, format="PNG", compress_level=PNG_LEVEL)
        except OSError as e:
            raise UserError(f"{args.png}: cannot write the PNG ({e.strerror or e})") from None
    if args.json:
        options.print_json(report, indent=2)
    else:
        print(_format(report))
        if args.png:
            print(f"plan drawn to {args.png}")
    return 0


def _inspected_config(args: argparse.Namespace):
    """(model name, its config with the plan switches applied, its preset) for ``inspect``."""
    from ..runtime.pipeline import with_overrides

    if args.preset is not None and args.model != options.DEFAULT_MODEL:
        raise UserError(f"--preset {args.preset} and --model {args.model}: give one")
    model = args.preset or args.model
    config, preset = options.model_config(model)
    try:
        return model, with_overrides(config, **options.plan_overrides(args)), preset
    except ValueError as e:
        raise UserError(str(e)) from None


_NOT_FOR_TRAINING = ("image", "video", "prompt", "prompt_option", "png", "adapter", "select_frames", "reduce",
                     "template", "max_new_tokens", "sampling", "scene_threshold", "scene_min_len", "max_image_pixels",
                     "allow_overflow")


def _inspect_training(args: argparse.Namespace) -> int:
    """``inspect --train-memory GIB``: the training memory planner (llava_next/train/memory.py) for one device."""
    from ..train.memory import (TEXT_TOKENS, TrainSetting, context_frames, format_plan, largest_frames,
                                training_memory)

    given = [f"--{n.replace('_option', '').replace('_', '-')}" for n in _NOT_FOR_TRAINING if getattr(args, n, None)]
    given += ["--rope-scale"] * (args.rope_scale != "config")
    if given:
        raise UserError(f"{', '.join(given)}: --train-memory plans a training step from the model's config alone "
                        f"(--frames, --text-tokens, --lora-rank and the pooling switches set it); drop them")
    model, config, preset = _inspected_config(args)
    text = TEXT_TOKENS if args.text_tokens is None else args.text_tokens
    if text < 0:
        raise UserError(f"--text-tokens must be >= 0, got {text}")
    base = TrainSetting(frames=args.frames or 8, text_tokens=text, lora_rank=args.lora_rank or 16)
    if base.frames > context_frames(config, base):
        raise UserError(f"--frames {base.frames}: {model}'s context holds at most "
                        f"{context_frames(config, base)} frames beside {text} text tokens")
    memory = int(args.train_memory * 2**30)
    settings = [dataclasses.replace(base, quantize=q, checkpointing=c)
                for q in (None, "int8", "nf4") for c in (False, True)]
    plans = [training_memory(config, s) for s in settings]
    most = [largest_frames(config, memory, s) for s in settings]
    report = {"model": model, "preset": preset, "memory_gib": args.train_memory, "frames": base.frames,
              "tokens": plans[0].tokens, "text_tokens": text, "lora_rank": base.lora_rank,
              "context_frames": context_frames(config, base),
              "settings": [{"base": s.base_name, "checkpointing": s.checkpointing, "largest_frames": n,
                            "fits": p.peak_bytes <= 0.9 * memory, **p.to_dict()}
                           for s, p, n in zip(settings, plans, most)]}
    if args.json:
        options.print_json(report, indent=2)
        return 0
    print(f"{model}: one LoRA step (rank {base.lora_rank} on the decoder, fp32 adapters and AdamW, bf16 "
          f"compute, batch 1) on a {args.train_memory:g} GiB device (90% usable)")
    print("most frames that fit".ljust(24) + "".join(f"{n or 'none':>14}" for n in most)
          + f"   (the context holds {report['context_frames']})")
    print(f"at {base.frames} frames = {plans[0].tokens} tokens ({plans[0].tokens - text} visual + {text} text):")
    print(format_plan(plans, memory))
    return 0


def _load_image(path: str, max_pixels: int | None):
    from ..inputs.image import load_image

    try:
        return load_image(path, max_pixels=max_pixels)
    except (ValueError, OSError) as e:
        message = str(e)
        raise UserError(message if path in message else f"{path}: {message}") from None


def _inspect_media(args, config: LlavaNextConfig, model: str, preset: str | None):
    """The inspect report of the request's media, and a function drawing its plan (for --png)."""
    from ..inputs.tokens import plan_context
    from .plan import growth_note, media_plan, overflow, per_crop, rope_note

    n_frames, sampling = options.frames(args), options.sampling(args)
    images, image_plans = _plan_images(args, config)
    reduction = options.reduction(args)
    own = reduction.select_frames.video_sampling() if reduction and reduction.select_frames else None
    sampling = own["sampling"] if own else sampling  # --select-frames scene samples as --sampling scene
    videos = _plan_videos(args, config, n_frames, sampling, reduction)
    media = media_plan(image_plans, videos, config, args.rope_scale, sampling)
    budgets = _reduction_budgets(reduction, config, image_plans, videos, n_frames)
    visual = media["visual_tokens"]  # after reduction, when there is one
    visual += sum(b["visual_tokens_into_decoder"] - b["visual_tokens_unreduced"] for b in budgets)
    text_tokens = _text_tokens(args, config, model, len(image_plans), len(videos))
    new_tokens = options.ANSWER_TOKENS if args.max_new_tokens is None else args.max_new_tokens  # as run counts
    video_visual = sum(plan.total for _, plan in videos)  # the videos' share, for the overflow advice
    if budgets:
        video_visual = sum(b["visual_tokens_into_decoder"] for b in budgets[len(image_plans):])
    context = plan_context(text_tokens, visual, config, args.rope_scale, new_tokens=new_tokens,
                           video_tokens=video_visual)
    kind = "video" if videos and not images and len(videos) == 1 else "image" if images and not videos else "mixed"
    report = {"preset": preset, "model": model, "kind": kind, "visual_tokens": visual,
              "text_tokens": text_tokens, "total": context.tokens_needed, "fits": context.fits, **media,
              "context": context.to_dict(), "overflow": overflow(context)}
    from .run import random_weights_notice

    if random_weights_notice(model):
        report["random_weights"] = True
    notes = [rope_note(context)]
    if budgets:
        report["reduction"] = budgets
        report["visual_tokens"] = visual  # after reduction (media's own entry is the unreduced sum)
        notes += [growth_note(b["methods"], b["visual_tokens_unreduced"], b["visual_tokens_into_decoder"],
                              per_crop(reduction, config)) for b in budgets]
    report["notes"] = [n for n in notes if n]
    if kind == "video":  # one video: its fields at the top level too (the original inspect format)
        report.update({k: v for k, v in media["videos"][0].items() if k != "tokens"})
    return report, _plan_drawer(images, videos, context, config, sampling)


def _plan_images(args, config: LlavaNextConfig) -> tuple[list, list]:
    """Each --image loaded and planned: (image, plan, file name) for the drawing, (path, plan) for the report."""
    from ..inputs.tokens import image_aspect, image_plan

    images, image_plans = [], []
    aspect = image_aspect(config, len(args.image))  # OneVision pads each of several images to one tile
    for path in args.image:
        img = _load_image(path, args.max_image_pixels)
        plan = image_plan((img.height, img.width), config, aspect)
        images.append((img, plan, os.path.basename(path)))
        image_plans.append((path, plan))
    return images, image_plans


def _plan_videos(args, config: LlavaNextConfig, n_frames: int, sampling: str, reduction=None) -> list:
    """Each --video's sampled frames (pixels only for --png) and plan, as (clip, plan); a frame selector with
    its own rule over the whole video (``--select-frames scene``) samples them as run will."""
    from ..inputs.tokens import video_plan
    from ..inputs.video import VideoError, frame_options, load_video

    if args.video:
        try:  # options first: a bad stride should not wait for a decode
            video_plan(n_frames, config)
        except ValueError as e:
            raise UserError(str(e)) from None
    videos = []
    for path in args.video:
        try:
            # the plan needs indices and times; pixels only for --png
            own = reduction.select_frames.video_sampling() if reduction and reduction.select_frames else None
            sampled = (dict(own, num_frames=reduction.select_frames.budget(n_frames)) if own else
                       dict(num_frames=n_frames, sampling=sampling, scene=options.scene(args)))
            clip = load_video(path, keep_pixels=bool(args.png), **sampled, **frame_options(config))
        except VideoError as e:
            raise UserError(str(e)) from None
        videos.append((clip, video_plan(clip.num_frames, config)))
    return videos


def _reduction_budgets(reduction, config: LlavaNextConfig, image_plans: list, videos: list, n_frames: int) -> list:
    """The budget after frame selection / token reduction, one per image then per video ([] without one)."""
    if not reduction:
        return []
    try:
        reduction.check(config)
        budgets = [reduction.image_budget(config, plan.grid_hw, plan.total) for _, plan in image_plans]
        return budgets + [reduction.budget(config, n_frames, plan.total) for _, plan in videos]
    except ValueError as e:
        raise UserError(str(e)) from None


def _text_tokens(args, config: LlavaNextConfig, model: str, n_images: int, n_videos: int) -> int:
    """--prompt counted exactly, as run does (with the model's tokenizer); else --text-tokens, default 100."""
    if args.prompt is None:
        return 100 if args.text_tokens is None else args.text_tokens
    from ..inputs.prompt import build_input_ids

    tokenizer = options.model_tokenizer(model)
    if tokenizer is None:
        raise UserError(f"--prompt: counting the prompt needs the model's tokenizer.json, and {model} is not a "
                        f"checkpoint directory here; give a directory, or --text-tokens N instead")
    ids = build_input_ids(args.prompt, tokenizer, config, n_images, n_videos, args.template)
    return len(ids) - n_images - n_videos  # one placeholder id per medium


def _plan_drawer(images: list, videos: list, context, config: LlavaNextConfig, sampling: str):
    """A function that draws the plan picture: the images' tiles, or the one video's frames."""
    def draw():
        if images:
            from .plan_png import draw_images_plan

            return draw_images_plan(images, context, tile=config.tile_size)
        from .plan_png import draw_video_plan

        (clip, plan), = videos
        source = (f"{_hw(clip.size_hw)} px, {clip.total_frames} frames, {clip.fps:.2f} fps, "
                  f"{clip.duration:.2f} s; {sampling} sampling")
        return draw_video_plan(clip.frames, clip.frame_indices, clip.timestamps, clip.duration, plan,
                               os.path.basename(clip.path), context, source)

    return draw


def _hw(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _format(r: dict) -> str:
    """The human-readable plan: model, each image, each video, each reduction budget, the context."""
    lines = [_model_line(r)]
    if r.get("adapter"):
        a = r["adapter"]
        lines.append(f"adapter  {a['path']}: LoRA r {a['r']}, alpha {a['alpha']:g} on {a['layers']} layers "
                     f"({a['parameters']:,} parameters; projector {a['projector']}, vision tower {a['vision']})")
    for e in r["images"]:
        lines += _image_lines(e)
    for v in r["videos"]:
        lines += _video_lines(v)
    for b in r.get("reduction", []):
        lines += _reduction_lines(b)
    n = len(r["images"]) + len(r["videos"])
    if n > 1:
        lines.append(f"visual   {r['visual_tokens']} tokens in {len(r['images'])} images"
                     + (f" and {len(r['videos'])} videos" if r["videos"] else ""))
    sw = r["switches"]
    if sw["pool_position"] != "before_projector" or sw["anyres_compat"] != "hf":
        lines.append(f"switches pool {sw['pool_position']}, anyres_compat {sw['anyres_compat']}")
    lines += _context_lines(r["context"])
    lines += [f"note     {note}" for note in r.get("notes", [])]
    return "\n".join(lines)


def _model_line(r: dict) -> str:
    if r["preset"] is not None:
        return f"preset   {r['preset']} ({PRESETS[r['preset']].hub_id}); sizes are height x width"
    if r.get("random_weights"):
        what = "built in" if options.is_tiny(r["model"]) else "a copy of a built-in model"
        return f"model    {r['model']} ({what}, RANDOM weights: a smoke-test model); sizes are height x width"
    return f"model    {r['model']}; sizes are height x width"


def _image_lines(e: dict) -> list[str]:
    kh, kw = e["unpadded_hw"]
    if e["num_tiles"] == 0:  # one untiled image (LLaVA-NeXT-Interleave, OneVision's multi-image)
        return [f"image    {e['path']}: {_hw(e['image_hw'])} px",
                f"  one tile        resized to {_hw(e['canvas_hw'])} px: {e['base_tokens']} tokens"
                f" + {e['newline_tokens']} newline",
                f"  tokens          {e['tokens']}"]
    return [
        f"image    {e['path']}: {_hw(e['image_hw'])} px",
        f"  best resolution {_hw(e['canvas_hw'])} px -> grid {_hw(e['grid_hw'])} = {e['num_tiles']} tiles "
        f"+ 1 base image; resized to {_hw(e['resized_hw'])} then padded",
        f"  features        base {e['base_tokens']} + map {_hw(e['feature_map_hw'])} unpadded to "
        f"{kh}x{kw} = {kh * kw} + {e['newline_tokens']} newline",
        f"  tokens          {e['tokens']}",
    ]


def _video_lines(v: dict) -> list[str]:
    ph, pw = v["pooled_hw"]
    frames = ", ".join(f"{i}@{t:.2f}s" for i, t in zip(v["frame_indices"], v["timestamps"]))
    nl = f" + {v['newline_tokens']} newline ({v['newline']})" if v["newline_tokens"] else ""
    return [
        f"video    {v['path']}: {_hw(v['size_hw'])} px, {v['total_frames']} frames, {v['fps']:.2f} fps, "
        f"{v['duration']:.2f} s",
        f"  sampled         {v['num_frames']} frames ({v['sampling']}): {frames}",
        *([f"  scene cuts      {len(v['scene_cuts'])}: " + (", ".join(
            f"{i}@{t:.2f}s" for i, t in zip(v["scene_cuts"], v["scene_cut_times"])) or "none (one scene)")]
          if "scene_cuts" in v else []),
        f"  per frame       {_hw(v['patch_grid_hw'])} patches -> {v['pool_mode']} pool stride {v['pool_stride']}"
        f" -> {ph}x{pw} = {v['tokens_per_frame']} tokens",
        f"  tokens          {v['num_frames']} x {v['tokens_per_frame']}{nl} = {v['tokens']}",
    ] + [f"  note: {note}" for note in v["notes"]]


def _reduction_lines(b: dict) -> list[str]:
    frames = f" (at most {b['frames_at_most']} frames)" if "frames_at_most" in b else ""
    lines = [f"reduce   {'image: ' if b.get('media') == 'image' else ''}{', '.join(b['methods'])}: "
             f"{b['visual_tokens_unreduced']} visual tokens -> "
             f"{b['visual_tokens_into_decoder']} into the decoder{frames}"]
    if "pruned_at_layer" in b:
        lines.append(f"  from decoder layer {b['pruned_at_layer']}: {b['visual_tokens_after_pruning']} visual tokens")
    if "decode_reads_from_layer" in b:
        lines.append(f"  decode, from layer {b['decode_reads_from_layer']}: {b['visual_keys_read_per_step']} "
                     f"visual keys read per step")
    return lines


def _context_lines(c: dict) -> list[str]:
    from ..inputs.tokens import ContextPlan

    plan = ContextPlan(**c)
    lines = [f"context  {plan.summary()}"]
    if not plan.fits:
        lines.append(f"  fix: {plan.fix()}")
    elif plan.factor != plan.config_factor and plan.factor_source != "auto":  # auto's reason is a note below
        lines.append(f"  note: the model's config uses RoPE factor {plan.config_factor:g}; this plan uses "
                     f"{plan.factor:g}")
    return lines


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, except that with ``json_errors`` a usage error is printed as a JSON object."""

    def __init__(self, *args, json_errors: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.json_errors = json_errors

    def error(self, message: str):
        if not self.json_errors:
            super().error(message)  # usage + message on stderr, exit 2
        options.print_json({"error": message, "kind": "user", "type": "ArgumentError"})
        sys.exit(EXIT_USER_ERROR)


def build_parser(json_errors: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(prog="llava-next", description="LLaVA-NeXT / LLaVA-NeXT-Video in plain PyTorch",
                     json_errors=json_errors)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=functools.partial(_Parser, json_errors=json_errors))
    _add_inspect(sub)
    from .run import add_convert, add_run  # weights commands (imported lazily: torch-heavy paths)

    add_run(sub, user_error=UserError)
    add_convert(sub, user_error=UserError)
    from .trace import add_trace  # research: provenance, attention, logit lens of one request

    add_trace(sub, user_error=UserError)
    from .batch import add_batch  # the resumable batch job (torchrun shares it out)

    add_batch(sub, user_error=UserError)
    from .train import add_train  # fine-tuning: LoRA on LLaVA-format conversations

    add_train(sub, user_error=UserError)
    from .eval import add_eval  # evaluation: score candidate answers, run benchmark tasks

    add_eval(sub, user_error=UserError)
    from .data import add_data  # batch results -> training data (captions, preference pairs)

    add_data(sub, user_error=UserError)
    from .explore import add_explore  # the interactive page (Gradio, the explore extra)

    add_explore(sub, user_error=UserError)
    return parser



def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe the user's input (files, options, checkpoints, prompts): one line, exit 2.
    Every module raises ValueError subclasses (or OSError for files) with messages written for the user."""
    from llava_next_weights.hub import HubError

    return (UserError, ValueError, OSError, HubError)


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point. Everything runs inside it, the torch-heavy imports of building the parser included,
    so a Ctrl-C in the first second (while torch imports) is the same one line and status 130 as later, and
    a reader that stops early (``| head``) ends the command quietly."""
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    command = argv[0] if argv and not argv[0].startswith("-") else None  # COMMAND comes first
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe is caught below
        return status
    except KeyboardInterrupt:
        return _interrupted(command, as_json)
    except BrokenPipeError:
        return _broken_pipe()


def _interrupted(command: str | None, as_json: bool) -> int:
    try:
        if as_json:
            options.print_json({"error": "interrupted", "kind": "interrupted", "type": "KeyboardInterrupt"}, flush=True)
        else:
            print(f"llava-next{f' {command}' if command else ''}: interrupted", file=sys.stderr, flush=True)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    return EXIT_INTERRUPTED


def _broken_pipe() -> int:
    """stdout's reader went away (``llava-next run ... | head -1``): nothing more to say to anyone. As Python's
    documentation advises (signal module, "Note on SIGPIPE"), point stdout at /dev/null so that the flush at
    exit does not fail again; 141 = 128 + SIGPIPE, what a tool killed by the signal reports."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def _main(argv: list[str]) -> int:
    parser = build_parser(json_errors="--json" in argv)
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        return args.func(args)
    except (KeyboardInterrupt, BrokenPipeError):
        raise  # main's: the same line whenever it happens
    except _user_errors() as e:
        message = str(e) if not isinstance(e, OSError) or e.filename is None else f"{e.filename}: {e.strerror or e}"
        if as_json:
            options.print_json({"error": message, "kind": "user", "type": type(e).__name__})
        else:
            print(f"llava-next {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug in llava-next: say so, keep the traceback for the report
        import traceback

        if as_json:
            options.print_json({"error": f"{type(e).__name__}: {e}", "kind": "internal", "type": type(e).__name__,
                                "traceback": traceback.format_exc()})
        else:
            traceback.print_exc()
            print(f"llava-next {args.command}: internal error ({type(e).__name__}); this is a bug, please report "
                  f"it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
