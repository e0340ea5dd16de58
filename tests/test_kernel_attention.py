"""Triton attention kernels (llava_next_kernels.attention) under the interpreter vs the fp32 reference.

Tolerance: the flash-attention rule — the kernel's max error against an fp32 reference on the same
(rounded) inputs may be at most 2x the error of PyTorch's own same-dtype path (SDPA) plus a tiny floor.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import llava_next.model.attention as facade
from llava_next.model.attention import eager_attention
from llava_next_kernels import attention as attn
from llava_next_kernels.attention import (attention_reference, decode_attention, flash_attention,
                                          flash_attention_with_key_mass, key_mass_reference)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F32, BF16, F16 = DTYPES


def _qkv(B, Hq, Hkv, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, D, generator=g).to(dtype) for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
    return q, k, v


def _allowed(B, Tq, Tk, causal, mask):
    allowed = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    if causal:  # query i sits at key position Tk - Tq + i
        allowed &= torch.arange(Tk)[None, :] <= torch.arange(Tk - Tq, Tk)[:, None]
    return allowed if mask is None else allowed & mask


def _torch_same_dtype(q, k, v, causal, mask):
    """PyTorch's own path in the inputs' dtype (its error sets the bound)."""
    allowed = _allowed(q.shape[0], q.shape[2], k.shape[2], causal, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])


def _assert_flash_rule(out, q, k, v, causal, mask, floor=2e-6):
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = attention_reference(q.float(), k.float(), v.float(), causal=causal, mask=mask)  # fp32 on the same inputs
    err = (out.float() - ref).abs().max().item()
    torch_err = (_torch_same_dtype(q, k, v, causal, mask).float() - ref).abs().max().item()
    assert err <= 2 * torch_err + floor, f"kernel error {err:.3g} vs PyTorch {q.dtype} error {torch_err:.3g}"


def _cases(shapes: dict, dtypes: dict) -> list:
    """Crossed with every dtype is too slow for the interpreter: each shape names its dtypes."""
    return [pytest.param(*shape, dtype, id=f"{name}-{str(dtype)[6:]}") for name, shape in shapes.items()
            for dtype in dtypes[name]]


# (B, Hq, Hkv, Tq, Tk, D, causal): odd lengths, GQA ratios 1 and 4, head dims 64/80/128, KV offsets
PREFILL = {"square-causal-17": (1, 2, 2, 17, 17, 64, True), "gqa4-d80-17": (2, 8, 2, 17, 17, 80, False),
           "vision-577": (1, 2, 2, 577, 577, 64, False),
           "chunked-prefill-offset931-gqa4": (1, 4, 1, 100, 1031, 128, True),
           "more-queries-than-keys": (1, 2, 1, 30, 13, 64, True)}
PREFILL_DTYPES = {"square-causal-17": DTYPES, "gqa4-d80-17": DTYPES, "vision-577": [BF16],
                  "chunked-prefill-offset931-gqa4": [F32, BF16], "more-queries-than-keys": [F32, F16]}


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,causal,dtype", _cases(PREFILL, PREFILL_DTYPES))
def test_flash_attention_matches_reference(B, Hq, Hkv, Tq, Tk, D, causal, dtype):
    q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, D, dtype)
    _assert_flash_rule(flash_attention(q, k, v, causal=causal), q, k, v, causal, None)


@pytest.mark.parametrize("delta", [-2, -1, 0, 1])
def test_causal_offsets_around_tile_edges(delta):
    """KV offsets that put the first query's last visible key at the end of a key tile, just before or after:
    the kernel skips masks on tiles every query sees, so an off-by-one there shows up only here."""
    q, k, v = _qkv(1, 1, 1, 3, 3, 64, F32)
    offset = attn._forward_tiles(q)["BLOCK_N"] + delta  # keys before the first query
    q, k, v = _qkv(1, 1, 1, 3, offset + 3, 64, F32, seed=delta + 10)
    _assert_flash_rule(flash_attention(q, k, v, causal=True), q, k, v, True, None)


def test_queries_with_no_visible_key_give_zero_rows():
    q, k, v = _qkv(1, 2, 1, 30, 13, 64, torch.float32)
    out = flash_attention(q, k, v, causal=True)  # queries 0..16 sit before key 0
    assert torch.equal(out[:, :, :17], torch.zeros_like(out[:, :, :17]))
    assert out[:, :, 17:].abs().amax() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_rows", ["key", "query_key"])
def test_left_padding_mask(mask_rows, dtype):
    B, Hq, Hkv, T, D = 2, 4, 1, 150, 64
    q, k, v = _qkv(B, Hq, Hkv, T, T, D, dtype, seed=1)
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[0, ..., :37] = False  # sample 0 is left-padded by 37 tokens
    if mask_rows == "query_key":  # (B, 1, Tq, Tk): also a random hole pattern
        mask = mask.expand(B, 1, T, T) & (torch.rand(B, 1, T, T, generator=torch.Generator().manual_seed(2)) > 0.2)
    out = flash_attention(q, k, v, causal=True, mask=mask)
    _assert_flash_rule(out, q, k, v, True, mask)
    eager = eager_attention(q, k, v, causal=True, mask=mask)  # the facade's reference
    # bf16: both round once at the end, so they may differ by one bf16 step at the output's scale (measured: a
    # quarter of one); the strict check is the flash rule above
    step = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * eager.float().abs().max().item()
    torch.testing.assert_close(out, eager, **({} if dtype == torch.float32 else dict(atol=step, rtol=0.0)))


# (B, Hq, Hkv, Tq=1, Tk, D, num_splits)
DECODE = {"gqa4-1031-auto-splits": (1, 4, 1, 1, 1031, 128, None), "mha-17": (2, 2, 2, 1, 17, 64, None),
          "gqa4-d80-3-splits": (1, 8, 2, 1, 700, 80, 3), "one-split": (1, 2, 2, 1, 300, 64, 1),
          "more-splits-than-blocks": (1, 2, 1, 1, 200, 64, 100)}
DECODE_DTYPES = dict.fromkeys(DECODE, [F32, BF16]) | {"gqa4-1031-auto-splits": DTYPES, "mha-17": DTYPES}


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,splits,dtype", _cases(DECODE, DECODE_DTYPES))
def test_decode_matches_reference(B, Hq, Hkv, Tq, Tk, D, splits, dtype):
    q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, D, dtype, seed=3)
    _assert_flash_rule(decode_attention(q, k, v, num_splits=splits), q, k, v, True, None)


def test_decode_with_mask_and_empty_splits():
    B, Hq, Hkv, Tk, D = 2, 4, 1, 1031, 64
    q, k, v = _qkv(B, Hq, Hkv, 1, Tk, D, torch.float32, seed=4)
    mask = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    mask[0, ..., :700] = False  # the first chunks of sample 0 see nothing: they must weigh 0 in the merge
    mask[1, ..., 5::7] = False
    out = decode_attention(q, k, v, mask=mask, num_splits=4)
    _assert_flash_rule(out, q, k, v, False, mask)
    torch.testing.assert_close(flash_attention(q, k, v, causal=True, mask=mask), out)  # Tq == 1 dispatches here


def test_non_contiguous_inputs_from_btHD_layout():
    x = torch.randn(3, 1, 33, 6, 64).unbind(0)  # the decoder's (B, T, H, D) projections, viewed as (B, H, T, D)
    q, k, v = (t.transpose(1, 2) for t in x)
    _assert_flash_rule(flash_attention(q, k, v, causal=True), q, k, v, True, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,causal,masked", [
    pytest.param(2, 8, 2, 64, 200, True, True, id="causal-offset-gqa4-left-padding"),
    pytest.param(1, 2, 2, 200, 200, False, False, id="non-causal-200"),
    pytest.param(1, 2, 2, 1, 130, True, False, id="last-token-only"),
])
def test_key_mass_matches_reference(B, Hq, Hkv, Tq, Tk, causal, masked, dtype):
    q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, 64, dtype, seed=5)
    mask = None
    if masked:
        mask = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
        mask[0, ..., :51] = False
    out, mass = flash_attention_with_key_mass(q, k, v, causal=causal, mask=mask)
    _assert_flash_rule(out, q, k, v, causal, mask)
    ref = key_mass_reference(q.float(), k.float(), causal=causal, mask=mask)
    assert mass.shape == (B, Hq, Tk) and mass.dtype == torch.float32
    torch.testing.assert_close(mass, ref, atol=1e-5 * math.sqrt(Tq), rtol=1e-4)
    rows_with_keys = _allowed(B, Tq, Tk, causal, mask).any(-1).sum(-1)  # (B, 1): each such row sums to 1
    torch.testing.assert_close(mass.sum(-1), rows_with_keys.expand(B, Hq).float(), atol=1e-3, rtol=1e-5)


def test_drop_in_backend_for_the_facade(monkeypatch):
    """The facade calls its triton backend as fn(q, k, v, causal=..., mask=...): same answers as its eager path."""
    monkeypatch.setattr(facade, "_triton_fn", flash_attention)
    q, k, v = _qkv(2, 4, 2, 9, 20, 64, F32, seed=6)
    mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    mask[1, ..., :4] = False
    for tq in (9, 1):  # chunked prefill and one-token decode
        with facade.use_backend("triton"):
            got = facade.attention(q[:, :, -tq:], k, v, causal=True, mask=mask)
        with facade.use_backend("eager"):
            torch.testing.assert_close(got, facade.attention(q[:, :, -tq:], k, v, causal=True, mask=mask))


def test_bad_inputs_have_clear_errors(monkeypatch):
    q, k, v = _qkv(1, 4, 2, 5, 7, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, k[:, :1].expand(1, 3, 7, 64), v[:, :1].expand(1, 3, 7, 64), causal=True)
    with pytest.raises(ValueError, match=r"expected q \(B, Hq, Tq, D\)"):
        flash_attention(q[0], k, v, causal=True)
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attention(q, k.half(), v, causal=True)
    with pytest.raises(TypeError, match="mask must be bool"):
        flash_attention(q, k, v, causal=True, mask=torch.ones(1, 1, 1, 7))
    with pytest.raises(ValueError, match=r"mask must be \(B, 1, 1, Tk\)"):
        flash_attention(q, k, v, causal=True, mask=torch.ones(1, 1, 1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(q, k, v)
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        decode_attention(q[:, :, :1], k, v, num_splits=0)
    monkeypatch.setattr(attn, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        flash_attention(q, k, v, causal=True)
