"""DyCoke: the temporal pruning (TTM) equals ``dycole_ttm`` transcribed from the official llava_arch.py,
including its quirks (variant="code"), and the paper variant does what the paper says; the decode-time
KV selection equals a no-cache recompute in which each generated token's query reads, from layer L on,
the keys the official rule selects at its step (eager attention of transformers' Llama, same weights)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from llava_next.config import LlavaNextConfig
from llava_next.model.attention import use_backend
from llava_next.model.generate import generate
from llava_next.reduce import DyCokeDecode, DyCokeMerge, Reduction, parse_method
from llava_next.reduce.engine import ReducedEngine
from test_reduce_fastv import LAYERS, hf_layers, layout, prompt
from test_decoder import hf_and_ours

CFG = LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")  # 144 pooled tokens per frame


@pytest.fixture(autouse=True)
def sdpa():
    with use_backend("sdpa"):
        yield


def dycole_ttm(image_feature, num_tokens_per_frame=196, merging_ratio=0.7):
    """llava/model/llava_arch.py of KD-TAO/DyCoke, as released (comments dropped)."""
    num_frames = image_feature.shape[0] // num_tokens_per_frame
    merging_ratio = 1 - merging_ratio
    similarities = []
    for i in range(0, num_frames - 1, 2):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 1) * num_tokens_per_frame: (i + 2) * num_tokens_per_frame]
        frame1_norm = torch.nn.functional.normalize(frame1_tokens, p=2, dim=1)
        frame2_norm = torch.nn.functional.normalize(frame2_tokens, p=2, dim=1)
        similarity = torch.nn.functional.cosine_similarity(frame1_norm, frame2_norm, dim=1)
        similarities.append(similarity)
    similarities = torch.stack([torch.tensor(similarity) for similarity in similarities])
    modified_image_feature = []
    for i in range(0, num_frames - 1, 2):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 1) * num_tokens_per_frame: (i + 2) * num_tokens_per_frame]
        avg_similarity = similarities[(i - 2) // 2]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices
        modified_image_feature.append(frame1_tokens)
        modified_image_feature.append(frame2_tokens[tokens_to_keep])
    odd_similarities = []
    for i in range(0, num_frames - 4, 4):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 2) * num_tokens_per_frame: (i + 3) * num_tokens_per_frame]
        similarity = torch.nn.functional.cosine_similarity(frame1_tokens, frame2_tokens, dim=1)
        odd_similarities.append(similarity)
    if odd_similarities:  # (the release stacks an empty list for < 5 frames and crashes)
        odd_similarities = torch.stack([torch.tensor(similarity) for similarity in odd_similarities])
    for i in range(0, num_frames - 4, 4):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 2) * num_tokens_per_frame: (i + 3) * num_tokens_per_frame]
        avg_similarity = odd_similarities[i // 4]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices
        modified_image_feature[i] = frame1_tokens
        modified_image_feature[i + 2] = frame2_tokens[tokens_to_keep]
    return torch.cat(modified_image_feature, dim=0)


def video_features(frames: int, seed: int = 0) -> torch.Tensor:
    """(F, 144, D) features with temporal correlation (each frame = the previous + noise)."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(144, 32, generator=g)]
    for _ in range(frames - 1):
        x.append(x[-1] + 0.7 * torch.randn(144, 32, generator=g))
    return torch.stack(x)


@pytest.mark.parametrize("frames", [2, 6, 8, 9, 16])
def test_ttm_equals_the_official_code(frames):
    feats = video_features(frames)
    with pytest.warns(UserWarning) if frames else nullcontext():  # torch.tensor(tensor) warns in the release
        ref = dycole_ttm(feats.reshape(-1, 32), 144, 0.7)
    out = DyCokeMerge(keep=0.3).reduce(feats, CFG)
    assert torch.equal(out.tokens, ref)
    assert DyCokeMerge(keep=0.3).num_tokens(frames, CFG) == ref.shape[0]


def test_ttm_paper_variant():
    feats = video_features(8, seed=1)
    out = DyCokeMerge(keep=0.25, variant="paper").reduce(feats, CFG)
    k = 36
    sizes = [144, k, k, k] * 2  # frames 1, 3 vs their pair; 2 vs 0; 0 whole; the tail group too
    assert torch.bincount(out.frame).tolist() == sizes
    f3 = out.patch[out.frame == 3]
    sim = torch.nn.functional.cosine_similarity(feats[2], feats[3], dim=1)
    assert f3.tolist() == sorted(sim.topk(k, largest=False).indices.tolist())  # spatial order, own pair
    assert torch.equal(out.tokens[out.frame == 3], feats[3][f3])


# ---- stage 2 --------------------------------------------------------------------------------------------
def reference_dycoke_decode(hf, e, vis, method: DyCokeDecode, n: int):
    """No cache: every step recomputes the whole sequence; from layer L on, the query of generated token s
    reads the keys selected at step s (the prompt's queries read everything, as in the prefill)."""
    L = method.layer
    T = e.shape[1]
    rows_visible = []  # per generated token: (S,) bool visible keys at its step
    out, logits, prev, chosen = [], [], None, None
    with torch.no_grad():
        for t in range(n + 1):
            ids = torch.tensor([out], dtype=torch.long)
            x = torch.cat([e, hf.model.embed_tokens(ids)], 1) if out else e
            S = x.shape[1]
            pos = torch.arange(S)[None]
            h = hf_layers(hf, x, pos, range(L - 1))
            if t > 0:  # the step's scores: eager attention of layer L-1, last query, mean heads
                layer = hf.model.layers[L - 1]
                causal = torch.full((S, S), float("-inf")).triu(1)[None, None]
                _, w = layer.self_attn(layer.input_layernorm(h), position_embeddings=hf.model.rotary_emb(h, pos),
                                       attention_mask=causal)
                s = w.mean(1)[0, -1][:T][vis[0]]
                visual_idx = torch.nonzero(vis[0]).flatten()
                similar = prev is not None and float(torch.nn.functional.cosine_similarity(s, prev, dim=0)) >= method.threshold
                prev = s
                visible = torch.ones(S, dtype=torch.bool)
                if not (similar and method.on_similar == "full"):
                    if not similar:
                        chosen = visual_idx[s.topk(int(len(visual_idx) * method.keep)).indices]
                    visible[visual_idx] = False
                    visible[chosen] = True
                rows_visible.append(visible)
            h = hf_layers(hf, h, pos, range(L - 1, L))
            mask = torch.full((S, S), float("-inf")).triu(1)
            for q, vis_row in zip(range(T, S), rows_visible):  # generated rows (the last one is this step's)
                mask[q, :len(vis_row)][~vis_row] = float("-inf")
            h = _layers_masked(hf, h, pos, range(L, LAYERS), mask[None, None])
            if t < n:
                logits.append(hf.lm_head(hf.model.norm(h[:, -1])))
                out.append(int(logits[-1].argmax()))
    return out, rows_visible, torch.cat(logits)


def _layers_masked(hf, x, pos, layers, mask):
    cos_sin = hf.model.rotary_emb(x, pos)
    for i in layers:
        x = hf.model.layers[i](x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    return x


@pytest.fixture(scope="module")
def models():
    return hf_and_ours("llama", 1.0, seed=5, num_layers=LAYERS, vocab_size=101)


@pytest.mark.parametrize("on_similar,threshold", [("full", 0.9), ("full", 0.0), ("reuse", 0.0)])  # 0.9: new pick every step here; 0.0: never
def test_decode_selection_equals_a_recompute_with_the_official_rule(models, on_similar, threshold):
    hf, ours = models
    e, vis = prompt(7, 5, 40, 6)
    method = DyCokeDecode(layer=2, keep=0.25, threshold=threshold, on_similar=on_similar)
    runner = ReducedEngine(Reduction(decode=method), layout(vis))
    seen = []
    decode = runner.decode
    runner.decode = lambda *a: seen.append(decode(*a)) or seen[-1]
    tokens = generate(ours, input_embeds=e, max_new_tokens=6, eos_token_id=(), engine=runner)
    ref, visible, ref_logits = reference_dycoke_decode(hf, e, vis, method, 6)
    assert tokens[0].tolist() == ref and len(set(ref)) > 1
    ours_logits, ref_logits = torch.cat(seen), ref_logits[1:]  # the decode steps' logits, not just the argmax
    assert (ours_logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    pruned_steps = sum(int(v.sum()) < len(v) for v in visible)
    assert pruned_steps >= 1  # the selection did fire (DyCoke issue #6: it silently never did)


def test_knobs():
    assert parse_method("dycoke:layer=3,keep=0.2,on_similar=reuse") == DyCokeDecode(3, 0.2, 0.9, "reuse")
    assert parse_method("dycoke-ttm:keep=0.3,variant=paper") == DyCokeMerge(0.3, "paper")
    assert DyCokeDecode().spec() == "dycoke:layer=3,keep=0.2,threshold=0.9,on_similar=full"
