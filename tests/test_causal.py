"""Causal tracing and head sweeps (research/causal.py) against a direct reference: the same corruption and
restoration done with plain PyTorch hooks on transformers' model of the same weights; restoring every
position gives back the clean run exactly; units follow the provenance."""

from __future__ import annotations

import pytest
import torch

from research_models import tiny_pair
from llava_next.research import Provenance
from llava_next.research import select as sel
from llava_next.research.causal import causal_trace, head_sweep, unit_positions
from llava_next.research.plots import causal_chart

NOISE, SEED = 3.0, 0


@pytest.fixture(scope="module")
def video():
    ours, hf, ids, mine, theirs = tiny_pair("video")
    prov = Provenance.build(ids[0].tolist(), ours.config, videos=[{"num_frames": 4, "frame_hw": (240, 320)}])
    with torch.no_grad():
        target = int(ours(ids, **mine)[0, -1].argmax())
    return ours, hf, ids, mine, theirs, prov, target


def _hf_metric(hf, ids, theirs, target, noisy=None, positions=None, restore=None):
    """transformers' p(target) with the decoder input rows ``positions`` set to ``noisy`` and, with ``restore``
    = (layer, rows, clean states), those rows of that layer's output put back."""
    lm = hf.model.language_model
    hooks = []
    if noisy is not None:
        def pre(module, args, kwargs):
            x = kwargs["inputs_embeds"].clone()
            x[0, positions] = noisy.to(x.dtype)
            kwargs["inputs_embeds"] = x
            return args, kwargs
        hooks.append(lm.register_forward_pre_hook(pre, with_kwargs=True))
    if restore is not None:
        layer, rows, states = restore

        def post(module, args, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[0, rows] = states[0, rows].to(h.dtype)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        hooks.append(lm.layers[layer].register_forward_hook(post))
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids, **theirs).logits
    finally:
        for h in hooks:
            h.remove()
    return float(logits[0, -1].float().softmax(-1)[target])


def test_causal_trace_equals_hooks_on_transformers(video):
    ours, hf, ids, mine, theirs, prov, target = video
    ct = causal_trace(ours, ids, mine, provenance=prov, target=target, units="frame", layers=[0, 1], noise=NOISE,
                      seed=SEED)
    assert ct.units == ["v0f0", "v0f1", "v0f2", "v0f3"] and ct.scores.shape == (2, 4)
    corrupted = torch.tensor(ct.extra["corrupted"])
    assert torch.equal(corrupted, sel.visual().resolve(prov))
    # the same noise, drawn the same way from transformers' own clean decoder input
    clean_states = hf(input_ids=ids, **theirs, output_hidden_states=True).hidden_states
    x = clean_states[0][0].float()
    noisy = x[corrupted] + NOISE * x.std() * torch.randn(len(corrupted), x.shape[1],
                                                          generator=torch.Generator().manual_seed(SEED))
    assert abs(ct.clean - _hf_metric(hf, ids, theirs, target)) <= 1e-5
    assert abs(ct.corrupt - _hf_metric(hf, ids, theirs, target, noisy, corrupted)) <= 1e-5
    assert ct.corrupt != pytest.approx(ct.clean, abs=1e-6)  # the corruption does something
    units = unit_positions(prov, "frame", corrupted)
    for i, layer in enumerate(ct.layers):
        for j, rows in enumerate(units.values()):
            want = _hf_metric(hf, ids, theirs, target, noisy, corrupted, (layer, rows, clean_states[layer + 1]))
            assert abs(float(ct.scores[i, j]) - want) <= 1e-5


def test_restoring_every_position_gives_the_clean_run(video):
    ours, _, ids, mine, _, prov, target = video
    everything = torch.arange(ids.shape[1])
    for kind in ("resid_post",):
        ct = causal_trace(ours, ids, mine, provenance=prov, target=target, units={"all": everything}, layers=[1],
                          kind=kind)
        assert abs(float(ct.scores[0, 0]) - ct.clean) <= 1e-6
    png = causal_chart(ct.scores.numpy(), ct.layers, ct.units, clean=ct.clean, corrupt=ct.corrupt, title="t")
    assert png.size[0] > 100 and png.size[1] > 50


def test_units(video):
    ours, _, ids, _, _, prov, _ = video
    corrupted = sel.visual().resolve(prov)
    seg = unit_positions(prov, "segment", corrupted)
    assert "video" in seg and sum(len(v) for v in seg.values()) == ids.shape[1]
    assert len(unit_positions(prov, "position", corrupted)) == len(corrupted)
    with pytest.raises(ValueError, match="no image tiles"):
        unit_positions(prov, "tile", corrupted)


def test_head_sweep_equals_hooks_on_transformers(video):
    ours, hf, ids, mine, theirs, _, target = video
    cfg = ours.config.text
    swept = head_sweep(ours, ids, mine, target=target, layers=[1])
    assert swept.shape == (1, cfg.num_heads)
    o_proj = hf.model.language_model.layers[1].self_attn.o_proj
    for h in range(cfg.num_heads):
        def pre(module, args, h=h):
            z = args[0].clone()
            z[..., h * cfg.head_dim:(h + 1) * cfg.head_dim] = 0
            return (z,)
        hook = o_proj.register_forward_pre_hook(pre)
        try:
            want = _hf_metric(hf, ids, theirs, target)
        finally:
            hook.remove()
        assert abs(float(swept[0, h]) - want) <= 1e-5


def test_patch_frame_of_one_video_onto_another(video):
    from llava_next.research import Record, patch, trace

    ours, _, ids, mine, _, prov, _ = video
    other = {"videos": [mine["videos"][0].flip(0)]}  # video B: the same clip, frames in reverse order
    name = "blocks.0.hook_resid_post"
    with torch.no_grad(), trace(ours, record=[Record(name)], provenance=prov) as a:
        ours(ids, **mine)
    with torch.no_grad(), trace(ours, provenance=prov, interventions=[
            patch(name, a, positions=sel.frame(1), source_positions=sel.frame(2))]):
        patched = ours(ids, **other)
    # by hand: B's forward with frame 1's rows of that hook replaced by A's frame 2 rows
    dst, src = sel.frame(1).resolve(prov), sel.frame(2).resolve(prov)

    def put(x, hook):
        x = x.clone()
        x[:, dst] = a[name][:, src]
        return x
    with torch.no_grad(), trace(ours, hooks=[(name, put)]):
        want = ours(ids, **other)
    assert torch.equal(patched, want)
    with torch.no_grad():
        assert not torch.equal(patched, ours(ids, **other))


def test_map_positions_between_grids():
    from llava_next.research.interventions import map_positions

    ours = tiny_pair("image")[0]
    cfg = ours.config
    from llava_next.inputs.prompt import expand_placeholders
    from llava_next.inputs.tokens import image_tokens

    def prov_of(size):
        ids = expand_placeholders([1, cfg.image_token_id, 2], cfg.image_token_id, cfg.video_token_id,
                                  [image_tokens(size, cfg)], [])
        return Provenance.build(ids, cfg, image_sizes=[size])
    small, big = prov_of((200, 300)), prov_of((600, 300))
    ds, bs = sel.tile("base").resolve(small), sel.tile("base").resolve(big)
    assert torch.equal(map_positions(small, ds, big, bs), bs)  # the same base grid: in order
    dg = (sel.visual() - sel.tile("base") - sel.newlines()).resolve(small)
    bg = (sel.visual() - sel.tile("base") - sel.newlines()).resolve(big)
    assert len(dg) != len(bg)
    take = map_positions(small, dg, big, bg)
    for d, s in zip(dg.tolist(), take.tolist()):  # the nearest cell centre in relative coordinates
        for p, g in ((small, d), (big, s)):
            assert p.row[g] >= 0
        dy = (small.row[d] + 0.5) / small.grid_h[d] - (big.row[s] + 0.5) / big.grid_h[s]
        dx = (small.col[d] + 0.5) / small.grid_w[d] - (big.col[s] + 0.5) / big.grid_w[s]
        assert abs(float(dy)) <= 0.5 / float(big.grid_h[s]) + 1e-9 and abs(float(dx)) <= 0.5 / float(big.grid_w[s]) + 1e-9
