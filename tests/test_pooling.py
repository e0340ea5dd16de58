"""pooling.py against transformers' LlavaNextVideo pooler/get_video_features and the original code's
get_2dPool / add_token_per_grid / add_token_per_frame (transcribed below from LLaVA-VL/LLaVA-NeXT
llava/model/llava_arch.py at HEAD df17966)."""

import math

import pytest
import torch
import torch.nn as nn

from llava_next.model import pooling
from llava_next.model.pooling import add_video_newlines, newline_count, pool_and_project, pool_frames, pooled_grid_hw


# ---- the original LLaVA-NeXT code, transcribed (self.* replaced by arguments) ------------------------
def orig_get_2dPool(image_feature, side, stride, mode):
    height = width = side
    num_frames, num_tokens, num_dim = image_feature.shape
    image_feature = image_feature.view(num_frames, height, width, -1)
    image_feature = image_feature.permute(0, 3, 1, 2).contiguous()
    if mode == "average":
        image_feature = nn.functional.avg_pool2d(image_feature, stride)
    elif mode == "max":
        image_feature = nn.functional.max_pool2d(image_feature, stride)
    elif mode == "bilinear":
        height, width = image_feature.shape[2:]
        scaled_shape = [math.ceil(height / stride), math.ceil(width / stride)]
        image_feature = nn.functional.interpolate(image_feature, size=scaled_shape, mode="bilinear")
    image_feature = image_feature.permute(0, 2, 3, 1)
    image_feature = image_feature.view(num_frames, -1, num_dim)
    return image_feature


def orig_add_token_per_grid(image_feature, image_newline):
    resize_h = int(math.sqrt(image_feature.shape[1]))
    num_frames = image_feature.shape[0]
    image_feature = image_feature.view(num_frames, 1, resize_h, resize_h, -1)
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
    image_feature = image_feature.flatten(1, 2).flatten(2, 3)
    image_feature = torch.cat((image_feature, image_newline[:, None, None].expand(*image_feature.shape[:-1], 1)), dim=-1)
    image_feature = image_feature.flatten(1, 2).transpose(0, 1)
    return image_feature


def orig_add_token_per_frame(image_feature, image_newline):
    image_feature = image_feature.permute(2, 0, 1).contiguous()
    image_feature = torch.cat((image_feature, image_newline[:, None, None].expand(*image_feature.shape[:-1], 1)), dim=-1)
    image_feature = image_feature.permute(1, 2, 0).contiguous()
    return image_feature


def orig_video_newlines(image_feature, image_newline, mode):
    if mode == "grid":
        return orig_add_token_per_grid(image_feature, image_newline)
    if mode == "frame":
        return orig_add_token_per_frame(image_feature, image_newline).flatten(0, 1)
    if mode == "one_token":
        return torch.cat((image_feature.flatten(0, 1), image_newline[None]), dim=0)
    return image_feature.flatten(0, 1)  # no_token


# ---- transformers ----------------------------------------------------------------------------------
def hf_video_model(side, stride, mode, vision_hidden=32, text_hidden=48):
    from transformers import LlavaNextVideoConfig, LlavaNextVideoModel

    torch.manual_seed(0)
    tile = side * 14
    cfg = LlavaNextVideoConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=vision_hidden, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=tile, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=text_hidden, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=100),
        spatial_pool_stride=stride, spatial_pool_mode=mode,
        image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]])
    return LlavaNextVideoModel(cfg).eval()


@pytest.mark.parametrize("mode", ["average", "max"])
@pytest.mark.parametrize("side,stride", [(4, 1), (4, 2), (5, 2), (6, 3), (7, 3), (6, 4), (5, 4)])
def test_get_video_features_parity_with_transformers(side, stride, mode):
    """CLIP layer -2, CLS dropped -> our pooling -> transformers' projector == get_video_features."""
    model = hf_video_model(side, stride, mode)
    frames = torch.randn(2, 3, 3, side * 14, side * 14)  # (batch, F, 3, H, W)
    with torch.no_grad():
        ref = model.get_video_features(frames, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default").pooler_output  # (B, F*h*w, D)
        hidden = model.vision_tower(frames.flatten(0, 1), output_hidden_states=True).hidden_states[-2][:, 1:]
        ours = pool_and_project(hidden, model.multi_modal_projector, (side, side), stride, mode, "before_projector")
    h, w = pooled_grid_hw((side, side), stride, mode)
    assert ours.shape == (6, h * w, 48) and (h, w) == (side // stride, side // stride)
    torch.testing.assert_close(ours.reshape(2, -1, 48), ref, atol=1e-6, rtol=1e-5)


def test_real_shape_pooler_parity():
    """8 frames x 24x24 x 1024 -> 8 x 144 x 1024, as LlavaNextVideoPooler."""
    from transformers import LlavaNextVideoConfig
    from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler

    pooler = LlavaNextVideoPooler(LlavaNextVideoConfig())
    x = torch.randn(8, 576, 1024)
    ours = pool_frames(x, (24, 24), 2, "average")
    assert ours.shape == (8, 144, 1024)
    torch.testing.assert_close(ours, pooler(x), atol=0, rtol=0)


# ---- the original code's get_2dPool, incl. bilinear and strides that do not divide -------------------
@pytest.mark.parametrize("mode", ["average", "max", "bilinear"])
@pytest.mark.parametrize("side,stride", [(24, 1), (24, 2), (24, 3), (24, 4), (27, 2), (5, 2), (7, 3), (7, 4)])
def test_matches_original_get_2dPool(side, stride, mode):
    x = torch.randn(3, side * side, 16)
    ref = orig_get_2dPool(x, side, stride, mode)
    ours = pool_frames(x, (side, side), stride, mode)
    h, w = pooled_grid_hw((side, side), stride, mode)
    assert ours.shape == ref.shape == (3, h * w, 16)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    if mode == "bilinear":
        assert h == math.ceil(side / stride)  # e.g. SigLIP 27 -> 14
    else:
        assert h == side // stride  # floor: uncovered rows/cols are dropped


def test_non_square_grid_pools_rows_and_columns_separately():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 24, 1)  # 2 frames, (4, 6) grid
    out = pool_frames(x, (4, 6), 2, "max")
    assert pooled_grid_hw((4, 6), 2, "max") == (2, 3)
    # frame 0: values v = 6r + c; max over 2x2 block (r, c) -> 6(2r+1) + 2c+1
    assert out[0, :, 0].tolist() == [7, 9, 11, 19, 21, 23]
    assert out[1, :, 0].tolist() == [v + 24 for v in [7, 9, 11, 19, 21, 23]]


def test_frames_stay_frame_major_not_a_row_major_strip():
    """Token order is frame 0 row by row, then frame 1 ... — not the rows of a stitched 1xF strip."""
    num_frames, side = 3, 4
    x = torch.randn(num_frames, side * side, 8)
    out = pool_frames(x, (side, side), 2, "average")  # (F, 4, C)
    flat = add_video_newlines(out, (2, 2), None, "none")  # (F*4, C)
    per_frame = torch.cat([pool_frames(x[f:f + 1], (side, side), 2, "average")[0] for f in range(num_frames)])
    torch.testing.assert_close(flat, per_frame, atol=0, rtol=0)
    # the mistake: stitch frames side by side into a (2, 2F) map and flatten it row-major
    strip = out.reshape(num_frames, 2, 2, 8).permute(1, 0, 2, 3).reshape(2 * 2 * num_frames, 8)
    assert not torch.allclose(flat, strip)
    assert torch.equal(flat[:2], strip[:2]) and not torch.equal(flat[2:4], strip[2:4])  # row 1 of frame 0 vs frame 1


# ---- newline modes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "grid", "frame", "one_token"])
@pytest.mark.parametrize("num_frames,side", [(1, 3), (4, 2), (3, 12)])
def test_newline_modes_match_the_original(mode, num_frames, side):
    x = torch.randn(num_frames, side * side, 8)
    newline = torch.randn(8)
    ours = add_video_newlines(x, (side, side), newline, mode)
    ref = orig_video_newlines(x, newline, mode if mode != "none" else "no_token")
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    assert ours.shape[0] == num_frames * side * side + newline_count(num_frames, (side, side), mode)


def test_newline_placement():
    num_frames, (h, w) = 2, (2, 3)
    x = torch.ones(num_frames, h * w, 4)
    newline = torch.zeros(4)
    where = {m: (add_video_newlines(x, (h, w), newline, m)[:, 0] == 0).nonzero().flatten().tolist()
             for m in pooling.NEWLINE_MODES}
    assert where["none"] == []
    assert where["grid"] == [3, 7, 11, 15]  # after each row of 3 tokens, in every frame
    assert where["frame"] == [6, 13]  # after each frame's 6 tokens
    assert where["one_token"] == [12]  # once, after all frames
    assert {m: newline_count(num_frames, (h, w), m) for m in where} == {m: len(v) for m, v in where.items()}


# ---- pool position: before vs after the GELU projector ---------------------------------------------
def test_pool_position_matters_with_gelu_and_not_without():
    torch.manual_seed(0)
    x = torch.randn(2, 36, 16)
    gelu_mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
    linear = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32))
    with torch.no_grad():
        before = pool_and_project(x, gelu_mlp, (6, 6), 2, "average", "before_projector")
        after = pool_and_project(x, gelu_mlp, (6, 6), 2, "average", "after_projector")
        assert before.shape == after.shape == (2, 9, 32)
        assert (before - after).abs().max() > 1e-2  # GELU does not commute with averaging
        lin_before = pool_and_project(x, linear, (6, 6), 2, "average", "before_projector")
        lin_after = pool_and_project(x, linear, (6, 6), 2, "average", "after_projector")
        torch.testing.assert_close(lin_before, lin_after, atol=1e-5, rtol=1e-5)  # a linear map does
        torch.testing.assert_close(after, pool_frames(gelu_mlp(x), (6, 6), 2, "average"), atol=0, rtol=0)


def test_pool_modes_differ():
    x = torch.randn(1, 36, 4)
    outs = {m: pool_frames(x, (6, 6), 2, m) for m in ("average", "max")}
    assert not torch.allclose(outs["average"], outs["max"])
    # bilinear at an even stride samples between the two middle pixels of each block: the 2x2 average
    torch.testing.assert_close(pool_frames(x, (6, 6), 2, "bilinear"), outs["average"], atol=1e-6, rtol=0)
    assert not torch.allclose(pool_frames(x, (6, 6), 4, "bilinear"), pool_frames(x, (6, 6), 4, "average"))


def test_bf16_features():
    x = torch.randn(2, 576, 64, dtype=torch.bfloat16)
    for mode in ("average", "max", "bilinear"):
        out = pool_frames(x, (24, 24), 2, mode)
        assert out.dtype == torch.bfloat16 and out.shape == (2, 144, 64)
        torch.testing.assert_close(out.float(), pool_frames(x.float(), (24, 24), 2, mode), atol=2e-2, rtol=2e-2)


# ---- errors ----------------------------------------------------------------------------------------
def test_errors_say_what_is_wrong():
    x = torch.randn(2, 576, 8)
    with pytest.raises(ValueError, match="577"):
        pool_frames(torch.randn(2, 577, 8), (24, 24))  # CLS not dropped
    with pytest.raises(ValueError, match="larger than the 24x24"):
        pool_frames(x, (24, 24), 25)
    with pytest.raises(ValueError, match="positive integer"):
        pool_frames(x, (24, 24), 0)
    with pytest.raises(ValueError, match="conv"):
        pool_frames(x, (24, 24), 2, "conv")
    with pytest.raises(ValueError, match="image_newline"):
        add_video_newlines(torch.randn(2, 144, 8), (12, 12), None, "grid")
    with pytest.raises(ValueError, match="before_projector"):
        pool_and_project(x, nn.Identity(), (24, 24), 2, "average", "middle")
