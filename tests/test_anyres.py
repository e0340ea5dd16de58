"""AnyRes geometry and feature packing vs transformers (select_best_resolution, LlavaNextModel.pack_image_features,
LlavaNextProcessor token counts) and vs the original LLaVA-NeXT code, transcribed below (docs/references.md)."""

import math

import pytest
import torch

from llava_next.model.anyres import (pack_image_features, resized_size, select_best_resolution,
                               tile_grid, unpadded_size)
from llava_next.config import LlavaNextConfig, VisionConfig
from llava_next.inputs.tokens import image_tokens

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINPOINTS = [[p // 6 for p in pair] for pair in PINPOINTS]  # tile 56 px = 4x4 patches of 14 px
CONFIG = LlavaNextConfig()
ORIG_CONFIG = LlavaNextConfig(anyres_compat="original")
TINY_VISION = VisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=56, patch_size=14)
TINY = LlavaNextConfig(vision=TINY_VISION, image_grid_pinpoints=TINY_PINPOINTS)
TINY_ORIG = TINY.replace(anyres_compat="original")

# (height, width) sizes: photos, wide, tall, square, tiny, huge, just over a tile, extreme ratios
SIZES = [(480, 640), (640, 480), (899, 1024), (300, 1000), (720, 1280), (1080, 1920), (500, 500), (748, 352),
         (427, 640), (300, 451), (400, 600), (500, 741), (600, 512), (512, 512), (1500, 2000), (500, 337),
         (337, 500), (336, 336), (200, 300), (224, 224), (1, 1), (17, 5), (336, 1008), (1008, 336), (672, 672),
         (673, 671), (130, 542), (3000, 40), (40, 3000), (999, 1001), (2, 3), (1411, 1411), (872, 1000)]


# ---- the original LLaVA-NeXT code (llava/mm_utils.py, llava/model/llava_arch.py), sizes (width, height) ----
def orig_select_best_resolution(original_size, possible_resolutions):
    original_width, original_height = original_size
    best_fit, max_effective_resolution, min_wasted_resolution = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
                effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution):
            max_effective_resolution, min_wasted_resolution, best_fit = effective_resolution, wasted_resolution, (width, height)
    return best_fit


def orig_unpad_image(tensor, original_size):
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding:current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding:current_width - padding]


def orig_pack(image_feature, image_size_wh, pinpoints, tile, newline):
    base_image_feature, image_feature = image_feature[0], image_feature[1:]
    height = width = math.isqrt(base_image_feature.shape[0])
    best_w, best_h = orig_select_best_resolution(image_size_wh, pinpoints)
    num_patch_width, num_patch_height = best_w // tile, best_h // tile
    image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    image_feature = orig_unpad_image(image_feature, image_size_wh)
    image_feature = torch.cat((image_feature, newline[:, None, None].expand(*image_feature.shape[:-1], 1)), dim=-1)
    image_feature = image_feature.flatten(1, 2).transpose(0, 1)
    return torch.cat((base_image_feature, image_feature), dim=0)


# ---- transformers references ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model():
    """A tiny transformers LlavaNextModel: pack_image_features only reads the config (56 px tiles, 4x4 patches)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextModel
    from transformers import LlavaNextConfig as HFConfig
    cfg = HFConfig(vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=56, patch_size=14),
                   text_config=LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=64),
                   image_grid_pinpoints=TINY_PINPOINTS)
    return LlavaNextModel(cfg).eval()


@pytest.fixture(scope="module")
def hf_processor():
    from tokenizers import Tokenizer, models
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>")),
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    pixels = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaNextProcessor(image_processor=pixels, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default")


# ---- select_best_resolution -----------------------------------------------------------------------
def test_select_best_resolution_matches_transformers_and_original():
    from transformers.image_processing_utils import select_best_resolution as hf_select
    sizes = SIZES + [(h, w) for h in range(20, 2200, 137) for w in range(20, 2200, 151)]
    for h, w in sizes:
        hf = hf_select((h, w), PINPOINTS)
        if hf is not None:  # transformers returns None when every candidate keeps 0 pixels (e.g. 2x3)
            assert select_best_resolution((h, w), PINPOINTS) == hf, (h, w)
        orig = orig_select_best_resolution((w, h), PINPOINTS)
        if orig is not None:
            assert select_best_resolution((h, w), PINPOINTS, "original") == (orig[1], orig[0]), (h, w)
        if max(h, w) > 336 and hf is not None:  # both agree unless an exact tie (§2.1)
            assert select_best_resolution((h, w), PINPOINTS, "original") == hf, (h, w)


def test_tie_case_hf_wide_vs_original_tall(hf_processor):
    # 300x200 (W x H): the two 336x672 orientations keep all pixels; the first listed pair wins, read
    # as (h, w) by transformers (wide, 1x2 tiles) and as (w, h) by the original code (tall, 2x1)
    assert tile_grid((200, 300), CONFIG) == ((336, 672), (1, 2))
    assert tile_grid((200, 300), ORIG_CONFIG) == ((672, 336), (2, 1))
    assert image_tokens((200, 300), CONFIG) == 1464 == hf_processor._get_number_of_features(200, 300, 336, 336)
    assert image_tokens((200, 300), ORIG_CONFIG) == 976
    assert image_tokens((336, 336), CONFIG) == image_tokens((336, 336), ORIG_CONFIG) == 1176
    assert tile_grid((336, 336), CONFIG)[1] == (1, 2) and tile_grid((336, 336), ORIG_CONFIG)[1] == (2, 1)


def test_degenerate_sizes_still_get_a_canvas():
    # every candidate keeps int(...) = 0 pixels: transformers and the original return None and crash later;
    # here the smallest canvas wins (least waste) and the count stays consistent with the packing
    for size in [(2, 3), (1, 5000), (5000, 1)]:
        assert select_best_resolution(size, PINPOINTS) in {(336, 672), (672, 336)}
        assert image_tokens(size, CONFIG) >= 576


def test_resized_size_matches_transformers():
    import numpy as np
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.image_utils import ChannelDimension
    for h, w in SIZES:
        canvas = select_best_resolution((h, w), PINPOINTS)
        hf = get_patch_output_size(np.zeros((3, h, w)), canvas, ChannelDimension.FIRST)
        assert resized_size((h, w), canvas) == hf, (h, w)


# ---- token counts -------------------------------------------------------------------------------------
# docs/references.md, sizes (height, width)
WORKED = {(480, 640): 2340, (899, 1024): 2634, (640, 480): 2352, (300, 1000): 2182, (720, 1280): 1948,
          (1080, 1920): 1948, (500, 500): 2928}


def test_worked_example_counts():
    for size, tokens in WORKED.items():
        assert image_tokens(size, CONFIG) == tokens, size
    assert tile_grid((480, 640), CONFIG) == ((672, 672), (2, 2))
    assert resized_size((480, 640), (672, 672)) == (504, 672)
    assert unpadded_size((480, 640), (48, 48)) == (36, 48)


def test_token_count_matches_transformers_processor(hf_processor):
    sizes = SIZES + [(h, w) for h in range(37, 2100, 173) for w in range(41, 2100, 181)]
    for h, w in sizes:
        if select_best_resolution((h, w), PINPOINTS) is None:
            continue
        assert image_tokens((h, w), CONFIG) == hf_processor._get_number_of_features(h, w, 336, 336), (h, w)


def test_unpad_rounding_hf_vs_original():
    # 352x748 (W x H) -> 3x1 tiles, map 72x24; image rows = 748 * (24 / 352) = 50.99999999999999:
    # transformers rounds to 51 (pad 10, keeps 52 rows), the original truncates to 50 (pad 11, keeps 50)
    assert tile_grid((748, 352), CONFIG)[1] == (3, 1)
    assert unpadded_size((748, 352), (72, 24), "hf") == (52, 24)
    assert unpadded_size((748, 352), (72, 24), "original") == (50, 24)
    assert image_tokens((748, 352), CONFIG) == 1876
    assert image_tokens((748, 352), ORIG_CONFIG) == 1826


def test_full_feature_strategy_is_rejected():
    cfg = CONFIG.replace(vision=VisionConfig(feature_strategy="full"))
    with pytest.raises(ValueError, match="feature_strategy='default'"):
        image_tokens((480, 640), cfg)


# ---- packing ------------------------------------------------------------------------------------------
def _features(size_hw, config, channels, seed):
    _, (rows, cols) = tile_grid(size_hw, config)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1 + rows * cols, config.vision.num_patches, channels, generator=g)
    return feats, (rows, cols), torch.randn(channels, generator=g)


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (300, 1000), (1000, 300), (748, 352), (200, 300),
                                  (100, 60), (60, 100), (56, 56), (57, 113), (1, 1), (900, 40), (500, 337)])
def test_pack_matches_transformers(hf_model, size):
    # tiny geometry (56 px tiles of 4x4 patches, pinpoints / 6): every size exercises a different crop
    feats, grid, newline = _features(size, TINY, channels=8, seed=sum(size))
    ours = pack_image_features(feats, size, grid, newline)
    (ref,), lens = hf_model.pack_image_features([feats], torch.tensor([size]), "default", image_newline=newline)
    assert torch.equal(ours, ref)
    assert ours.shape[0] == image_tokens(size, TINY) == lens.item()
    (ref,), _ = hf_model.pack_image_features([feats], torch.tensor([size]), "default", image_newline=None)
    assert torch.equal(pack_image_features(feats, size, grid, None), ref)


@pytest.mark.parametrize("size", [(480, 640), (748, 352), (200, 300), (336, 336), (300, 1000), (1500, 2000)])
def test_pack_matches_original(size):
    feats, grid, newline = _features(size, ORIG_CONFIG, channels=3, seed=7)
    ref = orig_pack(feats, (size[1], size[0]), PINPOINTS, 336, newline)
    ours = pack_image_features(feats, size, grid, newline, compat="original")
    assert torch.equal(ours, ref)
    assert ours.shape[0] == image_tokens(size, ORIG_CONFIG)


def test_pack_worked_example_layout():
    # 640x480 (W x H), real geometry: 5 tiles of 24x24 patches, map 48x48, rows 6..41 kept
    c = 2
    feats = torch.zeros(5, 576, c)
    feats[:, :, 0] = torch.arange(5)[:, None].float()  # channel 0: which tile
    feats[:, :, 1] = torch.arange(576).float()  # channel 1: patch index inside the tile
    newline = torch.tensor([-1.0, -1.0])
    tokens = pack_image_features(feats, (480, 640), (2, 2), newline)
    assert tokens.shape == (2340, c)
    assert torch.equal(tokens[:576], feats[0])  # base first, no newline
    grid = tokens[576:].view(36, 49, c)
    assert (grid[:, 48] == -1).all() and (grid[:, :48] != -1).all()  # a newline ends every row
    # first kept row is map row 6 = row 6 of the top tiles: tile 1 (TL) then tile 2 (TR)
    assert grid[0, :24, 0].eq(1).all() and grid[0, 24:48, 0].eq(2).all()
    assert torch.equal(grid[0, :24, 1], torch.arange(6 * 24, 7 * 24).float())
    # last kept row is map row 41 = row 17 of the bottom tiles (BL = 3, BR = 4)
    assert grid[-1, :24, 0].eq(3).all() and grid[-1, 24:48, 0].eq(4).all()
    assert torch.equal(grid[-1, 24:48, 1], torch.arange(17 * 24, 18 * 24).float())


def test_pack_keeps_dtype_and_device():
    feats, grid, newline = _features((480, 640), TINY, channels=4, seed=1)
    out = pack_image_features(feats.bfloat16(), (480, 640), grid, newline)  # fp32 newline, bf16 features
    assert out.dtype == torch.bfloat16


def test_pack_errors_are_specific():
    feats, grid, newline = _features((480, 640), TINY, channels=4, seed=1)
    with pytest.raises(ValueError, match="1 \\+ 6"):
        pack_image_features(feats, (480, 640), (2, 3), newline)
    with pytest.raises(ValueError, match="CLS token dropped"):
        pack_image_features(torch.zeros(5, 17, 4), (480, 640), (2, 2), newline)
    with pytest.raises(ValueError, match="image_newline"):
        pack_image_features(feats, (480, 640), grid, torch.zeros(5))
    with pytest.raises(ValueError, match="positive integers"):
        pack_image_features(feats, (0, 640), grid, newline)
    with pytest.raises(ValueError, match="compat"):
        pack_image_features(feats, (480, 640), grid, newline, compat="HF")
    with pytest.raises(ValueError, match="1 \\+ tiles"):
        pack_image_features(feats[0], (480, 640), grid, newline)
