"""Memory: will a model and a request fit, before anything is allocated.

    memory_budget(text_config, batch, prompt_tokens, new_tokens, dtype, device) -> MemoryBudget   .check()
    weight_bytes(config, dtype, quantize)      bytes of the weights in a dtype or quantized format
    check_model_fits(config, dtype, device)    refuse a model larger than the machine (name what would fit)
    memory_table()                             which presets fit in how much memory, per format (docs/quantization.md)

The KV cache a request allocates is 2 x layers x batch x KV heads x positions x head_dim x bytes; the
prompt's activations are estimated on top. Available memory is /proc/meminfo's MemAvailable on CPU and
``torch.cuda.mem_get_info`` on CUDA. The tensor-parallel runner calls ``memory_budget`` with one rank's
share, so the per-rank table in docs/parallel.md comes from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import LlavaNextConfig, TextConfig
from ..model.pages import available_memory


class MemoryBudgetError(ValueError):
    """A request needs more memory than is available; the message has the numbers and what to lower."""


def _gib(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale / 10:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} bytes"


@dataclass(frozen=True)
class MemoryBudget:
    """What a generation run allocates, against what is available."""

    batch: int
    prompt_tokens: int  # longest prompt of the batch, visual tokens included
    new_tokens: int
    kv_cache_bytes: int  # keys + values of every layer for batch x (prompt + new) positions
    activation_bytes: int  # the prompt's largest per-layer activations (prefill)
    available_bytes: int | None  # free now, plus the KV cache a previous run left (it is replaced)
    dtype: torch.dtype
    device: torch.device
    videos: bool = True  # whether fewer frames / a larger pool stride can help (the advice names them only then)

    @property
    def needed_bytes(self) -> int:
        return self.kv_cache_bytes + self.activation_bytes

    def error(self, why: str) -> MemoryBudgetError:
        have = "unknown" if self.available_bytes is None else _gib(self.available_bytes)
        return MemoryBudgetError(
            f"not enough memory for this request ({why}): {self.batch} x {self.prompt_tokens + self.new_tokens} "
            f"positions ({self.prompt_tokens} prompt + {self.new_tokens} new tokens) need a KV cache of "
            f"{_gib(self.kv_cache_bytes)} in {str(self.dtype).removeprefix('torch.')} plus ~"
            f"{_gib(self.activation_bytes)} of prefill activations = {_gib(self.needed_bytes)}; available on "
            f"{self.device.type}: {have}. Lower --max-new-tokens, "
            f"{'use fewer frames (--frames) or a larger --pool-stride, ' if self.videos else 'use fewer images, '}"
            f"or run fewer requests per batch"
            f"{', or use --dtype bf16 (half of fp32)' if self.dtype == torch.float32 else ''}")

    def check(self) -> None:
        if self.available_bytes is not None and self.needed_bytes > self.available_bytes:
            raise self.error("estimated before allocating")


def memory_budget(text: TextConfig, batch: int, prompt_tokens: int, new_tokens: int, dtype: torch.dtype,
                  device: torch.device, decoder: torch.nn.Module | None = None, videos: bool = True) -> MemoryBudget:
    """The memory a run of ``batch`` prompts of up to ``prompt_tokens`` tokens + ``new_tokens`` needs
    (``videos``: whether any prompt has a video, so that the advice names frames only then)."""
    size = torch.empty((), dtype=dtype).element_size()
    positions = prompt_tokens + new_tokens
    kv = 2 * text.num_layers * batch * text.num_kv_heads * positions * text.head_dim * size
    # one layer at a time: input, q/k/v, attention output, residual (~4 x hidden) and gate/up/product (3 x MLP)
    q_kv = (text.num_heads + 2 * text.num_kv_heads) * text.head_dim
    activations = batch * prompt_tokens * (3 * text.hidden_size + q_kv + 3 * text.intermediate_size) * size
    available = available_memory(torch.device(device))
    if available is not None and decoder is not None:  # caches of an earlier run are freed or reused
        available += sum(b.nbytes for name, b in decoder.named_buffers() if "kv_cache" in name)
    return MemoryBudget(batch, prompt_tokens, new_tokens, kv, activations, available, dtype, torch.device(device),
                        videos)


# ----------------------------------------------------------------------------------------------------
# Whole-model memory: weights (float / int8 / int4 / nf4) + a request's KV cache and activations
# ----------------------------------------------------------------------------------------------------
TYPICAL_PROMPT = 1272  # an 8-frame video (8 x 144 visual tokens) + ~120 text tokens
TYPICAL_NEW = 256  # llava-next run's default --max-new-tokens


def weight_bytes(config: LlavaNextConfig, dtype: torch.dtype, quantize: str | None = None,
                 group_size: int = 128) -> int:
    """Bytes of the model's weights in ``dtype``, with the decoder's linears quantized as ``quantize`` (the
    layout of llava_next/model/quant.py: int8 + a scale per row, int4 + a scale and zero per group, nf4 +
    a uint8 absmax per 64 weights and its fp32 statistics).
    From the config alone (llava_next_weights.shapes, the converter's own shape table)."""
    from llava_next_weights.shapes import expected_shapes

    from ..model.quant_model import weight_bytes as linear_bytes

    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for key, shape in expected_shapes(config).items():
        is_linear = (key.startswith("language_model.") and key.endswith(".weight") and len(shape) == 2
                     and "embed_tokens" not in key)
        total += linear_bytes(shape, quantize if is_linear else None, size, group_size)
    return total


def check_model_fits(config: LlavaNextConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                     quantize: str | None = None, group_size: int = 128) -> None:
    """Before loading: refuse a model whose weights plus a one-token KV cache exceed the machine's memory
    (weights are mmapped, but decoding reads every byte per token: a model larger than memory rereads the
    disk for every token), and warn when they exceed the memory available now (other processes hold the
    rest). The message names the smaller format that would fit."""
    import warnings

    device = torch.device(device)
    available = available_memory(device)
    total = _total_memory() if device.type == "cpu" else available
    if available is None or total is None:
        return
    need = weight_bytes(config, dtype, quantize, group_size) + memory_budget(
        config.text, 1, 1, 0, dtype, device).needed_bytes
    if need <= available:
        return
    if need <= total:
        warnings.warn(f"llava-next: the model's weights need {_gib(need)} but only {_gib(available)} of "
                      f"{_gib(total)} are available now; decoding may reread the disk", RuntimeWarning, stacklevel=3)
        return
    available = total
    fits = [q for q in ("int8", "int4") if q != quantize and weight_bytes(config, dtype, q, group_size) < available]
    what = "quantized " + quantize if quantize else str(dtype).removeprefix("torch.")
    hint = (f"; --quantize {fits[0]} ({_gib(weight_bytes(config, dtype, fits[0], group_size))}) would fit"
            if fits and device.type == "cpu" else "; use a machine with more memory or a smaller model")
    raise MemoryBudgetError(f"the model's weights need {_gib(need)} in {what} but the machine has {_gib(available)} "
                            f"({device.type}){hint} (docs/quantization.md: 'Which models fit')")


def _total_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None


def memory_table(memories_gib: Sequence[int] = (16, 24, 32, 64)) -> str:
    """Markdown: for each decoder size (the presets), weights and a typical request (8-frame video + the
    default 256 new tokens: KV cache and prefill activations, ``memory_budget``) in bf16 / int8 / int4 / nf4,
    and which machine memories hold it (with 10% left for the OS and the process)."""
    from ..config import PRESETS

    rows = [f"| model | format | weights | + typical request | total | "
            + " | ".join(f"{m} GB" for m in memories_gib) + " |",
            "|---|---|---|---|---|" + "---|" * len(memories_gib)]
    for name in ("llava-v1.6-vicuna-7b", "llava-v1.6-vicuna-13b", "llava-v1.6-34b"):
        cfg = PRESETS[name].config
        request = memory_budget(cfg.text, 1, TYPICAL_PROMPT, TYPICAL_NEW, torch.bfloat16, torch.device("meta"))
        for q in (None, "int8", "int4", "nf4"):
            w = weight_bytes(cfg, torch.bfloat16, q)
            total = w + request.needed_bytes
            marks = " | ".join("yes" if total <= 0.9 * m * 1e9 else "no" for m in memories_gib)
            rows.append(f"| {name} | {q or 'bf16'} | {w / 1e9:.1f} GB | {request.needed_bytes / 1e9:.1f} GB | "
                        f"{total / 1e9:.1f} GB | {marks} |")
    return "\n".join(rows)
