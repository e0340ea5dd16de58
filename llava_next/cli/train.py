"""``llava-next train``: supervised fine-tuning with LoRA into an adapter that loads here and in PEFT.

    llava-next train --method sft --data train.jsonl --media-root clips/ --model llava-hf/LLaVA-NeXT-Video-7B-hf \\
        --out runs/ko --lora-rank 16 --frames 8 --steps 500 --lr 2e-4 --batch-size 1 --grad-accum 8
    llava-next run --model llava-hf/LLaVA-NeXT-Video-7B-hf --adapter runs/ko/adapter --video clip.mp4 "..."

The same command resumes a killed run (``--out`` holds its checkpoint); another run's directory is refused.
The loop, the checkpoints and the data are llava_next/train/ (sft.py, data.py); docs/training.md has the
commands for both stages. Registered into the parser by ``llava_next.cli.main.build_parser``.
"""

from __future__ import annotations

import argparse
import sys

from . import options


def add_train(sub, *, user_error) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA on LLaVA-format conversations (resumable)",
                       description="Supervised fine-tuning on a LLaVA-format JSON / JSONL file (id, image or "
                                   "video, conversations): the assistant turns are learned. Writes OUT/steps.jsonl, "
                                   "a checkpoint every --save-every steps and the adapter (PEFT's format) in "
                                   "OUT/adapter. Rerun the same command to resume.")
    p.add_argument("--method", choices=("sft",), default="sft", help="sft: supervised fine-tuning (default)")
    p.add_argument("--data", required=True, metavar="TRAIN.jsonl")
    p.add_argument("--media-root", default=None, metavar="DIR", help="media paths are relative to this "
                                                                     "(default: the data file's folder)")
    p.add_argument("--out", required=True, metavar="DIR")
    options.add_model_options(p)
    p.add_argument("--trainable", choices=("lora", "projector", "lora+projector"), default="lora",
                   help="lora (default); projector: stage 1, the projector alone; lora+projector")
    p.add_argument("--lora-rank", type=options.positive, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--quantize", choices=("nf4",), default=None,
                   help="nf4: QLoRA, the frozen decoder in 4-bit NormalFloat (bitsandbytes' definition: "
                        "docs/quantization.md), the adapters in float")
    p.add_argument("--frames", type=options.positive, default=8, help="frames per video (default 8)")
    p.add_argument("--steps", type=options.positive, default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=options.positive, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=options.positive, default=1)
    p.add_argument("--grad-accum", type=options.positive, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--save-every", type=options.positive, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="where converted checkpoints are kept")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=lambda args: _train(args, user_error))


def _train(args: argparse.Namespace, user_error) -> int:
    from pathlib import Path

    from llava_next_weights.adapters import save_adapter

    from ..model.lora import LoraConfig, apply_lora
    from ..runtime.loading import load
    from ..train.data import TrainingData
    from ..train.sft import SFTConfig, SFTRun, materialize_trainable

    data_path = Path(args.data)
    if not data_path.is_file():
        raise user_error(f"--data {args.data}: no such file")
    pipe = load(args.model, cache_dir=args.cache_dir, progress=not args.quiet, materialize=materialize_trainable)
    compute = pipe.model.dtype
    if args.quantize:  # QLoRA: quantize the frozen base first, then wrap its layers in float adapters
        from ..model.quant import QuantConfig, quantize_model

        quantize_model(pipe.model, QuantConfig(args.quantize))
    if args.trainable != "projector":
        apply_lora(pipe.model, LoraConfig(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                          projector="full" if "projector" in args.trainable else "frozen"),
                   dtype=compute)
    data = TrainingData(data_path, pipe.tokenizer, pipe.config, media_root=args.media_root or data_path.parent,
                        frames=args.frames, seed=args.seed)
    summary = data.validate()  # every item, media decoded, before step 1
    if not args.quiet:
        print(f"[llava-next] {summary.items} items ({summary.images} images, {summary.videos} videos), "
              f"{summary.supervised_tokens} supervised tokens", file=sys.stderr)
    cfg = SFTConfig(out=args.out, steps=args.steps or 0, epochs=args.epochs, batch_size=args.batch_size,
                    grad_accum=args.grad_accum, lr=args.lr, trainable=args.trainable, seed=args.seed,
                    gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every)
    run = SFTRun(pipe.model, data, cfg, on_step=None if args.quiet else _progress)
    out = run.train()
    if args.trainable != "projector":
        save_adapter(pipe.model, out / "adapter", base_model_name_or_path=str(args.model))
    print(str(out / ("adapter" if args.trainable != "projector" else "checkpoint")))
    return 0


def _progress(line: dict) -> None:
    print(f"[llava-next] step {line['step']}  loss {line['loss']:.4f}  {line['tokens']} tokens  "
          f"lr {line['lr']:.2e}  {line['seconds']:.2f} s", file=sys.stderr)
