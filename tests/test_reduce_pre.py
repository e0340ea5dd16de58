"""Pre-decoder token reducers (PLLaVA pooling, SlowFast) against their official code transcribed onto
transformers' tower and projector (same tiny checkpoint), their token counts at the real shapes, and the
whole pipeline with reduction on the real test video: `run --json`-style report, batch equals alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
from einops import rearrange
from torch import nn

from checkpoints import make_runnable_checkpoint
from media import real_video
from llava_next.config import LlavaNextConfig
from llava_next.inputs.video import load_video
from llava_next.model.attention import use_backend
from llava_next.reduce import PLLaVAPool, ReductionError, SlowFast, parse_reduction
from llava_next.runtime.pipeline import Pipeline

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def sdpa():
    with use_backend("sdpa"):
        yield


@pytest.fixture(scope="module")
def runnable(tmp_path_factory):
    root = tmp_path_factory.mktemp("reduce")
    directory, hf = make_runnable_checkpoint(root / "LLaVA-NeXT-Video-tiny", kind="video")
    hf.set_attn_implementation("eager")
    pipe = Pipeline.from_pretrained(directory, cache_dir=root / "cache", progress=False)
    return hf, pipe, directory, root / "cache"


@pytest.fixture(scope="module")
def clip(runnable):
    return load_video(real_video(), 6, size=runnable[1].config.tile_size)


def hf_projected(hf, pixels: torch.Tensor) -> torch.Tensor:
    """transformers: tower hidden state -2 without CLS, then the projector: (F, H*W, D)."""
    with torch.no_grad():
        h = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        return hf.model.multi_modal_projector(h)


def official_pllava(hidden_states: torch.Tensor, num_frames: int, pooling_shape, frame_shape) -> torch.Tensor:
    """PllavaMultiModalProjector.forward after the projector (modeling_pllava.py), one video."""
    total_frames = hidden_states.shape[0]
    if total_frames < num_frames:
        multiplier = int(num_frames / total_frames) + 1
        hidden_states = hidden_states.repeat_interleave(multiplier, dim=0)[:num_frames]
    v = rearrange(hidden_states, "(n f) (h w) d -> n d f h w", n=1, h=frame_shape[0])
    v = nn.AdaptiveAvgPool3d(pooling_shape)(v)
    return rearrange(v, "n d f h w -> n (f h w) d")[0]


def official_slowfast(image_features: torch.Tensor, num_slowpath: int, fast_hw) -> torch.Tensor:
    """prepare_slowfast with 'spatial_1d_max_pool' (ml-slowfast-llava llava_arch.py)."""
    T, N, D = image_features.shape
    idx = torch.linspace(0, T, num_slowpath + 1).to(torch.int32).tolist()
    idx.pop()
    slow = rearrange(image_features[idx], "t n d -> t d n")
    slow = rearrange(nn.MaxPool1d(kernel_size=2, stride=2)(slow), "t d n -> t n d").reshape(-1, D)
    n0 = int(math.sqrt(N))
    fast = rearrange(image_features, "t (n0 n1) d -> d t n0 n1", n0=n0)
    fast = rearrange(nn.AdaptiveAvgPool2d(fast_hw)(fast), "d t n0 n1 -> (t n0 n1) d")
    return torch.cat([slow, fast])


def close(a, b):
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("shape", [(3, 2, 2), (8, 3, 3), (6, 4, 4)])  # temporal pooling, repeat, identity
def test_pllava_matches_official(runnable, clip, shape):
    hf, pipe, *_ = runnable
    out = PLLaVAPool(shape).reduce_video(pipe.model, clip.pixel_values)
    ref = official_pllava(hf_projected(hf, clip.pixel_values), shape[0], shape, (4, 4))
    close(out.tokens, ref)
    assert out.frame.max() < clip.num_frames and len(out.frame) == len(out.patch) == ref.shape[0]


def test_pllava_at_the_native_grid_is_the_models_own_pooling(runnable, clip):
    _, pipe, *_ = runnable
    model = pipe.model
    own = model.config
    try:
        model.config = own.replace(pool_position="after_projector")
        native = model.video_features(clip.pixel_values)
    finally:
        model.config = own
    close(PLLaVAPool((6, 2, 2)).reduce_video(model, clip.pixel_values).tokens, native)


@pytest.mark.parametrize("slow", [1, 3, 6])
def test_slowfast_matches_official(runnable, clip, slow):
    hf, pipe, *_ = runnable
    out = SlowFast(slow_frames=slow, fast_grid=2).reduce_video(pipe.model, clip.pixel_values)
    close(out.tokens, official_slowfast(hf_projected(hf, clip.pixel_values), slow, (2, 2)))


def test_published_token_counts_at_the_real_shapes():
    cfg = LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")
    assert SlowFast().num_tokens(50, cfg) == 3680  # 10 x 288 + 50 x 16 (SF-LLaVA paper)
    assert PLLaVAPool().num_tokens(16, cfg) == 2304  # 16 x 12 x 12 (PLLaVA eval)
    with pytest.raises(ReductionError, match="slow_frames=10 but the video has 8 frames"):
        SlowFast().num_tokens(8, cfg)


def test_pipeline_reports_and_batches_with_reduction(runnable):
    _, pipe, *_ = runnable
    video = real_video()
    red = parse_reduction(reduce=["pllava:shape=3x2x2", "fastv:layer=1,keep=0.5"])
    a = pipe.prepare("What happens?", video=video, frames=6, reduction=red, max_new_tokens=6)
    b = pipe.prepare("Describe the scene in a few words.", video=video, frames=4, reduction=red, max_new_tokens=6)
    assert a.video_token_counts == [12] and b.video_token_counts == [12]
    batch = pipe.generate_batch([a, b], max_new_tokens=6)
    report = a.to_dict()["reduction"]
    assert report["methods"] == ["pllava:shape=3x2x2", "fastv:layer=1,keep=0.5,score=last_query"]
    assert report["visual_tokens_unreduced"] == 24 and report["visual_tokens_into_decoder"] == 12
    assert report["visual_tokens_after_pruning"] == 6 and len(report["kept_positions"]) == 6
    kept = report["kept_positions"]
    alone = [pipe.generate_batch([r], max_new_tokens=6)[0] for r in (a, b)]
    assert batch == alone and a.to_dict()["reduction"]["kept_positions"] == kept


def test_maxinfo_selects_frames_from_the_towers_cls_on_the_real_video(runnable):
    from llava_next.reduce.maxinfo import MaxInfo, select_rows

    hf, pipe, *_ = runnable
    video = real_video()  # 132 frames at 25 fps: 6 candidates at 1 fps
    method = MaxInfo(rank=3)
    req = pipe.prepare("What happens?", video=video, frames=4, reduction=parse_reduction(select_frames="maxinfo:rank=3"))
    cands = load_video(video, method.candidate_count(4, 132, 25.0), size=pipe.config.tile_size)
    assert cands.num_frames == 6
    with torch.no_grad():  # the embedding: CLS of transformers' tower at the feature layer
        ref_cls = hf.model.vision_tower(cands.pixel_values, output_hidden_states=True).hidden_states[-2][:, 0]
    emb = method.embeddings(cands.pixel_values, pipe.model)
    close(emb, ref_cls)
    rows = select_rows(ref_cls, 3, 0.3, 4)
    assert req.videos[0].frame_indices == [cands.frame_indices[i] for i in rows]
    assert 3 <= req.videos[0].num_frames <= 4 and req.video_token_counts == [4 * req.videos[0].num_frames]
    assert req.to_dict()["reduction"]["methods"] == ["maxinfo:frames=0,rank=3,tol=0.3,candidate_fps=1.0,"
                                                     "max_candidates=128,embedding=cls"]


def test_cli_run_json_reports_the_reduction_and_equals_the_python_api(runnable, capsys):
    from llava_next.cli.main import main

    _, pipe, directory, cache = runnable
    video = str(real_video())
    assert main(["run", "--model", str(directory), "--cache-dir", str(cache), "--video", video, "--frames", "8",
                 "--dtype", "fp32", "--max-new-tokens", "5", "--json", "--select-frames", "maxinfo:frames=6,rank=3",
                 "--reduce", "pllava:shape=4x2x2", "--reduce", "fastv:layer=1,keep=0.5", "What happens?"]) == 0
    out = json.loads(capsys.readouterr().out)
    red = out["plan"]["reduction"]
    assert red["visual_tokens_unreduced"] == 32 and red["visual_tokens_into_decoder"] == 16
    assert red["visual_tokens_after_pruning"] == 8 and len(red["kept_positions"]) == 8
    req = pipe.prepare("What happens?", video=video, frames=8, max_new_tokens=5,
                       reduction=parse_reduction("maxinfo:frames=6,rank=3", ["pllava:shape=4x2x2", "fastv:layer=1,keep=0.5"]))
    assert pipe.generate_batch([req], max_new_tokens=5)[0] == out["tokens"]
    assert req.to_dict()["reduction"]["kept_positions"] == red["kept_positions"]


def test_cli_bad_methods_and_values_fail_before_loading(capsys):
    from llava_next.cli.main import main

    video = str(real_video())
    for spec, message in [("fastv:keep=0", "fastv: keep is the fraction of visual tokens kept, in (0, 1], got 0.0"),
                          ("fastvv", "unknown reduction method 'fastvv'; the methods are: maxinfo, scene, pllava"),
                          ("pllava:shape=4x2", "pllava: shape is (frames, height, width)"),
                          ("maxinfo", "maxinfo selects frames: pass it as --select-frames maxinfo")]:
        assert main(["run", "--model", "/nonexistent", "--video", video, "--reduce", spec, "--json", "Q?"]) == 2
        assert message in json.loads(capsys.readouterr().out)["error"]


def official_visionzip(hidden_states, attn_weights, metric, dominant_num, contextual_num):
    """CLIPVisionTower_VisionZip.forward (visionzip/clip_encoder.py @ 3151f6d), after the tower ran."""
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(hidden_states.shape[0], dominant_num + 1,
                                                                              hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num,
                                 dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1]), target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)


@pytest.mark.parametrize("dominant,contextual", [(5, 3), (2, 6), (9, 1)])
def test_visionzip_matches_official(runnable, clip, dominant, contextual):
    from llava_next.reduce import VisionZip

    hf, pipe, *_ = runnable
    px = clip.pixel_values
    with torch.no_grad():
        out = hf.model.vision_tower(px, output_hidden_states=True, output_attentions=True)
        layer = hf.model.vision_tower.encoder.layers[-2]
        h_in = layer.layer_norm1(out.hidden_states[-3])
        n, T, _ = h_in.shape
        heads = layer.self_attn.num_heads
        metric = layer.self_attn.k_proj(h_in).view(n, T, heads, -1).transpose(1, 2).mean(1)  # raw_key_states.mean(1)
        ref = hf.model.multi_modal_projector(official_visionzip(out.hidden_states[-2], out.attentions[-2], metric,
                                                                dominant - 1, contextual))
    got = VisionZip(dominant, contextual).reduce_video(pipe.model, px)
    close(got.tokens, ref.reshape(-1, ref.shape[-1]))
    assert got.tokens.shape[0] == VisionZip(dominant, contextual).num_tokens(px.shape[0], pipe.config)
