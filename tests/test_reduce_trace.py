"""Tracing a reduced model (llava_next.reduce + llava_next.research.trace): every hook point fires as unreduced,
layers from the pruning layer on see the pruned rows, and everything is reported in ORIGINAL positions.

References are built independently of the runner's index map: FastV's keep-set from transformers' eager
attention (test_reduce_fastv.reference_keep), then our decoder's layers run by hand without a cache on the
kept rows at their original positions (and transformers' layers for the residual stream and the attention
probabilities); FrameFusion's from its official class driven through transformers' layers
(test_reduce_framefusion.official_run, which tracks the original index of every alive token). A pruned +
selected decode (FastV + DyCoke) equals a no-cache recompute with the same kept keys at original positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_next.model.attention import use_backend
from llava_next.model.generate import generate
from llava_next.reduce import DyCokeDecode, FastV, FrameFusion, Reduction
from llava_next.reduce.engine import ReducedEngine
from llava_next.research import Attention, LogitLens, Record, knockout, trace
from test_decoder import hf_and_ours
from test_reduce_fastv import LAYERS, K, hf_layers, layout, prompt, reference_keep
from test_trace import TL_BLOCK_NAMES

BLOCK = [f"blocks.{i}.{n}" for i in range(LAYERS) for n in TL_BLOCK_NAMES]


@pytest.fixture(autouse=True)
def sdpa():
    with use_backend("sdpa"):
        yield


@pytest.fixture(scope="module")
def models():
    return hf_and_ours("llama", 2.0, seed=3, num_layers=LAYERS, vocab_size=101)


def fastv_prefill(ours, e, vis, keep=0.5, **kw):
    runner = ReducedEngine(Reduction(pruner=FastV(layer=K, keep=keep)), layout(vis))
    T = e.shape[1]
    ours.setup_caches(1, T + 4)
    with torch.no_grad(), trace(ours, **kw) as tr:
        logits = runner.prefill(ours, e, torch.arange(T)[None], None)
    return tr, logits, runner


def test_fastv_hook_tensors_equal_the_layers_run_by_hand_on_the_kept_rows(models):
    hf, ours = models
    e, vis = prompt(2, 6, 48, 9)
    T = e.shape[1]
    tr, logits, runner = fastv_prefill(ours, e, vis, record=["hook_embed", *BLOCK, "ln_final.hook_normalized",
                                                              "hook_logits"])
    keep = reference_keep(hf, e, vis, 0.5)  # transformers' eager attention picks them, not the runner
    pruned = torch.ones(T, dtype=torch.bool)
    pruned[keep] = False
    pos = torch.arange(T)[None]
    with torch.no_grad(), trace(ours, record=BLOCK) as full:  # unreduced code, no cache, all T rows
        h = ours.forward_layers(e, pos, range(K))
    with torch.no_grad(), trace(ours, record=BLOCK) as cut:  # the kept rows at their original positions
        last = ours.forward_layers(h[:, keep], keep[None], range(K, LAYERS))
    assert len(tr.steps) == 1 and torch.equal(tr["hook_embed"], e)
    for name in BLOCK:
        got, layer = tr[name], int(name.split(".")[1])
        if layer < K:  # the full sequence
            assert got.shape == full[name].shape and name + ":kept" not in tr.cache
            torch.testing.assert_close(got, full[name], rtol=0, atol=1e-5)
            continue
        assert got.shape[1] == T, name  # original positions: one row per prompt position
        assert torch.equal(tr[name + ":kept"][0], ~pruned), name
        assert bool(got[:, pruned].isnan().all()), name  # pruned rows are absent, not shifted
        torch.testing.assert_close(got[:, keep], cut[name], rtol=0, atol=1e-5)
    # transformers' layers agree on the residual stream of the last layer, and the head sees the last position
    with torch.no_grad():
        ref = hf_layers(hf, hf_layers(hf, e, pos, range(K))[:, keep], keep[None], range(K, LAYERS))
        ref_logits = hf.lm_head(hf.model.norm(ref[:, -1]))
    torch.testing.assert_close(tr[f"blocks.{LAYERS - 1}.hook_resid_post"][:, keep], ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(tr["hook_logits"][:, -1], ref_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    assert torch.allclose(ours.head(last[:, -1:])[:, 0], logits, atol=1e-5)
    # the fates say the same
    assert torch.equal(runner.fates.removed_at[0] == K, pruned)
    assert bool((runner.fates.removed_at[0][keep] == -1).all())


def test_records_reduced_over_positions_skip_the_pruned_ones(models):
    hf, ours = models
    e, vis = prompt(2, 6, 48, 9)
    keep = reference_keep(hf, e, vis, 0.5)
    vis_idx = torch.nonzero(vis[0]).flatten()
    gone = vis_idx[~torch.isin(vis_idx, keep)][:3]
    stay = vis_idx[torch.isin(vis_idx, keep)][:3]
    want = torch.cat([gone, stay])
    name = f"blocks.{K}.hook_resid_post"
    tr, _, _ = fastv_prefill(ours, e, vis, record=[Record(name, positions=want, key="rows"),
                                                    Record(name, positions=want, reduce="mean", key="mean"),
                                                    Record(name, positions=want, reduce="topk", k=2, key="top")])
    rows = tr["rows"]
    assert rows.shape[1] == 6 and bool(rows[:, :3].isnan().all()) and not bool(rows[:, 3:].isnan().any())
    assert tr["rows:kept"][0].tolist() == [False] * 3 + [True] * 3
    torch.testing.assert_close(tr["mean"], rows[:, 3:].mean(1))
    top = rows[:, 3:].topk(2, dim=1)
    assert torch.equal(tr["top"], top.values) and torch.equal(tr["top:positions"], stay[top.indices])


def test_records_of_a_pruned_batch_equal_each_prompt_alone(models):
    _, ours = models
    rows = [prompt(3, 5, 40, 7), prompt(4, 9, 24, 3)]
    T = max(e.shape[1] for e, _ in rows)
    batch, vis, mask = torch.zeros(2, T, 64), torch.zeros(2, T, dtype=torch.bool), torch.zeros(2, T, dtype=torch.bool)
    for i, (e, v) in enumerate(rows):
        batch[i, T - e.shape[1]:], vis[i, T - e.shape[1]:], mask[i, T - e.shape[1]:] = e[0], v[0], True
    name = f"blocks.{K + 1}.hook_resid_post"
    runner = ReducedEngine(Reduction(pruner=FastV(layer=K, keep=0.5)), layout(vis))
    with torch.no_grad(), trace(ours, record=[name]) as tr:
        generate(ours, input_embeds=batch, attention_mask=mask, max_new_tokens=1, eos_token_id=(), engine=runner)
    for i, (e, v) in enumerate(rows):
        alone, _, _ = fastv_prefill(ours, e, v, record=[name])
        n = e.shape[1]
        torch.testing.assert_close(tr[name][i, T - n:], alone[name][0], rtol=0, atol=1e-5, equal_nan=True)
        assert torch.equal(tr[name + ":kept"][i, T - n:], alone[name + ":kept"][0])
        assert not bool(tr[name + ":kept"][i, :T - n].any())  # padding is no position of the prompt


def eager_probs(hf, h, pos, layer, mask=None):
    """transformers' eager attention probabilities (1, H, S, S) of one layer on the rows h at RoPE positions pos."""
    S = h.shape[1]
    causal = torch.full((S, S), float("-inf")).triu(1)[None, None] if mask is None else mask
    block = hf.model.layers[layer]
    _, w = block.self_attn(block.input_layernorm(h), position_embeddings=hf.model.rotary_emb(h, pos),
                           attention_mask=causal)
    return w


def test_attention_on_a_pruned_layer_equals_eager_attention_over_the_kept_keys(models):
    hf, ours = models
    e, vis = prompt(2, 6, 48, 9)
    T = e.shape[1]
    keep = reference_keep(hf, e, vis, 0.5)
    vis_idx = torch.nonzero(vis[0]).flatten()
    gone = int(vis_idx[~torch.isin(vis_idx, keep)][0])
    stay = int(vis_idx[torch.isin(vis_idx, keep)][-1])
    queries = torch.tensor([gone, stay, T - 2, T - 1])
    segments = torch.zeros(T, dtype=torch.long)
    segments[vis[0]] = 1 + (torch.arange(int(vis.sum())) >= 24).long()  # two "frames"
    tr, _, _ = fastv_prefill(ours, e, vis, attention=Attention(layers=[K - 1, K + 1], queries=queries, rows=True,
                                                               key_mass=True, topk=3, segments=segments))
    pos = torch.arange(T)[None]
    with torch.no_grad():
        h = hf_layers(hf, e, pos, range(K - 1))
        full = eager_probs(hf, h, pos, K - 1)[0]  # (H, T, T)
        h = hf_layers(hf, hf_layers(hf, e, pos, range(K))[:, keep], keep[None], range(K, K + 1))
        cut = eager_probs(hf, h, keep[None], K + 1)[0]  # (H, T', T'): the kept rows and keys only
    below = tr.attention[K - 1]
    assert below.query_positions.tolist() == queries.tolist()
    torch.testing.assert_close(below.rows[0], full[:, queries], rtol=0, atol=1e-5)
    st = tr.attention[K + 1]
    assert st.query_positions.tolist() == [stay, T - 2, T - 1]  # the pruned query is absent at this layer
    assert st.rows.shape[-1] == T and torch.equal(st.extra["kept_keys"], torch.isin(torch.arange(T), keep))
    at = {int(p): i for i, p in enumerate(keep.tolist())}
    ref_rows = torch.full((cut.shape[0], 3, T), float("nan"))
    ref_rows[:, :, keep] = cut[:, [at[stay], at[T - 2], at[T - 1]]]
    torch.testing.assert_close(st.rows[0], ref_rows, rtol=0, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(st.key_mass[0][:, keep], ref_rows[:, :, keep].sum(1), rtol=0, atol=1e-5)
    assert bool(st.key_mass[0][:, ~torch.isin(torch.arange(T), keep)].isnan().all())
    assert torch.equal(st.topk_ids[0], ref_rows.nan_to_num(-1).topk(3, dim=-1).indices)  # original positions
    seg_ref = torch.stack([ref_rows.nan_to_num(0)[..., segments == s].sum(-1) for s in range(3)], -1)
    torch.testing.assert_close(st.segment_rows[0], seg_ref, rtol=0, atol=1e-5)
    # the virtual pattern hook and a knockout at the pruned layer, both by original position
    src = keep[vis[0][keep]][:4]  # four kept visual tokens the last query may not read at layer K+1
    tr, _, _ = fastv_prefill(ours, e, vis, record=[Record(f"blocks.{K + 1}.attn.hook_pattern", positions=[stay, T - 1],
                                                          key="pattern")],
                             interventions=[knockout(src, torch.tensor([T - 1]), layers=[K + 1])])
    torch.testing.assert_close(tr["pattern"][0, :, 0], ref_rows[:, 0], rtol=0, atol=1e-5, equal_nan=True)
    blocked = torch.zeros(1, 1, len(keep), len(keep))
    blocked[..., -1, torch.isin(keep, src)] = float("-inf")
    with torch.no_grad():
        causal = torch.full((len(keep), len(keep)), float("-inf")).triu(1)[None, None]
        ko = eager_probs(hf, h, keep[None], K + 1, causal + blocked)[0, :, -1]
    ref_last = torch.full((ko.shape[0], T), float("nan"))
    ref_last[:, keep] = ko
    torch.testing.assert_close(tr["pattern"][0, :, 1], ref_last, rtol=0, atol=1e-5, equal_nan=True)
    assert float(tr["pattern"][0, :, 1, src].abs().max()) == 0.0


def test_decode_steps_of_a_pruned_layer_are_in_original_positions(models):
    hf, ours = models
    e, vis = prompt(2, 6, 48, 9)
    T = e.shape[1]
    keep = reference_keep(hf, e, vis, 0.5)
    runner = ReducedEngine(Reduction(pruner=FastV(layer=K, keep=0.5)), layout(vis))
    with torch.no_grad(), trace(ours, record=[Record(f"blocks.{K}.hook_resid_post", key="r")],
                                attention=Attention(layers=[K], queries="last", rows=True),
                                logit_lens=LogitLens(layers=[K], positions=torch.tensor([7, T + 1]), top_k=2)) as tr:
        tokens = generate(ours, input_embeds=e, max_new_tokens=3, eos_token_id=(), engine=runner)
    assert len(tr.steps) == 3  # the prefill and two decode steps
    with torch.no_grad():  # no cache: the prompt's kept rows and the first generated token
        x = torch.cat([e, ours.embed_tokens(tokens[:, :1])], 1)
        rows = torch.cat([keep, torch.tensor([T])])
        h = hf_layers(hf, hf_layers(hf, x, torch.arange(T + 1)[None], range(K))[:, rows], rows[None], range(K, K))
        w = eager_probs(hf, h, rows[None], K)[0, :, -1]  # (H, T'+1): the generated token's row
    step = tr.steps[1]
    assert step.attention[K].query_positions.tolist() == [T] and step.records["r:kept"].tolist() == [[True]]
    ref = torch.full((w.shape[0], T + 1), float("nan"))
    ref[:, rows] = w
    torch.testing.assert_close(step.attention[K].rows[0, :, 0], ref, rtol=0, atol=1e-5, equal_nan=True)
    lens0 = tr.steps[0].extra["logit_lens"][K].positions.tolist()
    assert lens0 == ([7] if 7 in keep.tolist() else [])  # text position 7: present
    assert tr.steps[2].extra["logit_lens"][K].positions.tolist() == [T + 1]


# ---- FrameFusion: the two halves of every layer, merged rows ----------------------------------------------
def test_framefusion_hooks_follow_the_official_merges():
    import test_reduce_framefusion as tff

    hf, ours = hf_and_ours("llama", 1.0, seed=11, num_layers=tff.LAYERS, vocab_size=101)
    e, lay, start = tff.video_prompt(1, 5, 7, 0.8)
    T, n = e.shape[1], tff.LAYERS
    method = FrameFusion(cost=0.3, similarity=0.9)
    official, recorded = tff.OfficialFrameFusion.forward, []

    def spy(self, x, pe, mask, w=None):  # each call's result: the original indices alive and the hidden states
        out = official(self, x, pe, mask, w)
        recorded.append((self.orig.clone(), out[0].clone()))
        return out
    tff.OfficialFrameFusion.forward = spy
    try:
        ref_logits, ff = tff.official_run(hf, e, lay, start, method)
    finally:
        tff.OfficialFrameFusion.forward = official
    assert len(recorded) == n + 1  # before layer 0, then after every layer's attention
    names = [f"blocks.{i}.{h}" for i in range(n) for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                                                           "mlp.hook_post")]
    runner = ReducedEngine(Reduction(pruner=method), lay)
    ours.setup_caches(1, T + 4)
    with torch.no_grad(), trace(ours, record=names) as tr:
        logits = runner.prefill(ours, e, torch.arange(T)[None], None)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    at = lambda orig: torch.isin(torch.arange(T), orig)  # noqa: E731
    torch.testing.assert_close(tr["blocks.0.hook_resid_pre"][0, recorded[0][0]], recorded[0][1][0], rtol=0, atol=1e-6)
    for layer in range(n):
        orig_in, (orig_mlp, x_mlp) = recorded[layer][0], recorded[layer + 1]
        for name in ("hook_resid_pre", "hook_resid_mid"):  # the rows of this layer's attention
            assert torch.equal(tr[f"blocks.{layer}.{name}:kept"][0], at(orig_in)), (layer, name)
        for name in ("mlp.hook_post", "hook_resid_post"):  # the MLP half runs on the merged rows
            assert torch.equal(tr[f"blocks.{layer}.{name}:kept"][0], at(orig_mlp)), (layer, name)
        block = hf.model.layers[layer]
        with torch.no_grad():
            ref_post = x_mlp + block.mlp(block.post_attention_layernorm(x_mlp))
        post = tr[f"blocks.{layer}.hook_resid_post"]
        torch.testing.assert_close(post[0, orig_mlp], ref_post[0], rtol=0, atol=1e-4)
        assert bool(post[0, ~at(orig_mlp)].isnan().all())
        if layer + 1 < n:
            torch.testing.assert_close(tr[f"blocks.{layer + 1}.hook_resid_pre"], post, equal_nan=True)
    # the fates: every merged token went into an earlier frame's same patch; the survivors are the official ones
    fates = runner.fates
    merged = torch.nonzero(fates.merged_into[0] >= 0).flatten()
    into = fates.merged_into[0, merged]
    assert len(merged) > 0 and bool((lay.patch[0, merged] == lay.patch[0, into]).all()) and bool((into < merged).all())
    survivors = ff.orig[(ff.orig >= start) & (ff.orig < start + tff.FRAMES * tff.PATCHES)]
    assert torch.equal(torch.nonzero(fates.alive(n - 1)[0] & lay.visual[0]).flatten(), survivors)


# ---- FastV + DyCoke: prefill pruning and decode-time selection together ------------------------------------
def reference_pruned_selected(hf, e, vis, keep_idx, method: DyCokeDecode, n: int):
    """No cache: every step recomputes the sequence; layers < K see every row, layers >= K the kept prompt rows
    and the generated ones (original RoPE positions); from layer L on, the query of generated token s reads
    only the text, generated and selected visual keys of step s, chosen by the official rule among the visual
    keys layer L-1 has (eager attention of its last query, mean over heads)."""
    T, L = e.shape[1], method.layer
    out, logits, prev, chosen, visible_at = [], [], None, None, []
    with torch.no_grad():
        for t in range(n + 1):
            x = torch.cat([e, hf.model.embed_tokens(torch.tensor([out], dtype=torch.long))], 1) if out else e
            S = x.shape[1]
            rows = torch.arange(S)
            h = x
            for layer in range(LAYERS):
                if layer == K:
                    rows = torch.cat([keep_idx, torch.arange(T, S)])
                    h = h[:, torch.isin(torch.arange(S), rows)] if h.shape[1] == S else h
                mask = torch.full((len(rows), len(rows)), float("-inf")).triu(1)
                if layer >= L:
                    for j, vis_ok in enumerate(visible_at):  # generated token j's row (later keys: causal)
                        q = int((rows == T + j).nonzero())
                        ok = torch.ones(S, dtype=torch.bool)
                        ok[:len(vis_ok)] = vis_ok
                        mask[q][~ok[rows]] = float("-inf")
                if t > 0 and layer == L - 1:  # this step's choice, from the last query's attention here
                    s = eager_probs(hf, h, rows[None], layer, mask[None, None])[0].mean(0)[-1]
                    present = rows < T
                    cand = rows[present & vis[0][rows.clamp(max=T - 1)]]
                    sc = s[torch.isin(rows, cand)]
                    similar = prev is not None and float(torch.nn.functional.cosine_similarity(sc, prev, dim=0)) \
                        >= method.threshold
                    prev = sc
                    ok = torch.ones(S, dtype=torch.bool)
                    if not (similar and method.on_similar == "full"):
                        if not similar:
                            chosen = cand[sc.topk(int(len(cand) * method.keep)).indices]
                        ok[vis[0].nonzero().flatten()] = False
                        ok[chosen] = True
                    visible_at.append(ok)
                cos_sin = hf.model.rotary_emb(h, rows[None])
                h = hf.model.layers[layer](h, attention_mask=mask[None, None], position_ids=rows[None],
                                           position_embeddings=cos_sin)
            if t < n:
                logits.append(hf.lm_head(hf.model.norm(h[:, -1])))
                out.append(int(logits[-1].argmax()))
    return out, torch.cat(logits), visible_at


@pytest.mark.parametrize("L", [K + 1, K, K - 1])  # the selector's layer after, at and before the pruning layer
def test_pruned_and_selected_decode_equals_a_recompute_with_the_same_kept_keys(models, L):
    hf, ours = models
    e, vis = prompt(7, 5, 40, 6)
    keep_idx = reference_keep(hf, e, vis, 0.5)
    dy = DyCokeDecode(layer=L, keep=0.25, threshold=0.9)
    runner = ReducedEngine(Reduction(pruner=FastV(layer=K, keep=0.5), decode=dy), layout(vis))
    seen = []
    decode = runner.decode
    runner.decode = lambda *a: seen.append(decode(*a)) or seen[-1]
    tokens = generate(ours, input_embeds=e, max_new_tokens=6, eos_token_id=(), engine=runner)
    ref, ref_logits, visible_at = reference_pruned_selected(hf, e, vis, keep_idx, dy, 6)
    assert tokens[0].tolist() == ref and len(set(ref)) > 1
    assert (torch.cat(seen) - ref_logits[1:]).abs().max() <= 1e-4 * ref_logits.abs().max()
    assert sum(int(v.sum()) < len(v) for v in visible_at) >= 1  # the selection did prune at some step
    reads = [r[0, :e.shape[1]] & vis[0] for r in runner.fates.decode_read if r is not None]
    candidates = int((vis[0][keep_idx]).sum()) if L - 1 >= K else int(vis.sum())  # layer L-1's visual keys
    assert reads and all(int(r.sum()) == int(candidates * 0.25) for r in reads)


# ---- the command line ------------------------------------------------------------------------------------
def test_cli_trace_of_a_reduced_model(tmp_path, monkeypatch):
    """`llava-next trace --reduce fastv --reduce dycoke` on tiny-random and the sample video: every prompt position
    says its fate, weights are null exactly where the layer no longer has the key, the kept map is drawn."""
    import contextlib
    import io
    import json

    from llava_next.cli.main import main

    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")
    args = ["trace", "--model", "tiny-random", "--video", "sample:bunny", "--frames", "4", "--layers", "0,1",
            "--reduce", "fastv:layer=1,keep=0.5", "--reduce", "dycoke:layer=1,keep=0.5", "--max-new-tokens", "2",
            "--query", "last,generated,all", "--png", str(tmp_path / "png"), "--json", "What happens?"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    out = json.loads(buf.getvalue())
    P = out["prompt_positions"]
    fates = [p["reduction"] for p in out["positions"][:P]]
    pruned = [i for i, f in enumerate(fates) if f["fate"] == "pruned"]
    assert all(fates[i]["removed_at_layer"] == 1 for i in pruned)
    red = out["reduction"]
    assert len(pruned) == red["visual_tokens_into_decoder"] - red["visual_tokens_after_pruning"]
    kept_visual = [i for i, p in enumerate(out["positions"][:P]) if p["media"] is not None and i not in pruned]
    assert [i for i in kept_visual if out["positions"][i]["kind"] == "video"] == out["reduction"]["kept_positions"]
    assert all("decode_steps_read" in fates[i] for i in kept_visual)
    assert all(fates[i]["decode_steps_read"] == [] for i in pruned)  # not in the deep layers' caches: never read
    assert any(0 < len(fates[i]["decode_steps_read"]) < 2 for i in kept_visual)  # the selection left some out
    for group in ("last", "generated", "all"):
        w0, w1 = out["attention"]["0"][group]["weights"], out["attention"]["1"][group]["weights"]
        assert None not in w0 and [i for i, v in enumerate(w1) if v is None] == pruned
        assert abs(sum(v for v in w1 if v is not None) - 1) < 1e-4
    names = {p.rsplit("/", 1)[-1] for p in out["png"]}
    assert {"video0_kept.png", "video0_decode_reads.png", "video0_frames.png"} <= names
    # DyCoke's temporal pruning before the decoder, then FrameFusion's merges: fates of the tokens that entered
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert main(args[:9] + ["--reduce", "dycoke-ttm:keep=0.5", "--reduce", "framefusion:similarity=0.5,cost=0.6",
                                "--query", "last", "--json", "What happens?"]) == 0
    out = json.loads(buf.getvalue())
    red, positions = out["reduction"], out["positions"][:out["prompt_positions"]]
    video = [p for p in positions if p["kind"] == "video"]
    assert sum(red["before_decoder"][0]["kept_per_frame"]) == len(video) == red["visual_tokens_into_decoder"] < 64
    assert len({(p["frame"], p["row"], p["col"]) for p in video}) == len(video)  # distinct pooled cells
    merged = [(p, positions[p["reduction"]["merged_into"]]) for p in positions if p["reduction"]["fate"] == "merged"]
    assert merged and all(a["frame"] < p["frame"] and (a["row"], a["col"]) == (p["row"], p["col"])
                          for p, a in merged)  # into the same cell of an earlier frame
    assert red["visual_tokens_after_pruning"] == sum(p["reduction"]["fate"] == "kept" for p in video)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(args[:-6] + ["--reduce", "pllava", "What happens?"]) == 2
    assert "does not take this token reducer yet" in err.getvalue()


def test_cli_trace_of_a_pruned_layer_reports_numbers_and_distributions(tmp_path, monkeypatch):
    """Issue 22.7: a pruned position receives no attention at the layers it is gone from (mass 0), so the text
    report prints numbers (never nan) and the frame picture averages the SAME layers for every cell: its
    per-frame masses are the mean over layers of the JSON's per-layer frame sums, and with the text segments
    they add up to 1 (nanmean counted pruned cells over one layer, kept ones over two: 1.146)."""
    import contextlib
    import io
    import json

    from llava_next.cli.main import main
    from llava_next.research import plots

    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")
    drawn = {}
    real = plots.frame_heatmaps

    def spy(frames, grids, *a, **kw):
        drawn.setdefault("calls", []).append(kw)
        return real(frames, grids, *a, **kw)

    monkeypatch.setattr(plots, "frame_heatmaps", spy)
    args = ["trace", "--model", "tiny-random", "--video", "sample:bunny", "--frames", "4",
            "--reduce", "fastv:layer=1,keep=0.5", "--png", str(tmp_path / "png"), "What happens?"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
    text = buf.getvalue()
    assert "nan" not in text.lower(), text
    assert "layer   1" in text and "frames:" in text
    frame_sums = drawn["calls"][0]["frame_sums"]  # video0_frames.png: the first drawing is the attention one
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert main(args[:-3] + ["--json", "What happens?"]) == 0
    out = json.loads(buf.getvalue())
    layers = sorted(out["attention"], key=int)
    per_layer = np.array([[f["sum"] for f in out["attention"][layer]["last"]["sums"]["frames"]] for layer in layers])
    assert np.allclose(frame_sums, per_layer.mean(0), atol=1e-9)
    text_mass = np.mean([sum(v for k, v in out["attention"][layer]["last"]["sums"]["segments"].items()
                             if k not in ("video", "video_newline")) for layer in layers])
    assert abs(sum(frame_sums) + text_mass - 1) < 1e-4


def test_trace_api_runs_the_multimodal_model_through_a_reduction():
    """``model(ids, videos=..., engine=ReducedEngine(red, layout_from_provenance(prov)))`` under ``trace(model,
    provenance=prov)``: the index map built from the
    provenance equals the pipeline's (built from the ids and the pooling), the logits are the runner's at the last
    position and NaN at the positions pruned before the last layer, and ``with_fates`` reports them."""
    from research_models import tiny_pair

    from llava_next.reduce.stages import VisualLayout, native_video_layout
    from llava_next.research import Provenance
    from llava_next.research.trace import layout_from_provenance

    ours, _, ids, mine, _ = tiny_pair("video")
    cfg, dec = ours.config, ours.language_model
    F, T = mine["videos"][0].shape[0], ids.shape[1]
    prov = Provenance.build(ids[0].tolist(), cfg, videos=[{"num_frames": F, "frame_hw": (240, 320)}])
    layout = VisualLayout.build(ids, cfg, [native_video_layout(F, cfg)])
    from_prov = layout_from_provenance(prov)
    for name in ("visual", "frame", "patch"):
        assert torch.equal(getattr(from_prov, name), getattr(layout, name)), name
    red = Reduction(pruner=FastV(layer=1, keep=0.5))
    with torch.no_grad(), trace(ours, provenance=prov, record=["blocks.1.hook_resid_post"]) as tr:
        logits = ours(ids, **mine, engine=ReducedEngine(red, from_prov))
    kept = tr.fates.alive(1)[0]
    assert int((~kept).sum()) == int(layout.visual.sum()) - int(layout.visual.sum() * 0.5)
    assert torch.equal(tr["blocks.1.hook_resid_post:kept"][0], kept)
    assert bool(logits[0, ~kept].isnan().all()) and not bool(logits[0, kept].isnan().any())
    runner = ReducedEngine(red, layout)
    with torch.no_grad():
        embeds = ours.embed(ids, [], [ours.video_features(v) for v in mine["videos"]])
        dec.setup_caches(1, T)
        ref = runner.prefill(dec, embeds, torch.arange(T)[None], None)
    torch.testing.assert_close(logits[:, -1], ref, rtol=0, atol=1e-5)
    records = prov.with_fates(tr.fates).to_records()
    assert [i for i, r in enumerate(records) if r["reduction"]["fate"] == "pruned"] == \
        torch.nonzero(~kept).flatten().tolist()
    assert all(records[i]["frame"] is not None for i in torch.nonzero(~kept).flatten().tolist())


def test_provenance_of_a_video_reduced_by_dycoke_ttm():
    """A token reducer that keeps pooled cells (DyCoke's TTM): each token's frame / row / col / box is its
    cell's, looked up in the unreduced video's provenance by (frame, row, col)."""
    from test_reduce_dycoke import CFG, video_features

    from llava_next.reduce import DyCokeMerge
    from llava_next.research import Provenance

    out = DyCokeMerge(keep=0.3).reduce(video_features(8), CFG)
    v = CFG.video_token_id
    native = Provenance.build([1, 2] + [v] * 8 * 144 + [3], CFG, videos=[{"num_frames": 8, "frame_hw": (720, 1280)}])
    reduced = Provenance.build([1, 2] + [v] * len(out.frame) + [3], CFG,
                               videos=[{"num_frames": 8, "frame_hw": (720, 1280), "tokens": (out.frame, out.patch)}])
    pos = reduced.where(kind="video")
    assert len(pos) == len(out.frame) < 8 * 144
    assert reduced.frame[pos].tolist() == out.frame.tolist()
    assert (reduced.row[pos] * 12 + reduced.col[pos]).tolist() == out.patch.tolist()
    for i in pos[::37].tolist():
        j = native.where(frame=int(reduced.frame[i]), row=int(reduced.row[i]), col=int(reduced.col[i]), kind="video")
        assert len(j) == 1 and torch.equal(native.box[j[0]], reduced.box[i])
    assert torch.isnan(reduced.to_grid(torch.ones(len(reduced)), 0, frame=1)).any()  # the cells TTM dropped
