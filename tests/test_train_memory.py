"""The training memory planner (llava_next/train/memory.py) against measurement, not against itself: a decoder of
the 7B's proportions scaled down (width 256, MLP 688, heads of 64, 3 blocks) behind a real vision tower, pooling
and projector, trained one real step with LoRA on a bf16 / int8 / nf4 base, with and without gradient
checkpointing. Measured: the bytes autograd saves for backward (``saved_tensors_hooks``, unique storages, the
model's own parameters and buffers left out), the peak of live tensor bytes over a whole step (a dispatch mode
counting every storage an op creates until it is freed), and the parameter / gradient / AdamW bytes after a real
``AdamW.step``. docs/training.md's table is the code's."""

from __future__ import annotations

import dataclasses
import json
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llava_next.config import LlavaNextConfig, TextConfig, VisionConfig
from llava_next.inputs.tokens import video_tokens
from llava_next.model.llava import LlavaNextModel
from llava_next.model.lora import LoraConfig, apply_lora
from llava_next.model.quant import QuantConfig
from llava_next.model.quant_model import quantize_model
from llava_next.model.training import TrainingEngine, causal_lm_loss
from llava_next.train.memory import (TrainMemoryError, TrainSetting, largest_frames, training_memory,
                                     training_table)

SAVED_TOLERANCE = 0.02  # autograd's saved bytes: the planner counts the same tensors
PEAK_TOLERANCE = 0.20  # the planned peak is at least the measured one and at most 20% above it (measured: +3% to +14%)

V = 1000
CFG = LlavaNextConfig(
    vision=VisionConfig(hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4, image_size=112, patch_size=14),
    text=TextConfig(vocab_size=V, hidden_size=256, intermediate_size=688, num_layers=3, num_heads=4, num_kv_heads=4,
                    max_position_embeddings=4096),
    image_token_id=V - 1, video_token_id=V - 2, spatial_pool_stride=2, template="llava_next_video")
FRAMES, TEXT = 8, 200  # 8 x 16 pooled tokens + 200 text tokens = 328 positions


def build(setting: TrainSetting, cfg: LlavaNextConfig = CFG) -> LlavaNextModel:
    torch.manual_seed(0)
    model = LlavaNextModel(cfg).to(setting.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if setting.quantize:
        quantize_model(model, QuantConfig(setting.quantize))
    apply_lora(model, LoraConfig(r=setting.lora_rank, alpha=32.0, dropout=setting.dropout,
                                 target_modules=setting.targets, projector=setting.projector),
               dtype=setting.adapter_dtype)
    model.train()
    return model


def inputs(setting: TrainSetting) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V - 2, (setting.batch, setting.text_tokens), generator=g)
    ids = torch.cat([ids[:, :5], torch.full((setting.batch, video_tokens(setting.frames, CFG)), CFG.video_token_id),
                     ids[:, 5:]], dim=1)  # (B, T): a video after the first 5 text tokens
    videos = [torch.randn(setting.frames, 3, 112, 112, generator=g) for _ in range(setting.batch)]
    return ids, videos


def step_loss(model, setting: TrainSetting, ids, videos) -> torch.Tensor:
    logits = model(ids, videos=videos, attention_mask=torch.ones_like(ids),
                   engine=TrainingEngine(checkpointing=setting.checkpointing))
    return causal_lm_loss(logits, ids)


def saved_bytes(setting: TrainSetting, cfg: LlavaNextConfig = CFG) -> int:
    """Unique storages autograd keeps for the backward of one forward + loss (the model's own tensors left out)."""
    model = build(setting, cfg)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t
    ids, videos = inputs(setting)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss(model, setting, ids, videos)
    del loss
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """Bytes of every storage an op creates, from its creation until it is freed; ``peak`` is their maximum.
    ``known``: tensors that exist before (the model's, AdamW's moments, the inputs): a view of one, or an
    in-place update, creates nothing."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = {t.untyped_storage().data_ptr() for t in known}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                if st.data_ptr() not in self.seen and st.nbytes():
                    self.seen.add(st.data_ptr())
                    self.live += st.nbytes()
                    weakref.finalize(st, self._free, st.data_ptr(), st.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, key: int, n: int) -> None:
        self.seen.discard(key)
        self.live -= n


def measured_step(setting: TrainSetting) -> dict[str, int]:
    """Two real AdamW steps; the second (steady state: the moments exist) is measured. Returns the model's
    frozen bytes, the trainable parameters', their gradients', AdamW's and the peak of everything the step
    creates on top of the model (moments and gradients made in the first step are counted as live)."""
    model = build(setting)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    ids, videos = inputs(setting)
    step_loss(model, setting, ids, videos).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    moments = sum(t.nbytes for st in opt.state.values() for k, t in st.items() if k != "step")
    state = [t for st in opt.state.values() for t in st.values()]
    tracker = LiveBytes([*model.parameters(), *model.buffers(), *state, ids, *videos])
    with tracker:
        step_loss(model, setting, ids, videos).backward()
        grads = sum(p.grad.nbytes for p in params)
        opt.step()
    trainable = sum(p.nbytes for p in params)
    frozen = sum(t.nbytes for t in model.state_dict().values()) - trainable
    return {"frozen": frozen, "trainable": trainable, "grads": grads, "moments": moments,
            "peak": moments + tracker.peak}


SETTINGS = [TrainSetting(frames=FRAMES, text_tokens=TEXT, quantize=q, checkpointing=c)
            for q in (None, "int8", "nf4") for c in (False, True)]


def _id(s: TrainSetting) -> str:
    return f"{s.base_name}-{'ckpt' if s.checkpointing else 'full'}"


@pytest.mark.parametrize("setting", [*SETTINGS,
                                     TrainSetting(frames=FRAMES, text_tokens=TEXT, adapter_dtype=torch.bfloat16),
                                     TrainSetting(frames=FRAMES, text_tokens=TEXT, dropout=0.05),
                                     TrainSetting(frames=FRAMES, text_tokens=TEXT, projector="full", batch=2)],
                         ids=lambda s: _id(s) + ("" if s.adapter_dtype == torch.float32 else "-bf16adapter")
                         + ("-dropout" if s.dropout else "") + ("-projector" if s.projector == "full" else ""))
def test_saved_for_backward_is_what_autograd_saves(setting):
    plan = training_memory(CFG, setting)
    got = saved_bytes(setting)
    assert abs(plan.saved - got) <= SAVED_TOLERANCE * got, (plan.saved, got)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_saved_for_backward_with_grouped_query_attention_and_a_tied_head(quantize):
    """Qwen-style: 2 KV heads for 4 query heads (SDPA keeps K and V unrepeated), lm_head tied to the embedding."""
    cfg = CFG.replace(text=dataclasses.replace(CFG.text, num_kv_heads=2, tie_word_embeddings=True))
    setting = TrainSetting(frames=FRAMES, text_tokens=TEXT, quantize=quantize)
    got, plan = saved_bytes(setting, cfg), training_memory(cfg, setting)
    assert abs(plan.saved - got) <= SAVED_TOLERANCE * got, (plan.saved, got)


@pytest.mark.parametrize("setting", SETTINGS, ids=_id)
def test_states_and_peak_match_a_real_adamw_step(setting):
    plan = training_memory(CFG, setting)
    got = measured_step(setting)
    assert plan.weights == got["frozen"]  # bf16, or int8 + scales / NF4 + absmax + double-quant statistics
    assert plan.adapter == got["trainable"] and plan.gradients == got["grads"] and plan.optimizer == got["moments"]
    want = plan.peak_bytes - plan.weights - plan.adapter  # the tracker sees what the step creates
    assert got["peak"] <= want <= (1 + PEAK_TOLERANCE) * got["peak"], (want, got["peak"])  # never below


def test_checkpointing_keeps_one_input_per_block_and_the_7b_numbers():
    from llava_next.config import PRESETS

    cfg = PRESETS["LLaVA-NeXT-Video-7B"].config
    s = TrainSetting(frames=8)
    assert training_memory(cfg, s).tokens == 8 * 144 + 128  # 144 pooled tokens a frame at stride 2
    full, ckpt = training_memory(cfg, s), training_memory(cfg, replace(s, checkpointing=True))
    assert ckpt.saved - ckpt.logits < full.saved / 10
    nf4 = training_memory(cfg, replace(s, quantize="nf4", checkpointing=True))
    assert nf4.weights < full.weights / 3  # ~4.1 bits a decoder weight, the tower and embeddings in bf16
    assert largest_frames(cfg, 24 * 2**30, replace(s, quantize="nf4", checkpointing=True)) >= 8  # the T4 / L4 plan
    assert largest_frames(cfg, 16 * 2**30, s) == 0  # bf16 weights alone are 14 GB


def test_bad_settings_are_clear_errors():
    with pytest.raises(TrainMemoryError, match="frames must be a non-negative integer"):
        TrainSetting(frames=-1)
    with pytest.raises(TrainMemoryError, match="quantize must be None, 'int8' or 'nf4'"):
        TrainSetting(quantize="int4")
    with pytest.raises(TrainMemoryError, match="targets"):
        TrainSetting(targets=("fc1",))
    with pytest.raises(TrainMemoryError, match="projector must be 'frozen' or 'full'"):
        TrainSetting(projector="lora")


def test_docs_training_table_is_the_planners():
    doc = (Path(__file__).parent.parent / "docs" / "training.md").read_text(encoding="utf-8")
    assert training_table() in doc


# ---- llava-next inspect --train-memory ------------------------------------------------------------------
def test_inspect_train_memory_answers_for_one_device(capsys):
    from llava_next.cli import main as cli
    from llava_next.config import PRESETS

    cfg = PRESETS["LLaVA-NeXT-Video-7B"].config
    assert cli.main(["inspect", "--model", "llava-hf/LLaVA-NeXT-Video-7B-hf", "--train-memory", "24", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == 8 and report["tokens"] == 8 * 144 + 128 and report["context_frames"] == 70
    got = {(s["base"], s["checkpointing"]): s for s in report["settings"]}
    assert len(got) == 6
    for (base, ckpt), s in got.items():
        setting = TrainSetting(quantize=None if base == "bf16" else base, checkpointing=ckpt)
        assert s["largest_frames"] == largest_frames(cfg, 24 * 2**30, setting)
        assert s["peak"] == training_memory(cfg, setting).peak_bytes
    assert got[("nf4", True)]["fits"] and not got[("bf16", False)]["fits"]
    assert cli.main(["inspect", "--preset", "LLaVA-NeXT-Video-7B", "--train-memory", "16", "--frames", "32",
                     "--lora-rank", "64"]) == 0
    text = capsys.readouterr().out
    assert "rank 64" in text and "at 32 frames = 4736 tokens (4608 visual + 128 text)" in text
    assert "NF4 dequantization" in text and text.rstrip().splitlines()[-1].startswith("fits")


@pytest.mark.parametrize("argv, message", [
    (["--train-memory", "24", "--video", "clip.mp4"],
     "--video: --train-memory plans a training step from the model's config"),
    (["--train-memory", "24", "--rope-scale", "3"], "--rope-scale: --train-memory plans"),
    (["--train-memory", "24", "--frames", "100"], "context holds at most 70 frames beside 128 text tokens"),
    (["--lora-rank", "8", "--video", "clip.mp4"], "--lora-rank: the rank of a planned training step; add --train-memory"),
])
def test_inspect_train_memory_refuses_what_it_would_ignore(argv, message, capsys):
    from llava_next.cli import main as cli

    assert cli.main(["inspect", *argv]) == 2
    assert message in capsys.readouterr().err


def test_inspect_train_memory_needs_a_size(capsys):
    from llava_next.cli import main as cli

    for bad in ("abc", "0", "-3", "inf"):
        with pytest.raises(SystemExit) as e:  # argparse's usage error
            cli.main(["inspect", "--train-memory", bad])
        assert e.value.code == 2 and "expected a memory size in GiB (e.g. 24)" in capsys.readouterr().err


if __name__ == "__main__":  # the figures: python tests/test_train_memory.py (from the repository root)
    for s in SETTINGS:
        plan, saved, step = training_memory(CFG, s), saved_bytes(s), measured_step(s)
        want = plan.peak_bytes - plan.weights - plan.adapter
        exact = (plan.weights, plan.adapter, plan.gradients, plan.optimizer) == (
            step["frozen"], step["trainable"], step["grads"], step["moments"])
        print(f"{_id(s):10s} saved: plan {plan.saved:>9,} measured {saved:>9,} ({plan.saved / saved - 1:+.2%}); "
              f"step peak: plan {want:>10,} measured {step['peak']:>10,} ({want / step['peak'] - 1:+.1%}); "
              f"weights / adapter / grads / AdamW exact: {exact}")
