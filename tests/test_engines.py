"""The decode engines (llava_next/model/engines.py) and ``pack_for_cpu``: the compiled one-query attention
against the float32 reference; the whole-step compiled decode (the same blocks with a static context) with
greedy tokens identical to the eager engine and logits within the bf16 rule, on a left-padded batch through a
prepacked bf16 model (one small compile, inductor's default mode: seconds, not max-autotune's minutes); the
policy (model/policy.py); the fallbacks when compiling fails; whole models packed for CPU (oneDNN linears +
compiled decode attention) against the same models unpacked on library kernels.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from checkpoints import tiny_config
from llava_next.model import cpu_gemv, engines, policy
from llava_next.model.attention import eager_attention, one_query_attention, use_backend
from llava_next.model.engines import CompiledStepEngine, EagerEngine, choose_engine, decode_kernel, decode_step
from llava_next.model.generate import generate
from llava_next.model.llava import DecodeLinear, LlavaNextModel, PackedLinear
from llava_next.model.quant import QuantConfig
from llava_next.model.quant_model import quantize_model

compiling = pytest.mark.skipif(policy.compile_setting() == "0", reason="LLAVA_NEXT_COMPILE=0")


def bf16_ulp(ref: torch.Tensor) -> float:
    return ref.abs().max().item() * 2.0 ** -8


# ---- the compiled one-query attention ---------------------------------------------------------------
@compiling
@pytest.mark.parametrize("b,hq,hkv,t", [(1, 4, 4, 2), (1, 4, 4, 300), (1, 8, 2, 33), (2, 4, 1, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_one_query_matches_eager(b, hq, hkv, t, dtype):
    g = torch.Generator().manual_seed(t)
    q = torch.randn(b, hq, 1, 16, generator=g).to(dtype)
    cache = torch.randn(2, b, hkv, t + 5, 16, generator=g).to(dtype) * 3
    k, v = cache[0, :, :, :t], cache[1, :, :, :t]  # a prefix of a cache buffer: not contiguous
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to SDPA would warn
        out = engines.compiled_one_query(q, k, v, None)
    assert "attention" in engines._compiled and "attention" not in engines._failed
    ref = eager_attention(q.double(), k.double(), v.double(), causal=True)
    assert out.shape == (b, hq, 1, 16) and out.dtype == dtype
    tol = 1e-5 * ref.abs().max().item() if dtype == torch.float32 else 2 * bf16_ulp(ref)
    assert (out.double() - ref).abs().max().item() <= tol


def test_one_query_attention_with_a_mask_equals_eager():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    allowed = torch.ones(2, 7, dtype=torch.bool)
    allowed[1, :3] = False
    ref = eager_attention(q, k, v, causal=True, mask=allowed[:, None, None, :])
    assert (one_query_attention(q, k, v, allowed) - ref).abs().max() <= 1e-6


def test_the_compiled_kernel_takes_only_unmasked_one_query_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(engines, "_compiled_one_query", lambda: lambda q, k, v: calls.append(q.shape) or q)
    q1, q3, kv = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 6, 8)
    engines.compiled_one_query(q1, kv, kv, None)
    assert calls == [q1.shape]
    engines.compiled_one_query(q3, kv, kv, None)  # prefill
    engines.compiled_one_query(q1, kv, kv, torch.ones(1, 1, 1, 6, dtype=torch.bool))  # a batch with padding
    engines.compiled_one_query(q1, kv[:, :, :1], kv[:, :, :1], None)  # a one-key cache
    assert calls == [q1.shape]


def test_decode_kernel_policy(monkeypatch):
    """The compiled attention (a warm compile costs seconds) is chosen only when the KV reads it speeds up pay
    for it, on CPU, while no backend is forced; once it has compiled in the process, always."""
    dec = bf16_model().language_model
    cpu = torch.device("cpu")
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "auto")
    monkeypatch.setattr(policy, "attention_in_c", lambda dtype: False)  # its own rule: the test below
    monkeypatch.setattr(engines, "_compiled", set())  # not compiled yet in this process
    monkeypatch.setattr(engines, "_failed", set())
    kv_7b = 2 * 32 * 32 * 1200 * 128 * 2  # KV bytes read per token: 7B, bf16, 1,200 tokens (~0.63 GB)
    assert not policy.attention_compile_pays(kv_7b, 30, False) and policy.attention_compile_pays(kv_7b, 64, False)
    assert not policy.attention_compile_pays(kv_7b / 16, 256, False)  # the 2-layer benchmark model: a short answer
    assert policy.attention_compile_pays(kv_7b / 16, 1, True)  # compiled before in this process
    assert decode_kernel(dec, 1, 10, 4, torch.bfloat16, cpu) is None  # a tiny request: not worth a compile
    engines._compiled.add("attention")
    assert decode_kernel(dec, 1, 10, 4, torch.bfloat16, cpu) is engines.compiled_one_query
    assert decode_kernel(dec, 1, 10, 4, torch.bfloat16, torch.device("meta")) is None  # CPU only
    with use_backend("sdpa"):  # forcing a backend means that backend
        assert decode_kernel(dec, 1, 10, 4, torch.bfloat16, cpu) is None
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")
    assert decode_kernel(dec, 1, 10, 4, torch.bfloat16, cpu) is None
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "1")
    engines._compiled.clear()
    assert decode_kernel(dec, 1, 10, 4, torch.bfloat16, cpu) is engines.compiled_one_query
    engines._failed.add("attention")
    assert decode_kernel(dec, 1, 10, 4, torch.bfloat16, cpu) is None
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "yes")
    with pytest.raises(ValueError, match="LLAVA_NEXT_COMPILE='yes'"):
        policy.compile_setting()


@pytest.mark.skipif(cpu_gemv.load() is None, reason="no C compiler for the CPU kernels")
def test_the_c_decode_attention_rule_and_its_tokens(monkeypatch):
    """policy.attention_in_c: bf16 decode steps attend with the C loop (no compile) on a CPU with AVX-512 (with
    AVX512-BF16 or without), under LLAVA_NEXT_COMPILE=auto only; any other CPU (AVX2 only), dtype or setting keeps
    the compiled rule. Decoding with it gives the greedy tokens of the SDPA facade."""
    dec, cpu = bf16_model().language_model, torch.device("cpu")
    flags = {"with": "AMD EPYC | avx2 avx512_bf16 avx512f", "without": "Intel Core | avx avx2 f16c fma"}
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "auto")
    monkeypatch.setattr(cpu_gemv, "cpu_identity", lambda: "Intel Xeon | avx2 avx512f avx512_vnni")
    assert policy.attention_in_c(torch.bfloat16)  # AVX-512 without BF16: the loop widens bf16 by shifts
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "auto")
    monkeypatch.setattr(cpu_gemv, "cpu_identity", lambda: flags["with"])
    assert policy.attention_in_c(torch.bfloat16) and not policy.attention_in_c(torch.float32)
    assert decode_kernel(dec, 1, 10, 4, torch.bfloat16, cpu) is engines.c_one_query
    with use_backend("sdpa"):
        assert decode_kernel(dec, 1, 10, 4, torch.bfloat16, cpu) is None
    for setting in ("0", "1", "step"):
        monkeypatch.setenv("LLAVA_NEXT_COMPILE", setting)
        assert not policy.attention_in_c(torch.bfloat16), setting
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "auto")
    monkeypatch.setattr(cpu_gemv, "cpu_identity", lambda: flags["without"])
    assert not policy.attention_in_c(torch.bfloat16)
    assert decode_kernel(dec, 1, 10, 4, torch.bfloat16, cpu) is not engines.c_one_query
    monkeypatch.undo()
    if "avx512f" not in cpu_gemv.cpu_identity().split():
        return  # the tokens below need this CPU to run the loop
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "auto")
    calls = []
    monkeypatch.setattr(cpu_gemv, "attend_one_query",
                        lambda *a, f=cpu_gemv.attend_one_query: calls.append(1) or f(*a))
    x = torch.randint(0, 128, (1, 40))
    got = generate(dec, x, max_new_tokens=12, eos_token_id=())
    assert len(calls) == 11 * len(dec.layers)  # every decode step after the first token, every layer
    with use_backend("sdpa"):
        want = generate(dec, x, max_new_tokens=12, eos_token_id=())
    assert torch.equal(got, want) and len(set(got[0].tolist())) > 2


def test_a_failed_attention_compile_warns_once_and_falls_back_to_sdpa(monkeypatch):
    def broken():
        def call(*args):
            raise RuntimeError("no C++ compiler\n(details)")
        return call

    monkeypatch.setattr(engines, "_compiled_one_query", broken)
    monkeypatch.setattr(engines, "_failed", set())
    q, kv = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8)
    with pytest.warns(RuntimeWarning, match="compiling the CPU decode attention failed .*no C\\+\\+ compiler"):
        out = engines.compiled_one_query(q, kv, kv, None)
    assert torch.equal(out, F.scaled_dot_product_attention(q, kv, kv)) and "attention" in engines._failed
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once: later calls go straight to SDPA
        engines.compiled_one_query(q, kv, kv, None)
    with pytest.raises(RuntimeError):  # bad input still fails, from the library kernel
        engines.compiled_one_query(q, torch.randn(1, 2, 4, 7), kv, None)


# ---- the whole step compiled ------------------------------------------------------------------------
def bf16_model(pack: bool = True) -> LlavaNextModel:
    torch.manual_seed(0)
    model = LlavaNextModel(tiny_config()).eval().to(torch.bfloat16)
    if pack:
        model.pack_for_cpu()
    return model


def test_the_step_is_the_eager_blocks_with_a_static_context():
    """``decode_step`` run eagerly (not compiled) = the eager engine's decode step in fp32: the same block code,
    only the attention reads the whole static cache with the unwritten and padding slots masked."""
    torch.manual_seed(0)
    dec = LlavaNextModel(tiny_config()).eval().language_model
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :4] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    step = CompiledStepEngine()
    with torch.no_grad():
        step.setup_caches(dec, 2, 11, 5, torch.float32, torch.device("cpu"))
        step.prefill(dec, dec.embed_tokens(ids), pos, mask)
        tok, slot, rope = torch.tensor([3, 7]), torch.tensor([11]), pos[:, -1:] + 1
        visible = step.real & (torch.arange(step.real.shape[1]) <= slot)
        got = decode_step(dec, tok, slot, rope, visible)
        eager = EagerEngine()
        eager.setup_caches(dec, 2, 11, 5, torch.float32, torch.device("cpu"))
        eager.prefill(dec, dec.embed_tokens(ids), pos, mask)
        want = eager.decode(dec, tok, 0, rope)
    assert step.real.shape[1] == policy.static_cache_length(11, 5)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@compiling
def test_compiled_step_matches_eager(monkeypatch):
    monkeypatch.setattr(policy, "STEP_MODE", "default")
    dec = bf16_model().language_model
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding in row 1: the static mask must hide those slots
    with use_backend("sdpa"):  # the eager reference without the compiled decode attention (its own compile)
        eager = generate(dec, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=(), compile_step=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the eager step would warn
        compiled = generate(dec, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=(), compile_step=True)
    assert dec._compiled_steps["default"] is not None and torch.equal(compiled, eager)
    assert len(set(eager[0].tolist())) > 2

    # one step's logits: against the same step in fp32 (eager), within 2x the eager bf16 step's own error
    T = 11
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    key_mask = mask.bool()
    with torch.no_grad():
        step = CompiledStepEngine("default")
        step.setup_caches(dec, 2, T, 12, torch.bfloat16, torch.device("cpu"))
        step.prefill(dec, dec.embed_tokens(ids), pos, key_mask)
        tok, rope = eager[:, 0], pos[:, -1:] + 1
        got = step.decode(dec, tok, 0, rope).float()
        plain = EagerEngine()
        plain.setup_caches(dec, 2, T, 12, torch.bfloat16, torch.device("cpu"))
        plain.prefill(dec, dec.embed_tokens(ids), pos, key_mask)
        bf16 = plain.decode(dec, tok, 0, rope).float()
        dec32 = bf16_model(pack=False).float().language_model  # the same (bf16-rounded) weights in fp32
        ref32 = EagerEngine()
        ref32.setup_caches(dec32, 2, T, 12, torch.float32, torch.device("cpu"))
        ref32.prefill(dec32, dec32.embed_tokens(ids), pos, key_mask)
        ref = ref32.decode(dec32, tok, 0, rope)
    rel = lambda a: ((a - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert rel(got) <= 2 * rel(bf16) + 1e-3, (rel(got), rel(bf16))


def test_step_policy(monkeypatch):
    monkeypatch.setenv("LLAVA_NEXT_GEMV", "torch")  # prepacked linears: the graph's products are the eager ones
    dec = bf16_model().language_model
    cpu = torch.device("cpu")
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "auto")
    monkeypatch.setattr(engines, "_failed", set())
    monkeypatch.setattr(engines, "available_memory", lambda device: None)
    step = lambda *a, **k: isinstance(choose_engine(*a, **k), CompiledStepEngine)  # noqa: E731
    assert not step(dec, policy.STEP_MIN_NEW_TOKENS - 1, cpu)
    assert step(dec, policy.STEP_MIN_NEW_TOKENS, cpu)
    qdec = quantize_model(bf16_model(pack=False), QuantConfig("int8")).language_model  # int kernels: eager is faster
    assert not step(qdec, 10 * policy.STEP_MIN_NEW_TOKENS, cpu)
    assert step(qdec, 1, cpu, compile_step=True)
    if cpu_gemv.load() is not None:  # the C decode loops (DecodeLinear): eager is faster than the graph too
        monkeypatch.setenv("LLAVA_NEXT_GEMV", "kernel")
        kdec = bf16_model().language_model
        assert any(isinstance(m, DecodeLinear) for m in kdec.modules())
        assert not step(kdec, 10 * policy.STEP_MIN_NEW_TOKENS, cpu)
        assert step(kdec, 1, cpu, compile_step=True)
        monkeypatch.setenv("LLAVA_NEXT_GEMV", "torch")
    assert not step(dec, 10_000, torch.device("meta"))  # CPU only
    assert not step(dec, 10_000, cpu, compile_step=False)
    assert step(dec, 1, cpu, compile_step=True)
    monkeypatch.setattr(engines, "available_memory", lambda device: 1)  # no room for the frozen weights
    assert not step(dec, 10_000, cpu)
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")
    assert not step(dec, 10_000, cpu)
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "step")
    assert step(dec, 1, cpu)
    assert policy.static_cache_length(1000, 64) == 1280 and policy.static_cache_length(1, 255) == 256
    # a named hook point, a module hook or an attention instrument: the graph would skip it, so eager runs
    remove = dec.layers[0].mlp.hook_post.add_hook(lambda t, hook: None)
    assert not step(dec, 1, cpu, compile_step=True)
    remove()
    handle = dec.layers[1].self_attn.register_forward_hook(lambda *a: None)
    assert not step(dec, 1, cpu, compile_step=True)
    handle.remove()
    dec.instrument = lambda layer, q, k, v, ctx: ctx.kernel(q, k, v, ctx.mask)
    assert not step(dec, 1, cpu, compile_step=True)
    dec.instrument = None
    assert step(dec, 1, cpu, compile_step=True)


def test_failed_step_compile_falls_back_to_the_eager_step_with_one_warning(monkeypatch):
    dec = bf16_model().language_model
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with use_backend("sdpa"):
        want = generate(dec, ids, max_new_tokens=6, eos_token_id=(), compile_step=False)

    def broken(_dec, _mode):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(engines, "compiled_step", broken)
    monkeypatch.setattr(engines, "_failed", set())
    with pytest.warns(RuntimeWarning, match="compiling the whole decode step failed"):
        with use_backend("sdpa"):
            got = generate(dec, ids, max_new_tokens=6, eos_token_id=(), compile_step=True)
    assert torch.equal(got, want) and "step" in engines._failed


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


@pytest.mark.parametrize("gemv", ["torch", "kernel"])
def test_pack_for_cpu_packs_every_linear(gemv, monkeypatch):
    """Every linear is packed, except the bf16 decoder's where the decode loops were chosen (DecodeLinear), on a
    CPU with bf16 arithmetic (one without keeps them all plain: test_cpu_gemv.py, bf16 prompts in fp32)."""
    from llava_next.model.llava import DecodeLinear

    monkeypatch.setenv("LLAVA_NEXT_GEMV", gemv)
    monkeypatch.setitem(policy._choices, "prompt", "bf16")
    model = tiny_model(torch.bfloat16)
    assert model.pack_for_cpu()
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    decoder_kind = DecodeLinear if gemv == "kernel" else PackedLinear
    assert isinstance(model.language_model.lm_head, decoder_kind) and isinstance(model.projector.linear_1, PackedLinear)
    assert all(type(m) is decoder_kind for m in model.language_model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear)))


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


@pytest.mark.parametrize("dtype,gemv", [(torch.float32, "auto"), (torch.bfloat16, "torch"), (torch.bfloat16, "kernel")])
def test_packed_model_decodes_like_the_unpacked_model(dtype, gemv, monkeypatch):
    monkeypatch.setenv("LLAVA_NEXT_GEMV", gemv)  # bf16: oneDNN's packed decode, or the C decode loops
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


def test_the_compile_switch_is_read_in_one_place():
    """``LLAVA_NEXT_COMPILE`` is read by model/policy.py only (one switch, one reader), and no module keeps a
    ``worth_compiling`` of its own (issue 23: two environment variables and two policies before)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "llava_next"
    readers, policies = [], []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("LLAVA_NEXT_COMPILE"):
                readers.append(path.relative_to(root).as_posix())  # a bare string constant: an environment key
            if isinstance(node, ast.FunctionDef) and "worth_compiling" in node.name:
                policies.append(path.relative_to(root).as_posix())
    assert set(readers) == {"model/policy.py"} and not policies, (readers, policies)
