"""NF4 (llava_next/model/nf4.py) against bitsandbytes 0.50.2's CPU backend, the test reference: quantize and
dequantize bit for bit (packed nibbles, absmax and its double-quantization statistics), NF4Linear's output
and input gradient against F.linear on bitsandbytes' dequantized weight, the frozen weight, the quantized
checkpoint round trip, and ``llava-next run --quantize nf4`` against the same model with its weights
replaced by the dequantized floats."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from llava_next.model.nf4 import (NF4Error, NF4Linear, dynamic_code, nf4_code, nf4_dequantize, nf4_quantize)
from llava_next.model.quant import QuantConfig, QuantizationError
from llava_next.model.quant_model import dequantize_model, quantize_model

# bitsandbytes' CPU backend, imported once: with AVX512-BF16 it looks for a GEMM kernel on the kernel hub; the
# hub is offline here (HF_HUB_OFFLINE=1, tests/conftest.py), so that only logs a warning, silenced here
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnbf = pytest.importorskip("bitsandbytes.functional")

# (N, K): whole blocks; 1000 weights (not a multiple of 64: the last block is partial); an odd count (the last
# nibble is padded); > 256 blocks (two second-level absmax blocks, the last partial); a vector
SHAPES = [(64, 128), (10, 100), (7, 9), (96, 200), (33, 1030), (5,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g) * 3  # rows of different scales
    return (torch.randn(shape, generator=g) * rows).to(dtype)


def bnb_quantize(w, double_quant=True):
    return bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)


def test_code_books_are_bitsandbytes():
    assert torch.equal(nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_and_dequantize_are_bitsandbytes_bit_for_bit(shape, dtype, double_quant):
    w = weight(shape, dtype, seed=len(shape) + shape[0])
    packed, state = bnb_quantize(w, double_quant)
    q = nf4_quantize(w, blocksize=64, double_quant=double_quant)
    assert torch.equal(q.packed, packed.reshape(-1))  # ((n + 1) // 2,) uint8, the same nibbles in the same order
    assert torch.equal(q.absmax, state.absmax)  # fp32 absmax, or its uint8 double-quantized codes
    if double_quant:
        assert torch.equal(q.absmax_scale, state.state2.absmax) and torch.equal(q.absmax_offset, state.offset)
    else:
        assert q.absmax_scale is None and q.absmax_offset is None
    for out in DTYPES:  # dequantized into every dtype bitsandbytes offers
        s = copy.copy(state)
        s.dtype = out
        assert torch.equal(nf4_dequantize(q, out), bnbf.dequantize_4bit(packed, s))


def test_dequantize_in_chunks_is_bitsandbytes(monkeypatch):
    """Whole blocks dequantize chunk by chunk (``nf4._CHUNK`` values at a time, 4M by default, more than any
    shape above): with 7 blocks a chunk, 300 blocks make 43 chunks, the last one short; bit for bit still."""
    import llava_next.model.nf4 as nf4

    monkeypatch.setattr(nf4, "_CHUNK", 7 * 64)
    monkeypatch.setattr(nf4, "_dequantize_in_c", lambda q, dtype, scratch=False: None)  # torch's chunks, not C
    for dtype in DTYPES:
        w = weight((96, 200), dtype, seed=5)
        packed, state = bnb_quantize(w)
        assert torch.equal(nf4_dequantize(nf4_quantize(w)), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("march", ["native", "x86-64-v3"])
def test_the_c_dequantization_is_the_torch_one_bit_for_bit(march, monkeypatch):
    """cpu_dequant.c (the CPU path of every NF4 forward and backward) against the torch chunks it replaces, bit for
    bit, in fp32 and bf16: the native build (AVX-512 where the CPU has it) and the plain C one (x86-64-v3: no
    AVX-512); every blocksize bitsandbytes accepts; tiny (subnormal products), huge, inf and NaN absmax, ties."""
    import llava_next.model.cpu_gemv as cpu_gemv
    import llava_next.model.nf4 as nf4

    if march != "native" and "avx2" not in cpu_gemv.cpu_identity():
        pytest.skip("the portable build is checked on x86-64 with AVX2")
    monkeypatch.setattr(cpu_gemv, "_lib", cpu_gemv.bind(cpu_gemv.build(march=march)))
    for blocksize in nf4.BLOCKSIZES:
        q = nf4_quantize(weight((24, 4096), torch.float32, seed=blocksize), blocksize=blocksize)
        absmax = nf4.block_absmax(q)
        # 1 + 2^-8 and 1 + 3 * 2^-8: times the levels +-1, exact ties of bf16 rounding (to even: down, then up)
        specials = torch.tensor([1e-40, 3e38, float("inf"), float("nan"), -0.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8])
        monkeypatch.setattr(nf4, "block_absmax", lambda _q: torch.cat([specials, absmax[len(specials):]]))
        for dtype in (torch.float32, torch.bfloat16):
            got, want = nf4._dequantize_in_c(q, dtype), nf4._dequantize_whole_blocks(q, dtype)
            bits = torch.int32 if dtype == torch.float32 else torch.int16
            assert torch.equal(got.view(bits), want.view(bits)), (blocksize, dtype)
        monkeypatch.undo()
        monkeypatch.setattr(cpu_gemv, "_lib", cpu_gemv.bind(cpu_gemv.build(march=march)))


def test_scratch_dequantization_reuses_one_buffer_per_thread():
    """The layer's forward and backward dequantize into one reused buffer (fresh 90 MB tensors cost more in page
    faults than in filling them); a plain call still returns a tensor of its own."""
    q1, q2 = nf4_quantize(weight((64, 128), torch.float32, 1)), nf4_quantize(weight((32, 128), torch.float32, 2))
    a = nf4_dequantize(q1, torch.bfloat16, scratch=True)
    want = nf4_dequantize(q1, torch.bfloat16)
    assert torch.equal(a, want) and want.data_ptr() != a.data_ptr()
    b = nf4_dequantize(q2, torch.bfloat16, scratch=True)  # smaller: the same storage, a's values overwritten
    assert b.data_ptr() == a.data_ptr() and torch.equal(b, nf4_dequantize(q2, torch.bfloat16))


def test_double_quantization_edge_cases():
    """Blocks whose absmax all equal their mean (a single block, a constant weight): the second-level absmax is
    0 and bitsandbytes stores code 0; an all-zero weight; large and tiny magnitudes."""
    for w in (torch.randn(4, 16), torch.full((8, 64), 0.5), torch.zeros(2, 64), torch.randn(16, 64) * 1e4,
              torch.randn(16, 64) * 1e-6):
        packed, state = bnb_quantize(w)
        q = nf4_quantize(w)
        assert torch.equal(q.packed, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
        assert torch.equal(q.absmax_scale, state.state2.absmax) and torch.equal(q.absmax_offset, state.offset)
        assert torch.equal(nf4_dequantize(q), bnbf.dequantize_4bit(packed, state))


def test_what_bitsandbytes_refuses_is_refused():
    w = torch.randn(8, 64)
    for blocksize in (48, 8192):
        with pytest.raises(ValueError, match="blocksize"):
            bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        with pytest.raises(NF4Error, match=f"NF4 blocksize {blocksize} is not supported"):
            nf4_quantize(w, blocksize=blocksize)
    with pytest.raises(NF4Error, match="float32, float16 or bfloat16"):
        nf4_quantize(torch.ones(8, 64, dtype=torch.int32))
    with pytest.raises(NF4Error, match=r"a \(3, 5\) weight cannot be an NF4 linear"):
        NF4Linear.from_linear(torch.nn.Linear(5, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nf4_linear_forward_and_input_gradient(dtype):
    """The output equals F.linear on bitsandbytes' dequantized weight; the input's gradient equals autograd
    through that F.linear; the packed weight is frozen (no parameter, no gradient), so only what sits on top
    (a LoRA adapter, here a scale before the layer) trains."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=True).to(dtype)
    layer = NF4Linear.from_linear(lin)
    assert list(layer.parameters()) == [] and not layer.weight.requires_grad
    packed, state = bnb_quantize(lin.weight.detach())
    w_ref = bnbf.dequantize_4bit(packed, state)  # (96, 128) in dtype
    x = torch.randn(2, 5, 128, dtype=dtype)
    a = torch.ones(128, dtype=dtype, requires_grad=True)  # a trainable parameter before the frozen layer
    b = torch.ones(128, dtype=dtype, requires_grad=True)
    y = layer(x * a)
    y_ref = F.linear(x * b, w_ref, lin.bias.detach())
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(a.grad, b.grad)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(layer(xr), xr, g)
    xr2 = x.clone().requires_grad_()
    (gx_ref,) = torch.autograd.grad(F.linear(xr2, w_ref, lin.bias.detach()), xr2, g)
    assert torch.equal(gx, gx_ref)
    assert all(t.grad is None for t in layer.buffers())


def test_backward_keeps_no_float_weight():
    """Nothing float of the weight's size is saved for backward (it is dequantized again there)."""
    layer = NF4Linear.from_linear(torch.nn.Linear(256, 512), dtype=torch.float32)
    saved = []
    x = torch.randn(3, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert not any(t.numel() >= 512 * 256 and t.is_floating_point() for t in saved)
    assert x.grad is not None


def test_quantize_model_nf4_scope_and_dequantize():
    from llava_next.config import PRESETS
    from llava_next.model.llava import LlavaNextModel

    assert QuantConfig("nf4").to_dict() == {"method": "nf4", "scope": "decoder"}
    assert QuantConfig.from_dict({"method": "nf4"}) == QuantConfig("nf4")
    with pytest.raises(QuantizationError, match=r"choose int8 or int4 \(CPU inference\) or nf4"):
        QuantConfig("nf3")
    with torch.device("meta"):
        model = LlavaNextModel(PRESETS["llava-v1.6-vicuna-7b"].config)
    quantize_model(model, QuantConfig("nf4"))
    assert isinstance(model.language_model.lm_head, NF4Linear)
    assert isinstance(model.language_model.layers[0].self_attn.q_proj, NF4Linear)
    assert type(model.projector.linear_1) is torch.nn.Linear  # scope "decoder"


# ---- checkpoints and the command line --------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    """convert --quantize nf4 writes the packed tensors; loading them (bf16) gives the layers that quantizing
    the float model in memory gives, the fp32 statistics kept fp32."""
    pytest.importorskip("transformers")
    from checkpoints import make_llava_hf_checkpoint
    from llava_next.model.llava import LlavaNextModel
    from llava_next_weights.convert import convert
    from llava_next_weights.load import load_into, read_config
    from llava_next_weights.quantize import QUANT_FILE, prepare_quantized

    def load(path):
        with torch.device("meta"):
            model = LlavaNextModel(read_config(path))
        prepare_quantized(model, path, torch.bfloat16)
        return load_into(model, path, dtype=torch.bfloat16).eval()

    src, _ = make_llava_hf_checkpoint(tmp_path / "hf", kind="video")
    flt = convert(src, tmp_path / "float", dtype="bf16", progress=False)
    out = convert(src, tmp_path / "nf4", dtype="bf16", quantize="nf4", shard_bytes=30_000, progress=False)
    assert json.loads((out / QUANT_FILE).read_text()) == {"method": "nf4", "scope": "decoder"}
    loaded, in_memory = load(out), quantize_model(load(flt), QuantConfig("nf4"))
    layer = loaded.language_model.layers[0].mlp.up_proj
    assert isinstance(layer, NF4Linear) and layer.absmax.dtype == torch.uint8
    for m in (loaded, in_memory):  # every NF4 linear reuses the thread's buffer but lm_head (nf4.py ``_scratch``)
        assert not m.language_model.lm_head.reuse_buffer and m.language_model.layers[0].mlp.up_proj.reuse_buffer
    assert layer.absmax_scale.dtype == torch.float32 and layer.absmax_offset.dtype == torch.float32
    sa, sb = loaded.state_dict(), in_memory.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.language_model(x), in_memory.language_model(x))
    size = {k: sum(f.stat().st_size for f in p.glob("*.safetensors")) for k, p in (("f", flt), ("q", out))}
    assert size["q"] < size["f"]


def test_cli_run_nf4_equals_the_dequantized_float_model(tmp_path, monkeypatch, capsys):
    """``llava-next run --model tiny-random --quantize nf4``: the greedy tokens equal those of the same model
    whose quantized linears are replaced by nn.Linear holding the dequantized weights (fp32)."""
    from llava_next.cli.main import main
    from llava_next.runtime.pipeline import Pipeline

    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")
    args = ["run", "--model", "tiny-random", "--image", "sample:cat", "--dtype", "fp32", "--max-new-tokens", "8",
            "--json", "What is this?"]
    assert main(args[:3] + ["--quantize", "nf4"] + args[3:]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert list((tmp_path / "cache").rglob("*-nf4"))  # quantized once into the cache, like a conversion

    pipe = Pipeline.from_pretrained("tiny-random", dtype=torch.float32, quantize="nf4", progress=False)
    assert isinstance(pipe.model.language_model.layers[0].mlp.down_proj, NF4Linear)
    dequantize_model(pipe.model, torch.float32)  # each NF4Linear -> nn.Linear(dequantized weight), F.linear
    assert not any(isinstance(m, NF4Linear) for m in pipe.model.modules())
    req = pipe.prepare("What is this?", images=["sample:cat"], max_new_tokens=8)
    pipe.generate(req, max_new_tokens=8)
    assert req.tokens == tokens and len(tokens) == 8
