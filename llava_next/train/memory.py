"""The training memory planner: what one LoRA / QLoRA fine-tuning step needs, from the config alone.

    plan = training_memory(config, TrainSetting(frames=8, quantize="nf4", checkpointing=True))
    plan.peak_bytes, plan.rows()                 # the peak and the breakdown, term by term
    largest_frames(config, 24 * 2**30, TrainSetting(quantize="nf4"))   # the most frames a 24 GiB device holds
    training_table()                             # docs/training.md's table (LLaVA-NeXT-Video-7B)

What a step of ``llava-next train`` holds (``train/sft.py`` with ``model/training.py``'s ``TrainingEngine``),
term by term; N = batch x tokens (visual tokens from the config, ``inputs.tokens.video_tokens``, + text), C the
decoder's width, I its MLP width, s the compute dtype's bytes, a the adapters':

- **weights**: the frozen base (``runtime.memory.weight_bytes``: bf16, or the decoder's linears in int8 / NF4
  with NF4's absmax and double-quantization statistics), vision tower and projector in float.
- **adapter, gradients, AdamW**: the LoRA matrices (r x in + out x r per target linear), a gradient each and
  AdamW's two moments, all in the adapters' dtype (fp32 by default, as PEFT keeps them).
- **saved for backward**, per block (what autograd keeps; ``block_saved_bytes``, measured in
  tests/test_train_memory.py with ``saved_tensors_hooks``): each RMSNorm's fp32 input and its rsqrt; SDPA's
  rotated q, k, v, output and log-sum-exp; for a padded batch the (B, 1, T, T) attention mask in the compute
  dtype (SDPA turns the boolean key mask into an additive one and keeps it; ``TrainingEngine`` passes none for
  an unpadded batch); the MLP's gate, silu(gate) and up;
  and per LoRA target its input in the adapters' dtype (a copy per target when that dtype differs from the
  compute dtype: fp32 adapters on a bf16 base double the block's activations), the dropout mask (dropout > 0)
  and the r-wide ``lora_A`` output. A frozen int8 or NF4 base keeps nothing (``_FrozenQuantLinearFn``,
  ``_NF4LinearFn``: the weight is dequantized again in the backward). Without checkpointing every block's tensors stay until the backward reaches
  it; with it only each block's (B, T, C) input stays, and one block's tensors exist again while its backward
  runs (recomputed). The first block keeps less when nothing before the decoder trains (its input needs no
  gradient).
- **logits**: the loss (``causal_lm_loss``, fp32 cross-entropy) keeps the fp32 log-softmax (N, V); its backward
  adds two more fp32 (N, V) gradients on top of everything saved: the peak of a step without checkpointing.
- **NF4 dequantization**: an NF4 linear dequantizes its whole weight in the forward and again in the backward:
  for a moment the weight in the compute dtype plus one chunk's fp32 temporaries (``model/nf4.py``); lm_head's
  (V x C, 263 MB in bf16 for a 7B) beside the logits' gradient, a block's largest linear beside its recomputed
  tensors.
- **vision forward**: the frozen tower runs without a graph (nothing kept), ``FRAME_BATCH`` frames at a time,
  before the decoder: its features and one chunk's activations, never at the same time as the decoder's.

The gradients of a block's activations while its backward runs are not a term: the block's saved tensors are
freed as its backward goes, faster than gradients appear (the measured peaks below show it).
The peak is the states (weights, adapter, gradients, AdamW; the gradients counted whole, an upper bound) plus
the largest of: everything saved + the logits' gradients (or lm_head dequantizing), everything saved + one block
recomputed (+ its largest linear dequantizing), the vision forward. A device "fits" a setting when the peak is
at most 90% of its memory (the rest: the CUDA context, the allocator's fragmentation, the OS).

Measured against a real step (tests/test_train_memory.py, a decoder of the 7B's proportions scaled down, CPU):
the saved bytes equal ``saved_tensors_hooks``' count within 2% (to the byte but for a scalar), the weights,
adapter, gradient and AdamW bytes exactly; the measured peak of live tensors is 3-14% below the plan, never above.
On CUDA the same tensors are saved (SDPA's memory-efficient kernel keeps q, k, v, output, log-sum-exp and the
additive mask; the flash kernel takes no mask), but dropout keeps a 1-byte mask where CPU keeps one in the
input's dtype (the planner counts the larger).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch

from ..config import LlavaNextConfig
from ..inputs.tokens import video_tokens
from ..model.lora import DECODER_TARGETS
from ..model.policy import FRAME_BATCH
from ..runtime.memory import _gib, weight_bytes

Quantize = Literal["int8", "nf4"]
USABLE = 0.9  # share of a device's memory a run may plan for
TEXT_TOKENS = 128  # prompt + caption of a typical video-caption item (the Korean prompt ~30 tokens, a caption ~100)


class TrainMemoryError(ValueError):
    """A setting the planner cannot compute; the message says which and why."""


@dataclass(frozen=True)
class TrainSetting:
    """One fine-tuning setting (what ``llava-next train`` is given)."""

    frames: int = 8  # video frames per item (0: text only)
    text_tokens: int = TEXT_TOKENS  # prompt + answer text
    quantize: Quantize | None = None  # the frozen decoder's linears: None = float (``dtype``)
    checkpointing: bool = False
    lora_rank: int = 16
    batch: int = 1  # items per micro-batch
    dtype: torch.dtype = torch.bfloat16  # the base's float weights and the compute
    adapter_dtype: torch.dtype = torch.float32
    dropout: float = 0.0
    targets: tuple[str, ...] = DECODER_TARGETS
    projector: Literal["frozen", "full"] = "frozen"
    attention_mask: bool = False  # a padded batch (rows of different lengths): SDPA keeps an additive (T, T)
    # mask per block; an unpadded one has none (TrainingEngine drops an all-true mask)

    def __post_init__(self) -> None:
        for name, least in (("frames", 0), ("text_tokens", 0), ("lora_rank", 1), ("batch", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise TrainMemoryError(f"TrainSetting.{name} must be a {'non-negative' if least == 0 else 'positive'} "
                                       f"integer, got {value!r}")
        if self.projector not in ("frozen", "full"):
            raise TrainMemoryError(f"TrainSetting.projector must be 'frozen' or 'full', got {self.projector!r} "
                                   f"(the planner covers decoder LoRA and a fully trained projector)")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainMemoryError(f"TrainSetting.dropout must be in [0, 1), got {self.dropout!r}")
        if self.quantize not in (None, "int8", "nf4"):
            raise TrainMemoryError(f"TrainSetting.quantize must be None, 'int8' or 'nf4', got {self.quantize!r}")
        bad = [t for t in self.targets if t not in DECODER_TARGETS]
        if bad or not self.targets:
            raise TrainMemoryError(f"TrainSetting.targets {list(self.targets)}: each must be one of "
                                   f"{', '.join(DECODER_TARGETS)} (the planner covers decoder LoRA)")

    @property
    def base_name(self) -> str:
        return self.quantize or str(self.dtype).removeprefix("torch.").replace("bfloat16", "bf16")


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tokens(config: LlavaNextConfig, setting: TrainSetting) -> int:
    """Positions of one item: the video's visual tokens (pooled, newlines included) + the text."""
    return (video_tokens(setting.frames, config) if setting.frames else 0) + setting.text_tokens


_INPUT_GROUP = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp", "up_proj": "mlp"}  # one input


def _linears(config: LlavaNextConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decoder block's linears by leaf name."""
    t = config.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    return {"q_proj": (t.hidden_size, q), "k_proj": (t.hidden_size, kv), "v_proj": (t.hidden_size, kv),
            "o_proj": (q, t.hidden_size), "gate_proj": (t.hidden_size, t.intermediate_size),
            "up_proj": (t.hidden_size, t.intermediate_size), "down_proj": (t.intermediate_size, t.hidden_size)}


# ---- the trainable tensors ----------------------------------------------------------------------------
def trainable_params(config: LlavaNextConfig, setting: TrainSetting) -> int:
    """Parameters that train: r x (in + out) per LoRA target per block, and the projector when "full"."""
    per_block = sum(setting.lora_rank * (k + n) for name, (k, n) in _linears(config).items()
                    if name in setting.targets)
    total = config.text.num_layers * per_block
    if setting.projector == "full":
        cv, c = config.vision.hidden_size, config.text.hidden_size
        total += cv * c + c * c + (2 * c if config.projector_bias else 0)
    return total


# ---- what autograd keeps ------------------------------------------------------------------------------
def block_saved_bytes(config: LlavaNextConfig, setting: TrainSetting, n_tokens: int,
                      input_needs_grad: bool = True) -> int:
    """Bytes autograd keeps for one decoder block's backward (module docstring), for ``n_tokens`` positions
    per row. ``input_needs_grad``: False for the first block when nothing before the decoder trains."""
    t, s, a = config.text, _size(setting.dtype), _size(setting.adapter_dtype)
    B, N = setting.batch, setting.batch * n_tokens
    C, I, q, kv = t.hidden_size, t.intermediate_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    norm = N * C * 4 + N * 4  # RMSNorm: the fp32 input and rsqrt (B, T, 1)
    total = norm if input_needs_grad else 0
    total += norm  # post-attention norm: the residual needs a gradient after the attention's adapters
    total += N * (2 * q + 2 * kv) * s + N * t.num_heads * 4  # SDPA: rotated q, k, v, output; log-sum-exp fp32
    if setting.attention_mask:
        total += B * n_tokens * n_tokens * s  # the boolean mask made additive, (B, 1, T, T)
    total += 3 * N * I * s  # gate, silu(gate), up
    # inputs that adapters read as a tensor already counted when no cast copies them: q/k/v share one, gate/up
    # one, and o_proj's is SDPA's output (its kernels lay it out (B, T, H, D): the reshape is a view)
    shared = {"o_proj"}
    for name, (k, n) in _linears(config).items():
        grad_in = input_needs_grad or name not in ("q_proj", "k_proj", "v_proj")
        if name not in setting.targets:
            continue
        group = _INPUT_GROUP.get(name, name)
        if setting.dropout > 0:  # the dropped input (lora_A's) and the mask (in the input's dtype on CPU)
            total += N * k * a + (N * k * a if grad_in else 0)
        elif a != s:
            total += N * k * a  # the input cast to the adapters' dtype, one copy per target
        elif group not in shared:
            shared.add(group)
            total += N * k * s
        total += N * setting.lora_rank * a  # lora_A's output, for lora_B's gradient
    return total


def head_saved_bytes(config: LlavaNextConfig, setting: TrainSetting, n_tokens: int) -> int:
    """What the final norm, lm_head and the loss keep: the norm's fp32 input, the fp32 log-softmax (N, V) and the int64 targets; without checkpointing also RoPE's cos / sin (every
    block saves the same two; with it they are recomputed, and only the blocks' context holds them)."""
    t, s, N = config.text, _size(setting.dtype), setting.batch * n_tokens
    total = N * t.hidden_size * 4 + N * 4 + N * t.vocab_size * 4 + N * 8
    if not setting.checkpointing:
        total += 2 * N * t.head_dim * s
    return total


def logits_bytes(config: LlavaNextConfig, setting: TrainSetting, n_tokens: int) -> int:
    """The loss's transient beyond what it keeps, at the start of the backward: the gradients of the fp32
    log-softmax's output and input, (N, V) fp32 each (more than the forward's logits and their fp32 copy)."""
    return 2 * setting.batch * n_tokens * config.text.vocab_size * 4


def dequantize_bytes(n_weights: int, dtype: torch.dtype) -> int:
    """An NF4 linear's transient while it dequantizes its weight (``model/nf4.py`` ``nf4_dequantize``, in the
    forward and again in the backward): the output in the compute dtype, the fp32 absmax per block of 64, and
    per chunk of at most ``_CHUNK`` values their int32 pair codes (one per 4 values) and fp32 code values."""
    from ..model.nf4 import _CHUNK

    return n_weights * _size(dtype) + n_weights // 64 * 4 + min(n_weights, _CHUNK) * 5


def vision_bytes(config: LlavaNextConfig, setting: TrainSetting) -> int:
    """The frozen tower's forward (no graph): every frame's features (the chunks and their concatenation)
    and one chunk of ``FRAME_BATCH`` frames' layer activations (hidden, norm, q/k/v, attention, MLP)."""
    if not setting.frames:
        return 0
    v, s = config.vision, _size(setting.dtype)
    feats = 2 * setting.batch * setting.frames * v.tokens_per_tile * v.hidden_size * s
    chunk = min(FRAME_BATCH, setting.frames) * v.tokens_per_tile * (6 * v.hidden_size + 2 * v.intermediate_size) * s
    return feats + chunk


# ---- the plan -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingMemory:
    """The breakdown of one setting, in bytes (module docstring)."""

    setting: TrainSetting
    tokens: int  # positions per item
    weights: int
    adapter: int
    gradients: int
    optimizer: int
    saved: int  # everything autograd keeps when the backward starts
    recompute: int  # checkpointing: one block's saved tensors, again, during its backward (0 without)
    logits: int  # the loss's transient at the start of the backward
    dequantize_head: int  # NF4: lm_head's whole-weight dequantization (transient; 0 otherwise)
    dequantize_block: int  # NF4: the largest block linear's
    vision: int  # the tower's forward (before the decoder; not at the same time as ``saved``)

    @property
    def states(self) -> int:
        return self.weights + self.adapter + self.gradients + self.optimizer

    @property
    def activations(self) -> int:
        """The largest of the three moments a step can peak at: the loss's backward (or lm_head dequantizing
        beside the logits' gradient in the compute dtype), one block recomputed (or dequantizing), the tower."""
        head = max(self.logits, self.dequantize_head + self.logits // 8 * _size(self.setting.dtype))
        return max(self.saved + head, self.saved + self.recompute + self.dequantize_block, self.vision)

    @property
    def peak_bytes(self) -> int:
        return self.states + self.activations

    def rows(self) -> list[tuple[str, int]]:
        """(what, bytes) in the order of the module docstring; the peak last."""
        return [("base weights", self.weights), ("LoRA adapter", self.adapter),
                ("adapter gradients", self.gradients), ("AdamW moments", self.optimizer),
                ("saved for backward", self.saved), ("one block recomputed", self.recompute),
                ("logits gradients", self.logits),
                ("NF4 dequantization", max(self.dequantize_head, self.dequantize_block)),
                ("vision tower forward", self.vision), ("peak", self.peak_bytes)]

    def to_dict(self) -> dict:
        keys = ("weights", "adapter", "gradients", "optimizer", "saved", "recompute", "logits", "dequantize_head",
                "dequantize_block", "vision")
        return {"tokens": self.tokens, **{k: getattr(self, k) for k in keys}, "peak": self.peak_bytes}


def training_memory(config: LlavaNextConfig, setting: TrainSetting = TrainSetting()) -> TrainingMemory:
    """The memory one training step of ``setting`` needs (module docstring)."""
    n, t = tokens(config, setting), config.text
    a = _size(setting.adapter_dtype)
    block = block_saved_bytes(config, setting, n)
    head = head_saved_bytes(config, setting, n)
    if setting.checkpointing:  # each block's input (B, T, C), one block again during its backward
        saved, recompute = t.num_layers * setting.batch * n * t.hidden_size * _size(setting.dtype) + head, block
    else:  # the first block keeps less when nothing before the decoder trains
        first = block_saved_bytes(config, setting, n, input_needs_grad=setting.projector == "full")
        saved, recompute = first + (t.num_layers - 1) * block + head, 0
    if setting.projector == "full":  # its input, GELU's input and output, per visual token
        visual = setting.batch * (n - setting.text_tokens)
        saved += visual * (config.vision.hidden_size + 2 * t.hidden_size) * _size(setting.dtype)
    nf4 = setting.quantize == "nf4"
    dq_head = dequantize_bytes(t.vocab_size * t.hidden_size, setting.dtype) if nf4 and not t.tie_word_embeddings else 0
    dq_block = dequantize_bytes(max(k * m for k, m in _linears(config).values()), setting.dtype) if nf4 else 0
    p = trainable_params(config, setting)
    return TrainingMemory(setting, n, weight_bytes(config, setting.dtype, setting.quantize), p * a, p * a, 2 * p * a,
                          saved, recompute, logits_bytes(config, setting, n), dq_head, dq_block,
                          vision_bytes(config, setting))


def largest_frames(config: LlavaNextConfig, memory_bytes: int, setting: TrainSetting = TrainSetting(),
                   usable: float = USABLE) -> int:
    """The most video frames per item whose step fits ``usable`` x ``memory_bytes`` (0: not even one frame;
    capped by the RoPE context: the frames must fit the model's positions)."""
    per_frame = video_tokens(1, config)
    limit = max(0, (config.text.max_scaled_positions - setting.text_tokens) // per_frame)
    budget = usable * memory_bytes
    if training_memory(config, replace(setting, frames=0)).peak_bytes > budget:
        return 0
    lo, hi = 0, limit  # the peak grows with the frames: the largest that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if training_memory(config, replace(setting, frames=mid)).peak_bytes <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def context_frames(config: LlavaNextConfig, setting: TrainSetting = TrainSetting()) -> int:
    """The most frames the model's RoPE context holds beside ``setting.text_tokens``."""
    return max(0, (config.text.max_scaled_positions - setting.text_tokens) // video_tokens(1, config))


# ---- the docs' table ----------------------------------------------------------------------------------
TABLE_MODEL = "LLaVA-NeXT-Video-7B"
TABLE_FRAMES = (4, 8, 16, 32)
TABLE_GPUS_GIB = (16, 24, 40, 80)
TABLE_RAM_GIB = (32, 64)


def training_table(model: str = TABLE_MODEL, frames: Sequence[int] = TABLE_FRAMES,
                   gpus_gib: Sequence[int] = TABLE_GPUS_GIB, ram_gib: Sequence[int] = TABLE_RAM_GIB) -> str:
    """Markdown: LoRA rank 16 (fp32 adapters) on the decoder, a bf16 / int8 / nf4 base, with and without
    gradient checkpointing: the peak per frame count, and the most frames each GPU / RAM size holds."""
    from ..config import PRESETS

    cfg = PRESETS[model].config
    sizes = [*(f"{g} GB GPU" for g in gpus_gib), *(f"{r} GB RAM" for r in ram_gib)]
    rows = ["| base | checkpointing | " + " | ".join(f"{f} frames" for f in frames) + " | "
            + " | ".join(sizes) + " |", "|---|---|" + "---|" * (len(frames) + len(sizes))]
    cap = context_frames(cfg)
    for quantize in (None, "int8", "nf4"):
        for ckpt in (False, True):
            s = TrainSetting(quantize=quantize, checkpointing=ckpt)
            peaks = [f"{training_memory(cfg, replace(s, frames=f)).peak_bytes / 2**30:.1f} GiB" for f in frames]
            most = [largest_frames(cfg, m * 2**30, s) for m in (*gpus_gib, *ram_gib)]
            cells = [f"{n}" + (" (context)" if n == cap else "") if n else "none" for n in most]
            rows.append(f"| {s.base_name} | {'yes' if ckpt else 'no'} | " + " | ".join(peaks) + " | "
                        + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_plan(plans: Sequence[TrainingMemory], memory_bytes: int | None = None) -> str:
    """The breakdowns of several settings side by side, as text (``llava-next inspect --train-memory``)."""
    head = "".ljust(24) + "".join(f"{p.setting.base_name + (' +ckpt' if p.setting.checkpointing else ''):>14}"
                                  for p in plans)
    lines = [head]
    for i, (what, _) in enumerate(plans[0].rows()):
        lines.append(what.ljust(24) + "".join(f"{_gib(p.rows()[i][1]):>14}" for p in plans))
    if memory_bytes is not None:
        lines.append("fits".ljust(24) + "".join(
            f"{'yes' if p.peak_bytes <= USABLE * memory_bytes else 'no':>14}" for p in plans))
    return "\n".join(lines)
