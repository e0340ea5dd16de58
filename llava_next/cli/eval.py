"""``llava-next score`` and ``llava-next eval``: candidate answers scored by teacher-forced log-probability, and
benchmark tasks run from a YAML file (llava_next/eval: score.py, tasks.py, run.py; docs/evaluation.md).

    llava-next score --data items.jsonl --model llava-hf/LLaVA-NeXT-Video-7B-hf --out scores.jsonl
    llava-next eval --task videomme.yaml --model llava-hf/LLaVA-NeXT-Video-7B-hf --out runs/videomme --limit 100

``score`` writes one JSON line per item (to ``--out``, resumable like ``batch``, or to stdout); ``eval`` writes
OUT/run.json, OUT/samples.jsonl (as it goes, resumable) and OUT/summary.json. Both take the model options
and every token-plan switch (options.py); ``eval`` also the reduction switches. Registered into the parser by
``llava_next.cli.main.build_parser``.
"""

from __future__ import annotations

import argparse
import sys

from . import options
from .run import DTYPES


def _common(p: argparse.ArgumentParser) -> None:
    options.add_model_options(p)
    options.add_plan_options(p)
    p.add_argument("--batch-size", type=options.positive, default=4,
                   help="items (with all their candidates) per forward (default 4)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--cache-dir", default=None, help="where converted checkpoints are kept")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def add_eval(sub, *, user_error) -> None:
    p = sub.add_parser("score", help="teacher-forced log-probability of candidate answers (lm-eval's loglikelihood)",
                       description="For each item of DATA (one JSON object per line: id, prompt, candidates, image "
                                   "or video, frames) the log-probability of each candidate after the prompt: sum, "
                                   "per token, per character and per byte, and whether it is the greedy answer. One "
                                   "prefill per prompt; its candidates continue from it together.")
    p.add_argument("--data", required=True, metavar="ITEMS.jsonl")
    p.add_argument("--out", default=None, metavar="SCORES.jsonl", help="append one line per item, skipping ids "
                                                                         "already there (default: stdout)")
    p.add_argument("--media-root", default=None, metavar="DIR", help="media paths are relative to this (default: "
                                                                     "the data file's folder)")
    p.add_argument("--delimiter", default=" ", help="put between the prompt and each candidate (lm-eval's "
                                                    "target_delimiter; default one space)")
    _common(p)
    p.set_defaults(func=lambda args: _score(args, user_error))

    p = sub.add_parser("eval", help="run a benchmark task (YAML) into per-sample JSONL and a summary (resumable)",
                       description="Answer every sample of TASK (a YAML file: data, prompt, answer type) and write "
                                   "OUT/samples.jsonl as it goes and OUT/summary.json (accuracy, bootstrap 95% "
                                   "interval, visual tokens and seconds per sample, versions, checkpoint hash). "
                                   "Rerun the same command to resume.")
    p.add_argument("--task", required=True, metavar="TASK.yaml", help="a task file, or a bundled task's name "
                                                                   "(videomme, mvbench_action_sequence, ...)")
    p.add_argument("--data", default=None, metavar="FILE", help="the data file (replaces the task file's "
                                                                "data:); for bundled tasks, the official file")
    p.add_argument("--media-root", default=None, metavar="DIR", help="media paths are relative to this "
                                                                     "(replaces the task file's media_root:)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--limit", type=options.positive, default=None, help="only the first N samples")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (generation is greedy; default 0)")
    _common(p)
    options.add_reduction_options(p)
    p.set_defaults(func=lambda args: _eval(args, user_error))


def _switches(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) not in (None, [], False)}


PLAN_SWITCHES = ("frames", "sampling", "pool_stride", "pool_mode", "newline", "pool_position", "anyres_compat",
                 "rope_scale", "max_image_pixels", "adapter", "select_frames", "reduce")  # --limit, --batch-size: a
# rerun with another limit or batch size continues the same run


def _loader(args: argparse.Namespace, user_error, device: str):
    import torch

    from ..config import PRESETS
    from ..runtime.pipeline import Pipeline, with_overrides

    if args.allow_overflow:
        raise user_error(f"--allow-overflow: {args.command} does not run prompts past the RoPE context (such an item "
                         f"becomes an error line); use run --allow-overflow to study one prompt")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise user_error("--device cuda: no CUDA device is available; use --device cpu")
    given = [f"--{n.replace('_', '-')}" for n in ("scene_threshold", "scene_min_len") if getattr(args, n) is not None]
    if given:  # not passed on to the samples: refused rather than ignored
        raise user_error(f"{', '.join(given)}: {args.command} samples --sampling scene with PySceneDetect's defaults "
                         f"(threshold 27, min_len 15); drop them")
    options.adapter_summary(args.adapter)  # a bad adapter fails before anything runs
    model_id = PRESETS[args.model].hub_id if args.model in PRESETS else args.model

    def load() -> Pipeline:
        pipe = Pipeline.from_pretrained(model_id, dtype=DTYPES[args.dtype], device=device, cache_dir=args.cache_dir,
                                        progress=not args.quiet, adapter=args.adapter)
        pipe.model.config = with_overrides(pipe.model.config, **options.plan_overrides(args))
        return pipe
    return model_id, load


def _score(args: argparse.Namespace, user_error) -> int:
    from pathlib import Path

    from ..eval.score import read_score_items, score_records
    from ..runtime.batch import ResultsFile

    if not Path(args.data).is_file():
        raise user_error(f"--data {args.data}: no such file")
    _, load = _loader(args, user_error, args.device)
    items = read_score_items(args.data, media_root=args.media_root, frames=options.frames(args))
    items = [_with_plan(it, args) for it in items]
    out = ResultsFile(args.out) if args.out else None
    done = out.done_ids() if out else set()
    todo = [it for it in items if it.id not in done]
    if not args.quiet:
        print(f"[llava-next score] {len(items)} item(s), {len(items) - len(todo)} already in {args.out or 'the output'}, "
              f"{len(todo)} to do", file=sys.stderr)
    if not todo:
        return 0
    pipe = load()
    for record in score_records(pipe, todo, batch_size=args.batch_size, delimiter=args.delimiter):
        if out is None:
            options.print_json(record, flush=True)
        else:
            out.append(record)
    return 0


def _with_plan(item, args: argparse.Namespace):
    import dataclasses

    return dataclasses.replace(item, sampling=options.sampling(args), rope_scale=args.rope_scale,
                               max_image_pixels=args.max_image_pixels)


def _eval(args: argparse.Namespace, user_error) -> int:
    from ..eval.records import provenance
    from ..eval.run import EvalOptions, run_eval
    from ..eval.tasks import load_task
    from ..parallel.launch import dist_env
    from ..reduce import ReductionError, parse_reduction
    from ..runtime.loading import resolve_checkpoint

    task = load_task(args.task, data=args.data, media_root=args.media_root)
    env = dist_env()
    device = f"cuda:{env.local_rank}" if args.device == "cuda" else "cpu"
    model_id, load = _loader(args, user_error, device)
    try:
        reduction = parse_reduction(args.select_frames, args.reduce) if args.select_frames or args.reduce else None
    except ReductionError as e:
        raise user_error(str(e)) from None
    from pathlib import Path

    from ..runtime.batch import ResultsFile

    results = ResultsFile(Path(args.out) / "samples.jsonl")
    try:
        with results.locked():  # ranks sharing a machine convert it once
            checkpoint = resolve_checkpoint(model_id, cache_dir=args.cache_dir, progress=not args.quiet)
    except BaseException:  # a bad model: leave no empty output behind
        results.remove_if_empty()
        raise
    record = provenance(model=str(args.model), checkpoint_dir=checkpoint, dtype=DTYPES[args.dtype],
                        device=args.device, seed=args.seed, switches=_switches(args, PLAN_SWITCHES))
    opts = EvalOptions(limit=args.limit, batch_size=args.batch_size, frames=args.frames, seed=args.seed,
                       reduction=reduction, max_image_pixels=args.max_image_pixels, sampling=options.sampling(args),
                       rope_scale=args.rope_scale, rank=env.rank, world_size=env.world_size)
    summary = run_eval(load, task, args.out, record=record, options=opts, progress=None if args.quiet else sys.stderr)
    keys = ("task", "accuracy", "accuracy_ci95", "caption", "answered", "errors", "visual_tokens_per_sample",
            "seconds_per_sample")
    options.print_json({k: summary[k] for k in keys if k in summary})
    return 0
