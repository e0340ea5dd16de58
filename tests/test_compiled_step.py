"""The whole-step compiled decode (llava_next/model/compiled_step.py): greedy tokens identical to the eager
path and logits within the bf16 rule, on a left-padded batch through a prepacked bf16 model (one small
compile, inductor's default mode: seconds, not max-autotune's minutes); the policy; the fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from checkpoints import tiny_config
from llava_next.model import compiled_step
from llava_next.model.attention import use_backend
from llava_next.model.generate import generate, prefill
from llava_next.model.llava import LlavaNextModel
from llava_next.model.quant import QuantConfig, quantize_model


def bf16_model(pack: bool = True) -> LlavaNextModel:
    torch.manual_seed(0)
    model = LlavaNextModel(tiny_config()).eval().to(torch.bfloat16)
    if pack:
        model.pack_for_cpu()
    return model


@pytest.mark.skipif(compiled_step.setting() == "0", reason="LLAVA_NEXT_COMPILE_STEP=0")
def test_compiled_step_matches_eager(monkeypatch):
    monkeypatch.setattr(compiled_step, "MODE", "default")
    dec = bf16_model().language_model
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding in row 1: the static mask must hide those slots
    with use_backend("sdpa"):  # the eager reference without the compiled decode attention (its own compile)
        eager = generate(dec, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=(), compile_step=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the eager step would warn
        compiled = generate(dec, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=(), compile_step=True)
    assert dec._compiled_step is not None and torch.equal(compiled, eager)
    assert len(set(eager[0].tolist())) > 2

    # one step's logits: against the same step in fp32 (eager), within 2x the eager bf16 step's own error
    T = 11
    S = dec.cache_shape[1]
    key_mask = torch.ones(2, S, dtype=torch.bool)
    key_mask[1, :4] = False
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        prefill(dec, dec.embed_tokens(ids), pos, key_mask[:, :T])
        tok, slot, rope = eager[:, 0], torch.tensor([T]), pos[:, -1:] + 1
        got = compiled_step.run_step(dec, tok, slot, rope, key_mask).float()
        bf16 = dec(tok[:, None], input_pos=slot, position_ids=rope, key_mask=key_mask[:, :T + 1])[:, -1].float()
        dec32 = bf16_model(pack=False).float().language_model  # the same (bf16-rounded) weights in fp32
        dec32.setup_caches(2, S)
        prefill(dec32, dec32.embed_tokens(ids), pos, key_mask[:, :T])
        ref = dec32(tok[:, None], input_pos=slot, position_ids=rope, key_mask=key_mask[:, :T + 1])[:, -1]
    rel = lambda a: ((a - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert rel(got) <= 2 * rel(bf16) + 1e-3, (rel(got), rel(bf16))


def test_policy(monkeypatch):
    dec = bf16_model().language_model
    cpu = torch.device("cpu")
    monkeypatch.delenv("LLAVA_NEXT_COMPILE_STEP", raising=False)
    assert not compiled_step.worth_compiling(dec, compiled_step.MIN_NEW_TOKENS - 1, cpu)
    assert compiled_step.worth_compiling(dec, compiled_step.MIN_NEW_TOKENS, cpu)
    qdec = quantize_model(bf16_model(pack=False), QuantConfig("int8")).language_model  # int kernels: eager is faster
    assert not compiled_step.worth_compiling(qdec, 10 * compiled_step.MIN_NEW_TOKENS, cpu)
    assert compiled_step.worth_compiling(qdec, 1, cpu, compile_step=True)
    assert not compiled_step.worth_compiling(dec, 10_000, torch.device("meta"))  # CPU only
    assert not compiled_step.worth_compiling(dec, 10_000, cpu, compile_step=False)
    assert compiled_step.worth_compiling(dec, 1, cpu, compile_step=True)
    monkeypatch.setenv("LLAVA_NEXT_COMPILE_STEP", "0")
    assert not compiled_step.worth_compiling(dec, 10_000, cpu)
    monkeypatch.setenv("LLAVA_NEXT_COMPILE_STEP", "1")
    assert compiled_step.worth_compiling(dec, 1, cpu)
    assert compiled_step.cache_length(1000, 64) == 1280 and compiled_step.cache_length(1, 255) == 256
    # a named hook point or a module hook inside the decoder: the graph would skip it, so the eager step runs
    remove = dec.layers[0].mlp.hook_post.add_hook(lambda t, hook: None)
    assert not compiled_step.worth_compiling(dec, 1, cpu, compile_step=True)
    remove()
    handle = dec.layers[1].self_attn.register_forward_hook(lambda *a: None)
    assert not compiled_step.worth_compiling(dec, 1, cpu, compile_step=True)
    handle.remove()
    assert compiled_step.worth_compiling(dec, 1, cpu, compile_step=True)


def test_failed_compile_falls_back_to_the_eager_step_with_one_warning(monkeypatch):
    dec = bf16_model().language_model
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with use_backend("sdpa"):
        want = generate(dec, ids, max_new_tokens=6, eos_token_id=(), compile_step=False)

    def broken(_dec):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled_step, "compiled_step", broken)
    monkeypatch.setattr(compiled_step, "_failed", False)
    with pytest.warns(RuntimeWarning, match="compiling the whole decode step failed"):
        with use_backend("sdpa"):
            got = generate(dec, ids, max_new_tokens=6, eos_token_id=(), compile_step=True)
    assert torch.equal(got, want) and compiled_step._failed


def test_decode_attention_compile_pays_for_itself_by_default(monkeypatch):
    """cpu_decode's compile (~5 s warm) is used by default only when the KV reads it speeds up pay for it."""
    from llava_next.model import cpu_decode

    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "auto")
    monkeypatch.setattr(cpu_decode, "_compiled_once", False)  # not compiled yet in this process
    monkeypatch.setattr(cpu_decode, "_compiled", lambda: cpu_decode._attention_one_query)  # no real compile here
    kv_7b = 2 * 32 * 32 * 1200 * 128 * 2  # KV bytes read per token: 7B, bf16, 1,200 tokens (~0.63 GB)
    assert not cpu_decode.worth_compiling(kv_7b, 30) and cpu_decode.worth_compiling(kv_7b, 64)
    assert not cpu_decode.worth_compiling(kv_7b / 16, 256)  # the 2-layer benchmark model: a short answer
    q, kv = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    with cpu_decode.for_request(True):
        cpu_decode.attention_one_query(q, kv, kv)  # the compiled kernel ran once in this process: from then on always
    assert cpu_decode.worth_compiling(kv_7b / 16, 1)
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")
    assert not cpu_decode.worth_compiling(kv_7b, 10_000)
    with cpu_decode.for_request(False):
        monkeypatch.setenv("LLAVA_NEXT_COMPILE", "1")
        assert cpu_decode.worth_compiling(kv_7b, 1) and not cpu_decode.enabled()
    assert cpu_decode.enabled() or cpu_decode._failed
