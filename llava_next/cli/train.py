"""``llava-next train``: supervised fine-tuning or DPO with LoRA into an adapter that loads here and in PEFT.

    llava-next train --method sft --data train.jsonl --media-root clips/ --model llava-hf/LLaVA-NeXT-Video-7B-hf \\
        --out runs/ko --lora-rank 16 --frames 8 --steps 500 --lr 2e-4 --batch-size 1 --grad-accum 8
    llava-next run --model llava-hf/LLaVA-NeXT-Video-7B-hf --adapter runs/ko/adapter --video clip.mp4 "..."

``--method dpo`` trains on preference pairs instead (train/dpo.py; docs/training.md, DPO):

    llava-next train --method dpo --data prefs.jsonl --model M --adapter runs/ko/adapter --ref-adapter runs/ko/adapter \
        --out runs/ko-dpo --beta 0.1

The same command resumes a killed run (``--out`` holds its checkpoint); another run's directory is refused.
Under torchrun it trains data-parallel (gloo on CPU, NCCL with one GPU per process; train/sft.py):

    torchrun --nproc-per-node 2 --no-python llava-next train --data train.jsonl --out runs/ko ...
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
    p.add_argument("--method", choices=("sft", "dpo"), default="sft",
                   help="sft: supervised fine-tuning (default); dpo: direct preference optimisation on pairs "
                        "{id, video | image, prompt, chosen, rejected} (docs/training.md, DPO)")
    p.add_argument("--data", required=True, metavar="TRAIN.jsonl")
    p.add_argument("--media-root", default=None, metavar="DIR", help="media paths are relative to this "
                                                                     "(default: the data file's folder)")
    p.add_argument("--out", required=True, metavar="DIR")
    options.add_model_options(p, adapter=False)
    p.add_argument("--trainable", choices=("lora", "projector", "lora+projector"), default="lora",
                   help="lora (default); projector: stage 1, the projector alone; lora+projector")
    p.add_argument("--projector", default=None, metavar="FILE",
                   help="start from this projector (OUT/projector.safetensors of a --trainable projector run: "
                        "stage 1, as the original --pretrain_mm_mlp_adapter); the adapter then carries it")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="start from this LoRA adapter (PEFT's format; its rank, alpha and targets), e.g. the SFT "
                        "adapter before DPO; --lora-* are then ignored")
    p.add_argument("--lora-rank", type=options.positive, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated decoder layers to adapt (default q_proj,k_proj,v_proj,o_proj,gate_proj,"
                        "up_proj,down_proj); add lm_head to adapt the output layer too (PEFT's target_modules)")
    p.add_argument("--quantize", choices=("nf4",), default=None,
                   help="nf4: QLoRA, the frozen decoder in 4-bit NormalFloat (bitsandbytes' definition: "
                        "docs/quantization.md), the adapters in float")
    p.add_argument("--frames", type=options.positive, default=8, help="frames per video (default 8)")
    p.add_argument("--frame-sampling", choices=("random", "uniform", "scene"), default="random",
                   help="random (default): one frame drawn from each of --frames segments, new each epoch, the "
                        "same in every rerun; uniform: evenly spaced, as the original LLaVA-NeXT and llava-next run; "
                        "scene: spread over the scenes, as llava-next run --sampling scene")
    p.add_argument("--scene-threshold", type=options.positive_float, default=None, metavar="T",
                   help="--frame-sampling scene: cut threshold (default 27, PySceneDetect's)")
    p.add_argument("--scene-min-len", type=options.nonnegative, default=None, metavar="N",
                   help="--frame-sampling scene: minimum scene length in frames (default 15)")
    p.add_argument("--steps", type=options.positive, default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=options.positive, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine (default): decay to 0 at the last step; constant: --lr throughout (both after "
                        "--warmup-steps)")
    p.add_argument("--warmup-steps", type=options.nonnegative, default=0, help="steps of linear warmup to --lr (default 0)")
    p.add_argument("--batch-size", type=options.positive, default=1)
    p.add_argument("--grad-accum", type=options.positive, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--bf16", action="store_true", help="mixed precision: the forward under bfloat16 autocast, "
                                                       "weights and optimizer in float32")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="the frozen base's dtype (default: bf16 on CUDA, fp32 on CPU); the adapters and AdamW's "
                        "moments are float32 whatever it is (PEFT's autocast_adapter_dtype)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one; under torchrun "
                                                  "each process takes cuda:LOCAL_RANK)")
    p.add_argument("--save-every", type=options.positive, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="where converted checkpoints are kept")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    _add_dpo_options(p)
    p.set_defaults(func=lambda args: _train(args, user_error))


def _add_dpo_options(p: argparse.ArgumentParser) -> None:
    """--method dpo's switches: the loss and the reference (train/dpo.py)."""
    dpo = p.add_argument_group("DPO (--method dpo)")
    dpo.add_argument("--beta", type=float, default=0.1, help="how far from the reference (TRL's beta, default 0.1)")
    dpo.add_argument("--loss-type", choices=("sigmoid", "robust", "ipo"), default="sigmoid",
                     help="sigmoid: DPO (default); robust: robust DPO; ipo: IPO (TRL's loss types)")
    dpo.add_argument("--label-smoothing", type=float, default=0.0,
                     help="the probability a pair's preference is flipped (conservative DPO / robust), in [0, 0.5)")
    dpo.add_argument("--ref-adapter", default=None, metavar="DIR",
                     help="the reference is the base with this adapter (default: the base with the trained adapter "
                          "disabled)")
    dpo.add_argument("--ref-model", default=None, metavar="M",
                     help="the reference is this model (same configuration as --model), loaded for one pass")


def _train(args: argparse.Namespace, user_error) -> int:
    from pathlib import Path

    from llava_next_weights.adapters import save_adapter

    from ..parallel.launch import dist_env
    from ..runtime.loading import load
    from ..train.sft import materialize_trainable, save_projector

    data_path = Path(args.data)
    _check_args(args, data_path, user_error)
    env = dist_env()
    device = _device(args.device, env, user_error)
    quiet = args.quiet or env.rank != 0
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    # QLoRA: the base goes to the GPU only once it is 4-bit (a 7B in bf16 is 13.5 GB: more than a T4 has free)
    pipe = load(args.model, cache_dir=args.cache_dir, progress=not quiet, materialize=materialize_trainable,
                dtype=dtype, device="cpu" if args.quantize else device)
    _adapt(pipe.model, args, user_error)
    if device != "cpu":
        pipe.model.to(device)
    data = _data(args, pipe, data_path, quiet)
    common = dict(out=args.out, steps=args.steps or 0, epochs=args.epochs, batch_size=args.batch_size,
                  grad_accum=args.grad_accum, lr=args.lr, lr_schedule=args.lr_schedule,
                  warmup_steps=args.warmup_steps, trainable=args.trainable, seed=args.seed,
                  gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
                  autocast="bf16" if args.bf16 else None)
    on_step = None if quiet else StepProgress()
    if args.method == "dpo":
        run = _dpo_run(args, pipe, data, common, on_step, user_error, dtype=dtype, device=device)
    else:
        from ..train.sft import SFTConfig, SFTRun

        run = SFTRun(pipe.model, data, SFTConfig(**common), on_step=on_step)
    out = run.train()
    if env.rank == 0:
        if args.trainable == "projector":
            result = save_projector(pipe.model, out / "projector.safetensors")
        else:
            result = save_adapter(pipe.model, out / "adapter", base_model_name_or_path=str(args.model))
        print(str(result))
    return 0


def _check_args(args: argparse.Namespace, data_path, user_error) -> None:
    if not data_path.is_file():
        raise user_error(f"--data {args.data}: no such file")
    if args.projector is not None and args.trainable == "projector":
        raise user_error("--projector with --trainable projector: stage 1 starts from the model's own projector; "
                         "give --projector to the stage-2 run")
    if args.method == "dpo" and args.trainable != "lora":
        raise user_error(f"--method dpo trains LoRA adapters only: drop --trainable {args.trainable}")
    if args.method != "dpo" and (args.ref_adapter or args.ref_model):
        raise user_error("--ref-adapter / --ref-model are for --method dpo")
    if args.ref_adapter and args.ref_model:
        raise user_error("give one reference: --ref-adapter DIR or --ref-model M, not both")
    if args.adapter is not None and args.trainable == "projector":
        raise user_error("--adapter with --trainable projector: stage 1 trains no adapter")


def _data(args: argparse.Namespace, pipe, data_path, quiet: bool):
    """The training file (conversations, or preference pairs for DPO), every item checked before step 1."""
    from ..train.data import TrainingData
    from ..train.preferences import PreferenceData

    kind = PreferenceData if args.method == "dpo" else TrainingData
    scene = options.scene(argparse.Namespace(sampling=args.frame_sampling, scene_threshold=args.scene_threshold,
                                             scene_min_len=args.scene_min_len))
    data = kind(data_path, pipe.tokenizer, pipe.config, media_root=args.media_root or data_path.parent,
                frames=args.frames, seed=args.seed, frame_sampling=args.frame_sampling, scene=scene)
    summary = data.validate()  # every item, media decoded, before step 1
    if not quiet:
        what, n = (f"{len(data)} pairs", 2) if args.method == "dpo" else (f"{summary.items} items", 1)
        print(f"[llava-next] {what} ({summary.images // n} images, {summary.videos // n} videos), "
              f"{summary.supervised_tokens} supervised tokens", file=sys.stderr)  # a pair: two conversations
    return data


def _dpo_run(args: argparse.Namespace, pipe, data, common: dict, on_step, user_error, *, dtype: str, device: str):
    """The DPO run with its reference: the adapter disabled, ``--ref-adapter``'s tensors, or ``--ref-model``
    (loaded only when OUT has no cached reference log-probs yet)."""
    from pathlib import Path

    from llava_next_weights.adapters import AdapterError, read_adapter

    from ..runtime.loading import load
    from ..train.dpo import REFERENCE_FILE, DPOConfig, DPORun
    from ..train.sft import materialize_trainable

    ref_adapter = ref_model = None
    reference = "adapter disabled"
    if args.ref_adapter:
        reference = f"adapter {Path(args.ref_adapter).resolve()}"
        try:
            _, ref_adapter = read_adapter(args.ref_adapter)
        except (AdapterError, OSError) as e:
            raise user_error(f"--ref-adapter {args.ref_adapter}: {e}") from None
    if args.ref_model:
        reference = f"model {args.ref_model}"
        if not (Path(args.out) / REFERENCE_FILE).exists():
            ref = load(args.ref_model, cache_dir=args.cache_dir, progress=False, materialize=materialize_trainable,
                       dtype=dtype, device=device)
            if ref.config != pipe.config:
                raise user_error(f"--ref-model {args.ref_model}: not the configuration of --model {args.model}")
            ref_model = ref.model
    cfg = DPOConfig(**common, beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                    reference=reference)
    return DPORun(pipe.model, data, cfg, on_step=on_step, reference_adapter=ref_adapter, reference_model=ref_model)


def _device(name: str | None, env, user_error) -> str:
    """The device this process trains on; under torchrun, the process group too (before anything is loaded)."""
    import torch

    cuda = torch.cuda.is_available() if name is None else name.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise user_error(f"--device {name}: this machine has no CUDA device; use --device cpu")
    device = (f"cuda:{env.local_rank}" if env.is_distributed else "cuda") if cuda else "cpu"
    if env.is_distributed:
        import datetime

        import torch.distributed as dist

        from ..parallel.launch import rank0_output, timeout_s

        rank0_output(env)
        if cuda:
            torch.cuda.set_device(env.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s()))
    return device


def _adapt(model, args: argparse.Namespace, user_error) -> None:
    """QLoRA: quantize the frozen base first, then wrap its layers in float adapters (none for ``projector``),
    initialised from ``--seed`` (the same adapter in every process and every rerun)."""
    import torch

    from ..model.lora import DECODER_TARGETS, LoraConfig, LoraError, apply_lora

    if args.projector is not None:
        from ..train.sft import TrainError, load_projector

        try:
            load_projector(model, args.projector)
        except (TrainError, OSError) as e:
            raise user_error(f"--projector {args.projector}: {e}") from None
    if args.quantize:
        from ..model.quant import QuantConfig
        from ..model.quant_model import quantize_model

        quantize_model(model, QuantConfig(args.quantize))
    if args.adapter is not None:
        from llava_next_weights.adapters import AdapterError, load_adapter

        try:
            load_adapter(model, args.adapter, dtype=torch.float32)
        except (AdapterError, OSError) as e:
            raise user_error(f"--adapter {args.adapter}: {e}") from None
    elif args.trainable != "projector":
        torch.manual_seed(args.seed)
        try:
            cfg = LoraConfig(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                             target_modules=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
                             if args.lora_targets else DECODER_TARGETS,
                             # a stage-1 projector travels in the adapter (trained or not: PEFT's modules_to_save)
                             projector="full" if "projector" in args.trainable or args.projector else "frozen")
            apply_lora(model, cfg, dtype=torch.float32)
        except LoraError as e:
            raise user_error(f"--lora-targets / --lora-rank / --lora-alpha / --lora-dropout: {e}") from None


class StepProgress:
    """One progress line per step on stderr (rewritten in place on a terminal): the step of the total, the
    loss, tokens/s over this process's steps so far, and the time left at that pace."""

    def __init__(self) -> None:
        from ..runtime.progress import Progress

        self.progress = Progress(sys.stderr, interval=0.0)
        self.seconds = 0.0
        self.tokens = 0
        self.steps = 0

    def __call__(self, line: dict) -> None:
        self.seconds += line["seconds"]
        self.tokens += line["input_tokens"]
        self.steps += 1
        total, step = line["total_steps"], line["step"]
        left = (total - step) * self.seconds / self.steps
        width = 20
        bar = "#" * round(width * step / total) + "-" * (width - round(width * step / total))
        self.progress.update("training", f"step {step}/{total} [{bar}] loss {line['loss']:.4f}  "
                                         f"{self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s  "
                                         f"ETA {_duration(left)}", final=step == total)


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
