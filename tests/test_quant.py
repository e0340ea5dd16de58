"""Weight-only quantization (llava_next/model/quant.py): each quantized linear against its dequantized fp32
reference, a quantized model's logits against the same model with dequantized weights, which layers a
scope quantizes, and the errors for shapes the int4 kernel cannot take.

Tolerances (stated, measured x ~4): bf16 activations — the quantized layer rounds its output to bf16
(and the GEMM path also the dequantized weight), so max |y - ref| <= 1.5e-2 x max |ref| per layer; a
whole model's bf16 logits are held to the bf16 rule (at most 2x the error of the same dequantized model
run in plain bf16, plus 1e-3). fp32 activations (int8 only: the int4 kernel rounds weights to bf16)
differ from the fp32 reference only in summation order: 1e-5 per layer, 1e-4 for logits.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checkpoints import tiny_config
from llava_next.model.attention import use_backend
from llava_next.model.generate import generate
from llava_next.model.llava import LlavaNextModel
from llava_next.model.quant import (DEQUANT_MIN_ROWS, Int4Linear, Int8Linear, QuantConfig, QuantizationError,
                                    dequantize_int4, dequantize_int8, quantize_int4, quantize_int8, set_activations)
from llava_next.model.quant_model import dequantize_model, quantize_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def linear(n: int = 96, k: int = 256, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(1 + 3 * torch.rand(n, 1))  # rows of different ranges: per-row scales matter
    return lin


def test_int8_numbers():
    w = linear().weight.detach()
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and s.shape == (96,)
    assert ((dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-7).all()  # round to nearest


def test_int4_numbers():
    w = linear().weight.detach()
    packed, s, z = quantize_int4(w, 64)
    assert packed.shape == (96, 128) and packed.dtype == torch.uint8 and s.shape == z.shape == (96, 4)
    assert ((dequantize_int4(packed, s, z, 64) - w).abs() <= s.repeat_interleave(64, 1) / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 5, DEQUANT_MIN_ROWS + 3])  # one-row kernel, few rows, the GEMM path
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_linear_matches_dequantized_fp32(method, rows):
    lin = linear(bias=True)
    if method == "int8":
        q = Int8Linear.from_linear(lin, torch.bfloat16)
        w = dequantize_int8(q.weight, q.scales)
    else:
        q = Int4Linear.from_linear(lin, 64, torch.bfloat16)
        w = dequantize_int4(q.weight, q.scales, q.zeros, 64)
    x = torch.randn(2, rows, 256).bfloat16()
    ref = x.float() @ w.T + q.bias.float()
    with torch.no_grad():
        y = q(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, rows, 96)
    assert rel(y, ref) <= 1.5e-2
    assert rel(y, lin(x.float())) > 1e-3  # the quantization itself is visible: the test compares the right thing


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_prompt_gemm_in_weight_chunks_covers_every_output_channel(method):
    """The prompt path dequantizes 512 output channels at a time; 1,040 channels = two full chunks and a
    partial one. Each column must equal the whole-weight GEMM's (F.linear on ``dequantized``)."""
    lin = linear(n=1040, bias=True)
    q = Int8Linear.from_linear(lin, torch.bfloat16) if method == "int8" else Int4Linear.from_linear(lin, 64, torch.bfloat16)
    x = torch.randn(1, DEQUANT_MIN_ROWS + 1, 256).bfloat16()
    with torch.no_grad():
        y = q(x)
        whole = F.linear(x, q.dequantized(torch.bfloat16), q.bias)
    assert y.shape == (1, DEQUANT_MIN_ROWS + 1, 1040)
    assert rel(y, whole) <= 1e-2  # bf16 GEMMs over the same weights (oneDNN may block differently per width)
    assert rel(y[..., 1024:], whole[..., 1024:]) <= 1e-2  # the last, partial chunk too


@pytest.mark.parametrize("rows", [3, DEQUANT_MIN_ROWS])
def test_int8_fp32_activations_match_to_summation_order(rows):
    lin = linear()
    q = Int8Linear.from_linear(lin, torch.float32)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        assert rel(q(x), x @ dequantize_int8(q.weight, q.scales).T) <= 1e-5


def int8_activations_reference(x: torch.Tensor, q: Int8Linear) -> torch.Tensor:
    """The int8-activation prompt written out in float64 (model/quant.py's docstring): per row s_x = max |x| / 127,
    x_q = round(x / s_x) (ties to even, as torch.round), y = (x_q . w_q) s_x s_w (+ bias), rounded once."""
    x64 = x.double()
    sx = (x.float().abs().amax(-1, keepdim=True) / 127).double()  # the scale as fp32 computes it
    xq = torch.round(x.float() / sx.float()).double()
    y = (xq @ q.weight.double().T) * sx * q.scales.double()
    return (y if q.bias is None else y + q.bias.double()).to(x.dtype), x64


@pytest.mark.parametrize("bias", [False, True])
def test_int8_activations_are_the_written_formula(bias):
    """``activations = "int8"``: the integer sums are exact, so the layer equals the formula to bf16's last
    rounding, for a prompt and for decode rows (the C VNNI loop), which give the prompt's bits row for row;
    "float" (the default) stays weight-only."""
    lin = linear(n=1040, bias=bias)
    q = Int8Linear.from_linear(lin, torch.bfloat16)
    x = torch.randn(2, DEQUANT_MIN_ROWS, 256).bfloat16()
    x[0, 3, 7] = 40.0  # an outlier: its row's other features lose precision (the contract's known cost)
    with torch.no_grad():
        weight_only, weight_only_row = q(x), q(x[:, :1])
        assert set_activations(q, "int8") == 1
        y = q(x)
        want, _ = int8_activations_reference(x, q)
        one_row = q(x[:, :1])  # a decode step (2 rows of one token)
        set_activations(q, "float")
        assert torch.equal(q(x), weight_only) and torch.equal(q(x[:, :1]), weight_only_row)
    assert torch.equal(one_row, y[:, :1])  # decode and prompt: the same bits for the same row
    assert not torch.equal(one_row, weight_only_row)
    assert (y.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()  # one bf16 rounding
    assert (y.float() - want.float()).abs().gt(0).float().mean() < 0.05  # most entries identical
    exact = F.linear(x.double(), dequantize_int8(q.weight, q.scales).double(), None if q.bias is None else q.bias.double())
    assert rel(y, exact) > rel(weight_only, exact)  # activations rounded to int8: measurably less exact
    assert rel(y[0, 3], exact[0, 3]) > 5 * rel(y[1], exact[1])  # the outlier's row most of all
    with pytest.raises(QuantizationError, match="choose float"):
        set_activations(q, "fp8")
    q32, x32 = Int8Linear.from_linear(lin, torch.float32), x.float()  # fp32: the input is left as it was
    set_activations(q32, "int8")
    with torch.no_grad():
        y32, row32 = q32(x32), q32(x32[:, :1])
    assert torch.equal(x32, x.float()) and rel(y32, int8_activations_reference(x32, q32)[0]) < 1e-6
    assert rel(row32, int8_activations_reference(x32[:, :1], q32)[0]) < 1e-6


def int4_activations_reference(x: torch.Tensor, q: Int4Linear) -> torch.Tensor:
    """int4 weights with int8 activations written out in float64 (model/quant.py's docstring): x_q and s_x as for
    int8, per group P = sum x_q q (q the raw nibble) and X = sum x_q, y = s_x sum_g (scale P + (zero - 8 scale) X)."""
    N, K, G = q.out_features, q.in_features, q.group_size
    x32 = x.reshape(-1, K).float()
    sx = (x32.abs().amax(-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    xq = torch.round(x32 / sx).double().view(-1, K // G, G)
    nib = torch.stack((q.weight & 15, q.weight >> 4), -1).reshape(N, K // G, G).double()
    s, z = q.scales.double(), q.zeros.double()
    y = sx.double() * ((torch.einsum("mgk,ngk->mng", xq, nib) * s).sum(-1) + xq.sum(-1) @ (z - 8 * s).T)
    y = y if q.bias is None else y + q.bias.double()
    return y.reshape(*x.shape[:-1], N)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_activations_in_decode_steps_are_the_written_formula(group, monkeypatch):
    """Int4Linear with ``activations = "int8"``: decode rows (the C VNNI loop, and torch's ops without the
    library) equal the float64 formula to bf16's rounding; prompts stay on the dequantized weight."""
    from llava_next.model import cpu_gemv

    torch.manual_seed(5)
    lin = linear(n=96, k=512, bias=True)
    q = Int4Linear.from_linear(lin, group, torch.bfloat16)
    x = torch.randn(3, 512).bfloat16()
    x[1, 9] = 30.0  # an outlier row
    prompt = torch.randn(DEQUANT_MIN_ROWS, 512).bfloat16()
    with torch.no_grad():
        weight_only, weight_only_prompt = q(x), q(prompt)
        assert set_activations(q, "int8") == 1
        y, y_prompt = q(x), q(prompt)
        monkeypatch.setattr(cpu_gemv, "load", lambda: None)
        y_torch = q(x)
    want = int4_activations_reference(x, q)
    for got in (y, y_torch):
        assert ((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-30).all()  # within one bf16 rounding
    assert torch.equal(y_prompt, weight_only_prompt) and not torch.equal(y, weight_only)
    exact = F.linear(x.double(), dequantize_int4(q.weight, q.scales, q.zeros, group).double(), q.bias.double())
    assert rel(y[1], exact[1]) > 3 * rel(y[0], exact[0])  # the outlier's row loses most


def tiny_model(dtype: torch.dtype) -> LlavaNextModel:
    torch.manual_seed(0)
    return LlavaNextModel(tiny_config()).eval().to(dtype)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_logits_match_dequantized_model(method):
    qc = QuantConfig(method, group_size=32)  # the tiny decoder is 64 wide
    model = quantize_model(tiny_model(torch.bfloat16), qc)
    ref = dequantize_model(copy.deepcopy(model), torch.float32).float()
    plain_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    dec, dec_ref, dec_bf16 = model.language_model, ref.language_model, plain_bf16.language_model
    for T in (7, DEQUANT_MIN_ROWS + 5):  # kernel path and dequantize-then-GEMM path
        x = torch.randint(0, 128, (1, T))
        with torch.no_grad():
            out, want, bf16 = dec(x).float(), dec_ref(x), dec_bf16(x).float()
        assert rel(out, want) <= 2 * rel(bf16, want) + 1e-3, (T, rel(out, want), rel(bf16, want))


def test_int8_fp32_model_greedy_identical_to_dequantized():
    model = quantize_model(tiny_model(torch.float32), QuantConfig("int8"))
    ref = dequantize_model(copy.deepcopy(model), torch.float32)
    x = torch.randint(0, 128, (1, DEQUANT_MIN_ROWS + 2))  # prefill on the GEMM path, decode on the kernel
    with torch.no_grad():
        assert rel(model.language_model(x), ref.language_model(x)) <= 1e-4
    with use_backend("sdpa"):  # keeps the compiled decode attention (one-time compile) out of this test
        a = generate(model.language_model, x, max_new_tokens=12, eos_token_id=())
        b = generate(ref.language_model, x, max_new_tokens=12, eos_token_id=())
    assert torch.equal(a, b) and len(set(a[0].tolist())) > 2


def test_scope_decoder_keeps_vision_and_projector():
    model = quantize_model(tiny_model(torch.bfloat16), QuantConfig("int8"))
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}
    assert kinds["language_model.lm_head"] is Int8Linear
    assert kinds["language_model.layers.1.mlp.down_proj"] is Int8Linear
    assert all(t is nn.Linear for n, t in kinds.items() if not n.startswith("language_model."))
    assert any(n.startswith("vision_tower.") for n in kinds) and "projector.linear_1" in kinds
    assert model.vision_tower.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    everything = quantize_model(tiny_model(torch.bfloat16), QuantConfig("int8", scope="all"))
    assert not any(type(m) is nn.Linear for m in everything.modules())


def test_int4_bad_shapes_and_config_are_clear_errors():
    with pytest.raises(QuantizationError, match=r"layers.0.self_attn.q_proj.weight.*multiple of the group size"):
        quantize_model(tiny_model(torch.bfloat16), QuantConfig("int4", group_size=128))  # K = 64
    with pytest.raises(QuantizationError, match="multiple of 16"):
        Int4Linear.from_linear(linear(n=40, k=128), 64)
    with pytest.raises(QuantizationError, match="group_size 100"):
        QuantConfig("int4", group_size=100)
    with pytest.raises(QuantizationError, match="int8 or int4"):
        QuantConfig("int3")
    with pytest.raises(QuantizationError, match="group_size"):
        QuantConfig.from_dict({"method": "int4"})


def test_docs_memory_table_is_the_one_the_memory_check_computes():
    """docs/quantization.md's 'Which models fit' table is ``memory.memory_table()`` (the code ``check_model_fits``
    uses)."""
    from pathlib import Path

    from llava_next.runtime.memory import memory_table, weight_bytes

    doc = (Path(__file__).parent.parent / "docs" / "quantization.md").read_text()
    assert memory_table() in doc
    cfg = tiny_config()
    model = tiny_model(torch.bfloat16)
    assert weight_bytes(cfg, torch.bfloat16) == sum(t.nbytes for t in model.state_dict().values())
    quantize_model(model, QuantConfig("int4", group_size=32))
    assert weight_bytes(cfg, torch.bfloat16, "int4", 32) == sum(t.nbytes for t in model.state_dict().values())


def test_check_model_fits_names_the_format_that_would(monkeypatch):
    from llava_next.config import PRESETS
    from llava_next.runtime import memory
    from llava_next.runtime.memory import MemoryBudgetError, check_model_fits

    cfg = PRESETS["llava-v1.6-vicuna-13b"].config
    monkeypatch.setattr(memory, "available_memory", lambda device: 10 * 2**30)
    monkeypatch.setattr(memory, "_total_memory", lambda: 24 * 2**30)
    with pytest.raises(MemoryBudgetError, match=r"need 2\d\.\d\d GiB in bfloat16 but the machine has 24.00 GiB "
                                                r"\(cpu\); --quantize int8 \(12\.\d\d GiB\) would fit"):
        check_model_fits(cfg, torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="only 10.00 GiB of 24.00 GiB are available now"):
        check_model_fits(cfg, torch.bfloat16, quantize="int8")  # fits the machine, not what is free now
    check_model_fits(cfg, torch.bfloat16, quantize="int4")  # fits


@pytest.mark.parametrize("in_features", [344, 24])
def test_int8_decode_rows_with_in_features_not_a_multiple_of_16(in_features):
    """torch 2.13's CPU int8 kernel (``_weight_int8pack_mm``) reads past each row when K % 16 != 0 (garbage or
    inf seen, and a segfault on the mmapped tiny-random int8 copy, MLP width 344): such layers dequantize."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(in_features, 64, bias=False), torch.bfloat16)
    x = torch.randn(3, in_features, dtype=torch.bfloat16)  # decode-sized: below DEQUANT_MIN_ROWS
    ref = F.linear(x.float(), layer.dequantized(torch.float32))
    y = layer(x).float()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
