"""Decoder parity with transformers' LlamaForCausalLM / MistralForCausalLM, the KV cache, left padding,
and the real checkpoint shapes on the meta device.

Reference models are tiny, random, fp32, eager attention, loaded into ours through the real key table
(``rename_state_dict("llama_hf", ...)`` + ``load_state_dict(strict=True)``). Their weights are redrawn
so that attention is peaked (HF's std-0.02 init makes it nearly uniform, which hides RoPE and GQA
mistakes) and the norm weights are not all ones. Prompts run past max_position_embeddings (even
times the RoPE factor). Tolerance: max |diff| <= 1e-4 * max |reference|.
"""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from llava_next.config import LlavaNextConfig, PRESETS, TextConfig
from llava_next.model.decoder import Decoder, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from llava_next.model.keymaps import rename_state_dict

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=16, rms_norm_eps=1e-5)
ROPE = {"none": 1.0, "linear2": 2.0, "linear4": 4.0}
THETA = {"llama": 1e4, "mistral": 1e6}


def hf_and_ours(kind: str = "llama", factor: float = 1.0, seed: int = 0, **tiny):
    """(transformers model, our Decoder) with identical random weights."""
    t = dict(TINY, **tiny)
    theta = THETA[kind]
    rope = {"rope_type": "default", "rope_theta": theta}
    if factor != 1.0:
        rope = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    common = dict(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                  num_hidden_layers=t["num_layers"], num_attention_heads=t["num_heads"],
                  num_key_value_heads=t["num_kv_heads"], max_position_embeddings=t["max_position_embeddings"],
                  rms_norm_eps=t["rms_norm_eps"], rope_parameters=rope, pad_token_id=0, tie_word_embeddings=False,
                  attn_implementation="eager")
    if kind == "llama":
        hf = LlamaForCausalLM(LlamaConfig(**common))
    else:
        hf = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    _redraw(hf, seed)
    ours = Decoder(TextConfig(**t, rope_theta=theta, rope_scaling_factor=factor, pad_token_id=0))
    ours.load_state_dict(rename_state_dict("llama_hf", hf.state_dict()), strict=True)
    return hf.eval(), ours.eval()


def _redraw(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:  # small activations: the RMSNorm eps matters
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:  # q/k bigger so attention is peaked, others ~ unit gain
                gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(gain / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=g))


def assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * max |ref| {scale:.3g}"


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- logits parity -------------------------------------------------------------------------------
@pytest.mark.parametrize("rope", list(ROPE))
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_logits_match_transformers(kind, rope):
    hf, ours = hf_and_ours(kind, ROPE[rope])
    x = ids(2, 80)  # 80 > max_position_embeddings 16, and > 16 * 4
    with torch.no_grad():
        ref = hf(x).logits
        assert_close(ours(x), ref)
        assert_close(ours(x, last_only=True), ref[:, -1:])
        assert_close(ours(input_embeds=ours.embed_tokens(x)), ref)


def test_explicit_position_ids_match_transformers():
    # RoPE only sees position differences, so a gap (not a constant shift) is what tests them
    hf, ours = hf_and_ours("llama", 2.0)
    x = ids(2, 12)
    pos = torch.cat([torch.arange(6), torch.arange(40, 46)]).expand(2, 12)
    with torch.no_grad():
        assert_close(ours(x, position_ids=pos), hf(x, position_ids=pos).logits)


def test_multi_query_attention_matches():
    hf, ours = hf_and_ours("mistral", 2.0, num_heads=4, num_kv_heads=1)
    x = ids(1, 24)
    with torch.no_grad():
        assert_close(ours(x), hf(x).logits)


def test_rope_factor_overridable_at_run_time():
    hf, _ = hf_and_ours("llama", 2.0)
    base = Decoder(TextConfig(**TINY, rope_theta=1e4))  # factor 1 in its config
    base.load_state_dict(rename_state_dict("llama_hf", hf.state_dict()), strict=True)
    x = ids(1, 40)
    with torch.no_grad():
        ref = hf(x).logits
        assert (base(x) - ref).abs().max() > 1e-2  # the factor matters at these positions
        base.rope_scaling_factor = 2.0
        assert_close(base(x), ref)
        text = LlavaNextConfig(text=base.config).with_rope_scaling(2.0).text
        rebuilt = Decoder(text)
        rebuilt.load_state_dict(base.state_dict(), strict=True)
        assert_close(rebuilt(x), ref)


def test_bf16_rmsnorm_and_rope_are_bitwise_transformers():
    """The dtype choices (norm in fp32 then cast, weight multiplied after; fp32 angles, cos/sin cast)
    show only in low precision: compare the pieces bit for bit in bf16."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, 64, generator=g) * 3).bfloat16()
    ours, ref = RMSNorm(64, 1e-5), LlamaRMSNorm(64, 1e-5)
    with torch.no_grad():
        ours.weight.copy_(1 + torch.randn(64, generator=g))
        ref.weight.copy_(ours.weight)
    ours, ref = ours.bfloat16(), ref.bfloat16()
    assert torch.equal(ours(x), ref(x))
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=16,
                      rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 5e6})
    pos = torch.tensor([[0, 1, 2, 900, 4000, 20000, 123457]])
    q, k = (torch.randn(1, 4, 7, 16, generator=g).bfloat16() for _ in range(2))
    cos_ref, sin_ref = LlamaRotaryEmbedding(cfg)(q, pos)
    cos, sin = rope_cos_sin(pos, rope_inv_freq(16, 5e6, 2.5), torch.bfloat16)
    assert torch.equal(cos[:, 0], cos_ref) and torch.equal(sin[:, 0], sin_ref)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    assert torch.equal(apply_rope(q, cos, sin), q_ref) and torch.equal(apply_rope(k, cos, sin), k_ref)


# ---- KV cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_cached_decode_equals_full_sequence(kind):
    _, ours = hf_and_ours(kind, 2.0)
    x = ids(2, 40)
    with torch.no_grad():
        full = ours(x)  # (B, 40, V), no cache
        ours.setup_caches(batch=2, max_len=64)
        assert_close(ours(x[:, :12], input_pos=torch.arange(12)), full[:, :12])  # prefill
        assert_close(ours(x[:, 12:20], input_pos=torch.arange(12, 20)), full[:, 12:20])  # chunked prefill
        for t in range(20, 40):  # one token at a time
            assert_close(ours(x[:, t:t + 1], input_pos=torch.tensor([t])), full[:, t:t + 1])


def test_cache_is_reused_and_kept_out_of_state_dict():
    _, ours = hf_and_ours()
    ours.setup_caches(2, 32)
    cache = ours.layers[0].self_attn.kv_cache
    assert cache.k.shape == (2, TINY["num_kv_heads"], 32, TINY["hidden_size"] // TINY["num_heads"])
    ours.setup_caches(2, 20)  # fits: kept
    assert ours.layers[0].self_attn.kv_cache is cache and ours.cache_shape == (2, 32)
    ours.setup_caches(3, 20)  # other batch: reallocated
    assert ours.cache_shape == (3, 20)
    assert not any("kv_cache" in k for k in ours.state_dict())
    ours.clear_caches()
    assert ours.cache_shape is None


# ---- left padding --------------------------------------------------------------------------------
def test_left_padded_batch_equals_per_row():
    hf, ours = hf_and_ours("mistral", 2.0)
    lengths = [30, 21, 9]
    T = max(lengths)
    rows = [ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    batch = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        batch[i, T - r.shape[1]:], mask[i, T - r.shape[1]:] = r[0], True
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = ours(batch, position_ids=pos, key_mask=mask)
        ref = hf(batch, attention_mask=mask.long(), position_ids=pos).logits
        # cached: prefill the padded batch, then 6 steps with each row continuing its own positions
        ours.setup_caches(len(rows), T + 6)
        cached = [ours(batch, input_pos=torch.arange(T), position_ids=pos, key_mask=mask)]
        steps = ids(len(rows), 6, seed=99)
        key_mask = torch.cat([mask, torch.ones(len(rows), 6, dtype=torch.bool)], dim=1)
        for s in range(6):
            cached.append(ours(steps[:, s:s + 1], input_pos=torch.tensor([T + s]), position_ids=pos[:, -1:] + 1 + s,
                               key_mask=key_mask[:, :T + s + 1]))
        cached = torch.cat(cached, dim=1)
        ours.clear_caches()
        for i, (r, n) in enumerate(zip(rows, lengths)):
            single = ours(torch.cat([r, steps[i:i + 1]], dim=1))  # (1, n + 6, V)
            assert_close(out[i:i + 1, T - n:], single[:, :n])
            assert_close(ref[i:i + 1, T - n:], single[:, :n])
            assert_close(cached[i:i + 1, T - n:], single)
        assert torch.isfinite(cached).all()  # padded query rows see no key; they must not poison the rest


# ---- errors --------------------------------------------------------------------------------------
def test_sliding_window_longer_sequence_is_refused():
    _, ours = hf_and_ours("mistral")
    windowed = Decoder(TextConfig(**TINY, rope_theta=1e6, sliding_window=8))
    windowed.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(windowed(ids(1, 8)), ours(ids(1, 8)))  # within the window: plain causal attention
        with pytest.raises(NotImplementedError, match="sliding_window=8"):
            windowed(ids(1, 9))


def test_bad_inputs_raise_clear_errors():
    _, ours = hf_and_ours()
    x = ids(2, 5)
    with pytest.raises(ValueError, match="exactly one"):
        ours(x, input_embeds=torch.zeros(2, 5, 64))
    with pytest.raises(ValueError, match="input_embeds must have shape"):
        ours(input_embeds=torch.zeros(2, 5, 63))
    with pytest.raises(RuntimeError, match="setup_caches"):
        ours(x, input_pos=torch.arange(5))
    ours.setup_caches(2, 8)
    with pytest.raises(ValueError, match="max_len >= 10"):
        ours(x, input_pos=torch.arange(5, 10))
    with pytest.raises(ValueError, match="set up for 2"):
        ours(ids(3, 5), input_pos=torch.arange(5))
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        ours(x, key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        ours(x, position_ids=torch.arange(4)[None])


# ---- real checkpoint shapes on the meta device ---------------------------------------------------
# (vocab, hidden, intermediate, layers, kv dim = kv_heads * head_dim), from the llava-hf config.json files
REAL = {
    "llava-v1.6-vicuna-7b": (32064, 4096, 11008, 32, 4096),
    "llava-v1.6-vicuna-13b": (32064, 5120, 13824, 40, 5120),
    "llava-v1.6-mistral-7b": (32064, 4096, 14336, 32, 1024),
    "llava-v1.6-34b": (64064, 7168, 20480, 60, 1024),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_shapes_convert_on_meta_device(name):
    V, C, I, L, KV = REAL[name]
    expected = {"embed_tokens.weight": (V, C), "norm.weight": (C,), "lm_head.weight": (V, C)}
    for i in range(L):
        expected.update({
            f"layers.{i}.input_layernorm.weight": (C,), f"layers.{i}.post_attention_layernorm.weight": (C,),
            f"layers.{i}.self_attn.q_proj.weight": (C, C), f"layers.{i}.self_attn.k_proj.weight": (KV, C),
            f"layers.{i}.self_attn.v_proj.weight": (KV, C), f"layers.{i}.self_attn.o_proj.weight": (C, C),
            f"layers.{i}.mlp.gate_proj.weight": (I, C), f"layers.{i}.mlp.up_proj.weight": (I, C),
            f"layers.{i}.mlp.down_proj.weight": (C, I)})
    tc = PRESETS[name].config.text
    hf_cls, hf_cfg_cls = ((MistralForCausalLM, MistralConfig) if "mistral" in name else (LlamaForCausalLM, LlamaConfig))
    hf_cfg = hf_cfg_cls(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
                        num_hidden_layers=tc.num_layers, num_attention_heads=tc.num_heads,
                        num_key_value_heads=tc.num_kv_heads, tie_word_embeddings=False)
    with torch.device("meta"):
        hf_sd = hf_cls(hf_cfg).state_dict()
        ours = Decoder(tc)
    converted = {k: tuple(v.shape) for k, v in rename_state_dict("llama_hf", hf_sd).items()}
    built = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert converted == expected
    assert built == expected
    assert all(v.is_meta for v in ours.state_dict().values())
    ours.load_state_dict(rename_state_dict("llama_hf", hf_sd), strict=True, assign=True)
