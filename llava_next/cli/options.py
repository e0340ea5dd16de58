"""The options every command shares: one name, one meaning, one parser per group.

Each group is a function that takes an argparse parser and adds its flags, so every command that builds
a token plan (``inspect``, ``run``, and ``trace``, ``batch`` ...) accepts the same switches with the
same names, defaults and help:

    add_model_options(p)     --model ID_OR_DIR (a hub id, a checkpoint directory, a preset name, tiny-random)
                             --adapter DIR (a LoRA adapter in PEFT's format: docs/training.md)
    add_media_options(p)     --image FILE [FILE ...]   --video FILE [FILE ...]
    add_plan_options(p)      --frames --sampling --scene-threshold --scene-min-len
                             --pool-stride --pool-mode --newline --pool-position
                             --anyres-compat --rope-scale --allow-overflow --max-image-pixels
    add_prompt_options(p)    PROMPT (positional, optional) or --prompt TEXT; --template; --max-new-tokens
    add_output_options(p)    --json --quiet; print_json(obj) writes what --json prints (UTF-8, any locale)
    add_reduction_options(p) --select-frames METHOD[:knob=value,...]  --reduce METHOD[:knob=value,...] (repeat)

and after ``parse_args``:

    finish(args)             the prompt rule below; switches that need a video without one are errors, and so
                             are --scene-* without --sampling scene
    plan_overrides(args)     the config switches as keyword arguments of runtime.pipeline.with_overrides
    reduction(args)          the llava_next.reduce.Reduction of --select-frames / --reduce (or None)
    scene(args)              the SceneOptions of --scene-threshold / --scene-min-len (--sampling scene)
    UserError                what ``main`` prints as one line with exit status 2

Media: ``--image a.jpg b.jpg`` and ``--image a.jpg --image b.jpg`` both give two images, in every
command; nothing given is ever dropped. Because a list option is greedy, ``run --video clip.mp4 "What
happens?"`` first reads the question as a second video; the rule (``finish``): when a command takes a
PROMPT and none was found on its own, the PROMPT is the last word of the last ``--image``/``--video``
list, if that list has more than one word and that word is not a file (a forgotten question is an
error, never a dropped file). ``--prompt TEXT`` avoids the question altogether.

``sample:bunny`` (a 5 s clip of Big Buck Bunny, CC-BY 3.0) and ``sample:cat`` (a photo, CC0) name the
sample media shipped in the package (llava_next/samples/README.md), for first runs.

Plan switches default to None ("the checkpoint's value"), so a command can tell a switch that was given
from one that was not: a video switch (``--frames``, ``--sampling``, ``--pool-*``, ``--newline``)
without a ``--video`` is an error rather than silently ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import PRESETS
from ..inputs.samples import SAMPLES, SampleError, is_sample  # noqa: F401  (SAMPLES re-exported)

DEFAULT_MODEL = "llava-hf/LLaVA-NeXT-Video-7B-hf"
TINY_MODEL = "tiny-random"
TINY_MODELS = (TINY_MODEL, "tiny-random-interleave", "tiny-random-onevision")  # runtime/tiny.py NAMES


def is_tiny(model: str) -> bool:
    """A built-in random-weight model (runtime/tiny.py; the list is repeated here so --help imports no torch)."""
    return model in TINY_MODELS
DEFAULT_FRAMES = 8
ANSWER_TOKENS = 256  # run's default --max-new-tokens
VIDEO_SWITCHES = ("frames", "sampling", "scene_threshold", "scene_min_len", "pool_stride", "pool_mode", "newline",
                  "pool_position")


class UserError(Exception):
    """Something the user can fix; printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------
# value types
# --------------------------------------------------------------------------------------------------
def _integer_at_least(value: str, minimum: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
    return n


def positive(value: str) -> int:
    return _integer_at_least(value, 1)


def nonnegative(value: str) -> int:
    return _integer_at_least(value, 0)


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
    return x


def rope_scale(value: str):
    if value in ("config", "auto", "original"):
        return value
    try:
        factor = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not 'config', 'auto', 'original' or a number") from None
    if factor < 1:
        raise argparse.ArgumentTypeError(f"a RoPE factor must be >= 1 (1 = no scaling), got {value}")
    return factor


def pixels(value: str) -> int:
    try:
        n = int(float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of pixels") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = no limit), got {value}")
    return n


# --------------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser, *, adapter: bool = True) -> None:
    """``--model``, and ``--adapter`` unless the command makes adapters rather than reading one (train)."""
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="ID_OR_DIR",
                   help=f"a hub id, a llava-hf / original / converted checkpoint directory, a preset name "
                        f"({', '.join(sorted(PRESETS))}), or {' / '.join(TINY_MODELS)} (built in: random "
                        f"weights, no download); default {DEFAULT_MODEL}")
    if not adapter:
        return
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors, e.g. "
                        "from PEFT's save_pretrained or llava-next training): merged into float weights, kept "
                        "separate over quantized ones (docs/training.md)")


def adapter_summary(directory: str | None) -> dict | None:
    """What ``--adapter DIR`` adds, for the plan and ``--json``: None without one; a bad adapter is a UserError."""
    if directory is None:
        return None
    from llava_next_weights.adapters import AdapterError, read_adapter

    try:
        cfg, tensors = read_adapter(directory)
    except AdapterError as e:
        raise UserError(str(e)) from None
    layers = sorted({k.rsplit(".", 2)[0] for k in tensors if ".lora_" in k})
    return {"path": str(directory), "r": cfg.r, "alpha": cfg.alpha, "use_rslora": cfg.use_rslora,
            "target_modules": list(cfg.target_modules), "projector": cfg.projector, "vision": cfg.vision,
            "layers": len(layers), "parameters": sum(t.numel() for t in tensors.values())}


class _MediaList(argparse.Action):
    """``--image a b`` and ``--image a --image b`` both extend one list; remembers the last occurrence."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *values])
        namespace._last_media = (self.dest, len(values))


def add_media_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action=_MediaList, nargs="+", default=[], metavar="FILE",
                   help="image file(s): --image a.jpg b.jpg or --image a.jpg --image b.jpg; sample:cat is a "
                        "shipped photo")
    p.add_argument("--video", action=_MediaList, nargs="+", default=[], metavar="FILE",
                   help="video file(s), anything FFmpeg decodes; several as for --image; sample:bunny is a "
                        "shipped clip")


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """Every switch that changes the token plan (docs/usage.md: 'Divergences between implementations')."""
    g = p.add_argument_group("token plan (the same in every command)")
    g.add_argument("--frames", type=positive, default=None,
                   help=f"frames sampled per video (default {DEFAULT_FRAMES}; the cap with --sampling fps)")
    g.add_argument("--sampling", choices=("uniform", "fps", "scene"), default=None,
                   help="uniform: np.linspace over all frames (default); fps: 1 frame/s, uniform if over --frames; "
                        "scene: cuts found as PySceneDetect's ContentDetector, --frames spread over the scenes")
    g.add_argument("--scene-threshold", type=positive_float, default=None, metavar="T",
                   help="--sampling scene: a cut where the mean HSV difference of two frames is >= T (default 27)")
    g.add_argument("--scene-min-len", type=nonnegative, default=None, metavar="N",
                   help="--sampling scene: scenes shorter than N frames are merged (default 15)")
    g.add_argument("--pool-stride", type=positive, default=None, help="video spatial pool stride (checkpoint: 2)")
    g.add_argument("--pool-mode", choices=("average", "max", "bilinear"), default=None,
                   help="video spatial pool mode (checkpoint: average)")
    g.add_argument("--newline", choices=("none", "grid", "frame", "one_token"), default=None,
                   help="video newline tokens (checkpoint: none, as transformers)")
    g.add_argument("--pool-position", choices=("before_projector", "after_projector"), default=None,
                   help="pool video features before the projector (transformers, original 'inference' branch) "
                        "or after it (original main branch); checkpoint: before_projector")
    g.add_argument("--anyres-compat", choices=("hf", "original"), default=None,
                   help="AnyRes pinpoint order and unpad rounding: transformers (hf) or the original code")
    g.add_argument("--rope-scale", type=rope_scale, default="config", metavar="config|auto|original|F",
                   help="linear RoPE factor: the checkpoint's (config), the smallest that fits (auto), the "
                        "original demo's rule (original) or a number")
    g.add_argument("--allow-overflow", action="store_true",
                   help="run a prompt longer than max_position_embeddings x RoPE factor anyway (default: refuse); "
                        "says on stderr and in --json by how much the context is exceeded")
    g.add_argument("--max-image-pixels", type=pixels, default=None, metavar="N",
                   help="refuse images with more pixels (a guard against decompression bombs; default 100000000 "
                        "or $LLAVA_NEXT_MAX_IMAGE_PIXELS; 0 = no limit)")


def add_prompt_options(p: argparse.ArgumentParser, *, positional: bool = True,
                       max_new_tokens: int | None = ANSWER_TOKENS) -> None:
    from ..inputs.prompt import TEMPLATES

    if positional:
        p.add_argument("prompt", nargs="?", metavar="PROMPT",
                       help="the question (with --template none: the exact prompt text)")
    p.add_argument("--prompt", dest="prompt_option", metavar="TEXT", default=None,
                   help="the question, as an option" + (" (instead of PROMPT)" if positional else ""))
    p.add_argument("--template", choices=[*TEMPLATES, "none"], default=None,
                   help="chat template (default: the checkpoint's); 'none' sends the prompt exactly as given")
    p.add_argument("--max-new-tokens", type=positive, default=max_new_tokens,
                   help=f"answer length budget (default {max_new_tokens or ANSWER_TOKENS}), counted in the context")


def add_output_options(p: argparse.ArgumentParser, *, what: str = "the result", quiet: bool = True) -> None:
    """``--json``, and ``--quiet`` for commands that write progress or notes to stderr (``quiet=False``: one
    that writes none, so the switch would do nothing)."""
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON object on stdout")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress or notes on stderr (errors still go there)")


def print_json(obj, *, indent: int | None = None, flush: bool = False) -> None:
    """``obj`` as JSON on stdout, text as itself (Korean as UTF-8 bytes, not ``\\uXXXX``), one line unless
    ``indent``. UTF-8 whatever the locale: a stdout of another encoding (a Latin-1 locale) gets the bytes
    through its binary buffer, as a file would; a lone surrogate from an input (an undecodable file name)
    escapes the whole object instead, since it has no UTF-8 bytes."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent)
    try:
        data = (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, indent=indent)
        data = (text + "\n").encode("ascii")
    out = sys.stdout
    if (getattr(out, "encoding", None) or "").lower().replace("-", "").replace("_", "") == "utf8" \
            or getattr(out, "buffer", None) is None:
        out.write(text + "\n")  # an in-memory stdout without bytes (a test's StringIO) takes the text
    else:
        out.flush()  # what was written as text before these bytes comes first
        out.buffer.write(data)
    if flush:
        out.flush()


def add_reduction_options(p: argparse.ArgumentParser) -> None:
    """Frame selection and visual-token reduction (llava_next.reduce, docs/reduction.md)."""
    from ..reduce import METHODS, FrameSelector

    selectors = [n for n, c in METHODS.items() if issubclass(c, FrameSelector)]
    reducers = [n for n, c in METHODS.items() if not issubclass(c, FrameSelector)]
    g = p.add_argument_group("token reduction (docs/reduction.md)")
    g.add_argument("--select-frames", metavar="METHOD[:knob=value,...]", default=None,
                   help=f"choose the video frames: {', '.join(selectors)} (e.g. maxinfo:frames=16)")
    g.add_argument("--reduce", action="append", default=[], metavar="METHOD[:knob=value,...]",
                   help=f"reduce visual tokens, one method per stage, repeatable: {', '.join(reducers)} "
                        f"(e.g. fastv:layer=2,keep=0.5; keep = fraction kept)")


# --------------------------------------------------------------------------------------------------
# after parsing
# --------------------------------------------------------------------------------------------------
def finish(args: argparse.Namespace, *, needs_prompt: bool = False) -> argparse.Namespace:
    """Resolve the PROMPT rule and ``sample:`` names (module docstring), check that every media file exists,
    and refuse video switches without a video."""
    positional = getattr(args, "prompt", None)
    option = getattr(args, "prompt_option", None)
    if positional is not None and option is not None:
        raise UserError(f"two prompts given: PROMPT {positional!r} and --prompt {option!r}; give one")
    prompt = positional if positional is not None else option
    last = getattr(args, "_last_media", None)
    if prompt is None and needs_prompt and last is not None and last[1] > 1:
        dest, _ = last
        *kept, prompt = getattr(args, dest)
        if os.path.exists(prompt) or is_sample(prompt):  # a forgotten question: never eat a file
            raise UserError(f"no PROMPT given: the last word after --{dest}, {prompt!r}, is a file, not a "
                            f"question; put the question last or pass --prompt TEXT")
        setattr(args, dest, kept)
    if prompt is None and needs_prompt:
        raise UserError("no PROMPT given: put the question after the files (run --video clip.mp4 \"What "
                        "happens?\") or pass --prompt TEXT")
    if hasattr(args, "prompt_option"):
        args.prompt = prompt
    for dest in ("image", "video"):
        if getattr(args, dest, None):
            setattr(args, dest, [sample_path(f) if is_sample(f) else f for f in getattr(args, dest)])
    from ..runtime.files import check_media_file

    for dest in ("image", "video"):  # before any model is loaded: a typo should not wait for 14 GB
        for path in getattr(args, dest, None) or []:
            check_media_file(path, dest)  # FileNotFoundError / IsADirectoryError, as batch items say
    if not getattr(args, "video", None):
        given = [f"--{n.replace('_', '-')}" for n in VIDEO_SWITCHES if getattr(args, n, None) is not None]
        if given:
            raise UserError(f"{', '.join(given)}: video options, but no --video was given")
    scene(args)  # --scene-* without --sampling scene
    return args


def sample_path(name: str) -> str:
    """``sample:bunny`` / ``sample:cat`` -> the packaged sample file (llava_next/inputs/samples.py, the resolver
    the Python API uses too); an unknown name is a UserError."""
    from ..inputs import samples

    try:
        return samples.sample_path(name)
    except SampleError as e:
        raise UserError(str(e)) from None


def plan_overrides(args: argparse.Namespace) -> dict:
    """The config switches given on the command line, for ``runtime.pipeline.with_overrides``."""
    return {name: getattr(args, name, None) for name in
            ("pool_stride", "pool_mode", "newline", "pool_position", "anyres_compat")}


def reduction(args: argparse.Namespace):
    """The Reduction of --select-frames / --reduce, or None; a bad name or value is a UserError."""
    from ..reduce import ReductionError, parse_reduction

    if not getattr(args, "select_frames", None) and not getattr(args, "reduce", None):
        return None
    if getattr(args, "select_frames", None) and not args.video:
        raise UserError("--select-frames picks a video's frames, but no --video was given")
    if not args.video and not getattr(args, "image", None):
        raise UserError("--reduce: the reduction methods work on images and videos, but neither --image nor --video "
                        "was given")
    try:
        return parse_reduction(args.select_frames, args.reduce)
    except ReductionError as e:
        raise UserError(str(e)) from None


def quantization(args: argparse.Namespace) -> tuple[str | None, int]:
    """(--quantize, --group-size) with the group size's default (128); --group-size without --quantize int4
    is refused (it would do nothing)."""
    quantize, group = getattr(args, "quantize", None), getattr(args, "group_size", None)
    if group is not None and quantize != "int4":
        raise UserError(f"--group-size {group}: the group size is int4's; add --quantize int4 (int8 is per "
                        f"output channel, nf4 uses blocks of 64{'' if quantize else ', and no --quantize was given'})")
    activations = getattr(args, "activations", "float")
    if activations != "float" and quantize not in (None, "int8", "int4"):
        raise UserError(f"--activations {activations}: they are for int8 or int4 weights, not {quantize}; use "
                        f"--quantize int8 or int4")
    return quantize, 128 if group is None else group


def generation_only(args: argparse.Namespace) -> list[str]:
    """The sampling / decoding switches given with a non-default value (they act on generated tokens only)."""
    given = []
    if getattr(args, "temperature", 0.0) != 0.0:
        given.append(f"--temperature {args.temperature:g}")
    if getattr(args, "top_p", 1.0) != 1.0:
        given.append(f"--top-p {args.top_p:g}")
    if getattr(args, "seed", None) is not None:
        given.append(f"--seed {args.seed}")
    if getattr(args, "compile_step", "auto") != "auto":
        given.append(f"--compile-step {args.compile_step}")
    return given


def check_sampling(args: argparse.Namespace) -> str | None:
    """What is wrong with the sampling switches of run / batch, or None: out of range, or --top-p / --seed with
    greedy decoding (--temperature 0), where they cannot change a token (no switch is accepted and ignored)."""
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        return f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature}, {args.top_p}"
    given = [f"--top-p {args.top_p:g}"] * (args.top_p != 1.0) + [f"--seed {args.seed}"] * (args.seed is not None)
    if args.temperature == 0 and given:
        return (f"{', '.join(given)}: these act on sampling, and decoding is greedy (--temperature 0), where the "
                f"answer is the same whatever they are; add --temperature T (> 0) to sample, or drop them")
    return None


def frames(args: argparse.Namespace) -> int:
    return args.frames or DEFAULT_FRAMES


def sampling(args: argparse.Namespace) -> str:
    return args.sampling or "uniform"


def scene(args: argparse.Namespace, *, items_may_ask: bool = False):
    """The SceneOptions of --scene-threshold / --scene-min-len (their defaults: PySceneDetect's); given
    without --sampling scene they would do nothing, so that is a UserError (unless ``items_may_ask``: batch
    items choose their own sampling)."""
    from ..inputs.scenes import SceneOptions

    given = [f"--{n.replace('_', '-')}" for n in ("scene_threshold", "scene_min_len")
             if getattr(args, n, None) is not None]
    if given and sampling(args) != "scene" and not items_may_ask:
        raise UserError(f"{', '.join(given)}: these set scene sampling's cut detector, and sampling is not scene; "
                        f"add --sampling scene (train: --frame-sampling scene)")
    default = SceneOptions()
    threshold, min_len = getattr(args, "scene_threshold", None), getattr(args, "scene_min_len", None)
    return SceneOptions(default.threshold if threshold is None else threshold,
                        default.min_len if min_len is None else min_len)


def model_config(model: str):
    """(config, preset name or None) of ``--model`` without loading weights or downloading: a preset name,
    the hub id of a preset, or a local checkpoint directory (llava-next, llava-hf or original config.json)."""
    import json
    from pathlib import Path

    from ..config import ConfigError, LlavaNextConfig

    if is_tiny(model):
        from ..runtime.tiny import tiny_config

        return tiny_config(model), None
    if model in PRESETS:
        return PRESETS[model].config, model
    preset = next((p for p in PRESETS.values() if model in (p.hub_id, p.original_id)), None)
    if preset is not None:
        return preset.config, preset.name
    path = Path(model).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"{path}: no config.json in this directory; give a checkpoint directory")
        try:
            raw = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
        try:
            if "vision" in raw and "text" in raw and "model_type" not in raw:
                return LlavaNextConfig.from_dict(raw), None
            if raw.get("model_type") in ("llava_next", "llava_next_video"):
                return LlavaNextConfig.from_hf_config(raw), None
            return LlavaNextConfig.from_original_config(raw), None
        except ConfigError as e:
            raise UserError(f"{cfg_file}: {e}") from None
    from ..config.presets import did_you_mean

    raise UserError(f"--model {model}: planning needs the model's config without downloading it; give a preset "
                    f"name ({', '.join(sorted(PRESETS))}), the hub id of one, a checkpoint directory, or "
                    f"{' / '.join(TINY_MODELS)}{did_you_mean(model, extra=TINY_MODELS)}")


def model_tokenizer(model: str):
    """The tokenizer of ``--model`` when it is on this machine (a checkpoint directory), else None."""
    from pathlib import Path

    from ..inputs.prompt import Tokenizer

    if is_tiny(model):
        from ..runtime import tiny

        return Tokenizer.load(tiny.ensure(name=model))
    file = Path(model).expanduser() / "tokenizer.json"
    return Tokenizer.load(file) if file.is_file() else None
