"""Command line: ``llava-next COMMAND ...`` (also ``python -m llava_next.cli.main``).

Commands
- ``run`` / ``convert`` (run.py): answer a question with a checkpoint; convert a checkpoint.
- ``trace`` (trace.py): token provenance, exact attention and logit lens of one request (JSON, PNG).
- ``inspect``: the token plan of images or a video, without weights — AnyRes canvas, tiles, unpadded
  features and newlines per image; sampled frames, timestamps and pooled tokens per frame for a video;
  and whether the prompt fits the RoPE context with which factor. ``--json`` for scripts, ``--png`` for
  a picture of the plan.

Adding a command: write ``_add_NAME(subparsers)`` that builds its parser and calls
``parser.set_defaults(func=_NAME)``, where ``_NAME(args) -> int`` returns the exit code, and call it
from ``build_parser``. Raise ``UserError`` for anything the user can fix (bad file, bad option): ``main``
prints it as one line and exits with status 2, argparse's own code for usage errors.

Exit status (docs/errors.md has every message): 0 success; 2 a user error — bad option (argparse),
file, checkpoint, prompt, context, memory or dtype problem, one line on stderr; 3 an internal error
(a bug in llava-next: traceback, then a line asking to report it); 130 interrupted (Ctrl-C). With
``--json`` every error, usage errors included, is one JSON object on stdout:
``{"error": message, "kind": "user" | "internal" | "interrupted", "type": exception class}``
(internal errors add ``"traceback"``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Sequence

from ..config import PRESETS, LlavaNextConfig

DEFAULT_PRESET = "LLaVA-NeXT-Video-7B"
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


class UserError(Exception):
    """Something the user can fix; printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------
def _rope_scale(value: str):
    if value in ("config", "auto", "original"):
        return value
    try:
        factor = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not 'config', 'auto', 'original' or a number") from None
    if factor < 1:
        raise argparse.ArgumentTypeError(f"a RoPE factor must be >= 1 (1 = no scaling), got {value}")
    return factor


def _pixels(value: str) -> int:
    try:
        n = int(float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of pixels") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = no limit), got {value}")
    return n


def _add_max_image_pixels(p) -> None:
    p.add_argument("--max-image-pixels", type=_pixels, default=None, metavar="N",
                   help="refuse images with more pixels (a guard against decompression bombs; default 100000000 "
                        "or $LLAVA_NEXT_MAX_IMAGE_PIXELS; 0 = no limit)")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show the token plan of images or a video (no weights needed)",
                       description="Show how many tokens images or a video become and whether they fit the "
                                   "model's RoPE context. Sizes are printed as height x width.")
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", nargs="+", metavar="FILE", help="one or more image files")
    media.add_argument("--video", metavar="FILE", help="a video file (anything FFmpeg decodes)")
    p.add_argument("--frames", type=_positive, default=None,
                   help="frames to sample (default 8; the cap with --sampling fps)")
    p.add_argument("--sampling", choices=("uniform", "fps"), default=None,
                   help="uniform: np.linspace over all frames (default); fps: 1 frame/s, uniform if over --frames")
    p.add_argument("--pool-stride", type=_positive, default=None, help="spatial pool stride (preset: 2)")
    p.add_argument("--pool-mode", choices=("average", "max", "bilinear"), default=None,
                   help="spatial pool mode (preset: average)")
    p.add_argument("--newline", choices=("none", "grid", "frame", "one_token"), default=None,
                   help="video newline tokens (preset: none, as transformers)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET, metavar="NAME",
                   help=f"model preset (default {DEFAULT_PRESET}); one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--text-tokens", type=int, default=100,
                   help="positions to reserve for prompt text and answer (default 100)")
    p.add_argument("--rope-scale", type=_rope_scale, default="config", metavar="config|auto|original|F",
                   help="linear RoPE factor: the preset's (config), the smallest that fits (auto), the original "
                        "demo's rule (original) or a number")
    _add_max_image_pixels(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--png", metavar="OUT", help="draw the plan into a PNG file")
    p.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    config = LlavaNextConfig.from_name(args.preset)
    if args.text_tokens < 0:
        raise UserError(f"--text-tokens must be >= 0, got {args.text_tokens}")
    if args.image:
        video_only = [f"--{n.replace('_', '-')}" for n in ("frames", "sampling", "pool_stride", "pool_mode", "newline")
                      if getattr(args, n) is not None]
        if video_only:
            raise UserError(f"{', '.join(video_only)}: video options, not valid with --image")
        report, draw = _inspect_images(args, config)
    else:
        report, draw = _inspect_video(args, config)
    if args.png:
        try:
            draw().save(args.png, format="PNG")
        except OSError as e:
            raise UserError(f"{args.png}: cannot write the PNG ({e.strerror or e})") from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_format(report))
        if args.png:
            print(f"plan drawn to {args.png}")
    return 0


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, not a file")


def _load_image(path: str, max_pixels: int | None):
    from ..inputs.image import load_image

    _check_file(path)
    try:
        return load_image(path, max_pixels=max_pixels)
    except (ValueError, OSError) as e:
        message = str(e)
        raise UserError(message if path in message else f"{path}: {message}") from None


def _context(args, visual: int, config: LlavaNextConfig):
    from ..inputs.tokens import plan_context

    return plan_context(args.text_tokens, visual, config, args.rope_scale)


def _inspect_images(args, config: LlavaNextConfig):
    from ..inputs.tokens import image_plan

    images, entries = [], []
    for path in args.image:
        img = _load_image(path, args.max_image_pixels)
        plan = image_plan((img.height, img.width), config)
        images.append((img, plan, os.path.basename(path)))
        entries.append({"path": path, "tokens": plan.total, "image_hw": plan.image_hw, "canvas_hw": plan.canvas_hw,
                        "grid_hw": plan.grid_hw, "num_tiles": plan.num_tiles, "resized_hw": plan.resized_hw,
                        "base_tokens": plan.base_tokens, "feature_map_hw": plan.feature_map_hw,
                        "unpadded_hw": plan.unpadded_hw, "newline_tokens": plan.newline_tokens})
    visual = sum(e["tokens"] for e in entries)
    context = _context(args, visual, config)
    report = {"preset": args.preset, "kind": "image", "visual_tokens": visual, "text_tokens": args.text_tokens,
              "total": context.tokens_needed, "fits": context.fits, "images": entries,
              "context": context.to_dict()}

    def draw():
        from .plan_png import draw_images_plan

        return draw_images_plan(images, context, tile=config.tile_size)

    return report, draw


def _inspect_video(args, config: LlavaNextConfig):
    from ..inputs.tokens import video_plan
    from ..inputs.video import VideoError, load_video

    _check_file(args.video)
    try:  # options first: a bad stride should not wait for a decode
        plan = video_plan(args.frames or 8, config, args.pool_stride, args.pool_mode, args.newline)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        clip = load_video(args.video, args.frames or 8, sampling=args.sampling or "uniform",
                          size=config.vision.image_size)
    except VideoError as e:
        raise UserError(str(e)) from None
    plan = video_plan(clip.num_frames, config, plan.stride, plan.mode, plan.newline)
    context = _context(args, plan.total, config)
    report = {"preset": args.preset, "kind": "video", "visual_tokens": plan.total, "text_tokens": args.text_tokens,
              "total": context.tokens_needed, "fits": context.fits, "path": args.video,
              "size_hw": clip.size_hw, "total_frames": clip.total_frames, "fps": clip.fps, "duration": clip.duration,
              "sampling": args.sampling or "uniform", "num_frames": clip.num_frames,
              "frame_indices": clip.frame_indices, "timestamps": clip.timestamps,
              "tokens_per_frame": plan.tokens_per_frame, "patch_grid_hw": plan.patch_grid_hw,
              "pooled_hw": plan.pooled_hw, "pool_stride": plan.stride, "pool_mode": plan.mode,
              "newline": plan.newline, "newline_tokens": plan.newline_tokens, "context": context.to_dict(),
              "notes": clip.notes()}

    def draw():
        from .plan_png import draw_video_plan

        source = (f"{_hw(clip.size_hw)} px, {clip.total_frames} frames, {clip.fps:.2f} fps, "
                  f"{clip.duration:.2f} s; {report['sampling']} sampling")
        return draw_video_plan(clip.frames, clip.frame_indices, clip.timestamps, clip.duration, plan,
                               os.path.basename(args.video), context, source)

    return report, draw


def _hw(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _format(r: dict) -> str:
    """The human-readable plan."""
    preset = PRESETS[r["preset"]]
    lines = [f"preset   {r['preset']} ({preset.hub_id}); sizes are height x width"]
    if r["kind"] == "image":
        for e in r["images"]:
            kh, kw = e["unpadded_hw"]
            lines += [
                f"image    {e['path']}: {_hw(e['image_hw'])} px",
                f"  best resolution {_hw(e['canvas_hw'])} px -> grid {_hw(e['grid_hw'])} = {e['num_tiles']} tiles "
                f"+ 1 base image; resized to {_hw(e['resized_hw'])} then padded",
                f"  features        base {e['base_tokens']} + map {_hw(e['feature_map_hw'])} unpadded to "
                f"{kh}x{kw} = {kh * kw} + {e['newline_tokens']} newline",
                f"  tokens          {e['tokens']}",
            ]
        if len(r["images"]) > 1:
            lines.append(f"visual   {r['visual_tokens']} tokens in {len(r['images'])} images")
    else:
        ph, pw = r["pooled_hw"]
        frames = ", ".join(f"{i}@{t:.2f}s" for i, t in zip(r["frame_indices"], r["timestamps"]))
        nl = f" + {r['newline_tokens']} newline ({r['newline']})" if r["newline_tokens"] else ""
        lines += [
            f"video    {r['path']}: {_hw(r['size_hw'])} px, {r['total_frames']} frames, {r['fps']:.2f} fps, "
            f"{r['duration']:.2f} s",
            f"  sampled         {r['num_frames']} frames ({r['sampling']}): {frames}",
            f"  per frame       {_hw(r['patch_grid_hw'])} patches -> {r['pool_mode']} pool stride {r['pool_stride']}"
            f" -> {ph}x{pw} = {r['tokens_per_frame']} tokens",
            f"  tokens          {r['num_frames']} x {r['tokens_per_frame']}{nl} = {r['visual_tokens']}",
        ] + [f"  note: {note}" for note in r["notes"]]
    c = r["context"]
    from ..inputs.tokens import ContextPlan

    plan = ContextPlan(**c)
    lines.append(f"context  {plan.summary()}")
    if not plan.fits:
        lines.append(f"  fix: {plan.fix()}")
    elif plan.factor != plan.config_factor:
        lines.append(f"  note: the preset's config uses RoPE factor {plan.config_factor:g}; this plan uses "
                     f"{plan.factor:g}")
    return "\n".join(lines)


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
        print(json.dumps({"error": message, "kind": "user", "type": "ArgumentError"}))
        sys.exit(EXIT_USER_ERROR)


def build_parser(json_errors: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(prog="llava-next", description="LLaVA-NeXT / LLaVA-NeXT-Video in plain PyTorch",
                     json_errors=json_errors)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=functools.partial(_Parser, json_errors=json_errors))
    _add_inspect(sub)
    from .run import add_convert, add_run  # weights commands (imported lazily: torch-heavy paths)

    add_run(sub, positive=_positive, rope_scale=_rope_scale, user_error=UserError,
            max_image_pixels=_add_max_image_pixels)
    add_convert(sub, user_error=UserError)
    from .trace import add_trace  # research: provenance, attention, logit lens of one request

    add_trace(sub, positive=_positive, rope_scale=_rope_scale, user_error=UserError,
              max_image_pixels=_add_max_image_pixels)
    return parser



def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe the user's input (files, options, checkpoints, prompts): one line, exit 2.
    Every module raises ValueError subclasses (or OSError for files) with messages written for the user."""
    from llava_next_weights.hub import HubError

    return (UserError, ValueError, OSError, HubError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(json_errors="--json" in argv)
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if as_json:
            print(json.dumps({"error": "interrupted", "kind": "interrupted", "type": "KeyboardInterrupt"}))
        else:
            print(f"llava-next {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        message = str(e) if not isinstance(e, OSError) or e.filename is None else f"{e.filename}: {e.strerror or e}"
        if as_json:
            print(json.dumps({"error": message, "kind": "user", "type": type(e).__name__}))
        else:
            print(f"llava-next {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug in llava-next: say so, keep the traceback for the report
        import traceback

        if as_json:
            print(json.dumps({"error": f"{type(e).__name__}: {e}", "kind": "internal", "type": type(e).__name__,
                              "traceback": traceback.format_exc()}))
        else:
            traceback.print_exc()
            print(f"llava-next {args.command}: internal error ({type(e).__name__}); this is a bug, please report "
                  f"it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
