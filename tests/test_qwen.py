"""The decoder as Qwen1.5 / Qwen2 (LLaVA-NeXT-Interleave, LLaVA-OneVision): parity with transformers' Qwen2ForCausalLM.

What Qwen adds to the Llama block (docs/references.md): q/k/v biases (``TextConfig.qkv_bias``),
tied input/output embeddings for the 0.5B models (``tie_word_embeddings``), RoPE theta 1e6, GQA for
Qwen2. Reference models are tiny, random, fp32, eager attention, loaded into ours through the real key
table; biases are redrawn large (a missing bias changes every logit), attention is peaked. Tolerance:
max |diff| <= 1e-4 * max |reference|; greedy decoding (our KV-cache generate vs ``hf.generate``) token-identical.
"""

from __future__ import annotations

import math

import pytest
import torch

from llava_next.config import TextConfig
from llava_next.model.decoder import Decoder, TiedLMHead
from llava_next.model.generate import generate
from llava_next.model.keymaps import rename_state_dict
from llava_next_weights.shapes import expected_shapes

transformers = pytest.importorskip("transformers")
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

TINY = dict(vocab_size=150, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, max_position_embeddings=64,
            rms_norm_eps=1e-6, rope_theta=1e6)


def hf_config(num_kv_heads: int, tie: bool, **over) -> Qwen2Config:
    t = dict(TINY, **over)
    return Qwen2Config(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                       num_hidden_layers=t["num_layers"], num_attention_heads=t["num_heads"],
                       num_key_value_heads=num_kv_heads, max_position_embeddings=t["max_position_embeddings"],
                       rms_norm_eps=t["rms_norm_eps"], rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"]},
                       tie_word_embeddings=tie, use_sliding_window=False, attn_implementation="eager")


def redraw_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):  # q/k/v biases: as large as the projections' outputs
                p.copy_(torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(gain / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=g))


def qwen_state_dict(hf: Qwen2ForCausalLM, tie: bool) -> dict:
    """What a Qwen checkpoint holds: a tied model stores the embedding once (no lm_head.weight)."""
    sd = dict(hf.state_dict())
    if tie:
        assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
        del sd["lm_head.weight"]
    return sd


def hf_and_ours(num_kv_heads: int = 2, tie: bool = True, seed: int = 0):
    hf = Qwen2ForCausalLM(hf_config(num_kv_heads, tie))
    redraw_(hf, seed)
    cfg = TextConfig(**TINY, num_kv_heads=num_kv_heads, qkv_bias=True, tie_word_embeddings=tie, bos_token_id=None,
                     eos_token_id=None, pad_token_id=None)
    with torch.device("meta"):
        ours = Decoder(cfg)
    ours.load_state_dict(rename_state_dict("llama_hf", qwen_state_dict(hf, tie)), strict=True, assign=True)
    return hf.eval(), ours.eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * max |ref| {scale:.3g}"


@pytest.mark.parametrize("num_kv_heads, tie", [(2, True), (4, False), (1, False)])  # Qwen2-0.5B, Qwen1.5-7B, MQA
def test_logits_match_qwen2(num_kv_heads, tie):
    hf, ours = hf_and_ours(num_kv_heads, tie)
    x = ids(2, 40)
    with torch.no_grad():
        assert_close(ours(x), hf(x).logits)


def test_tied_head_is_the_embedding_after_loading():
    _, ours = hf_and_ours(2, tie=True)
    assert isinstance(ours.lm_head, TiedLMHead)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert "lm_head.weight" not in ours.state_dict()


def test_greedy_generation_is_token_identical(monkeypatch):
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")  # SDPA decode: no ~17 s compile for a tiny model (model/engines.py, policy.py)
    hf, ours = hf_and_ours(2, tie=True, seed=3)
    x = ids(1, 12, seed=4)
    with torch.no_grad():
        got = generate(ours, x, max_new_tokens=24, eos_token_id=())
        ref = hf.generate(x, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    assert got[0].tolist() == ref[0, 12:].tolist()


def test_a_decoder_without_qkv_bias_refuses_qwen_weights():
    hf = Qwen2ForCausalLM(hf_config(2, False))
    with torch.device("meta"):
        plain = Decoder(TextConfig(**TINY, num_kv_heads=2))
    with pytest.raises(RuntimeError, match="self_attn.q_proj.bias"):
        plain.load_state_dict(rename_state_dict("llama_hf", hf.state_dict()), strict=True, assign=True)


@pytest.mark.parametrize("name, sizes", [
    # Qwen1.5-0.5B-Chat (llava-interleave-qwen-0.5b-hf) and Qwen2-7B-Instruct (OneVision-7B / LLaVA-Video-7B)
    ("qwen1.5-0.5b", dict(vocab_size=152000, hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16,
                          num_kv_heads=16, tie=True)),
    ("qwen2-7b", dict(vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                      num_kv_heads=4, tie=False)),
])
def test_real_shapes_on_the_meta_device(name, sizes):
    tie = sizes.pop("tie")
    kv = sizes.pop("num_kv_heads")
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(hf_config(kv, tie, **sizes))
        ours = Decoder(TextConfig(**dict(TINY, **sizes), num_kv_heads=kv, qkv_bias=True, tie_word_embeddings=tie))
    renamed = rename_state_dict("llama_hf", qwen_state_dict(hf, tie))
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    from llava_next.config import LlavaNextConfig

    full = {k.removeprefix("language_model."): v for k, v in
            expected_shapes(LlavaNextConfig(text=ours.config)).items() if k.startswith("language_model.")}
    assert full == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


# ---- presets (docs/references.md) ----------------------------------------------------
# (layers, hidden, heads, kv heads, mlp, vocab, tied, image token, video token, image aspect, anyres_max)
QWEN_SPEC = {
    "llava-interleave-qwen-0.5b": (24, 1024, 16, 16, 2816, 152000, True, 151646, None, "resize", None),
    "llava-interleave-qwen-7b": (32, 4096, 32, 32, 11008, 152000, False, 151646, None, "resize", None),
    "llava-interleave-qwen-7b-dpo": (32, 4096, 32, 32, 11008, 152000, False, 151646, None, "resize", None),
    "llava-onevision-qwen2-0.5b-ov": (24, 896, 14, 2, 4864, 152000, True, 151646, 151647, "anyres", 9),
    "llava-onevision-qwen2-7b-ov": (28, 3584, 28, 4, 18944, 152128, False, 151646, 151647, "anyres", 9),
    "LLaVA-Video-7B-Qwen2": (28, 3584, 28, 4, 18944, 152128, False, 151646, 151647, "anyres", 9),
}


@pytest.mark.parametrize("name", list(QWEN_SPEC))
def test_qwen_presets_match_the_spec(name):
    from llava_next.config import PRESETS

    p = PRESETS[name]
    c, t, v = p.config, p.config.text, p.config.vision
    got = (t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.intermediate_size, t.vocab_size,
           t.tie_word_embeddings, c.image_token_id, c.video_token_id, c.image_aspect_ratio, c.anyres_max_patches)
    assert got == QWEN_SPEC[name]
    assert (t.qkv_bias, t.rope_theta, t.max_position_embeddings, t.rms_norm_eps, t.bos_token_id, t.eos_token_id) == \
        (True, 1e6, 32768, 1e-6, None, 151645)
    assert (v.kind, v.hidden_size, v.intermediate_size, v.num_layers, v.layers_used, v.num_patches, v.layer_norm_eps) == \
        ("siglip", 1152, 4304, 26, 26, 729, 1e-6)
    assert c.video_as_images == (c.video_token_id is None)
    assert p.source == f"https://huggingface.co/{p.hub_id}/blob/main/config.json"
