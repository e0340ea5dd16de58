"""Flash attention in Triton: prefill forward, split-K decode, and per-key attention mass — each beside its reference.

    flash_attention(q, k, v, *, causal, mask=None)                -> (B, Hq, Tq, D)
    flash_attention_with_key_mass(q, k, v, *, causal, mask=None)  -> (B, Hq, Tq, D), (B, Hq, Tk) fp32
    decode_attention(q, k, v, *, mask=None, num_splits=None)      -> (B, Hq, 1, D)
    attention_reference / key_mass_reference                      -> the same in plain fp32 PyTorch

Semantics are those of the model's attention facade (llava_next/model/attention.py), so ``flash_attention`` is
a drop-in backend: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D); GQA by index (query head h reads kv head
h // (Hq // Hkv), K/V never repeated); ``causal`` aligns queries to the END of the keys (query i sits at
key position Tk - Tq + i: prefill, chunked prefill and decode are one rule); ``mask`` is bool
(B, 1 or Hq, 1 or Tq, Tk), True = may attend; a query that sees no key gets a zero row.

Notable choices
- FlashAttention-2 forward: one program per (query block, batch*head) streams K/V blocks past its query
  tile with an online softmax in base 2 (scale * log2 e folded into the scores). Key blocks every query
  of the tile sees are processed without masks; only the causal diagonal / ragged end pays for them.
- Decode (Tq == 1) is memory-bound and has a single query row, so the forward grid would leave most of
  a GPU idle: split the keys into chunks (one program per chunk and kv head, all query heads of the GQA
  group as the rows of one tile so K/V are read once), then merge chunks by log-sum-exp.
- Key mass (what FastV-style pruning ranks keys by: column sums of the softmax over queries) is a second
  pass: the forward stores each query row's log-sum-exp, then one program per key block re-streams the
  queries and sums exp(s - lse). Deterministic (no atomics), costs one extra Q K^T.
- Values are upcast to fp32 right after tl.load and cast back at tl.store (the interpreter mishandles
  bf16 arithmetic). On a GPU the two matmuls take bf16/fp16 operands (fp32 accumulate), as FA2 does;
  fp32 inputs use exact fp32 dots unless torch.backends.cuda.matmul.allow_tf32 is set.
- Head dims that are not a power of two (80) are padded to the next one with load masks.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the kernels are an extra: say which
    raise ImportError("llava_next_kernels needs triton, which is not installed: pip install 'llava-next[kernels]' "
                      "(the PyTorch paths run without it)") from e

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read when the @triton.jit decorators run
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _attend_block(acc, l_i, m_i, q, K, V, mask_row, start_n, offs_m, offs_n, offs_d, d_ok,
                  sk_t, sv_t, sm_k, Tq, Tk, qk_scale,
                  EDGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step: fold keys [start_n, start_n + BLOCK_N) into (acc, l_i, m_i)."""
    cols = start_n + offs_n
    n_ok = cols < Tk  # all true off the edge (kept: cheaper than a second load path)
    kT = tl.load(K + offs_d[:, None] + cols[None, :] * sk_t, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
    s = tl.dot(q.to(DOT_DTYPE), kT.to(tl.float32).to(DOT_DTYPE), input_precision=PRECISION) * qk_scale
    if EDGE:  # ragged end of the keys and the causal diagonal
        allowed = n_ok[None, :] & (offs_m[:, None] >= 0)
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= offs_m[:, None] + (Tk - Tq))
        s = tl.where(allowed, s, float("-inf"))
    if HAS_MASK:
        keep = tl.load(mask_row + cols[None, :] * sm_k, mask=(offs_m[:, None] < Tq) & n_ok[None, :], other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: avoid inf - inf
    alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
    p = tl.exp2(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
    v = tl.load(V + cols[:, None] * sv_t + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(tl.float32).to(DOT_DTYPE), input_precision=PRECISION)
    return acc, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _flash_fwd_kernel(Q, K, V, Mask, Out, Lse,
                      sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
                      sm_b, sm_h, sm_q, sm_k, H, GROUP, Tq, Tk, D, qk_scale,
                      CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, STORE_LSE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest causal blocks first: better tail balance
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP  # GQA: read the shared kv head in place
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # load q once: it stays in SRAM while every K/V block streams past it
    q_ptrs = Q + b.to(tl.int64) * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Tq) & d_ok[None, :], other=0.0).to(tl.float32)
    K += b.to(tl.int64) * sk_b + hk * sk_h
    V += b.to(tl.int64) * sv_b + hk * sv_h
    mask_row = Mask + b.to(tl.int64) * sm_b + h * sm_h + offs_m[:, None] * sm_q  # unused without a mask

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if CAUSAL:  # keys after the block's last query are invisible; those up to its first are seen by all
        hi = tl.minimum(Tk, (start_m + 1) * BLOCK_M + (Tk - Tq))
        full = tl.minimum(tl.maximum(start_m * BLOCK_M + (Tk - Tq) + 1, 0), Tk) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        full = Tk // BLOCK_N * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, K, V, mask_row, start_n, offs_m, offs_n, offs_d, d_ok,
                                      sk_t, sv_t, sm_k, Tq, Tk, qk_scale, False, CAUSAL, HAS_MASK,
                                      DOT_DTYPE, PRECISION)
    for start_n in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, K, V, mask_row, start_n, offs_m, offs_n, offs_d, d_ok,
                                      sk_t, sv_t, sm_k, Tq, Tk, qk_scale, True, CAUSAL, HAS_MASK,
                                      DOT_DTYPE, PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key stay 0
    o_ptrs = Out + b.to(tl.int64) * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Tq) & d_ok[None, :])
    if STORE_LSE:  # log2-sum-exp2 of the scaled scores, per query row: (B * Hq, Tq)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(Lse + bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _key_mass_kernel(Q, K, Mask, Lse, Mass,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sm_b, sm_h, sm_q, sm_k, H, GROUP, Tq, Tk, D, qk_scale,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Tk
    d_ok = offs_d < D
    # load this key block once; every query block streams past it
    k_ptrs = K + b.to(tl.int64) * sk_b + (h // GROUP) * sk_h + offs_d[:, None] + offs_n[None, :] * sk_t
    kT = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # queries before position start_n cannot see any key of this block
        lo = tl.maximum(start_n * BLOCK_N - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, Tq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Tq
        q_ptrs = Q + b.to(tl.int64) * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        lse = tl.load(Lse + bh.to(tl.int64) * Tq + offs_m, mask=m_ok, other=0.0)
        s = tl.dot(q.to(DOT_DTYPE), kT.to(DOT_DTYPE), input_precision=PRECISION) * qk_scale
        allowed = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
        if HAS_MASK:
            m_ptrs = Mask + b.to(tl.int64) * sm_b + h * sm_h + offs_m[:, None] * sm_q + offs_n[None, :] * sm_k
            allowed = allowed & (tl.load(m_ptrs, mask=allowed, other=0) != 0)
        mass += tl.sum(tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0), 0)
    tl.store(Mass + bh.to(tl.int64) * Tk + offs_n, mass, mask=n_ok)


@triton.jit
def _decode_split_kernel(Q, K, V, Mask, PartOut, PartLse,
                         sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b, sm_h, sm_k,
                         Hq, Hkv, GROUP, Tk, D, split_len, qk_scale,
                         HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    split = tl.program_id(0)
    bk = tl.program_id(1)
    b, hk = bk // Hkv, bk % Hkv
    offs_g = tl.arange(0, BLOCK_H)  # the GQA group's query heads are the rows of one tile
    heads = hk * GROUP + offs_g
    g_ok = offs_g < GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ptrs = Q + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_D)
    K += b.to(tl.int64) * sk_b + hk * sk_h
    V += b.to(tl.int64) * sv_b + hk * sv_h
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, Tk)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < hi
        kT = tl.load(K + offs_d[:, None] + cols[None, :] * sk_t, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s = tl.dot(q.to(DOT_DTYPE), kT.to(tl.float32).to(DOT_DTYPE), input_precision=PRECISION) * qk_scale
        allowed = g_ok[:, None] & n_ok[None, :]
        if HAS_MASK:
            m_ptrs = Mask + b.to(tl.int64) * sm_b + heads[:, None] * sm_h + cols[None, :] * sm_k
            allowed = allowed & (tl.load(m_ptrs, mask=allowed, other=0) != 0)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        v = tl.load(V + cols[:, None] * sv_t + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(tl.float32).to(DOT_DTYPE),
                                            input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    # partial results, normalised within the chunk: PartOut (B*Hq, splits, BLOCK_D), PartLse (B*Hq, splits)
    part = (b * Hq + heads).to(tl.int64) * tl.num_programs(0) + split
    tl.store(PartOut + part[:, None] * BLOCK_D + offs_d[None, :], acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None],
             mask=g_ok[:, None])
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
    tl.store(PartLse + part, lse, mask=g_ok)


@triton.jit
def _decode_combine_kernel(PartOut, PartLse, Out, so_b, so_h, Hq, num_splits, D,
                           BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    part = bh.to(tl.int64) * num_splits + offs_s
    lse = tl.load(PartLse + part, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty chunks weigh 0
    o = tl.load(PartOut + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom == 0.0, 1.0, denom)
    o_ptrs = Out + (bh // Hq).to(tl.int64) * so_b + (bh % Hq) * so_h + offs_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < D)


# --------------------------------------------------------------------------------------------- launchers
def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, Hq, Tq, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if B != Bk or D != Dk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv}) for GQA")
    if Tq == 0 or Tk == 0:
        raise ValueError(f"empty sequence: Tq={Tq}, Tk={Tk}")
    if D > 256:
        raise ValueError(f"head dim {D} > 256 is not supported (the whole head must fit one tile)")
    if q.dtype not in _TL_DTYPE or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype of float16, bfloat16, float32; got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(f"Triton kernels need CUDA tensors (got {q.device}); for CPU tensors set "
                           "TRITON_INTERPRET=1 before importing llava_next_kernels (slow, for testing)")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = may attend), got {mask.dtype}")
        if (mask.dim() != 4 or mask.shape[0] != B or mask.shape[1] not in (1, Hq) or mask.shape[2] not in (1, Tq)
                or mask.shape[3] != Tk):
            raise ValueError(f"mask must be (B, 1, 1, Tk) or (B, 1, Tq, Tk) = (B, 1, {Tq}, {Tk}) with B={B}; "
                             f"got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device}, q on {q.device}")


def _unit_last_stride(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _empty_out(like: torch.Tensor) -> torch.Tensor:
    """Output buffer. The interpreter truncates fp32 -> bf16 casts (GPUs round to nearest even), so under it
    bf16 results are stored as fp32 and rounded by torch."""
    if _INTERPRET and like.dtype == torch.bfloat16:
        return torch.empty_like(like, dtype=torch.float32)
    return torch.empty_like(like)


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Mask as bytes with broadcast strides (B, Hq, Tq, Tk); a dummy pointer when there is none."""
    if mask is None:
        return q, (0, 0, 0, 0)
    B, Hq, Tq, _ = q.shape
    m = mask.view(torch.uint8).expand(B, Hq, Tq, mask.shape[-1])
    return m, m.stride()


def _dot_args(q: torch.Tensor) -> tuple[object, str]:
    """(dtype the matmul operands take, fp32 matmul precision). The interpreter computes in fp32."""
    if _INTERPRET:
        return tl.float32, "ieee"
    return _TL_DTYPE[q.dtype], "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _forward_tiles(q: torch.Tensor) -> dict:
    if _INTERPRET:  # the interpreter's cost is per program and op: few, big tiles
        return dict(BLOCK_M=128, BLOCK_N=128)
    if q.dtype == torch.float32:  # fp32 tiles take twice the shared memory
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4 if q.shape[-1] <= 64 else 8, num_stages=3)


def _forward(q, k, v, causal, mask, store_lse):
    q, k, v = _unit_last_stride(q, k, v)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = _empty_out(q)
    lse = torch.empty(B * Hq, Tq, device=q.device, dtype=torch.float32) if store_lse else out
    mask_t, sm = _mask_args(mask, q)
    dot_dtype, precision = _dot_args(q)
    tiles = _forward_tiles(q)
    grid = (triton.cdiv(Tq, tiles["BLOCK_M"]), B * Hq)
    _flash_fwd_kernel[grid](q, k, v, mask_t, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                            *out.stride()[:3], *sm, Hq, Hq // Hkv, Tq, Tk, D, _LOG2E / math.sqrt(D),
                            CAUSAL=causal, HAS_MASK=mask is not None, STORE_LSE=store_lse,
                            BLOCK_D=triton.next_power_of_2(D), DOT_DTYPE=dot_dtype, PRECISION=precision, **tiles)
    return out.to(q.dtype), lse


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with the facade's rules (module docstring). One query token -> split-K decode."""
    _check_inputs(q, k, v, mask)
    if q.shape[2] == 1:  # the single query sits at the last key position: causal or not, it sees every key
        return decode_attention(q, k, v, mask=mask)
    return _forward(q, k, v, causal, mask, store_lse=False)[0]


def flash_attention_with_key_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and, per (batch, query head, key), the softmax mass that key receives summed over
    the queries: (B, Hq, Tk) fp32. For last-token scores (FastV) pass only the last query row(s)."""
    _check_inputs(q, k, v, mask)
    out, lse = _forward(q, k, v, causal, mask, store_lse=True)
    q, k = _unit_last_stride(q, k)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    mass = torch.empty(B, Hq, Tk, device=q.device, dtype=torch.float32)
    mask_t, sm = _mask_args(mask, q)
    dot_dtype, precision = _dot_args(q)
    tiles = _forward_tiles(q)
    grid = (triton.cdiv(Tk, tiles["BLOCK_N"]), B * Hq)
    _key_mass_kernel[grid](q, k, mask_t, lse, mass, *q.stride()[:3], *k.stride()[:3], *sm, Hq, Hq // Hkv, Tq, Tk,
                           D, _LOG2E / math.sqrt(D), CAUSAL=causal, HAS_MASK=mask is not None,
                           BLOCK_D=triton.next_power_of_2(D), DOT_DTYPE=dot_dtype, PRECISION=precision, **tiles)
    return out, mass


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                     num_splits: int | None = None) -> torch.Tensor:
    """One query token (B, Hq, 1, D) against a KV cache (B, Hkv, Tk, D): split-K over the keys, then an LSE merge.
    ``num_splits`` (default: enough chunks to fill the GPU twice over) is the number of key chunks."""
    _check_inputs(q, k, v, mask)
    if q.shape[2] != 1:
        raise ValueError(f"decode_attention takes one query token, got Tq={q.shape[2]}; use flash_attention")
    q, k, v = _unit_last_stride(q, k, v)
    B, Hq, _, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    block_n = 64 if _INTERPRET else 64 if D <= 64 else 32
    blocks = triton.cdiv(Tk, block_n)
    if num_splits is None:
        programs = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = triton.cdiv(programs, B * Hkv)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    split_len = triton.cdiv(blocks, min(num_splits, blocks)) * block_n  # a whole number of key blocks
    num_splits = triton.cdiv(Tk, split_len)
    BLOCK_D = triton.next_power_of_2(D)
    part_out = torch.empty(B * Hq, num_splits, BLOCK_D, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(B * Hq, num_splits, device=q.device, dtype=torch.float32)
    mask_t, sm = _mask_args(mask, q)
    dot_dtype, precision = _dot_args(q)
    _decode_split_kernel[(num_splits, B * Hkv)](
        q, k, v, mask_t, part_out, part_lse, q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3],
        sm[0], sm[1], sm[3], Hq, Hkv, group, Tk, D, split_len, _LOG2E / math.sqrt(D), HAS_MASK=mask is not None,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=BLOCK_D,
        DOT_DTYPE=dot_dtype, PRECISION=precision)
    out = _empty_out(q)
    _decode_combine_kernel[(B * Hq,)](part_out, part_lse, out, out.stride(0), out.stride(1), Hq, num_splits, D,
                                      BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D)
    return out.to(q.dtype)


# ------------------------------------------------------------------------------------ PyTorch references
def attention_probs_reference(q: torch.Tensor, k: torch.Tensor, *, causal: bool,
                              mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq, Tq, Tk) fp32 softmax probabilities; K heads repeated explicitly, rows with no visible key are 0."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    k = k.float().repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D)
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(D)  # (B, Hq, Tq, Tk)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:  # query i sits at key position Tk - Tq + i
        allowed = torch.arange(Tk, device=q.device)[None, :] <= torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    if mask is not None:
        allowed = allowed & mask
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """The naive path (scores materialised, fp32): what flash_attention and decode_attention compute."""
    probs = attention_probs_reference(q, k, causal=causal, mask=mask)
    v = v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # (B, Hq, Tk, D)
    return (probs @ v).to(q.dtype)


def key_mass_reference(q: torch.Tensor, k: torch.Tensor, *, causal: bool,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq, Tk) fp32: column sums of the attention probabilities over the queries."""
    return attention_probs_reference(q, k, causal=causal, mask=mask).sum(dim=2)
