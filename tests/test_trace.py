"""trace(): named hook points, records reduced on the fly, per-step records in generation, the fast paths kept.

References are computed independently: the model's own logits (the last residual through norm + lm_head),
weights edited by hand (a zeroed head = zeroed o_proj columns), full records reduced afterwards.
"""

from __future__ import annotations

import pytest
import torch

from research_models import tiny_pair
from llava_next.model import attention as attention_mod
from llava_next.model import engines
from llava_next.model.generate import generate
from llava_next.model.hooks import hook_points
from llava_next.research import Attention, Record, ResearchError, hooks, run_with_cache, run_with_hooks, trace

TL_BLOCK_NAMES = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                  "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z",
                  "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "ln1.hook_normalized", "ln2.hook_normalized",
                  "ln1.hook_scale", "ln2.hook_scale"]
MM_NAMES = ["vision.hook_embed", "vision.blocks.0.hook_resid_post", "mm.hook_features", "mm.hook_pooled",
            "mm.hook_projected", "mm.hook_newline", "mm.hook_merged"]


@pytest.fixture(scope="module")
def video():
    ours, _, ids, mine, _ = tiny_pair("video")
    return ours, ids, mine


def test_transformer_lens_names(video):
    ours, _, _ = video
    names = hook_points(ours)
    for i in range(ours.config.text.num_layers):
        for n in TL_BLOCK_NAMES:
            assert f"blocks.{i}.{n}" in names
    for n in ["hook_embed", "ln_final.hook_normalized", "ln_final.hook_scale", "hook_logits", *MM_NAMES]:
        assert n in names
    assert names["blocks.1.attn.hook_z"].layer() == 1


def test_records_and_shapes(video):
    ours, ids, mine = video
    T = ids.shape[1]
    cfg = ours.config.text
    with torch.no_grad():
        plain = ours(ids, **mine)
        with trace(ours, record=["blocks.*.hook_resid_post", "ln_final.hook_normalized", "hook_logits",
                                 "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_z", *MM_NAMES,
                                 "blocks.0.mlp.hook_post",
                                 Record("blocks.1.hook_resid_post", positions=[2, 7, T - 1], reduce="mean", key="mean"),
                                 Record("blocks.0.mlp.hook_post", positions=torch.arange(T), reduce="topk", k=3,
                                        key="top")]) as tr:
            traced = ours(ids, **mine)
    assert torch.equal(traced, plain)  # recording changes nothing
    assert torch.equal(tr["hook_logits"], plain)
    last = tr[f"blocks.{cfg.num_layers - 1}.hook_resid_post"]
    final = ours.language_model.norm
    assert torch.allclose(final.weight * tr["ln_final.hook_normalized"], final(last))
    assert torch.allclose(ours.language_model.lm_head(final(last)), plain, atol=1e-5)
    assert tr["blocks.0.attn.hook_q"].shape == (1, T, cfg.num_heads, cfg.head_dim)
    assert tr["blocks.0.attn.hook_k"].shape == (1, T, cfg.num_kv_heads, cfg.head_dim)
    assert tr["blocks.0.attn.hook_z"].shape == (1, T, cfg.num_heads, cfg.head_dim)
    # reductions equal the full record reduced afterwards
    full = tr["blocks.1.hook_resid_post"]
    assert torch.allclose(tr["mean"], full[:, [2, 7, T - 1]].mean(1), atol=1e-6)
    post = tr["blocks.0.mlp.hook_post"]
    top = post.topk(3, dim=1)
    assert tr["top"].shape == (1, 3, cfg.intermediate_size)
    assert torch.equal(tr["top"], top.values) and torch.equal(tr["top:positions"], top.indices)
    with pytest.raises(ValueError, match="two Records store under 'hook_embed'"):
        with trace(ours, record=["hook_embed", Record("hook_embed", reduce="mean")]):
            pass
    # multimodal stages: 4 frames of 4x4 patches pooled to 2x2, projected; merged = decoder input
    F = mine["videos"][0].shape[0]
    assert tr["mm.hook_features"].shape[:2] == (F, 16)
    assert tr["mm.hook_pooled"].shape[:2] == (F, 4)
    assert tr["mm.hook_projected"].shape == (F, 4, cfg.hidden_size)
    assert tr["vision.hook_embed"].shape[:2] == (F, 17)
    visual = ids[0] == ours.config.video_token_id
    assert torch.equal(tr["mm.hook_merged"][0, visual], tr["mm.hook_projected"].reshape(-1, cfg.hidden_size))


def test_transformer_lens_hook_code_runs_unchanged(video):
    """A TransformerLens-style hook (z: [batch, pos, head_index, d_head]) zeroing head 2 equals zeroing the
    head's o_proj input columns by hand."""
    ours, ids, mine = video
    head, D = 2, ours.config.text.head_dim

    def zero_head(z, hook):
        z[:, :, head, :] = 0.0
        return z

    with torch.no_grad():
        got = run_with_hooks(ours, ids, **mine, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])
        o_proj = ours.language_model.layers[1].self_attn.o_proj
        saved = o_proj.weight.clone()
        try:
            o_proj.weight[:, head * D:(head + 1) * D] = 0
            want = ours(ids, **mine)
        finally:
            o_proj.weight.copy_(saved)
        plain = ours(ids, **mine)
        out, cache = run_with_cache(ours, ids, **mine, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    assert torch.equal(out, plain)
    with torch.no_grad():  # a returned tensor (not an in-place edit) replaces the hooked one
        replaced = run_with_hooks(ours, ids, **mine, fwd_hooks=[("blocks.0.hook_resid_pre",
                                                                 lambda x, hook: torch.full_like(x, 0.5))])
        direct = ours.language_model(input_embeds=torch.full((1, ids.shape[1], ours.config.text.hidden_size), 0.5))
    assert torch.equal(replaced, direct)
    assert sorted(cache) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                             "vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post"]
    with hooks(ours, fwd_hooks=[(lambda n: n == "hook_embed", lambda x, hook: x * 0)]):
        assert hook_points(ours)["hook_embed"].active
    assert not any(p.active for p in hook_points(ours).values())


def test_generation_records_every_step_and_keeps_fast_paths(video, monkeypatch):
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "1")  # the compiled decode attention, even under LLAVA_NEXT_COMPILE=0
    ours, ids, mine = video
    calls = {"sdpa": 0, "decode": 0}
    sdpa, one_query = attention_mod.sdpa_attention, attention_mod.one_query_attention

    def count_sdpa(*a, **k):
        calls["sdpa"] += 1
        return sdpa(*a, **k)

    def count_decode(*a, **k):
        calls["decode"] += 1
        return one_query(*a, **k)

    def no_eager(*a, **k):
        raise AssertionError("tracing switched to eager attention")

    # the routing is what is tested here, not the compiled kernel (test_engines.py; compiling costs seconds)
    monkeypatch.setattr(engines, "_compiled_one_query", lambda: count_decode)
    monkeypatch.setattr(attention_mod, "sdpa_attention", count_sdpa)
    monkeypatch.setattr(attention_mod, "eager_attention", no_eager)
    T = ids.shape[1]
    L = ours.config.text.num_layers
    with torch.no_grad():
        embeds = ours.embed(ids, (), [ours.video_features(v) for v in mine["videos"]])
        plain = generate(ours.language_model, input_embeds=embeds, max_new_tokens=4, eos_token_id=())
        calls.update(sdpa=0, decode=0)
        with trace(ours, record=[Record("blocks.1.hook_resid_post", reduce="mean"),
                                 Record("hook_embed", positions=[T + 1])],
                   attention=Attention(queries="last", rows=True, key_mass=True)) as tr:
            new = generate(ours.language_model, input_embeds=embeds, max_new_tokens=4, eos_token_id=())
    assert torch.equal(new, plain)
    assert calls["sdpa"] == L and calls["decode"] == 3 * L
    assert len(tr.steps) == 4 and [s.offset for s in tr.steps] == [0, T, T + 1, T + 2]
    assert all(s.records["blocks.1.hook_resid_post"].shape == (1, ours.config.text.hidden_size) for s in tr.steps)
    assert [("hook_embed" in s.records) for s in tr.steps] == [False, False, True, False]  # position T+1 only
    assert [s.attention[0].rows.shape[-1] for s in tr.steps] == [T, T + 1, T + 2, T + 3]
    assert ours.language_model.instrument is None


def test_hooks_removed_after_an_exception(video):
    ours, ids, mine = video
    with pytest.raises(RuntimeError, match="boom"):
        with trace(ours, record=["blocks.*.hook_resid_post"], attention=Attention(layers=[0])):
            raise RuntimeError("boom")
    assert not any(p.active for p in hook_points(ours).values())
    assert ours.language_model.instrument is None


def test_clear_errors(video):
    ours, ids, mine = video

    class Frame:
        def resolve(self, provenance):
            return torch.tensor([1, 2])

    with pytest.raises(ResearchError, match="no hook point matches 'blocks.0.hook_patern'"):
        with trace(ours, record=["blocks.0.hook_patern"]):
            pass
    with pytest.raises(ResearchError, match="virtual and read-only"):
        with trace(ours, hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: p * 0)]):
            ours(ids, **mine)
    with pytest.raises(ValueError, match="selector and needs the request's token provenance"):
        with trace(ours, record=[Record("hook_embed", positions=Frame())]):
            pass
    with pytest.raises(ResearchError, match="out of range"):
        with trace(ours, attention=Attention(layers=[7])):
            pass
    with pytest.raises(ValueError, match="reduce must be"):
        Record("hook_embed", reduce="median")
