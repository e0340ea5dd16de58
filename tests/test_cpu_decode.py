"""CPU decode (llava_next.model.cpu_decode) and ``pack_for_cpu``: the compiled one-query attention against the
float32 reference, the facade's routing, the fallback when compiling fails, and whole models packed for
CPU (oneDNN linears + compiled decode attention) against the same models unpacked on library kernels.

Greedy decoding through the compiled attention token-identical to transformers is covered where the
decoder meets transformers (test_generate.py, test_pipeline.py): "auto" sends every one-token decode on
CPU through it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from checkpoints import tiny_config
from llava_next.model import attention as attention_mod
from llava_next.model import cpu_decode
from llava_next.model.attention import eager_attention, use_backend
from llava_next.model.generate import generate
from llava_next.model.llava import LlavaNextModel, PackedLinear

pytestmark = pytest.mark.skipif(not cpu_decode.enabled(), reason="LLAVA_NEXT_COMPILE=0")


def bf16_ulp(ref: torch.Tensor) -> float:
    return ref.abs().max().item() * 2.0 ** -8


@pytest.mark.parametrize("b,hq,hkv,t", [(1, 4, 4, 1), (1, 4, 4, 300), (1, 8, 2, 33), (2, 4, 1, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_one_query_matches_eager(b, hq, hkv, t, dtype):
    g = torch.Generator().manual_seed(t)
    q = torch.randn(b, hq, 1, 16, generator=g).to(dtype)
    cache = torch.randn(2, b, hkv, t + 5, 16, generator=g).to(dtype) * 3
    k, v = cache[0, :, :, :t], cache[1, :, :, :t]  # a prefix of a cache buffer: not contiguous
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to SDPA would warn
        out = cpu_decode.attention_one_query(q, k, v)
    assert cpu_decode.enabled()
    ref = eager_attention(q.double(), k.double(), v.double(), causal=True)
    assert out.shape == (b, hq, 1, 16) and out.dtype == dtype
    tol = 1e-5 * ref.abs().max().item() if dtype == torch.float32 else 2 * bf16_ulp(ref)
    assert (out.double() - ref).abs().max().item() <= tol


def test_facade_sends_only_unmasked_one_query_cpu_calls_to_the_compiled_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_decode, "attention_one_query", lambda q, k, v: calls.append(q.shape) or q)
    q1, q3, kv = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 6, 8)
    attention_mod.attention(q1, kv, kv, causal=True)
    assert calls == [q1.shape]
    attention_mod.attention(q3, kv, kv, causal=True)  # prefill
    attention_mod.attention(q1, kv, kv, causal=True, mask=torch.ones(1, 1, 1, 6, dtype=torch.bool))  # a batch
    with use_backend("sdpa"):  # forcing a backend means that backend
        attention_mod.attention(q1, kv, kv, causal=True)
    assert calls == [q1.shape]
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")
    attention_mod.attention(q1, kv, kv, causal=True)
    assert calls == [q1.shape]


def test_a_failed_compile_warns_once_and_falls_back_to_sdpa(monkeypatch):
    def broken():
        def call(*args):
            raise RuntimeError("no C++ compiler\n(details)")
        return call

    monkeypatch.setattr(cpu_decode, "_compiled", broken)
    monkeypatch.setattr(cpu_decode, "_failed", False)
    q, kv = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8)
    with pytest.warns(RuntimeWarning, match="compiling the CPU decode attention failed .*no C\\+\\+ compiler"):
        out = cpu_decode.attention_one_query(q, kv, kv)
    assert torch.equal(out, F.scaled_dot_product_attention(q, kv, kv)) and not cpu_decode.enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once: later calls go straight to SDPA
        cpu_decode.attention_one_query(q, kv, kv)
    with pytest.raises(RuntimeError):  # bad input still fails, from the library kernel
        cpu_decode.attention_one_query(q, torch.randn(1, 2, 4, 7), kv)


# ---- whole models packed for CPU ------------------------------------------------------------------
def tiny_model(dtype: torch.dtype) -> LlavaNextModel:
    torch.manual_seed(0)
    model = LlavaNextModel(tiny_config("video")).eval()
    for p in model.parameters():  # default init leaves some tensors at zero: give every weight a scale
        torch.nn.init.normal_(p, std=0.3)
    return model.to(dtype)


def packed_copy(model: LlavaNextModel) -> LlavaNextModel:
    twin = tiny_model(model.dtype)
    twin.load_state_dict(model.state_dict())
    assert twin.pack_for_cpu()
    return twin


def test_pack_for_cpu_packs_every_linear():
    model = tiny_model(torch.bfloat16)
    assert model.pack_for_cpu()
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.language_model.lm_head, PackedLinear) and isinstance(model.projector.linear_1, PackedLinear)


def test_packed_linear_drops_the_file_pages_of_a_mapped_weight_and_leaves_copies_alone(tmp_path):
    from safetensors.torch import load_file, save_file
    from test_load import mapped_pages

    w = torch.randn(512, 256).to(torch.bfloat16)
    save_file({"w": w}, tmp_path / "w.safetensors")
    mapped = load_file(tmp_path / "w.safetensors")["w"]
    x = torch.randn(3, 256).to(torch.bfloat16)
    for weight in (mapped, w):
        linear = torch.nn.Linear(256, 512, bias=False, dtype=torch.bfloat16)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        before = mapped_pages(weight)
        packed = PackedLinear(linear)
        assert mapped_pages(weight) == (0 if weight is mapped else before) and before > 0
        assert torch.equal(weight, w)  # still readable: dropped file pages come back from the file
        assert torch.equal(packed(x), F.linear(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_model_decodes_like_the_unpacked_model(dtype):
    model = tiny_model(dtype)
    packed = packed_copy(model)
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model.video_features(pixels), packed.video_features(pixels)
    scale = a.float().abs().max().item()
    assert (a.float() - b.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 2 ** -7) * scale
    ours = generate(packed.language_model, ids, max_new_tokens=12, eos_token_id=())
    with use_backend("sdpa"):  # the unpacked model through the library kernels only
        ref = generate(model.language_model, ids, max_new_tokens=12, eos_token_id=())
    assert len(set(ref[0].tolist())) > 2
    if dtype == torch.float32:
        assert torch.equal(ours, ref)
    # every step's logits, teacher-forced on the reference's tokens, within the dtype's rounding
    seq = torch.cat([ids, ref], dim=1)
    with torch.no_grad():
        full = model.language_model(seq).float()
        packed.language_model.setup_caches(1, seq.shape[1])
        steps = [packed.language_model(seq[:, :9], input_pos=torch.arange(9))[:, -1]]
        for i in range(9, seq.shape[1] - 1):
            steps.append(packed.language_model(seq[:, i:i + 1], input_pos=torch.tensor([i]))[:, -1])
    got = torch.stack(steps, 1).float()
    want = full[:, 8:-1]
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert (got - want).abs().max().item() <= tol * want.abs().max().item()
