"""FrameFusion against its official FrameFusion class (framefusion/main.py @ fbec1d2, transcribed below,
batch 1) driven through transformers' Llama layers the way its modeling_qwen2.py calls it (layer 0 before
attention; after every layer's attention + residual, before the MLP; eager attention weights of the
last query): the same first-token logits, the same surviving positions; a batch equals each prompt
alone; the budget's layer count is an option (the code hard-codes 28)."""

from __future__ import annotations

import pytest
import torch

from llava_next.model.attention import use_backend
from llava_next.model.generate import generate
from llava_next.reduce import FrameFusion, Reduction, ReductionError
from llava_next.reduce.framefusion import pruning_ratio
from llava_next.reduce.engine import ReducedEngine
from llava_next.reduce.stages import VisualLayout
from test_decoder import hf_and_ours

LAYERS, FRAMES, PATCHES = 6, 6, 8
TEXT_TOKEN, IGNORE_TOKEN = -1, -2


@pytest.fixture(autouse=True)
def sdpa():
    with use_backend("sdpa"):
        yield


# ---- framefusion/main.py, as released (bsz 1), with num_layers a parameter ---------------------------------
def cosine_similarity(mat1, mat2):
    dot_product = torch.sum(mat1 * mat2, dim=-1)
    return dot_product / (torch.norm(mat1, dim=-1) * torch.norm(mat2, dim=-1))


def find_contigious_latter_index(index_tensor):
    bsz, n = index_tensor.shape
    t_prev = torch.cat([torch.zeros((bsz, 1), dtype=index_tensor.dtype), index_tensor[:, :-1]], dim=1)
    t_next = torch.cat([index_tensor[:, 1:], torch.zeros((bsz, 1), dtype=index_tensor.dtype)], dim=1)
    run_starts = (index_tensor == 1) & (t_prev == 0)
    run_ends = (index_tensor == 1) & (t_next == 0)
    start_indices = torch.nonzero(run_starts, as_tuple=True)
    end_indices = torch.nonzero(run_ends, as_tuple=True)
    run_lengths = (end_indices[1] - start_indices[1] + 1).to(index_tensor.dtype)
    output = torch.zeros_like(index_tensor, dtype=index_tensor.dtype)
    output[end_indices[0], end_indices[1]] = run_lengths
    return output


class OfficialFrameFusion:
    def __init__(self, cost, similarity_lower_bound, ratio_lower_bound, num_layers):
        self.cost, self.similarity_lower_bound, self.ratio_lower_bound = cost, similarity_lower_bound, ratio_lower_bound
        self.num_layers = num_layers

    def prepare(self, patch_type, patch_num, image_token_start_index, image_token_length, original_length):
        self.patch_type, self.patch_num = patch_type, patch_num
        self.image_token_start_index, self.image_token_length = image_token_start_index, image_token_length
        self.original_length = original_length
        self.finish_merging = self.finish_pruning = False
        self.sparsity_list = []
        self.orig = torch.arange(original_length)  # (test only) original index of every alive token

    def forward(self, hidden_states, position_embeddings, attention_mask, self_attn_weights=None):
        bsz, q_len, hidden_size = hidden_states.size()
        if q_len > 1 and self.finish_merging and not self.finish_pruning:
            start = int(self.image_token_start_index)
            length = int(self.image_token_length - (self.original_length - q_len))
            avg = torch.mean(self_attn_weights, dim=(1, 2))[0]
            avg_image = avg[start:start + length]
            pruning_ratio_ = self._compute_pruning_ratio(self.sparsity_list, self.cost)
            top = avg_image.topk(round(length * (1 - pruning_ratio_))).indices + start
            keep_indexs = torch.cat((torch.arange(start), top, torch.arange(start + length, q_len))).sort().values
            hidden_states = hidden_states[:, keep_indexs, :]
            position_embeddings = [p[:, keep_indexs, :] for p in position_embeddings]
            self.orig = self.orig[keep_indexs]
            if attention_mask is not None:
                attention_mask = attention_mask[:, :, keep_indexs, :][:, :, :, keep_indexs]
            self.finish_pruning = True
        if q_len > 1 and not self.finish_merging:
            sparsity_upper_bound = self._compute_pruning_ratio(self.sparsity_list, self.cost)
            similarity_by_patch, token_index_by_patch = self.compute_similarity_and_token_index_by_patch(
                hidden_states, self.patch_type, self.patch_num)
            frame_token_num = torch.sum(self.patch_type != TEXT_TOKEN).item()
            merge_index_by_patch = torch.where(similarity_by_patch >= self.similarity_lower_bound)[1]
            above_k_ratio = merge_index_by_patch.shape[0] / frame_token_num
            if above_k_ratio < sparsity_upper_bound:
                self.sparsity_list.append(above_k_ratio)
                if above_k_ratio < self.ratio_lower_bound:
                    self.finish_merging = True
            else:
                topk_values, topk_indices = torch.topk(similarity_by_patch, int(sparsity_upper_bound * frame_token_num))
                topk_indices, _ = torch.sort(topk_indices)
                merge_index_by_patch = topk_indices[0]
                self.finish_merging = True
                self.finish_pruning = True
            hidden_states, token_mask = self.merge_tokens_and_get_mask(hidden_states, similarity_by_patch,
                                                                       token_index_by_patch, merge_index_by_patch)
            self.patch_type = self.patch_type[token_mask].reshape(bsz, -1)
            hidden_states = hidden_states[token_mask, :].reshape(bsz, -1, hidden_size)
            position_embeddings = [p[:, token_mask[0], :] for p in position_embeddings]
            self.orig = self.orig[token_mask[0]]
            if attention_mask is not None:
                attention_mask = attention_mask[:, :, token_mask[0], :][:, :, :, token_mask[0]]
        return hidden_states, position_embeddings, attention_mask

    @staticmethod
    def compute_similarity_and_token_index_by_patch(hidden_states, token_patch_type, patch_num):
        bsz = hidden_states.shape[0]
        token_patch_type_by_patch, token_index_by_patch = torch.where(
            token_patch_type == torch.arange(patch_num)[:, None])
        token_patch_type_by_patch = token_patch_type_by_patch[None, :]
        token_index_by_patch = token_index_by_patch[None, :]
        similarity_by_patch = cosine_similarity(hidden_states[torch.arange(bsz), token_index_by_patch[:, :-1], :],
                                                hidden_states[torch.arange(bsz), token_index_by_patch[:, 1:], :])
        similarity_by_patch[token_patch_type_by_patch[:, :-1] != token_patch_type_by_patch[:, 1:]] = -2
        similarity_by_patch = torch.cat((torch.full((bsz, 1), IGNORE_TOKEN, dtype=hidden_states.dtype),
                                         similarity_by_patch), dim=1)
        return similarity_by_patch, token_index_by_patch

    @staticmethod
    def merge_tokens_and_get_mask(hidden_states, similarity_by_patch, token_index_by_patch, merge_index_by_patch):
        if merge_index_by_patch.shape[0] == 0:
            return hidden_states, torch.ones(hidden_states.shape[:-1], dtype=torch.bool)
        bsz = hidden_states.shape[0]
        bsz_index = torch.arange(bsz)[:, None]
        merge_mask_by_patch = torch.zeros(bsz, similarity_by_patch.shape[1], dtype=hidden_states.dtype)
        merge_mask_by_patch[bsz_index, merge_index_by_patch] = 1
        last_merge_token_by_patch = find_contigious_latter_index(merge_mask_by_patch)
        keep_mask = torch.ones(hidden_states.shape[:-1], dtype=torch.bool)
        keep_mask[bsz_index, token_index_by_patch[bsz_index, merge_index_by_patch]] = False
        unique_merge_nums = torch.sort(torch.unique(last_merge_token_by_patch.to(torch.long))).values
        unique_merge_nums = unique_merge_nums[1:] if (unique_merge_nums[0] == 0).item() else unique_merge_nums
        merge_num_indices, token_merge_index_in_patch = torch.where(last_merge_token_by_patch == unique_merge_nums[:, None])
        merge_nums = unique_merge_nums[merge_num_indices]
        token_merge_start_index_in_patch = token_merge_index_in_patch - merge_nums
        token_merge_member_start_index_in_patch = torch.repeat_interleave(token_merge_start_index_in_patch, merge_nums)
        merge_member_length = torch.sum(merge_nums)
        merge_member_contigious_sequence = torch.arange(1, merge_member_length + 1)
        merge_nums_cumulative_counts = torch.cumsum(merge_nums, dim=0)
        merge_nums_start = torch.cat((torch.tensor([0]), merge_nums_cumulative_counts[:-1]))
        contigious_sequence_by_merge_nums = merge_member_contigious_sequence - torch.repeat_interleave(merge_nums_start, merge_nums)
        token_merge_member_index_in_patch = token_merge_member_start_index_in_patch + contigious_sequence_by_merge_nums
        hidden_states.index_add_(dim=1, index=token_index_by_patch[0, token_merge_member_start_index_in_patch],
                                 source=hidden_states[bsz_index, token_index_by_patch[bsz_index, token_merge_member_index_in_patch]])
        hidden_states[bsz_index, token_index_by_patch[bsz_index, token_merge_start_index_in_patch]] /= (merge_nums[None, :, None] + 1)
        return hidden_states, keep_mask

    def _compute_pruning_ratio(self, sparsity_list, cost):
        num_layers = self.num_layers
        s, total = 1, 0
        for x in sparsity_list:
            s *= (1 - x)
            total += s
        remain = num_layers * cost - total
        if remain < 0:
            raise ValueError("The cost is too small")
        if remain / ((num_layers - len(sparsity_list)) * s) > 1:
            return 0
        return 1 - (remain / ((num_layers - len(sparsity_list)) * s))


def video_prompt(seed: int, before: int, after: int, drift: float):
    """Text, FRAMES x PATCHES video tokens (each frame = the previous + drift noise), text."""
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(PATCHES, 64, generator=g)]
    for _ in range(FRAMES - 1):
        frames.append(frames[-1] + drift * torch.randn(PATCHES, 64, generator=g))
    video = 0.05 * torch.cat(frames)
    e = torch.cat([0.02 * torch.randn(before, 64, generator=g), video, 0.02 * torch.randn(after, 64, generator=g)])[None]
    T = e.shape[1]
    frame = torch.full((1, T), -1)
    patch = torch.full((1, T), -1)
    frame[0, before:before + FRAMES * PATCHES] = torch.arange(FRAMES).repeat_interleave(PATCHES)
    patch[0, before:before + FRAMES * PATCHES] = torch.arange(PATCHES).repeat(FRAMES)
    return e, VisualLayout(frame >= 0, frame, patch), before


def official_run(hf, e, layout, start, method):
    T = e.shape[1]
    ff = OfficialFrameFusion(method.cost, method.similarity, method.ratio_floor, method.layers_in_budget or LAYERS)
    ff.prepare(layout.patch.clone(), PATCHES, start, FRAMES * PATCHES, T)
    pos = torch.arange(T)[None]
    pe = list(hf.model.rotary_emb(e, pos))
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        x, pe, mask = ff.forward(e.clone(), pe, mask)
        for layer in hf.model.layers:
            res = x
            out, w = layer.self_attn(layer.input_layernorm(x), position_embeddings=tuple(pe), attention_mask=mask)
            x = res + out
            x, pe, mask = ff.forward(x, pe, mask, w[:, :, -1:])  # utils.py: the last query only
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = hf.lm_head(hf.model.norm(x[:, -1]))
    return logits, ff


@pytest.fixture(scope="module")
def models():
    return hf_and_ours("llama", 1.0, seed=11, num_layers=LAYERS, vocab_size=101)


@pytest.mark.parametrize("drift,similarity,cost,layers,steps", [
    (0.8, 0.9, 0.3, 0, 2),   # two merge steps (layer 0 before and after attention), then the prune
    (0.5, 0.95, 0.5, 0, 1),  # one small merge, prune after layer 0's attention
    (0.3, 0.8, 0.3, 0, 0),   # enough similar tokens at once: the budget's top-k merge ends both
    (0.8, 0.9, 0.3, 28, 2),  # the official hard-coded 28-layer budget
])
def test_matches_the_official_class(models, drift, similarity, cost, layers, steps):
    hf, ours = models
    e, layout, start = video_prompt(1, 5, 7, drift)
    method = FrameFusion(cost=cost, similarity=similarity, layers_in_budget=layers)
    ref_logits, ff = official_run(hf, e, layout, start, method)
    assert len(ff.sparsity_list) == steps
    runner = ReducedEngine(Reduction(pruner=method), layout)
    ours.setup_caches(1, e.shape[1] + 8)
    logits = runner.prefill(ours, e, torch.arange(e.shape[1])[None], None)
    assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    vis = ff.orig[(ff.orig >= start) & (ff.orig < start + FRAMES * PATCHES)]
    assert runner.report.kept_positions[0] == vis.tolist()
    assert len(vis) < FRAMES * PATCHES  # something was merged or pruned


def test_batch_equals_each_prompt_alone(models):
    _, ours = models
    rows = [video_prompt(2, 5, 7, 0.3), video_prompt(3, 9, 3, 0.8), video_prompt(4, 2, 4, 0.5)]  # rows stop merging at different layers
    T = max(e.shape[1] for e, _, _ in rows)
    batch = torch.zeros(3, T, 64)
    frame, patch = torch.full((3, T), -1), torch.full((3, T), -1)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, (e, lay, _) in enumerate(rows):
        n = e.shape[1]
        batch[i, T - n:], frame[i, T - n:], patch[i, T - n:], mask[i, T - n:] = e[0], lay.frame[0], lay.patch[0], True
    method = FrameFusion(similarity=0.9)
    runner = ReducedEngine(Reduction(pruner=method), VisualLayout(frame >= 0, frame, patch))
    out = generate(ours, input_embeds=batch, attention_mask=mask, max_new_tokens=4, eos_token_id=(), engine=runner)
    for i, (e, lay, _) in enumerate(rows):
        alone = ReducedEngine(Reduction(pruner=method), lay)
        assert out[i].tolist() == generate(ours, input_embeds=e, max_new_tokens=4, eos_token_id=(), engine=alone)[0].tolist()
        assert runner.report.kept_positions[i] == alone.report.kept_positions[0]


def test_budget_layer_count_is_an_option():
    assert pruning_ratio([0.2], 0.3, 28) != pruning_ratio([0.2], 0.3, 32)
    assert pruning_ratio([], 0.3, 28) == pytest.approx(0.7)
    with pytest.raises(ReductionError, match="too small"):
        pruning_ratio([0.0, 0.0], 0.01, 28)
    assert FrameFusion(layers_in_budget=28).spec() == "framefusion:cost=0.3,similarity=0.6,ratio_floor=0.1,layers_in_budget=28"
