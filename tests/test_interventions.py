"""Interventions against independent references: knockout vs a dense-mask eager attention (the way
llava-interp / cross-modal-information-flow build it), ablations and replacements vs embeddings edited by
hand and fed to the decoder, activation patching vs a hand-written hook."""

from __future__ import annotations

import torch

from research_models import tiny_pair
from llava_next.model.attention import eager_attention
from llava_next.research import (Attention, Record, ablate, grouped_attention, intervene, knockout, patch,
                                 replace_embedding, trace)


def assert_close(got, want):
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def dense_reference(ours, ids, mine, blocked: dict[int, torch.Tensor]):
    """Logits with eager attention and a dense (T, T) mask in the given layers (True = blocked)."""
    decoder = ours.language_model

    def instrument(layer, q, k, v, ctx):
        if layer not in blocked:
            return ctx.kernel(q, k, v, ctx.mask)
        return eager_attention(q, k, v, causal=True, mask=~blocked[layer][None, None])
    try:
        decoder.instrument = instrument
        return ours(ids, **mine)
    finally:
        decoder.instrument = None


def test_knockout_equals_dense_mask_eager_reference():
    ours, _, ids, mine, _ = tiny_pair("image")  # Mistral decoder: GQA
    T = ids.shape[1]
    image = (ids[0] == ours.config.image_token_id).nonzero()[:, 0]
    question = torch.arange(T - 4, T)
    first = torch.arange(0, 40)
    with torch.no_grad():
        plain = ours(ids, **mine)
        with trace(ours, interventions=[knockout(src=image, dst=question, layers=[0, 1]),
                                        knockout(src=first, dst=torch.arange(30, T), layers=[1])],
                   attention=Attention(queries=question, rows=True)) as tr:
            got = ours(ids, **mine)
        dense0 = torch.zeros(T, T, dtype=torch.bool)
        dense0[question[:, None], image[None, :]] = True
        dense1 = dense0.clone()
        dense1[30:, :40] = True
        want = dense_reference(ours, ids, mine, {0: dense0, 1: dense1})
    assert_close(got, want)
    assert (got - plain).abs().max() > 1e-3  # the knockout does something
    for layer in (0, 1):  # recorded rows see the knockout: no mass from the question on the image
        rows = tr.attention[layer].rows
        assert rows[..., image].abs().max() == 0 and torch.allclose(rows.sum(-1), torch.ones(()), atol=1e-5)
    assert ours.language_model.instrument is None


def test_grouped_attention_empty_rows_are_zero():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 12, 8, generator=g) for _ in range(3))
    groups = torch.zeros(12, dtype=torch.long)
    groups[[0, 5]] = 3  # in src and dst of knockout 0: 0 sees nothing (not even itself), 5 not 0 nor 5
    table = torch.ones(4, 4, dtype=torch.bool)
    table[2:, 1::2] = False  # dst (bit 1) may not see src (bit 0)
    out = grouped_attention(q, k, v, (groups, table), chunk=5)
    assert torch.isfinite(out).all() and out[:, :, 0].abs().max() == 0
    dense = torch.ones(12, 12, dtype=torch.bool)
    dense[0, 0] = dense[5, 0] = dense[5, 5] = False
    ref = eager_attention(q, k, v, causal=True, mask=dense)
    assert torch.allclose(out, ref, atol=1e-6)


def test_ablate_and_replace_equal_edited_embeddings():
    ours, _, ids, mine, _ = tiny_pair("video")
    T = ids.shape[1]
    video = (ids[0] == ours.config.video_token_id).nonzero()[:, 0]
    frame1 = video[4:8]  # the second of four 2x2 pooled frames
    new_row = torch.randn(ours.config.text.hidden_size)
    with torch.no_grad():
        embeds = ours.embed(ids, (), [ours.video_features(v) for v in mine["videos"]])
        for spec, rows, value in [
            (ablate(frame1, mode="zero"), frame1, 0.0),
            (ablate(frame1, mode="mean", over=video), frame1, embeds[:, video].mean(1, keepdim=True)),
            (replace_embedding([T - 1], new_row), [T - 1], new_row),
        ]:
            with intervene(ours, spec):
                got = ours(ids, **mine)
            edited = embeds.clone()
            edited[:, rows] = value
            want = ours.language_model(input_embeds=edited)
            assert torch.equal(got, want), spec
            assert (got - ours(ids, **mine)).abs().max() > 1e-4


def test_patch_from_a_clean_trace():
    ours, _, ids, mine, _ = tiny_pair("video")
    T = ids.shape[1]
    video = (ids[0] == ours.config.video_token_id).nonzero()[:, 0]
    name = "blocks.0.hook_resid_post"
    with torch.no_grad():
        with trace(ours, record=[name]) as clean:
            clean_logits = ours(ids, **mine)
        corrupt = ablate(video, mode="zero")
        with intervene(ours, corrupt, patch(name, clean)):  # every position patched: the clean run again
            assert torch.equal(ours(ids, **mine), clean_logits)
        some = torch.tensor([T - 2, T - 1])
        with intervene(ours, corrupt, patch(name, clean, positions=some)):
            got = ours(ids, **mine)

        def by_hand(x, hook):
            x = x.clone()
            x[:, some] = clean[name][:, some]
            return x
        with trace(ours, interventions=[corrupt], hooks=[(name, by_hand)]):
            want = ours(ids, **mine)
        with trace(ours, record=[Record(name, positions=some)]) as partial:  # the source kept only those rows
            ours(ids, **mine)
        with intervene(ours, corrupt, patch(name, partial, positions=some)):
            got_partial = ours(ids, **mine)
    assert torch.equal(got, want) and torch.equal(got_partial, want)
    assert (got - clean_logits).abs().max() > 1e-4
