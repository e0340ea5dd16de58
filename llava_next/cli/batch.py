"""``llava-next batch``: answer every request of a JSONL file into a JSONL file, resumably; under torchrun
the ranks share the requests (runtime/batch.py has the formats and the guarantees).

    llava-next batch --inputs jobs.jsonl --out results.jsonl --model llava-hf/LLaVA-NeXT-Video-7B-hf
    llava-next batch --inputs videos.jsonl --out captions.jsonl --prompt "Describe this video." --frames 16
    llava-next batch --videos 'clips/*.mp4' --prompt "이 영상을 한국어로 상세히 묘사해주세요." --out results.jsonl
    torchrun --nproc-per-node 2 --no-python llava-next batch --inputs jobs.jsonl --out results.jsonl

The shared options (options.py: model, token plan, prompt) mean what they mean in ``run``; per item they
are defaults (``--frames``, ``--sampling``, ``--rope-scale``, ``--template``, ``--max-new-tokens``, and
``--prompt`` for items without a prompt), while the token-plan switches of the checkpoint (``--pool-*``,
``--newline``, ``--anyres-compat``) apply to the whole job. ``--videos`` (folders, files or quoted glob
patterns) instead of ``--inputs``: one item per video, each asked ``--prompt``, its id the path. Exit status 0 when every item has a line
(error lines included: the summary counts them), 2 when the inputs file is unusable.
Registered into the parser by ``llava_next.cli.main.build_parser``.
"""

from __future__ import annotations

import argparse
import sys

from . import options
from .run import DTYPES


def add_batch(sub, *, user_error) -> None:
    p = sub.add_parser("batch", help="answer every request of a JSONL file (resumable; torchrun shares the work)",
                       description="Answer each request of INPUTS (one JSON object per line: id, prompt, video(s), "
                                   "images, options) and append one JSON line per id to OUT. A rerun skips ids "
                                   "already in OUT; a bad item becomes an error line. Under torchrun each rank "
                                   "takes its share of the ids.")
    p.add_argument("--inputs", metavar="JOBS.jsonl", help="the requests, one JSON object per line (or --videos)")
    p.add_argument("--videos", nargs="+", metavar="PATH",
                        help="instead of --inputs: video files, folders (their video files) or quoted glob patterns "
                             "('clips/*.mp4'); one item per video, asked --prompt, its id the path")
    p.add_argument("--out", required=True, metavar="RESULTS.jsonl")
    options.add_model_options(p)
    options.add_plan_options(p)
    options.add_prompt_options(p, positional=False)
    p.add_argument("--batch-size", type=options.positive, default=4,
                   help="greedy requests with the same options run together, up to this many (default 4)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--cache-dir", default=None, help="where converted checkpoints are kept")
    p.add_argument("--quiet", action="store_true", help="no progress lines or summary on stderr")
    p.set_defaults(func=lambda args: _batch(args, user_error))


def _batch(args: argparse.Namespace, user_error) -> int:
    import torch

    from ..config import PRESETS
    from ..parallel.launch import dist_env
    from ..runtime.batch import BatchInputError, Defaults, run_batch, video_items
    from ..runtime.pipeline import Pipeline, with_overrides

    if args.allow_overflow:  # no switch is accepted and ignored
        raise user_error("--allow-overflow: batch does not run prompts past the RoPE context (an item that does not "
                         "fit becomes an error line saying so); to study one such prompt use run --allow-overflow")
    bad_sampling = options.check_sampling(args)
    if bad_sampling:
        raise user_error(bad_sampling)
    options.adapter_summary(args.adapter)  # a bad adapter fails before the batch starts
    env = dist_env()
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise user_error("--device cuda: no CUDA device is available; use --device cpu")
        device = f"cuda:{env.local_rank}"  # one GPU per rank
    defaults = Defaults(prompt=args.prompt_option, frames=options.frames(args), sampling=options.sampling(args),
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, rope_scale=args.rope_scale, template=args.template,
                        scene=options.scene(args, items_may_ask=True))
    if (args.inputs is None) == (args.videos is None):
        raise user_error("give the requests as --inputs JOBS.jsonl or as --videos PATH ... with --prompt TEXT "
                         "(one of the two)")
    inputs = args.inputs
    if args.videos:
        try:
            inputs = video_items(args.videos, defaults)
        except BatchInputError as e:
            raise user_error(str(e)) from None
    model_id = PRESETS[args.model].hub_id if args.model in PRESETS else args.model
    from .run import random_weights_notice

    notice = random_weights_notice(args.model)
    if notice and env.rank == 0:  # said whatever the output mode, as run does: every answer is noise
        print(f"[llava-next batch] {notice}", file=sys.stderr)

    def load() -> Pipeline:
        pipe = Pipeline.from_pretrained(model_id, dtype=DTYPES[args.dtype], device=device, cache_dir=args.cache_dir,
                                        progress=not args.quiet and env.local_rank == 0, adapter=args.adapter)
        pipe.model.config = with_overrides(pipe.model.config, **options.plan_overrides(args))
        return pipe

    run_batch(load, inputs, args.out, defaults=defaults, batch_size=args.batch_size, rank=env.rank,
              world_size=env.world_size, max_image_pixels=args.max_image_pixels,
              progress=None if args.quiet else sys.stderr)
    return 0
