"""VisionZip on AnyRes images and on SigLIP towers, against transcriptions of the code it follows.

- CLIP (LLaVA-NeXT image checkpoint): dvlab-research/VisionZip @ 3151f6d, ``CLIPVisionTower_VisionZip.forward``
  (clip_encoder.py) on transformers' eager tower outputs (``attentions[-2]``, ``hidden_states[-2]``, the layer's
  raw keys), then ``prepare_inputs_labels_for_multimodal_visionzip`` + ``restore_image_features_sorted``
  (llava_arch.py) on real photos: tokens within 1e-5, keep-sets identical.
- SigLIP (no CLS): HoliTom's adaptation (cokeshao/HoliTom @ e9b2972, siglip_encoder.py + visionzip/llava_arch.py):
  ``attentions[-1].mean(1).mean(1)``, ``topk(dominant)``, the same merge.
- Pipeline: image counts from ``num_image_tokens`` equal what the model consumes (placeholders, features,
  layout), each kept dominant token is the model's own feature at its recorded (tile, patch), a batch of two
  images equals each alone, a mixed image + video prompt reduces each medium and leaves the text alone,
  ``run --json`` equals ``inspect --json``, and temporal reducers refuse images.
"""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import make_runnable_checkpoint
from media import real_photo, real_video
from llava_next.inputs.image import preprocess_image
from llava_next.model.attention import use_backend
from llava_next.reduce import ReductionError, VisionZip, parse_reduction
from llava_next.runtime.pipeline import Pipeline

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def sdpa():
    with use_backend("sdpa"):
        yield


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("reduce-images")
    directory, hf = make_runnable_checkpoint(root / "LLaVA-NeXT-tiny", kind="image")
    hf.set_attn_implementation("eager")
    return hf, Pipeline.from_pretrained(directory, cache_dir=root / "cache", progress=False), directory, root / "cache"


# ---- the official code, transcribed (CLIP) ----------------------------------------------------------
def official_clip_visionzip(hidden_states, attn_weights, metric, dominant_num, contextual_num):
    """CLIPVisionTower_VisionZip.forward after the tower ran (clip_encoder.py L49-85): (tokens, all_indices)."""
    cls_attention = attn_weights[:, :, 0, 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    B, T, C = hidden_states.shape
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(B, dominant_num + 1, C)
    return contextual_merge(hidden_states, metric, mask, dominant_tokens, contextual_num), all_indices


def contextual_merge(hidden_states, metric, mask, dominant_tokens, contextual_num):
    """The contextual half, identical in clip_encoder.py L59-83 and HoliTom's visionzip() (llava_arch.py L110-180)."""
    B, T, C = hidden_states.shape
    kept = dominant_tokens.shape[1]
    metric_filtered = metric[mask].view(B, T - kept, metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(B, T - kept, C)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    rest = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, rest, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(B, tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_states_filtered[:, rest, :]) / counts
    contextual_tokens = hidden_states_filtered[:, target_indices, :] + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)


def official_restore(image_feature, cur_keep_idx, width, height, side):
    """restore_image_features_sorted (llava_arch.py L42-80), 576 -> side ** 2 and 24 -> side."""
    num_img, total_patches, feature_dim = image_feature.shape
    P = side * side
    num_keep = cur_keep_idx.shape[1]
    num_extra = total_patches - num_keep
    cur_keep_idx_sorted, _ = cur_keep_idx.sort(dim=1)
    cur_keep_idx_sorted_restore = cur_keep_idx_sorted[:, 1:] - 1
    restored_features = torch.zeros((num_img, P, feature_dim), dtype=image_feature.dtype)
    mask = torch.zeros(num_img, P, dtype=torch.bool)
    mask.scatter_(1, cur_keep_idx_sorted_restore, True)
    restored_features[mask] = image_feature[:, 1:num_keep, :].reshape(-1, feature_dim)
    restored_features = restored_features.view(height, width, side, side, feature_dim)
    restored_features = restored_features.permute(0, 2, 1, 3, 4).contiguous().view(height * side, width * side, feature_dim)
    mask = mask.view(height, width, side, side).permute(0, 2, 1, 3).contiguous().view(height * side, width * side)
    return torch.cat([restored_features[mask], image_feature[:, 0], image_feature[:, -num_extra:].reshape(-1, feature_dim)])


def official_image(hf, image, dominant, contextual):
    """One AnyRes image through VisionZip's LLaVA-NeXT path on transformers' eager CLIP tower and projector."""
    with torch.no_grad():
        out = hf.model.vision_tower(image.pixel_values, output_hidden_states=True, output_attentions=True)
        layer = hf.model.vision_tower.encoder.layers[-2]  # apply_info: r = [0] * 22 + [1] + [0]
        h_in = layer.layer_norm1(out.hidden_states[-3])
        n, T, _ = h_in.shape
        metric = layer.self_attn.k_proj(h_in).view(n, T, layer.self_attn.num_heads, -1).transpose(1, 2).mean(1)
        tokens, keep_idx = official_clip_visionzip(out.hidden_states[-2], out.attentions[-2], metric, dominant - 1,
                                                   contextual)
        feats = hf.model.multi_modal_projector(tokens)
    rows, cols = image.grid
    side = hf.config.vision_config.image_size // hf.config.vision_config.patch_size
    return torch.cat([feats[0], official_restore(feats[1:], keep_idx[1:], cols, rows, side)]), keep_idx


def close(a, b, tol=1e-5):
    assert a.shape == b.shape and (a - b).abs().max() <= tol * b.abs().max()


@pytest.mark.parametrize("photo,dominant,contextual", [("astronaut", 5, 3), ("coffee", 9, 2), ("chelsea", 2, 6)])
def test_visionzip_image_matches_official(image_model, photo, dominant, contextual):
    hf, pipe, *_ = image_model
    image = preprocess_image(real_photo(photo), pipe.config)
    assert image.num_tiles >= 2
    ref, keep_idx = official_image(hf, image, dominant, contextual)
    method = VisionZip(dominant, contextual)
    got = method.reduce_image(pipe.model, image)
    close(got.tokens, ref)
    assert got.tokens.shape[0] == method.num_image_tokens(image.grid, pipe.config) == (1 + image.num_tiles) * (dominant + contextual)
    # keep-sets: per crop, our dominant patches are the official all_indices (CLS = 0, patches + 1)
    _, patch = method.crops(pipe.model, image.pixel_values)
    for crop in range(len(keep_idx)):
        assert sorted((patch[crop, :dominant] + 1).tolist()) == sorted(keep_idx[crop].tolist())


def test_kept_tokens_are_the_models_own_features_at_their_tile_and_patch(image_model):
    """Provenance: a dominant token is the projected tower feature of its (tile, patch), unmerged."""
    _, pipe, *_ = image_model
    model = pipe.model
    image = preprocess_image(real_photo("coffee"), pipe.config)
    got = VisionZip(6, 3).reduce_image(model, image)
    with torch.no_grad():
        own = model.projector(model.vision_tower(image.pixel_values))  # (1 + tiles, P, D), CLS dropped
    dominant = torch.zeros(len(got.tile), dtype=torch.bool)  # base 0..5 (CLS first), tiles' patches after base
    per = 9
    dominant[1:6] = True
    tiles = image.num_tiles
    dominant[per:per + tiles * 5] = True
    for i in torch.nonzero(dominant).flatten().tolist():
        close(got.tokens[i], own[got.tile[i], got.patch[i]])


def test_pipeline_image_counts_batch_and_cli(image_model, capsys):
    from llava_next.cli.main import main

    _, pipe, directory, cache = image_model
    red = parse_reduction(reduce=["visionzip:dominant=5,contextual=3"])
    a = pipe.prepare("What is this?", images=[real_photo("astronaut")], reduction=red, max_new_tokens=4)
    b = pipe.prepare("Describe it.", images=[real_photo("coffee")], reduction=red, max_new_tokens=4)
    plain = pipe.prepare("What is this?", images=[real_photo("astronaut")], max_new_tokens=4)
    assert a.image_token_counts == [(1 + a.images[0].num_tiles) * 8]
    assert a.unreduced_visual_tokens == plain.image_token_counts[0]
    # the text is untouched: the same ids around the visual span
    n_img = a.image_token_counts[0]
    first = a.input_ids.index(pipe.config.image_token_id)
    assert a.input_ids[:first] == plain.input_ids[:first]
    assert a.input_ids[first + n_img:] == plain.input_ids[first + plain.image_token_counts[0]:]
    embeds, mask, layout = pipe.embed_with_layout([a, b])  # features == placeholders (else MediaMismatchError)
    assert int(layout.visual.sum()) == sum(a.image_token_counts + b.image_token_counts)
    own = VisionZip(5, 3).reduce_image(pipe.model, a.images[0])
    row = layout.visual[0]
    assert layout.tile[0][row].tolist() == own.tile.tolist() and layout.patch[0][row].tolist() == own.patch.tolist()
    for row, r in enumerate((a, b)):  # each row's embeddings (its image's reduced features) equal it alone
        alone = pipe.embed_with_layout([r])[0][0]
        assert torch.equal(embeds[row, embeds.shape[1] - len(r.input_ids):], alone)
    batch = pipe.generate_batch([a, b], max_new_tokens=4)
    assert batch == [pipe.generate_batch([r], max_new_tokens=4)[0] for r in (a, b)]
    summary = a.to_dict()["reduction"]
    assert summary["visual_tokens_into_decoder"] == n_img and summary["visual_tokens_unreduced"] == plain.image_token_counts[0]

    args = ["--model", str(directory), "--image", str(real_photo("astronaut")), "--reduce", "visionzip:dominant=5,contextual=3",
            "--json"]
    assert main(["run", "--cache-dir", str(cache), "--dtype", "fp32", "--max-new-tokens", "3", *args, "What is this?"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["plan"]["reduction"]["visual_tokens_into_decoder"] == n_img
    assert main(["inspect", *args]) == 0
    inspect = json.loads(capsys.readouterr().out)
    assert inspect["visual_tokens"] == n_img == inspect["reduction"][0]["visual_tokens_into_decoder"]
    assert inspect["reduction"][0]["media"] == "image"


def test_temporal_reducers_refuse_images(image_model, capsys):
    from llava_next.cli.main import main

    _, pipe, directory, _ = image_model
    for spec in ("pllava:shape=2x2x2", "slowfast:slow_frames=1", "dycoke-ttm"):
        with pytest.raises(ReductionError, match=r"reduces videos only \(it works across frames\), but the request "
                                                 r"has 1 image\(s\).*use a reducer for images: visionzip"):
            pipe.prepare("Q?", images=[real_photo("astronaut")], reduction=parse_reduction(reduce=[spec]))
    assert main(["inspect", "--model", str(directory), "--image", str(real_photo("astronaut")), "--reduce", "pllava",
                 "--json"]) == 2
    assert "pllava reduces videos only" in json.loads(capsys.readouterr().out)["error"]


def test_mixed_image_and_video_reduces_each_medium(tmp_path):
    directory, _ = make_runnable_checkpoint(tmp_path / "video-tiny", kind="video")
    pipe = Pipeline.from_pretrained(directory, cache_dir=tmp_path / "cache", progress=False)
    red = parse_reduction(reduce=["visionzip:dominant=4,contextual=2"])
    prompt = "<image> and <video>: what changed?"
    req = pipe.prepare(prompt, images=[real_photo("astronaut")], video=real_video(), frames=3, reduction=red,
                       max_new_tokens=3)
    plain = pipe.prepare(prompt, images=[real_photo("astronaut")], video=real_video(), frames=3, max_new_tokens=3)
    assert req.image_token_counts == [(1 + req.images[0].num_tiles) * 6] and req.video_token_counts == [3 * 6]
    cfg = pipe.config
    text = [i for i in req.input_ids if i not in (cfg.image_token_id, cfg.video_token_id)]
    assert text == [i for i in plain.input_ids if i not in (cfg.image_token_id, cfg.video_token_id)]
    _, _, layout = pipe.embed_with_layout([req])
    is_video = torch.tensor(req.input_ids) == cfg.video_token_id
    assert layout.frame[0][is_video].tolist() == torch.arange(3).repeat_interleave(6).tolist()
    assert (layout.tile[0][~is_video & layout.visual[0]] >= 0).all()
    assert len(pipe.generate_batch([req], max_new_tokens=3)[0]) >= 1


# ---- SigLIP (no CLS): score=mean_received ----------------------------------------------------------
def holitom_siglip_visionzip(hf_tower, pixels, dominant_num, contextual_num):
    """HoliTom's VisionZip for SigLIP: attentions[-1].mean(1).mean(1) of the feature layer, topk(dominant_num)
    (no CLS), the last layer's raw keys (mean over heads) as metric, then VisionZip's merge."""
    with torch.no_grad():
        out = hf_tower(pixels, output_hidden_states=True, output_attentions=True)
        layer = hf_tower.encoder.layers[-1]
        h_in = layer.layer_norm1(out.hidden_states[-2])
        n, T, _ = h_in.shape
        metric = layer.self_attn.k_proj(h_in).view(n, T, layer.self_attn.num_heads, -1).transpose(1, 2).mean(1)
        attention = out.attentions[-1].mean(dim=1).mean(dim=1)
        hidden_states = out.hidden_states[-1]
        topk_indices = attention.topk(dominant_num, dim=1).indices
        mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, topk_indices, False)
        dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(n, dominant_num, hidden_states.shape[2])
        return contextual_merge(hidden_states, metric, mask, dominant_tokens, contextual_num), topk_indices


def test_siglip_mean_received_matches_holitom_and_cls_is_refused(tmp_path):
    from checkpoints_qwen import make_onevision_checkpoint, real_clip

    src, hf = make_onevision_checkpoint(tmp_path / "hf")
    hf.set_attn_implementation("eager")
    pipe = Pipeline.from_pretrained(src, cache_dir=tmp_path / "cache", progress=False)
    model = pipe.model
    frames = real_clip(3).pixel_values
    assert VisionZip().resolved_score(model.config) == "mean_received"
    for dominant, contextual in ((6, 4), (1, 9)):
        ref, top = holitom_siglip_visionzip(hf.model.vision_tower, frames, dominant, contextual)
        tokens, patch = VisionZip(dominant, contextual, score="mean_received").crops(model, frames)
        close(tokens, ref)
        for f in range(len(frames)):
            assert sorted(patch[f, :dominant].tolist()) == sorted(top[f].tolist())
        video = VisionZip(dominant, contextual).reduce(frames, model.config, model=model)
        close(video.tokens, hf.model.multi_modal_projector(ref).reshape(-1, video.tokens.shape[-1]).detach())
    with pytest.raises(ReductionError, match="score=cls reads the CLS token's attention; this model's tower"):
        VisionZip(score="cls").crops(model, frames)
    from llava_next.reduce import MaxInfo

    with pytest.raises(ReductionError, match="maxinfo: embedding=cls needs a tower with a CLS token"):
        MaxInfo().embeddings(frames, model)
    assert MaxInfo(embedding="patch_mean").embeddings(frames, model).shape == (3, 32)
    image = preprocess_image(real_photo("coffee"), model.config)  # anyres_max_9: the same code layout
    got = VisionZip(6, 4).reduce_image(model, image)
    assert got.tokens.shape[0] == (1 + image.num_tiles) * 10 and (got.patch >= 0).all()  # no CLS anywhere
    # the pipeline: two images (OneVision pads each to one tile + a newline) and a video, each reduced
    red = parse_reduction(reduce=["visionzip:dominant=6,contextual=4"])
    req = pipe.prepare("<image><image><video> Compare.", images=[real_photo("coffee"), real_photo("astronaut")],
                       video=real_video(), frames=2, reduction=red, max_new_tokens=2)
    assert req.image_token_counts == [11, 11] and req.video_token_counts == [20]
    assert len(pipe.generate_batch([req], max_new_tokens=2)[0]) >= 1


def test_mean_received_on_clip_and_query_chunks(image_model):
    """score=mean_received on a CLIP tower ranks patches by attentions[-2].mean(heads).mean(queries) without the
    CLS column (CLS still kept first); the query-chunked sum equals the whole (query_chunk < T)."""
    from llava_next.reduce.visionzip import tower_scores

    hf, pipe, *_ = image_model
    pixels = preprocess_image(real_photo("coffee"), pipe.config).pixel_values
    with torch.no_grad():
        att = hf.model.vision_tower(pixels, output_attentions=True).attentions[-2]  # (n, H, 17, 17)
    ref = att.mean(1).mean(1)[:, 1:]
    _, whole, _ = tower_scores(pipe.model.vision_tower, pixels, "mean_received", True)
    _, chunked, _ = tower_scores(pipe.model.vision_tower, pixels, "mean_received", True, query_chunk=4)
    close(whole, ref)
    close(chunked, ref)
    _, patch = VisionZip(5, 3, score="mean_received").crops(pipe.model, pixels)
    assert (patch[:, 0] == -1).all()  # the CLS token, kept as the code keeps it
    for crop in range(len(pixels)):
        assert sorted(patch[crop, 1:5].tolist()) == sorted(ref[crop].topk(4).indices.tolist())
