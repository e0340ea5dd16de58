"""Direct preference optimisation (DPO): TRL's DPOTrainer losses over SFT's loop, the reference cached once.

    run = DPORun(model, PreferenceData("prefs.jsonl", ...), DPOConfig(out="runs/dpo", beta=0.1, steps=100))
    run.train()                      # reference log-probs first (OUT/reference_logps.safetensors), then the steps

What is here, top to bottom
- ``sequence_logps``: the log-probability of each row's answer, summed over its supervised tokens (TRL's
  ``per_token_logps.sum(dim=1)``, the completion mask being our labels != -100).
- ``dpo_losses``: per-pair losses from policy and reference log-probs, as TRL 1.16 writes them
  (trl/trainer/dpo_trainer.py, ``DPOTrainer._compute_loss``), with ``delta = (chosen - ref_chosen) -
  (rejected - ref_rejected)``:
    sigmoid   -logsigmoid(beta delta)                                                       (line 1388)
              with label_smoothing e > 0: -(1 - e) logsigmoid(beta delta) - e logsigmoid(-beta delta), the
              conservative DPO of TRL's earlier "sigmoid" (TRL 1.16 keeps this form in "aot", lines 1453-1456)
    robust    ((1 - e)(-logsigmoid(beta delta)) + e logsigmoid(-beta delta)) / (1 - 2e)       (lines 1429-1431)
    ipo       (chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 beta))^2,
              n = the answer's tokens (TRL's length-normalised IPO)                           (lines 1398-1404)
  The step's loss is the mean over its pairs (over every micro-batch and rank: each adds sum / pairs).
- ``pair_metrics``: what TRL logs, by its names: rewards/chosen = beta (chosen - ref_chosen), rewards/rejected,
  rewards/margins (their difference), rewards/accuracies (chosen reward > rejected reward), logps/chosen,
  logps/rejected (lines 1580-1601), as sums to average over the step.
- ``DPORun``: SFTRun (train/sft.py: the loop, checkpoints, resume, DDP, autocast) with a pair batch and this
  loss; before step 1 it computes the reference log-probs of every pair once, in eval mode without
  gradients, and keeps them in ``OUT/reference_logps.safetensors`` (a resumed run reads them back).

The reference (TRL's ``precompute_ref_log_probs``): by default the same model with its LoRA adapter disabled
(model/lora.py ``adapters_disabled``, PEFT's ``disable_adapter``; no second copy of the weights); or, with
``reference_adapter`` (``--ref-adapter DIR``), the same base with that adapter's tensors copied into the LoRA
layers for the reference pass and the policy's copied back after (the usual DPO after SFT: start from the SFT
adapter and compare against it); or another model of the same configuration, ``reference_model``
(``--ref-model``), used for that one pass. Only LoRA
trains (``trainable="lora"``): a disabled adapter is then exactly the starting model.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..model.lora import adapters_disabled, lora_state_dict
from .data import IGNORE_INDEX, pad_id
from .preferences import PreferenceData, collate_pairs
from .sft import SFTConfig, SFTRun, TrainError, _all_sum, _barrier

LossType = Literal["sigmoid", "robust", "ipo"]
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass(frozen=True)
class DPOConfig(SFTConfig):
    beta: float = 0.1
    loss_type: LossType = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "adapter disabled"  # what the reference is (run.json: a run with another one is refused)

    def __post_init__(self) -> None:
        if self.loss_type not in ("sigmoid", "robust", "ipo"):
            raise TrainError(f"loss_type {self.loss_type!r}: choose sigmoid, robust or ipo")
        if self.beta <= 0:
            raise TrainError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise TrainError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.trainable != "lora":
            raise TrainError(f"DPO trains LoRA adapters only (--trainable lora), got {self.trainable!r}")


# ---- the maths -------------------------------------------------------------------------------------------
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) logits, (B, T) labels -> (B,) summed log-probs of the supervised tokens (float32) and (B,) their
    counts. Position t predicts labels[:, t + 1], as in the causal-LM loss."""
    targets = labels[:, 1:].to(logits.device)  # (B, T-1)
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero()[:, 0]  # (N,): the row of each supervised token
    logp = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # (N, V): only where an answer token is next
    token_logps = logp.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)  # (N,)
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, token_logps)
    return sums, mask.sum(dim=1)  # (B,), (B,)


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               cfg: DPOConfig, n_chosen: torch.Tensor | None = None,
               n_rejected: torch.Tensor | None = None) -> torch.Tensor:
    """(P,) log-probs of P pairs under the policy and the reference -> (P,) losses (module docstring)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta, beta, e = chosen_ratio - rejected_ratio, cfg.beta, cfg.label_smoothing
    if cfg.loss_type == "sigmoid":
        return -(1 - e) * F.logsigmoid(beta * delta) - e * F.logsigmoid(-beta * delta)
    if cfg.loss_type == "robust":
        return (-(1 - e) * F.logsigmoid(beta * delta) + e * F.logsigmoid(-beta * delta)) / (1 - 2 * e)
    if n_chosen is None or n_rejected is None:
        raise ValueError("ipo needs the answers' token counts")
    ipo = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
    return (ipo - 1 / (2 * beta)) ** 2


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, beta: float) -> dict[str, float]:
    """TRL's logged values as sums over the pairs (divide by the pairs for TRL's means)."""
    r_chosen, r_rejected = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    return {"rewards/chosen": r_chosen.sum().item(), "rewards/rejected": r_rejected.sum().item(),
            "rewards/margins": (r_chosen - r_rejected).sum().item(),
            "rewards/accuracies": (r_chosen > r_rejected).float().sum().item(),
            "logps/chosen": chosen.detach().sum().item(), "logps/rejected": rejected.detach().sum().item()}


# ---- the run ---------------------------------------------------------------------------------------------
@dataclass
class PairBatch:
    batch: object  # data.Batch of 2P rows: the P chosen, then the P rejected
    indices: list[int]  # the P pairs' positions in the file (the reference cache's rows)


class DPORun(SFTRun):
    """One DPO run into ``config.out`` (module docstring). ``reference_adapter``: the reference's LoRA tensors
    (llava-next names, as ``lora_state_dict``); ``reference_model``: another model of the same configuration."""

    def __init__(self, model: torch.nn.Module, data: PreferenceData, config: DPOConfig,
                 on_step: Callable[[dict], None] | None = None, *,
                 reference_adapter: dict[str, torch.Tensor] | None = None,
                 reference_model: torch.nn.Module | None = None) -> None:
        super().__init__(model, data, config, on_step)
        self.reference_adapter, self.reference_model = reference_adapter, reference_model
        self.reference: torch.Tensor | None = None  # (pairs, 2): chosen, rejected

    def _start(self) -> None:
        super()._start()
        path = self.out / REFERENCE_FILE
        cached = path.exists()
        _barrier()  # every rank has looked before rank 0 may write it: all take the same branch
        if cached:
            self.reference = load_file(path)["logps"]
        else:
            model = self.reference_model or self.model
            self.reference = reference_logps(model, self.data, self._reference_logits)
            if self.rank == 0:
                save_file({"logps": self.reference.contiguous()}, self.out / (REFERENCE_FILE + ".tmp"),
                          metadata={"reference": self.cfg.reference})
                os.replace(self.out / (REFERENCE_FILE + ".tmp"), path)
            _barrier()
        if self.reference.shape != (len(self.data), 2):
            raise TrainError(f"{path}: reference log-probs of shape {tuple(self.reference.shape)}, the data has "
                             f"{len(self.data)} pairs; give a new --out")

    def _reference_logits(self, batch) -> torch.Tensor:
        if self.reference_model is not None:
            return self._logits(batch, model=self.reference_model)
        with self._as_reference():
            return self._logits(batch, model=self.model)

    @contextlib.contextmanager
    def _as_reference(self):
        """The model as the reference: its adapter disabled, or the reference adapter's tensors in its place."""
        if self.reference_adapter is None:
            with adapters_disabled(self.model):
                yield
            return
        policy = {k: v.clone() for k, v in lora_state_dict(self.model).items()}
        if set(policy) != set(self.reference_adapter):
            raise TrainError("the reference adapter does not fit the policy's LoRA layers (different targets or "
                             "projector): give an adapter of the same layers and rank")
        with torch.no_grad():
            live = lora_state_dict(self.model)
            for k, t in self.reference_adapter.items():
                live[k].copy_(t)
            try:
                yield
            finally:
                for k, t in policy.items():
                    live[k].copy_(t)

    def _collate(self, indices: list[int]) -> PairBatch:
        return PairBatch(collate_pairs([self.data[i] for i in indices], pad_id(self.data.tokenizer)), indices)

    def pair_terms(self, pb: PairBatch) -> tuple[torch.Tensor, dict[str, float], int]:
        """(P,) losses of a pair batch, TRL's metric sums, and its supervised tokens."""
        logps, counts = sequence_logps(self._logits(pb.batch), pb.batch.labels)
        (chosen, rejected), (n_chosen, n_rejected) = logps.chunk(2), counts.chunk(2)
        ref = self.reference[pb.indices].to(logps.device)  # (P, 2)
        losses = dpo_losses(chosen, rejected, ref[:, 0], ref[:, 1], self.cfg, n_chosen, n_rejected)
        return losses, pair_metrics(chosen, rejected, ref[:, 0], ref[:, 1], self.cfg.beta), int(counts.sum())

    def _optimizer_step(self) -> dict:
        """``grad_accum`` pair batches, one AdamW step; the loss is the mean over the step's pairs (all ranks)."""
        micro = [self._next_items() for _ in range(self.cfg.grad_accum)]
        pairs = _all_sum(sum(int(w * len(pb.indices)) for pb, w in micro))
        seen = _all_sum(sum(int(w * pb.batch.attention_mask.sum()) for pb, w in micro))
        sums: dict[str, float] = {"loss": 0.0}
        tokens = 0
        for i, (pb, weight) in enumerate(micro):
            with self._sync(last=i == len(micro) - 1):
                losses, metrics, n = self.pair_terms(pb)
                # DDP averages gradients over ranks: times world, the sum over ranks / pairs
                (losses.sum() * (weight * self.world / max(pairs, 1))).backward()
            for k, v in {"loss": losses.sum().item(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + weight * v
            tokens += int(weight * n)
        self._apply_step()
        means = {k: _all_sum(v) / max(pairs, 1) for k, v in sums.items()}
        return {**means, "pairs": pairs, "tokens": _all_sum(tokens), "input_tokens": seen}


@torch.no_grad()
def reference_logps(model: torch.nn.Module, data: PreferenceData, logits_of, batch_size: int = 1) -> torch.Tensor:
    """(pairs, 2) float32: each pair's chosen and rejected answer log-probs under ``logits_of(batch)`` (eval
    mode: no dropout), in file order."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in range(0, len(data), batch_size):
            batch = collate_pairs([data[i] for i in range(start, min(start + batch_size, len(data)))],
                                  pad_id(data.tokenizer))
            logps, _ = sequence_logps(logits_of(batch), batch.labels)
            rows.append(torch.stack(logps.float().cpu().chunk(2), dim=1))  # (P, 2)
    finally:
        model.train(was_training)
    return torch.cat(rows)
