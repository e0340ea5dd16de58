"""The work each stage must do (FLOPs, bytes) and what this machine can do (matmul FLOP/s, read GB/s).

Counting conventions (multiply-add = 2 FLOPs; only the work llava-next needs, for both providers):
- decoder prefill over T tokens: per layer 2 T (q, k, v, o + gate, up, down weights) + causal attention
  2 x 2 x (T (T + 1) / 2) x heads x head_dim (scores and values, the causal half); lm_head on the last
  position only.
- vision over N frames of P = 577 tokens: per used layer 2 N P (q, k, v, out, fc1, fc2 weights) +
  2 x 2 x N P^2 x hidden (bidirectional attention); the patch embedding.
- decode, bytes read per token: every decoder weight matrix + the final norm + lm_head (the embedding
  table contributes one row) + the KV cache read by attention, 2 x layers x kv_len x kv_heads x
  head_dim elements, at the mean kv_len of the decode run.

Machine limits, measured in-process with the model's own weight matrices:
- ``MatmulProbe``: plain ``F.linear`` over the same (tokens x in) @ (in x out) shapes the stage runs,
  with one layer's (unpacked) weights: the throughput a stage made only of its GEMMs would reach. In the
  dtype the model sums that stage in (``prompt_sum_dtype``: a bf16 model's GEMMs run in fp32 on a CPU
  without bf16 arithmetic, where oneDNN's bf16 GEMM is emulated and several times slower).
- ``ReadProbe``: ``x.sum()`` over a 512 MB fp32 tensor (reads only), GB/s.
The probes run inside the stage's alternation (ours, transformers, probe, ...), so a busy spell of a
shared machine slows the limit as much as the stage it is compared with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_next.config import LlavaNextConfig


# ---- work ----------------------------------------------------------------------------------------
def decoder_layer_weights(layer) -> list[torch.Tensor]:
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
            m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]


def vision_layer_weights(layer) -> list[torch.Tensor]:
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.out_proj.weight, m.fc1.weight, m.fc2.weight]


def prefill_flops(config: LlavaNextConfig, tokens: int) -> float:
    t = config.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    weights = t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size
    attention = 2 * 2 * (tokens * (tokens + 1) / 2) * q
    return t.num_layers * (2 * tokens * weights + attention) + 2 * t.hidden_size * t.vocab_size


def vision_flops(config: LlavaNextConfig, frames: int) -> float:
    v = config.vision
    P, C = v.num_patches + 1, v.hidden_size
    weights = 4 * C * C + 2 * C * v.intermediate_size
    per_layer = 2 * frames * P * weights + 2 * 2 * frames * P * P * C
    patch = 2 * frames * v.num_patches * C * v.num_channels * v.patch_size ** 2
    return v.layers_used * per_layer + patch


def decode_bytes(config: LlavaNextConfig, kv_len: float, itemsize: int) -> float:
    t = config.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    weights = t.num_layers * (t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size
                              + 2 * t.hidden_size) + t.hidden_size * (t.vocab_size + 2)
    cache = 2 * t.num_layers * kv_len * kv
    return (weights + cache) * itemsize


# ---- limits --------------------------------------------------------------------------------------
def prompt_sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype this CPU sums a ``dtype`` layer's prompt in, as the model does it (``policy.prompt_choice``: bf16
    widened to fp32 on a CPU without bf16 arithmetic): the GEMM whose rate is the machine's limit for that stage."""
    from llava_next.model import policy

    return torch.float32 if dtype == torch.bfloat16 and policy.prompt_choice() == "fp32" else dtype


class MatmulProbe:
    """Plain ``F.linear`` over (tokens x in) @ each weight^T, ``rounds`` times: ``flops`` per call; in
    ``dtype`` (weights copied to it beforehand, not counted) when given, else the weights' own."""

    def __init__(self, weights: list[torch.Tensor], tokens: int, rounds: int = 1,
                 dtype: torch.dtype | None = None) -> None:
        weights = [w if dtype is None else w.to(dtype) for w in weights]
        self.calls = [(torch.randn(tokens, w.shape[1], dtype=w.dtype), w) for w in weights]
        self.rounds = rounds
        self.flops = rounds * sum(2 * tokens * w.shape[0] * w.shape[1] for w in weights)

    @torch.no_grad()
    def __call__(self) -> None:
        for _ in range(self.rounds):
            for x, w in self.calls:
                F.linear(x, w)


class ReadProbe:
    """``x.sum()`` over a ``mbytes`` MB fp32 tensor, ``rounds`` times: ``bytes`` read per call."""

    def __init__(self, mbytes: int = 512, rounds: int = 5) -> None:
        self.x = torch.ones(mbytes * 10**6 // 4)
        self.rounds = rounds
        self.bytes = rounds * self.x.numel() * 4

    def __call__(self) -> None:
        for _ in range(self.rounds):
            self.x.sum()
