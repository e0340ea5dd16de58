"""Streaming logit lens equals the full computation (every layer's residual through norm + lm_head, full
vocabulary, then top-k / target log-probs), and its last layer is the model's own prediction."""

from __future__ import annotations

import torch

from research_models import tiny_pair
from llava_next.research import LogitLens, Record, trace


def test_logit_lens_equals_full_computation():
    ours, _, ids, mine, _ = tiny_pair("video")
    T = ids.shape[1]
    L = ours.config.text.num_layers
    dec = ours.language_model
    positions = torch.tensor([0, 3, 9, T - 2, T - 1])  # text and video positions
    targets = [5, 17, 100]
    with torch.no_grad():
        with trace(ours, record=["hook_embed", "blocks.*.hook_resid_post"],
                   logit_lens=LogitLens(positions=positions, top_k=4, targets=targets, embed=True, chunk=2)) as tr:
            logits = ours(ids, **mine)
        for layer in [-1, *range(L)]:
            resid = tr["hook_embed" if layer < 0 else f"blocks.{layer}.hook_resid_post"][:, positions]
            full = torch.log_softmax(dec.lm_head(dec.norm(resid)).float(), dim=-1)  # (1, P, V): the full vocabulary
            got = tr.logit_lens[layer]
            top = full.topk(4, dim=-1)
            assert torch.equal(got.ids, top.indices), layer
            assert torch.allclose(got.probs, top.values.exp(), atol=1e-6)
            assert torch.allclose(got.target_logprobs, full[..., targets], atol=1e-5)
            assert got.positions.tolist() == positions.tolist()
    assert torch.equal(tr.logit_lens[L - 1].ids[:, :, 0], logits[:, positions].argmax(-1))
    assert set(tr.logit_lens) == {-1, *range(L)}


def test_logit_lens_during_generation_and_hooks_untouched(monkeypatch):
    """Per decode step the new position's lens; the lens does not fire ln_final's hook point."""
    from llava_next.model import engines
    from llava_next.model.attention import one_query_attention
    from llava_next.model.generate import generate

    monkeypatch.setattr(engines, "_compiled_one_query", lambda: one_query_attention)  # no compile here

    ours, _, ids, mine, _ = tiny_pair("video")
    with torch.no_grad():
        embeds = ours.embed(ids, (), [ours.video_features(v) for v in mine["videos"]])
        with trace(ours, record=[Record("ln_final.hook_normalized", key="norm")],
                   logit_lens=LogitLens(layers=[-1], top_k=1)) as tr:
            new = generate(ours.language_model, input_embeds=embeds, max_new_tokens=3, eos_token_id=())
    L = ours.config.text.num_layers
    assert [s.extra["logit_lens"][L - 1].ids[0, -1, 0].item() for s in tr.steps] == new[0].tolist()
    # the model's own norm call only (prefill normalises the last position only), not the lens's 2 more
    assert all(s.records["norm"].shape == (1, 1, ours.config.text.hidden_size) for s in tr.steps)


def test_logit_lens_takes_the_position_selectors_attention_takes():
    """One resolver (issue 22.8): "last" and "all" mean for the lens what they mean for Attention.queries;
    a misspelt word is a ResearchError naming the choices, for both."""
    import pytest

    from llava_next.research import Attention, ResearchError

    ours, _, ids, mine, _ = tiny_pair("video")
    T = ids.shape[1]
    with torch.no_grad():
        with trace(ours, logit_lens=LogitLens(positions=torch.arange(T), top_k=3)) as every:
            ours(ids, **mine)
        with trace(ours, logit_lens=LogitLens(positions="last", top_k=3)) as last, \
                trace(ours, logit_lens=LogitLens(positions="all", top_k=3)) as all_:
            ours(ids, **mine)
    for layer, ref in every.logit_lens.items():
        assert last.logit_lens[layer].positions.tolist() == [T - 1]
        assert torch.equal(last.logit_lens[layer].ids, ref.ids[:, -1:])
        assert torch.equal(all_.logit_lens[layer].ids, ref.ids)
    for spec in (dict(logit_lens=LogitLens(positions="lats")), dict(attention=Attention(queries="lats"))):
        with pytest.raises(ResearchError, match="must be 'last', 'all', absolute positions"):
            with trace(ours, **spec):
                pass
