"""``llava-next trace --inputs JOBS.jsonl --out DIR``: trace every request of a JSONL file into compact
shards, resumably; under torchrun the ranks share the requests (runtime/trace_jobs.py has the formats).

    llava-next trace --inputs jobs.jsonl --out traces/ --layers 0,15,31 --query last,generated --max-new-tokens 8
    torchrun --nproc-per-node 2 --no-python llava-next trace --inputs jobs.jsonl --out traces/

The items are the batch job's (runtime/batch.py); ``--frames``, ``--sampling``, ``--max-new-tokens``,
``--template`` and a PROMPT (for items without one) are their defaults, ``--layers``, ``--query`` and
``--lens`` say what each shard keeps. Per-request drawings and reports (``--json``, ``--png``,
``--attribute``) and reductions are for one request and are refused here.
"""

from __future__ import annotations

import argparse
import sys


def add_job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", metavar="JOBS.jsonl", default=None,
                   help="trace every request of this file (batch's format) into --out DIR, resumably")
    p.add_argument("--out", metavar="DIR", default=None, help="with --inputs: index.jsonl and shards/*.npz go here")


def check_jobs(args: argparse.Namespace, user_error) -> None:
    """Refuse what a dataset trace cannot take, before any loading."""
    if (args.inputs is None) != (args.out is None):
        raise user_error("--inputs JOBS.jsonl and --out DIR go together: the requests to trace and where the "
                         "shards go")
    if args.inputs is None:
        return
    wrong = [flag for flag, on in (("--json", args.json), ("--png", args.png), ("--attribute", args.attribute),
                                   ("--reduce", args.reduce), ("--select-frames", args.select_frames),
                                   ("--image", args.image), ("--video", args.video)) if on]
    if wrong:
        raise user_error(f"{', '.join(wrong)}: per-request options; with --inputs every request comes from the file "
                         f"and each one's statistics go into its shard (load them with "
                         f"llava_next.runtime.trace_jobs.load_traces)")


def run_jobs(args: argparse.Namespace, user_error) -> int:
    from ..config import PRESETS
    from ..parallel.launch import dist_env
    from ..runtime.batch import BatchInputError, Defaults
    from ..runtime.pipeline import Pipeline, with_overrides
    from ..runtime.trace_jobs import run_trace_jobs
    from . import options
    from .run import DTYPES, random_weights_notice
    from .trace_attribute import reproducibility

    env = dist_env()
    model_id = PRESETS[args.model].hub_id if args.model in PRESETS else args.model
    notice = random_weights_notice(args.model)
    if notice and env.rank == 0:
        print(f"[llava-next trace] {notice}", file=sys.stderr)
    defaults = Defaults(prompt=args.prompt, frames=options.frames(args), sampling=options.sampling(args),
                        max_new_tokens=args.max_new_tokens, rope_scale=args.rope_scale, template=args.template,
                        scene=options.scene(args, items_may_ask=True))
    record: dict = {}

    def load() -> Pipeline:
        quantize, group_size = options.quantization(args)
        pipe = Pipeline.from_pretrained(model_id, dtype=DTYPES[args.dtype], device=args.device,
                                        cache_dir=args.cache_dir, progress=not args.quiet and env.local_rank == 0,
                                        quantize=quantize, group_size=group_size, adapter=args.adapter,
                                        activations=args.activations)
        pipe.model.config = with_overrides(pipe.model.config, **options.plan_overrides(args))
        record.update(reproducibility(args, pipe))
        return pipe

    try:
        run_trace_jobs(load, args.inputs, args.out, defaults=defaults, layers=args.layers, queries=args.query,
                       lens=[g for g in args.lens if g != "none"] or ["none"], run=record, rank=env.rank,
                       world_size=env.world_size, progress=None if args.quiet else sys.stderr)
    except BatchInputError as e:
        raise user_error(str(e)) from None
    return 0
