"""Supervised fine-tuning: the loop, its checkpoints and its resumption.

    run = SFTRun(model, data, SFTConfig(out="runs/ko", steps=200, lr=2e-4, trainable="lora"))
    run.train()                      # resumes from runs/ko when it holds a checkpoint of the same run

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` items. The loss of a step is the mean
cross-entropy over all of its supervised tokens (transformers' ``num_items_in_batch`` rule: each micro-batch
adds sum / total, so the gradient does not depend on how the tokens fall into micro-batches). Items are
visited in a seeded permutation per epoch (the data's frames are drawn per (seed, epoch, item) too), so a
position in the run — (epoch, index in the permutation) — names the next batch exactly.

The output directory, written as it goes:
    run.json                    the run's settings; a different run is refused (never written over)
    steps.jsonl                 one JSON line per optimizer step: step, epoch, loss, tokens, lr, seconds
    checkpoint/                 the latest complete checkpoint (written to a temporary directory, then renamed):
        trainable.safetensors   the trained tensors by name (LoRA weights, or the projector, ...)
        optimizer.safetensors   AdamW's moments by parameter, flat; state.json: step, position, RNG, schedule
    adapter/                    at the end: the adapter in PEFT's format (llava_next_weights.adapters)

Under torchrun (a process group initialised before the run: cli/train.py) the run is data-parallel with
torch's ``DistributedDataParallel``: each of the N processes takes its ``batch_size`` items of a global
micro-batch of N x ``batch_size`` consecutive items of the same seeded order, DDP averages the gradients
of the trainable tensors (the frozen base is neither broadcast nor reduced), and the loss is normalised by
the supervised tokens of the whole global step (one all-reduce of a count), so N processes reach the
weights of one process with an N times larger ``batch_size`` (tests/test_train.py). A rank whose slice of
the last micro-batch of an epoch is empty runs one item with its loss times zero, so every rank takes part
in every gradient all-reduce. Rank 0 writes the directory; every rank's RNG state is in the checkpoint.
``autocast="bf16"``: the forward runs under ``torch.autocast`` in bfloat16 over float32 weights (the
trainable tensors and AdamW's moments stay float32: transformers' Trainer ``bf16=True``).

Nothing is unpickled: tensors are safetensors, the rest JSON. After ``kill -9`` the same command resumes
from ``checkpoint/`` and reaches the same weights as an uninterrupted run (the RNG, the schedule, the data
position and the optimizer moments are all restored; tests/test_train.py checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..model.training import TrainingEngine, causal_lm_loss
from .data import IGNORE_INDEX, TrainingData, collate, pad_id

Trainable = Literal["lora", "projector", "lora+projector", "full"]


class TrainError(ValueError):
    """A run that cannot start or resume as asked; the message says what to do."""


def materialize_trainable(path: Path, config, dtype: torch.dtype | None, device) -> torch.nn.Module:
    """The loader's model for training (``runtime.loading.load(..., materialize=materialize_trainable)``):
    weights in float32 unless ``dtype`` says otherwise, not prepacked (packing is for inference), every
    parameter frozen until a run chooses what trains."""
    from llava_next_weights.load import load_into

    from ..model.llava import LlavaNextModel

    with torch.device("meta"):
        model = LlavaNextModel(config)
    load_into(model, path, dtype=dtype or torch.float32, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass(frozen=True)
class SFTConfig:
    out: str
    steps: int = 0  # optimizer steps; 0: ``epochs`` full passes
    epochs: int = 1
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after the warmup: decay to 0 at the last step, or none
    trainable: Trainable = "lora"
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 50
    max_grad_norm: float = 1.0
    autocast: Literal["bf16"] | None = None  # mixed precision over float32 weights (module docstring)


def trainable_names(model: torch.nn.Module, what: Trainable) -> list[str]:
    """The parameters a run trains; every other parameter is frozen."""
    def wanted(name: str) -> bool:
        lora = ".lora_A." in name or ".lora_B." in name
        projector = name.startswith("projector.")
        return {"lora": lora, "projector": projector, "lora+projector": lora or projector, "full": True}[what]
    names = [n for n, _ in model.named_parameters() if wanted(n)]
    if not names:
        raise TrainError(f"--trainable {what}: the model has no such parameters (apply LoRA first for 'lora')")
    return names


class SFTRun:
    """One fine-tuning run into ``config.out`` (module docstring)."""

    def __init__(self, model: torch.nn.Module, data: TrainingData, config: SFTConfig,
                 on_step: Callable[[dict], None] | None = None) -> None:
        self.model, self.data, self.cfg, self.on_step = model, data, config, on_step
        self.out = Path(config.out)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        self.names = trainable_names(model, config.trainable)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                if name in self.names:
                    p.data = p.data.clone()  # a mmapped checkpoint tensor is never written in place
                p.requires_grad_(name in self.names)
        self.params = [params[n] for n in self.names]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        per_epoch = math.ceil(len(data) / (config.batch_size * config.grad_accum * self.world))
        self.total_steps = config.steps or per_epoch * config.epochs
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.engine = TrainingEngine(checkpointing=config.gradient_checkpointing)
        self.step, self.epoch, self.index = 0, 0, 0  # the next batch: item ``index`` of epoch ``epoch``'s order
        self.forward = _data_parallel(model, self.names) if self.world > 1 else model

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to 0 at the last step (or the full rate: ``lr_schedule="constant"``)."""
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        if self.cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - self.cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.cfg.warmup_steps) / span)))

    # ---- the loop ---------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Run (or resume) to ``total_steps``; returns the output directory."""
        self._start()
        self.model.train()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            stats = self._optimizer_step()
            self.step += 1
            line = {"step": self.step, "epoch": self.epoch, **stats, "lr": self.schedule.get_last_lr()[0],
                    "seconds": round(time.perf_counter() - t0, 4), "total_steps": self.total_steps}
            if self.rank == 0:
                with open(self.out / "steps.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
                if self.on_step is not None:
                    self.on_step(line)
            if self.step % self.cfg.save_every == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        self.model.eval()
        return self.out

    def _optimizer_step(self) -> dict:
        """``grad_accum`` micro-batches, one AdamW step; the step's mean loss, its supervised tokens and all
        the tokens it read (visual ones included), over every rank: the step's line in steps.jsonl."""
        micro = [self._next_items() for _ in range(self.cfg.grad_accum)]
        tokens = _all_sum(sum(int(w * (b.labels[:, 1:] != IGNORE_INDEX).sum()) for b, w in micro))
        seen = _all_sum(sum(int(w * b.attention_mask.sum()) for b, w in micro))
        loss_sum = 0.0
        for i, (batch, weight) in enumerate(micro):
            with self._sync(last=i == len(micro) - 1):
                # DDP averages gradients over ranks: times world, the sum over ranks / tokens
                loss = self._loss(batch, max(tokens, 1)) * (weight * self.world)
                loss.backward()
            loss_sum += loss.item() / self.world
        self._apply_step()
        return {"loss": _all_sum(loss_sum), "tokens": tokens, "input_tokens": seen}

    def _apply_step(self) -> None:
        """The accumulated gradients -> clipped, one AdamW step, the schedule's next rate."""
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()

    def _sync(self, last: bool):
        """DDP all-reduces the gradients on the last micro-batch of a step only."""
        return contextlib.nullcontext() if last or self.world == 1 else self.forward.no_sync()

    def _logits(self, batch, model: torch.nn.Module | None = None) -> torch.Tensor:
        """(B, T, V) logits of a batch under the run's autocast; ``model`` defaults to the (DDP-wrapped) one."""
        device = self.params[0].device.type  # the model's; the batch is on the CPU until the model moves it
        autocast = torch.autocast(device, dtype=torch.bfloat16) if self.cfg.autocast else contextlib.nullcontext()
        with autocast:
            return (model or self.forward)(batch.input_ids, images=batch.images,
                                           videos=[v.pixel_values for v in batch.videos],
                                           attention_mask=batch.attention_mask, engine=self.engine)

    def _loss(self, batch, num_items: int) -> torch.Tensor:
        return causal_lm_loss(self._logits(batch), batch.labels, num_items=num_items)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=g).tolist()

    def _next_items(self):
        """This rank's part of the next global micro-batch (``world`` x ``batch_size`` consecutive items of the
        run's order; epochs roll over, the last batch of an epoch may be short) and the weight of its loss: 0
        for a rank whose part is empty, which runs the epoch's first item so that it still joins the
        gradient all-reduce."""
        order = self._order(self.epoch)
        whole = order[self.index:self.index + self.cfg.batch_size * self.world]
        mine = whole[self.rank * self.cfg.batch_size:(self.rank + 1) * self.cfg.batch_size]
        self.data.set_epoch(self.epoch)
        batch = self._collate(mine or order[:1])
        self.index += len(whole)
        if self.index >= len(order):
            self.epoch, self.index = self.epoch + 1, 0
        return batch, 1.0 if mine else 0.0

    def _collate(self, indices: list[int]):
        return collate([self.data[i] for i in indices], pad_id(self.data.tokenizer))

    # ---- the output directory ----------------------------------------------------------------------------
    def _settings(self) -> dict:
        from ..model.quant import QuantLinear

        quantized = sorted({type(m).__name__ for m in self.model.modules() if isinstance(m, QuantLinear)})
        return {**dataclasses.asdict(self.cfg), "data": str(self.data.path), "items": len(self.data),
                "trainable_names": len(self.names), "quantized_base": quantized,
                "base_dtype": str(getattr(self.model, "dtype", "")).removeprefix("torch."),
                "world_size": self.world}  # a QLoRA run resumes as one

    def _start(self) -> None:
        """A fresh directory gets run.json; one of the same run is resumed; anything else is refused (on every
        rank at once: the ranks read the same directory, rank 0 writes it)."""
        from ..parallel.launch import agree

        resume = agree("checking the output directory", self._check_out, user_errors=(TrainError, OSError))
        if resume:
            self.load_checkpoint()
        if self.rank == 0:  # every rank has looked (``agree`` gathers them all) before rank 0 writes
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "run.json").write_text(json.dumps(self._settings(), indent=1), encoding="utf-8")
        _barrier()

    def _check_out(self) -> bool:
        """Whether ``out`` holds a checkpoint of this run to resume; a TrainError for another run's directory."""
        run_file = self.out / "run.json"
        if run_file.exists():
            mine, theirs = self._settings(), json.loads(run_file.read_text(encoding="utf-8"))
            differ = sorted(k for k in set(mine) | set(theirs) if k not in ("out", "steps", "epochs")
                            and mine.get(k) != theirs.get(k))
            if differ:
                raise TrainError(f"{self.out} holds another run (different {', '.join(differ)}): give a new --out, "
                                 f"or the same settings to resume it")
            return (self.out / "checkpoint" / "state.json").exists()
        if self.out.exists() and any(self.out.iterdir()):
            raise TrainError(f"{self.out} is not empty and holds no run.json: give an empty or new --out")
        return False

    def save_checkpoint(self) -> None:
        """Write ``checkpoint/`` atomically: a complete temporary directory renamed over the old one (rank 0,
        with every rank's RNG state)."""
        rng = _all_gather_rng()
        if self.rank == 0:
            self._write_checkpoint(rng)
        _barrier()

    def _write_checkpoint(self, rng: list[dict[str, torch.Tensor]]) -> None:
        tmp, final = self.out / "checkpoint.tmp", self.out / "checkpoint"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        params = dict(self.model.named_parameters())
        save_file({n: params[n].detach().contiguous() for n in self.names}, tmp / "trainable.safetensors")
        moments = {}
        for i, n in enumerate(self.names):
            st = self.optimizer.state.get(self.params[i], {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    moments[f"{n}:{key}"] = st[key].detach().reshape(-1).contiguous() if key != "step" else \
                        st[key].detach().reshape(1).float()
        save_file(moments, tmp / "optimizer.safetensors")
        save_file({f"{kind}.rank{r}": t for r, states in enumerate(rng) for kind, t in states.items()},
                  tmp / "rng.safetensors")
        state = {"step": self.step, "epoch": self.epoch, "index": self.index,
                 "schedule": self.schedule.state_dict()}
        (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
        old = self.out / "checkpoint.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> None:
        ckpt = self.out / "checkpoint"
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in load_file(ckpt / "trainable.safetensors").items():
                params[n].copy_(t)
        moments = load_file(ckpt / "optimizer.safetensors")
        for i, n in enumerate(self.names):
            p = self.params[i]
            if f"{n}:step" in moments:
                self.optimizer.state[p] = {"step": moments[f"{n}:step"].reshape(()),
                                           "exp_avg": moments[f"{n}:exp_avg"].view_as(p).clone(),
                                           "exp_avg_sq": moments[f"{n}:exp_avg_sq"].view_as(p).clone()}
        self.schedule.load_state_dict(state["schedule"])
        # the rate of the next step, from this run's schedule: a run resumed with more --steps continues on the
        # longer schedule (the saved last rate was computed for the shorter one), and the scheduler's state
        # does not set the optimizer's rate anyway
        lrs = [base * self._lr_factor(self.schedule.last_epoch) for base in self.schedule.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.schedule._last_lr = lrs
        rng = load_file(ckpt / "rng.safetensors")
        torch.set_rng_state(rng[f"cpu.rank{self.rank}"])
        if f"cuda.rank{self.rank}" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[f"cuda.rank{self.rank}"])
        self.step, self.epoch, self.index = state["step"], state["epoch"], state["index"]
        # steps.jsonl may hold lines past the checkpoint (a kill between a step and its save): drop them
        log = self.out / "steps.jsonl"
        if log.exists() and self.rank == 0:
            kept = [line for line in log.read_text(encoding="utf-8").splitlines()
                    if line and json.loads(line)["step"] <= self.step]
            log.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# ---- data parallel (torchrun) ----------------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _all_sum(value: float | int) -> float | int:
    """``value`` summed over the ranks (itself in one process). The tensor is on the process group's device
    (NCCL reduces CUDA tensors only)."""
    if not _distributed():
        return value
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return type(value)(t.item())


def _rng_states() -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator's, and the current GPU's when it runs on CUDA (dropout)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _all_gather_rng() -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states, in rank order (rank 0 writes them all into the checkpoint)."""
    if not _distributed():
        return [_rng_states()]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, _rng_states())
    return states


def _data_parallel(model: torch.nn.Module, trainable: list[str]) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel``, which broadcasts and all-reduces the trainable tensors only
    (the frozen base, float or NF4 buffers, is the same on every rank already: read from one checkpoint)."""
    from torch.nn.parallel import DistributedDataParallel

    keep = set(trainable)
    ignored = [n for n, _ in model.named_parameters() if n not in keep] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device = next(iter(model.parameters())).device
    # a batch without images or videos leaves the projector and the vision tower out: only then must DDP look
    # for unused tensors (an extra walk over the graph every step, and a warning when it finds none)
    outside_decoder = any(not n.startswith("language_model.") for n in trainable)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=outside_decoder)


# ---- the stage-1 projector --------------------------------------------------------------------------------
def save_projector(model: torch.nn.Module, path: Path) -> Path:
    """A ``--trainable projector`` run's result: the projector's tensors in llava-next's names
    (``projector.linear_1.weight``, ...), safetensors; ``load_projector`` reads it into a stage-2 model."""
    tensors = {f"projector.{k}": v.detach().to("cpu").contiguous()
               for k, v in model.get_submodule("projector").state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


@torch.no_grad()
def load_projector(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy a ``save_projector`` file into ``model``'s projector: exactly its tensors, shapes checked."""
    from llava_next_weights.load import check_safetensors

    path = Path(path)
    if not path.is_file():
        raise TrainError("no such file (a stage-1 run writes OUT/projector.safetensors)")
    check_safetensors(path, TrainError)
    tensors = load_file(path)
    mine = {f"projector.{k}": p for k, p in model.get_submodule("projector").named_parameters()}
    if set(tensors) != set(mine):
        raise TrainError(f"not a projector of this model: it holds {sorted(tensors)[:4]}, the model's projector is "
                         f"{sorted(mine)}")
    for k, v in tensors.items():
        if v.shape != mine[k].shape:
            raise TrainError(f"{k} has shape {tuple(v.shape)}, this model's is {tuple(mine[k].shape)}")
        mine[k].data = v.to(device=mine[k].device, dtype=mine[k].dtype)  # replaced, never written: the base may be mmapped
