"""FastV (llava_next.reduce.fastv) against references written from its official code, on transformers'
Llama (eager attention, same weights): the keep-set equals the top-k of the eager attention probabilities
of layer K-1 (last query; and the paper's all-queries variant); a pruned decode through the KV cache
equals a full no-cache recompute with the same kept tokens at their ORIGINAL positions (layers < K see
every token, layers >= K the kept ones); a left-padded batch equals each prompt alone; keep=1 is the
unreduced model."""

import pytest
import torch

from llava_next.model.attention import use_backend
from llava_next.model.generate import generate
from llava_next.reduce import FastV, Reduction, ReductionError, parse_method
from llava_next.reduce.engine import ReducedEngine
from llava_next.reduce.stages import VisualLayout
from test_decoder import hf_and_ours

LAYERS, K, N = 4, 2, 8


@pytest.fixture(autouse=True)
def sdpa():
    with use_backend("sdpa"):  # no one-time decode-attention compile (~20 s) for these small tests
        yield


@pytest.fixture(scope="module")
def models():
    return hf_and_ours("llama", 2.0, seed=3, num_layers=LAYERS, vocab_size=101)


def prompt(seed: int, before: int, visual: int, after: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T, C) embeddings: text, a 'visual' span of random features, text; and the (1, T) visual mask."""
    g = torch.Generator().manual_seed(seed)
    T = before + visual + after
    e = 0.02 * torch.randn(1, T, 64, generator=g)
    e[:, before:before + visual] *= 3  # visual features on another scale, as real ones are
    vis = torch.zeros(1, T, dtype=torch.bool)
    vis[:, before:before + visual] = True
    return e, vis


def layout(vis: torch.Tensor) -> VisualLayout:
    return VisualLayout(vis, torch.full(vis.shape, -1), torch.full(vis.shape, -1))


def hf_layers(hf, x, pos, layers):
    """transformers' decoder layers, no cache, causal eager attention over exactly the rows given."""
    S = x.shape[1]
    mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
    cos_sin = hf.model.rotary_emb(x, pos)
    for i in layers:
        x = hf.model.layers[i](x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    return x


def reference_keep(hf, e, vis, keep, score="last_query"):
    """The official selection on eager attention probabilities (modeling_llama.py L740-752)."""
    with torch.no_grad():
        attn = hf.model(inputs_embeds=e, output_attentions=True).attentions[K - 1][0]  # (H, T, T)
    if score == "last_query":
        s = attn.mean(0)[-1]
    else:  # mass received from every query / number of queries that can see the key
        T = attn.shape[-1]
        s = (attn.sum(1) / torch.arange(T, 0, -1)).mean(0)
    v = torch.nonzero(vis[0]).flatten()
    top = v[s[v].topk(int(len(v) * keep)).indices]
    return torch.cat([torch.nonzero(~vis[0]).flatten(), top]).sort().values


def reference_decode(hf, e, keep_idx, n):
    """Greedy tokens with FastV's fixed keep-set, recomputed from scratch at every step (no KV cache)."""
    T = e.shape[1]
    out, logits = [], []
    with torch.no_grad():
        for t in range(n):
            x = torch.cat([e, hf.model.embed_tokens(torch.tensor([out], dtype=torch.long))], 1) if out else e
            pos = torch.arange(T + t)[None]
            h = hf_layers(hf, x, pos, range(K))
            rows = torch.cat([keep_idx, torch.arange(T, T + t)])
            h = hf_layers(hf, h[:, rows], pos[:, rows], range(K, LAYERS))  # original positions: gaps
            logits.append(hf.lm_head(hf.model.norm(h[:, -1])))
            out.append(int(logits[-1].argmax()))
    return out, torch.cat(logits)


def run(ours, e, vis, method, mask=None, n=N):
    runner = ReducedEngine(Reduction(pruner=method), layout(vis))
    runner.logits = []
    prefill, decode = runner.prefill, runner.decode
    runner.prefill = lambda *a: runner.logits.append(prefill(*a)) or runner.logits[-1]
    runner.decode = lambda *a: runner.logits.append(decode(*a)) or runner.logits[-1]
    tokens = generate(ours, input_embeds=e, attention_mask=mask, max_new_tokens=n, eos_token_id=(), engine=runner)
    return tokens, runner


@pytest.mark.parametrize("score", ["last_query", "all_queries"])
def test_keep_set_is_the_top_of_eager_attention(models, score):
    hf, ours = models
    e, vis = prompt(1, 5, 40, 7)
    _, runner = run(ours, e, vis, FastV(layer=K, keep=0.5, score=score), n=1)
    ref = reference_keep(hf, e, vis, 0.5, score)
    assert runner.report.kept_positions[0] == ref[vis[0][ref]].tolist()
    assert runner.report.visual_after == [20] and runner.report.visual_before == [40]


def test_score_variants_differ(models):
    _, ours = models
    e, vis = prompt(1, 5, 40, 7)
    a = run(ours, e, vis, FastV(layer=K, keep=0.25), n=1)[1].report.kept_positions
    b = run(ours, e, vis, FastV(layer=K, keep=0.25, score="all_queries"), n=1)[1].report.kept_positions
    assert a != b


def test_pruned_decode_equals_full_recompute_with_the_same_kept_tokens(models):
    hf, ours = models
    e, vis = prompt(2, 6, 48, 9)
    tokens, runner = run(ours, e, vis, FastV(layer=K, keep=0.5))
    keep_idx = reference_keep(hf, e, vis, 0.5)
    ref, ref_logits = reference_decode(hf, e, keep_idx, N)
    assert len(set(ref)) > 2  # a real sequence
    assert tokens[0].tolist() == ref
    ours_logits = torch.cat(runner.logits)  # every step's logits, not just the argmax
    assert (ours_logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()


def test_layers_after_the_pruner_hold_only_the_kept_tokens(models):
    """KV memory: layers < K keep T + n slots, layers >= K only T' + n (T' = kept rows), sized after pruning;
    the decode equals the recompute above with these caches (the test before this one)."""
    _, ours = models
    e, vis = prompt(2, 6, 48, 9)
    T = e.shape[1]
    ours.setup_caches(1, 4 * T)  # a longer cache left by an earlier request is not kept for layers >= K
    tokens, runner = run(ours, e, vis, FastV(layer=K, keep=0.5))
    kept = T - 48 + 24
    lengths = [layer.self_attn.kv_cache.k.shape[2] for layer in ours.layers]
    assert lengths[K:] == [kept + N] * (LAYERS - K)
    assert all(n >= T + N for n in lengths[:K])
    tokens2, _ = run(ours, e, vis, FastV(layer=K, keep=0.5))  # the next request resizes them again
    assert torch.equal(tokens, tokens2)


def test_renumbered_positions_would_change_the_answer(models):
    """Guards the reference: closing the gaps (positions 0..T'-1) gives other logits."""
    hf, _ = models
    e, vis = prompt(2, 6, 48, 9)
    keep_idx = reference_keep(hf, e, vis, 0.5)
    with torch.no_grad():
        h = hf_layers(hf, e, torch.arange(e.shape[1])[None], range(K))
        a = hf_layers(hf, h[:, keep_idx], keep_idx[None], range(K, LAYERS))
        b = hf_layers(hf, h[:, keep_idx], torch.arange(len(keep_idx))[None], range(K, LAYERS))
    assert (a - b).abs().max() > 1e-3


def test_batch_of_different_lengths_equals_each_prompt_alone(models):
    _, ours = models
    rows = [prompt(3, 5, 40, 7), prompt(4, 9, 24, 3), prompt(5, 2, 33, 12)]
    T = max(e.shape[1] for e, _ in rows)
    batch = torch.zeros(len(rows), T, 64)
    vis = torch.zeros(len(rows), T, dtype=torch.bool)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (e, v) in enumerate(rows):
        batch[i, T - e.shape[1]:], vis[i, T - e.shape[1]:], mask[i, T - e.shape[1]:] = e[0], v[0], True
    method = FastV(layer=K, keep=0.5)
    tokens, runner = run(ours, batch, vis, method, mask, n=4)
    for i, (e, v) in enumerate(rows):
        alone, r1 = run(ours, e, v, method, n=4)
        assert tokens[i].tolist() == alone[0].tolist()
        assert runner.report.kept_positions[i] == r1.report.kept_positions[0]


def test_keep_everything_is_the_unreduced_model(models):
    _, ours = models
    e, vis = prompt(6, 5, 30, 6)
    tokens, _ = run(ours, e, vis, FastV(layer=K, keep=1.0))
    assert torch.equal(tokens, generate(ours, input_embeds=e, max_new_tokens=N, eos_token_id=()))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ReductionError, match="keep is the fraction"):
        FastV(keep=1.5)
    with pytest.raises(ReductionError, match="layer must be an integer >= 1"):
        FastV(layer=0)
    with pytest.raises(ReductionError, match="unknown reduction method 'fastvv'; the methods are: .*fastv"):
        parse_method("fastvv:keep=0.5")
    with pytest.raises(ReductionError, match="fastv has no knob 'ratio'; its knobs: layer, keep, score"):
        parse_method("fastv:ratio=0.5")
    with pytest.raises(ReductionError, match="score='mean' is not one of last_query, all_queries"):
        parse_method("fastv:score=mean")
    assert parse_method("fastv:layer=3,keep=0.25") == FastV(layer=3, keep=0.25)
