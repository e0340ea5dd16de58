"""Attention statistics without T x T (llava_next.research.attention) against transformers' eager attention.

Parity: on tiny LLaVA-NeXT (Mistral decoder, GQA, a real photo through AnyRes) and LLaVA-NeXT-Video (Llama
decoder, 4 frames of the real test video) checkpoints, the rows ``trace`` records for chosen queries equal
transformers' ``output_attentions`` (fp32, eager) within 1e-5 absolute, on every decoder layer, per head
and head-averaged; key mass, entropy, top-k, per-segment sums and the all-query segment map equal the
same reductions of transformers' full maps; rows recorded at decode steps equal transformers' rows of the
whole sequence. Memory: no operation of the chunked path makes a tensor larger than heads x chunk x T.
The Triton key-mass kernel (under the interpreter) equals the PyTorch path.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from research_models import tiny_pair
from llava_next.model import engines
from llava_next.model.attention import one_query_attention
from llava_next.model.generate import generate
from llava_next.research import Attention, Record, attention_rows, attention_stats, fastv_score, trace
from llava_next.research.attention import key_mass_triton

pytest.importorskip("transformers")
ATOL = 1e-5


class Segments:
    """A selector-like object (what research.provenance passes): resolve(provenance) -> LongTensor."""

    def __init__(self, ids):
        self.ids = ids

    def resolve(self, provenance):
        assert provenance == "prov"
        return self.ids


@pytest.fixture(scope="module", params=["image", "video"])
def pair(request):
    ours, hf, ids, mine, theirs = tiny_pair(request.param)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_attentions=True, **theirs).attentions  # per layer (1, H, T, T)
    return ours, ids, mine, [a.float() for a in ref]


def test_rows_match_transformers_eager(pair):
    ours, ids, mine, ref = pair
    T = ids.shape[1]
    visual = (ids[0] >= 128).nonzero()[:, 0]
    queries = torch.cat([visual[:3], visual[-2:], torch.tensor([T - 3, T - 1])])  # image and text queries
    seen = {}

    def tl_style(pattern, hook):  # TransformerLens code reading hook_pattern, unchanged
        seen[hook.layer()] = pattern

    with torch.no_grad(), trace(ours, attention=Attention(queries=queries, rows=True),
                                record=[Record("blocks.*.attn.hook_pattern", positions=queries)],
                                hooks=[("blocks.0.attn.hook_pattern", tl_style)]) as tr:
        ours(ids, **mine)
    assert sorted(tr.attention) == list(range(len(ref)))
    assert (seen[0] - ref[0]).abs().max() <= ATOL  # the whole (1, H, T, T) pattern
    for layer in range(len(ref)):  # virtual hook_pattern records: only the chosen rows (TL's pos_slice)
        assert (tr[f"blocks.{layer}.attn.hook_pattern"] - ref[layer][:, :, queries]).abs().max() <= ATOL
    for layer, stats in tr.attention.items():
        want = ref[layer][:, :, queries]  # (1, H, |Q|, T)
        assert stats.rows.shape == want.shape
        assert (stats.rows - want).abs().max() <= ATOL, f"layer {layer} per head"
        assert (stats.mean_heads().rows - want.mean(1)).abs().max() <= ATOL, f"layer {layer} head mean"
        assert stats.query_positions.tolist() == queries.tolist()


def test_reductions_match_transformers_eager(pair):
    ours, ids, mine, ref = pair
    T = ids.shape[1]
    frames = torch.arange(T) // 37  # arbitrary segments (provenance passes frames / tiles)
    group = torch.tensor([3, 10, T - 2, T - 1])
    spec = Attention(queries=group, rows=False, key_mass=True, entropy=True, topk=4, segments=Segments(frames),
                     segment_map=True)
    with torch.no_grad(), trace(ours, attention=spec, provenance="prov") as tr:
        ours(ids, **mine)
    S = int(frames.max()) + 1
    for layer, stats in tr.attention.items():
        full = ref[layer]  # (1, H, T, T)
        rows = full[:, :, group]
        assert stats.rows is None
        assert (stats.key_mass - rows.sum(2)).abs().max() <= ATOL
        ent = -(rows * rows.clamp_min(1e-30).log()).sum(-1)
        assert (stats.entropy - ent).abs().max() <= 1e-4
        assert (stats.topk_values - rows.topk(4, -1).values).abs().max() <= ATOL
        per_seg = torch.zeros(*rows.shape[:3], S).index_add_(-1, frames, rows)
        assert (stats.segment_rows - per_seg).abs().max() <= ATOL
        smap = torch.zeros(1, full.shape[1], S, S)
        smap.index_add_(2, frames, torch.zeros(*full.shape[:3], S).index_add_(-1, frames, full))
        assert (stats.segment_map - smap).abs().max() <= 1e-4
        assert stats.segment_counts.tolist() == torch.bincount(frames).tolist()


def test_segments_with_unsegmented_positions_match_transformers_eager(pair):
    """segments=prov.frame (issue 22.8): text positions carry -1 there; such keys and queries belong to no
    segment (left out of segment_rows / segment_map / counts), the others are summed as usual."""
    ours, ids, mine, ref = pair
    T = ids.shape[1]
    frames = torch.arange(T) // max(2, T // 6)
    mid = T // 2
    frames[:3] = -1  # text before the media, and a run in between
    frames[mid - 2:mid + 3] = -1
    group = torch.tensor([1, mid - 4, mid, T - 1])
    spec = Attention(queries=group, rows=False, segments=frames, segment_map=True)
    with torch.no_grad(), trace(ours, attention=spec) as tr:
        ours(ids, **mine)
    S = int(frames.max()) + 1
    seg, keep = frames.clamp(min=0), (frames >= 0).float()
    for layer, stats in tr.attention.items():
        full = ref[layer] * keep  # (1, H, T, T), keys of no segment zeroed
        per_seg = torch.zeros(*full.shape[:3], S).index_add_(-1, seg, full)  # (1, H, T, S)
        assert (stats.segment_rows - per_seg[:, :, group]).abs().max() <= ATOL
        valid = frames >= 0
        smap = torch.zeros(1, full.shape[1], S, S).index_add_(2, frames[valid], per_seg[:, :, valid])
        assert (stats.segment_map - smap).abs().max() <= 1e-4
        assert stats.segment_counts.tolist() == torch.bincount(frames[valid], minlength=S).tolist()


def test_block_map_and_all_queries(pair):
    ours, ids, mine, ref = pair
    T = ids.shape[1]
    with torch.no_grad(), trace(ours, attention=Attention(layers=[-1], queries="all", rows=True, block=16,
                                                            heads="mean", chunk=7)) as tr:
        ours(ids, **mine)
    (layer, stats), = tr.attention.items()
    full = ref[layer].mean(1)  # (1, T, T)
    assert (stats.rows - full).abs().max() <= ATOL
    nb = -(-T // 16)
    blocks = torch.arange(T) // 16
    want = torch.zeros(1, nb, nb).index_add_(1, blocks, torch.zeros(1, T, nb).index_add_(-1, blocks, full))
    assert (stats.segment_map - want).abs().max() <= 1e-4


def test_decode_step_rows_match_transformers(pair, monkeypatch):
    """Rows recorded during generation (one query per step against the KV cache) = transformers' rows of the
    whole sequence at the generated positions. (Decode attention runs uncompiled here: compiling costs seconds
    and is what test_engines.py checks; the routing under a trace is checked in test_trace.py.)"""
    monkeypatch.setattr(engines, "_compiled_one_query", lambda: one_query_attention)
    ours, ids, mine, _ = pair
    _, hf, _, _, theirs = tiny_pair("image" if "images" in mine else "video")
    with torch.no_grad():
        embeds = ours.embed(ids, ours.image_features(mine.get("images", ())),
                            [ours.video_features(v) for v in mine.get("videos", ())])
        with trace(ours, attention=Attention(queries="last", rows=True)) as tr:
            new = generate(ours.language_model, input_embeds=embeds, max_new_tokens=3, eos_token_id=())
        full_ids = torch.cat([ids, new[:, :-1]], dim=1)
        ref = hf(input_ids=full_ids, output_attentions=True, **theirs).attentions
    T = ids.shape[1]
    assert [s.offset for s in tr.steps] == [0, T, T + 1]
    for s, step in enumerate(tr.steps):
        for layer, stats in step.attention.items():
            want = ref[layer][:, :, T - 1 + s, :T + s].float()
            assert (stats.rows[:, :, 0] - want).abs().max() <= ATOL, f"step {s} layer {layer}"


def test_fastv_score_inside_a_forward(pair):
    """The recipe in fastv_score's docstring: layer K-1's hook points give the score before layer K runs."""
    ours, ids, mine, ref = pair
    K = 1
    got = {}

    def keep_q(q, hook):
        got["q"] = q

    def score_from_k(k, hook):
        got["score"] = fastv_score(got["q"].transpose(1, 2), k.transpose(1, 2))

    with torch.no_grad(), trace(ours, hooks=[(f"blocks.{K}.attn.hook_rot_q", keep_q),
                                            (f"blocks.{K}.attn.hook_rot_k", score_from_k)]):
        ours(ids, **mine)
    assert (got["score"] - ref[K][:, :, -1].mean(1)).abs().max() <= ATOL


def test_fastv_score_one_liner():
    """attention_rows(q, k, -1).mean(1): the last query's head-mean row, as FastV ranks image tokens."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 8, 50, 16, generator=g), torch.randn(1, 2, 50, 16, generator=g)
    probs = torch.softmax((q @ k.repeat_interleave(4, 1).transpose(-1, -2)) / 4 +
                          torch.full((50, 50), float("-inf")).triu(1), -1)
    score = attention_rows(q, k, -1).mean(1)[:, 0]  # (B, T)
    assert (score - probs[:, :, -1].mean(1)).abs().max() <= 1e-6
    assert torch.equal(fastv_score(q, k), score)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_bounded_by_heads_x_chunk_x_T():
    B, Hq, Hkv, T, D, chunk = 1, 8, 2, 256, 8, 16
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    segments = torch.arange(T) // 40
    with LargestTensor() as mode:
        attention_stats(q, k, None, key_mass=True, entropy=True, segments=segments, segment_map=True, chunk=chunk)
    assert mode.largest <= B * Hq * chunk * T < Hq * T * T // 10
    with LargestTensor() as dense:  # the probe sees a T x T computation
        torch.softmax(q @ k.repeat_interleave(4, 1).transpose(-1, -2), -1)
    assert dense.largest >= Hq * T * T


@pytest.mark.parametrize("queries, padded", [(None, False), ([5, 17, 39], True)])
def test_triton_key_mass_matches_cpu_path(queries, padded):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 4, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    key_mask = torch.ones(1, 40, dtype=torch.bool)
    if padded:
        key_mask[:, :3] = False
    want = attention_stats(q, k, queries, key_mask=key_mask, key_mass=True).key_mass
    got = key_mass_triton(q, k, v, queries, key_mask=key_mask, chunk=16)
    assert (got - want).abs().max() <= 1e-5


def test_left_padded_batch_rows_match_transformers():
    """Two text prompts of different lengths, left padded: the padded keys get no mass (key_mask) and each
    row's last-query attention equals transformers' with the same attention_mask."""
    ours, hf, _, _, _ = tiny_pair("video")
    rows = [[1, 5, 17, 33, 7, 9, 21, 40, 41, 42], [1, 8, 9, 10, 11, 12]]
    T = max(map(len, rows))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, T - len(row):] = torch.tensor(row)
        mask[r, T - len(row):] = True
    with torch.no_grad():
        with trace(ours, attention=Attention(queries=[T - 2, T - 1], rows=True, key_mass=True)) as tr:
            ours(ids, attention_mask=mask)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ref = hf(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids, output_attentions=True).attentions
    for layer, stats in tr.attention.items():
        want = ref[layer][:, :, T - 2:].float()
        assert (stats.rows - want).abs().max() <= ATOL
        assert stats.key_mass[1, :, :T - len(rows[1])].abs().max() == 0
