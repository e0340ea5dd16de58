"""The ActivationCache (llava_next/research/cache.py) and TransformerLens-named weights (research/weights.py),
each against a straightforward computation on the same tiny checkpoints (transformers' eager attention for the
patterns): the decompositions sum to the stream, head results to the attention output, direct logit
attributions to the model's logit, folded weights reproduce the hooks, and every layer kind gives its matrix."""

from __future__ import annotations

import copy

import pytest
import torch

from research_models import tiny_pair
from llava_next.model.quant import QuantConfig
from llava_next.model.quant_model import quantize_model
from llava_next.research import run_with_cache
from llava_next.research.cache import act_name, direct_logit_attribution
from llava_next.research.weights import Weights, dense_weight


@pytest.fixture(scope="module", params=["image", "video"])
def run(request):
    ours, hf, ids, mine, theirs = tiny_pair(request.param)
    with torch.no_grad():
        logits, cache = run_with_cache(ours, ids, **mine)
        ref = hf(input_ids=ids, **theirs, output_attentions=True)
    return ours, ids, logits, cache, ref


def close(a, b, tol=1e-5):
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() / scale <= tol, float((a - b).abs().max() / scale)


def test_names():
    assert act_name("resid_post", 1) == "blocks.1.hook_resid_post"
    assert act_name("q", 0) == "blocks.0.attn.hook_q"
    assert act_name("post", 2) == "blocks.2.mlp.hook_post"
    assert act_name("scale", 3, "ln2") == "blocks.3.ln2.hook_scale"
    assert act_name("scale") == "ln_final.hook_scale"
    assert act_name("embed") == "hook_embed"
    with pytest.raises(KeyError, match="needs the norm"):
        act_name("scale", 3)


def test_scale_is_the_rms(run):
    ours, _, _, cache, _ = run
    x = cache["resid_pre", 1]
    eps = ours.language_model.layers[1].input_layernorm.eps
    close(cache["scale", 1, "ln1"], (x.pow(2).mean(-1, keepdim=True) + eps).sqrt())
    close(x / cache["scale", 1, "ln1"], cache["normalized", 1, "ln1"])


def test_decompositions_sum_to_the_stream(run):
    ours, _, _, cache, _ = run
    L = ours.config.text.num_layers
    acc, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels[:3] == ["0_pre", "0_mid", "1_pre"] and labels[-1] == "final_post"
    for layer in range(L + 1):
        parts, names = cache.decompose_resid(layer=layer, return_labels=True)
        assert names[0] == "embed" and len(names) == 1 + 2 * layer
        want = cache["resid_post", L - 1] if layer == L else cache["resid_pre", layer]
        close(parts.sum(0), want)
    mid = cache.decompose_resid(layer=1, mlp_input=True, pos_slice=-1)
    close(mid.sum(0), cache["resid_mid", 1][:, -1])


def test_head_results_sum_to_the_attention_output(run):
    ours, _, _, cache, _ = run
    cfg = ours.config.text
    heads, labels = cache.stack_head_results(return_labels=True)
    assert heads.shape[0] == cfg.num_layers * cfg.num_heads and labels[1] == "L0H1"
    for layer in range(cfg.num_layers):
        per_layer = heads[layer * cfg.num_heads:(layer + 1) * cfg.num_heads]
        close(per_layer.sum(0), cache["attn_out", layer])
    # one head by hand: its slice of z through its columns of o_proj
    o = ours.language_model.layers[1].self_attn.o_proj.weight
    D = cfg.head_dim
    close(cache["result", 1][:, :, 2], cache["z", 1][:, :, 2] @ o[:, 2 * D:3 * D].T)
    rest = cache.stack_head_results(incl_remainder=True, pos_slice=-1)
    close(rest.sum(0), cache["resid_post", cfg.num_layers - 1][:, -1])


def test_direct_logit_attribution_sums_to_the_logit(run):
    _, _, logits, cache, _ = run
    token, other = int(logits[0, -1].argmax()), int(logits[0, -1].argmin())
    attrs, labels = direct_logit_attribution(cache, token)
    assert labels[0] == "embed" and attrs.shape == (len(labels), 1)
    close(attrs.sum(0), logits[:, -1, token])
    heads, head_labels = direct_logit_attribution(cache, token, per_head=True, incorrect_token=other)
    assert "L0H0" in head_labels
    close(heads.sum(0), logits[:, -1, token] - logits[:, -1, other])
    lens = cache.accumulated_resid(apply_ln=True, pos_slice=-1)  # (L+1, B, C), each with its own RMS
    close(lens[-1] @ cache.weights.W_U, logits[:, -1])


def test_patterns_equal_transformers(run):
    _, _, _, cache, ref = run
    for layer, theirs in enumerate(ref.attentions):
        close(cache["pattern", layer], theirs)
        scores = cache["attn_scores", layer]
        assert torch.isinf(scores[0, 0, 0, 1]) and scores[0, 0, 0, 1] < 0
        close(scores.softmax(-1), theirs)


def test_folded_weights_reproduce_the_hooks(run):
    ours, _, _, cache, _ = run
    W, cfg = cache.weights, ours.config.text
    for layer in range(cfg.num_layers):
        x = cache["normalized", layer, "ln1"]  # (B, T, C)
        close(torch.einsum("btc,hcd->bthd", x, W.W_Q[layer]) + W.b_Q[layer], cache["q", layer])
        k = torch.einsum("btc,hcd->bthd", x, W._W_K[layer]) + W["blocks.%d.attn.b_K" % layer][::cfg.num_heads // cfg.num_kv_heads]
        close(k, cache["k", layer])
        y = cache["normalized", layer, "ln2"]
        post = torch.nn.functional.silu(y @ W.W_gate[layer]) * (y @ W.W_in[layer])
        close(post, cache["post", layer])
        close(post @ W.W_out[layer], cache["mlp_out", layer])
    assert W.W_Q[:].shape == (cfg.num_layers, cfg.num_heads, cfg.hidden_size, cfg.head_dim)
    assert W.W_K[0].shape == W.W_Q[0].shape and W._W_K[0].shape[0] == cfg.num_kv_heads
    with pytest.raises(KeyError, match="not a TransformerLens weight name"):
        W["blocks.0.attn.W_X"]


@pytest.mark.parametrize("kind", ["packed", "int8", "int4", "nf4"])
def test_every_layer_kind_gives_the_matrix_it_applies(kind):
    ours = copy.deepcopy(tiny_pair("image")[0])
    proj = ours.language_model.layers[0].self_attn.q_proj
    plain = proj.weight.detach().clone()
    if kind == "packed":
        assert ours.pack_for_cpu()
        want = plain
    else:
        quantize_model(ours, QuantConfig(method=kind, group_size=32))
        want = ours.language_model.layers[0].self_attn.q_proj.dequantized(torch.float32)
    layer = ours.language_model.layers[0].self_attn.q_proj
    assert type(layer).__name__ != "Linear"
    got = dense_weight(layer, plain.shape[1], ours.language_model.embed_tokens.weight)
    close(got, want, 1e-6)
    x = torch.randn(3, plain.shape[1])
    with torch.no_grad():
        close(x @ got.T, layer(x), 1e-5)
    cfg = ours.config.text
    W = Weights(ours, fold_ln=False)
    close(W.W_Q[0], got.view(cfg.num_heads, cfg.head_dim, -1).permute(0, 2, 1), 1e-6)
