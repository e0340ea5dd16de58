"""tokens.py: the blog's and docs/references.md numbers, transformers' processor expansion counts for images
and videos, the feature counts the models really produce, and the RoPE context check."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from llava_next import LlavaNextConfig
from llava_next.inputs import tokens
from llava_next.model.pooling import add_video_newlines, pool_frames
from llava_next.inputs.tokens import ContextOverflowError, check_context, image_tokens, plan_context, video_tokens

VIDEO_7B = LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")
VICUNA_7B = LlavaNextConfig.from_name("llava-v1.6-vicuna-7b")
TEXT = 100  # a prompt's worth of text positions


# ---- the LLaVA-NeXT-Video blog and docs/references.md numbers ------------------------------------------
def test_blog_numbers():
    assert video_tokens(1, VIDEO_7B, stride=1) == 576  # 24x24 per frame, unpooled
    assert video_tokens(1, VIDEO_7B) == 144  # stride 2 -> 12x12
    no_scaling = plan_context(TEXT, video_tokens(16, VIDEO_7B), VIDEO_7B, rope_scale=1.0)
    assert no_scaling.fits and no_scaling.positions_available == 4096  # 16 frames fit 4096 with text
    factor2 = plan_context(TEXT, video_tokens(56, VIDEO_7B), VIDEO_7B, rope_scale=2.0)
    assert factor2.fits and factor2.positions_available == 8192  # 56 frames at 12x12 fit 8192 with factor 2
    assert not plan_context(TEXT, video_tokens(57, VIDEO_7B), VIDEO_7B, rope_scale=2.0).fits
    factor4 = plan_context(TEXT, video_tokens(64, VIDEO_7B), VIDEO_7B, rope_scale=4.0)
    assert factor4.fits and factor4.positions_available == 16384  # 64 frames fit 16384 with factor 4
    assert not plan_context(TEXT, video_tokens(64, VIDEO_7B), VIDEO_7B, rope_scale=2.0).fits
    assert image_tokens((480, 640), VIDEO_7B) == 2340  # 640x480 (w x h)


def test_reference_spec_counts():
    # (height, width): 640x480 portrait, radar 1024x899, 1000x300, 1280x720, 1920x1080, 500x500 (w x h in the spec)
    expected = {(640, 480): 2352, (899, 1024): 2634, (300, 1000): 2182, (720, 1280): 1948, (1080, 1920): 1948,
                (500, 500): 2928}
    assert {hw: image_tokens(hw, VICUNA_7B) for hw in expected} == expected
    plan = tokens.image_plan((480, 640), VICUNA_7B)
    assert (plan.canvas_hw, plan.grid_hw, plan.resized_hw, plan.feature_map_hw, plan.unpadded_hw) == \
        ((672, 672), (2, 2), (504, 672), (48, 48), (36, 48))
    assert (plan.base_tokens, plan.newline_tokens, plan.num_tiles) == (576, 36, 4)
    assert [video_tokens(f, VIDEO_7B) for f in (8, 16, 32)] == [1152, 2304, 4608]
    assert [video_tokens(f, VIDEO_7B, newline="one_token") for f in (8, 16, 32)] == [1153, 2305, 4609]
    assert [video_tokens(f, VIDEO_7B, stride=4) for f in (8, 16, 32)] == [288, 576, 1152]
    assert video_tokens(8, VIDEO_7B, newline="grid") == 8 * 12 * 13
    assert video_tokens(8, VIDEO_7B, newline="frame") == 8 * 145
    # the HF test's padding check: radar image vs 8-frame video differ by 1482 tokens
    assert image_tokens((899, 1024), VIDEO_7B) - video_tokens(8, VIDEO_7B) == 1482


def test_original_compat_counts():
    orig = VICUNA_7B.replace(anyres_compat="original")
    assert image_tokens((748, 352), VICUNA_7B) == 1876 and image_tokens((748, 352), orig) == 1826  # unpad rounding
    assert image_tokens((200, 300), VICUNA_7B) == 1464 and image_tokens((200, 300), orig) == 976  # tie-break


# ---- transformers' processors: the expansion the model will check against --------------------------
def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "USER:", "ASSISTANT:", "what", "happens", "in", "this", "picture", "video", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True),
                            AddedToken("<video>", normalized=False, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def _image_processor():
    """The llava-hf preprocessor_config (class defaults are 224 px)."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


# (height, width): small (ties, upscaled), square, portrait, landscape, extreme strips, odd sizes, the
# spec's examples, and sizes at the unpadding rounding edge (353 x 748 rounds differently in the original)
IMAGE_SIZES = [(480, 640), (640, 480), (899, 1024), (300, 1000), (720, 1280), (500, 500), (336, 336), (224, 224),
               (200, 300), (300, 200), (17, 9), (9, 17), (1, 1), (337, 337), (2000, 337), (100, 1500),
               (1008, 336), (336, 1008), (768, 767), (427, 640), (451, 300), (748, 352), (1999, 1998), (50, 700)]


def _llava_next_processor():
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(image_processor=_image_processor(), tokenizer=_tokenizer(), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_image_counts_match_llava_next_processor_expansion():
    """The <image> run the processor writes into input_ids, for 24 real image sizes."""
    proc = _llava_next_processor()
    image_token_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    for hw in IMAGE_SIZES:
        image = Image.new("RGB", (hw[1], hw[0]))  # PIL sizes are (width, height)
        ids = proc(images=[image], text="USER: <image> what happens in this picture ? ASSISTANT:",
                   return_tensors="pt")["input_ids"]
        assert int((ids == image_token_id).sum()) == image_tokens(hw, VICUNA_7B), hw


def test_image_counts_match_processor_formula_on_a_sweep():
    """transformers' count (no pixels) for 600 random sizes incl. every rounding-edge pair found."""
    proc = _llava_next_processor()
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(1, 2200, 2)) for _ in range(600)]
    sizes += [(748, 352), (352, 748), (339, 1000), (1000, 339)]
    got = proc._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert got == [image_tokens(hw, VICUNA_7B) for hw in sizes]


@pytest.mark.parametrize("num_frames,frame_hw", [(1, (336, 336)), (8, (720, 1280)), (5, (9, 17)), (16, (480, 360))])
def test_video_counts_match_llava_next_video_processor(num_frames, frame_hw):
    from transformers import LlavaNextVideoProcessor
    from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor

    tokenizer = _tokenizer()
    proc = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size={"shortest_edge": 336},
                                                     crop_size={"height": 336, "width": 336}),
        image_processor=_image_processor(), tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    video = np.zeros((num_frames, *frame_hw, 3), np.uint8)
    image = np.zeros((480, 640, 3), np.uint8)
    ids = proc(text="USER: <image> <video> what happens in this video ? ASSISTANT:", videos=[video],
               images=[image], return_tensors="pt")["input_ids"]
    assert int((ids == tokenizer.convert_tokens_to_ids("<video>")).sum()) == video_tokens(num_frames, VIDEO_7B)
    assert int((ids == tokenizer.convert_tokens_to_ids("<image>")).sum()) == image_tokens((480, 640), VIDEO_7B)


@pytest.mark.parametrize("mode", ["average", "max"])
@pytest.mark.parametrize("side,stride", [(4, 1), (5, 2), (7, 3), (6, 4)])
def test_video_counts_match_transformers_features(side, stride, mode):
    """Every stride, not only transformers' processor's hard-coded /4: count what the model produces."""
    from test_pooling import hf_video_model

    model = hf_video_model(side, stride, mode)
    config = LlavaNextConfig.from_hf_config(model.config.to_dict())
    with torch.no_grad():
        feats = model.get_video_features(torch.randn(1, 3, 3, side * 14, side * 14), vision_feature_layer=-2,
                                         vision_feature_select_strategy="default").pooler_output
    assert feats.shape[1] == video_tokens(3, config) == tokens.video_plan(3, config).tokens_per_frame * 3


@pytest.mark.parametrize("mode", ["average", "max", "bilinear"])
@pytest.mark.parametrize("newline", ["none", "grid", "frame", "one_token"])
@pytest.mark.parametrize("stride", [1, 2, 3, 4, 5])
def test_video_counts_match_our_features(stride, newline, mode):
    """The count and the feature path share one definition: they agree for every setting."""
    frames = 3
    plan = tokens.video_plan(frames, VIDEO_7B, stride=stride, mode=mode, newline=newline)
    pooled = pool_frames(torch.zeros(frames, 576, 2), (24, 24), stride, mode)
    seq = add_video_newlines(pooled, plan.pooled_hw, torch.ones(2), newline)
    assert seq.shape[0] == plan.total == video_tokens(frames, VIDEO_7B, stride=stride, newline=newline, mode=mode)


# ---- context and RoPE factor -----------------------------------------------------------------------
def test_rope_scale_sources():
    visual = video_tokens(32, VIDEO_7B)  # 4608
    cfg = plan_context(TEXT, visual, VIDEO_7B)
    assert (cfg.factor, cfg.factor_source, cfg.positions_available, cfg.fits) == (2.5, "config", 10240, True)
    auto = plan_context(TEXT, visual, VIDEO_7B, rope_scale="auto")
    assert (auto.factor, auto.smallest_factor, auto.positions_available) == (2.0, 2.0, 8192)
    assert plan_context(TEXT, video_tokens(8, VIDEO_7B), VIDEO_7B, rope_scale="auto").factor == 1.0
    # the original demo: ceil((F * 144 + 1000) / 4096), applied only when >= 2 (docs/references.md)
    assert [plan_context(TEXT, video_tokens(f, VIDEO_7B), VIDEO_7B, rope_scale="original").factor
            for f in (8, 16, 32, 64)] == [1.0, 1.0, 2.0, 3.0]
    user = plan_context(TEXT, visual, VIDEO_7B, rope_scale=1.0)
    assert (user.factor_source, user.fits, user.tokens_needed) == ("user", False, visual + TEXT)
    assert plan_context(0, 4096, VICUNA_7B).fits and not plan_context(1, 4096, VICUNA_7B).fits  # boundary
    assert plan_context(10, 20, VICUNA_7B, new_tokens=5).tokens_needed == 35
    for bad in ("yes", 0.5, True):
        with pytest.raises(ValueError, match="rope_scale"):
            plan_context(TEXT, visual, VIDEO_7B, rope_scale=bad)


def test_overflow_is_never_silent():
    plan = plan_context(TEXT, video_tokens(64, VIDEO_7B), VIDEO_7B)  # 9316 positions vs 10240: fits
    assert check_context(plan) is plan
    over = plan_context(TEXT, video_tokens(80, VIDEO_7B), VIDEO_7B, video_tokens=video_tokens(80, VIDEO_7B))  # 11620
    with pytest.raises(ContextOverflowError) as e:
        check_context(over)
    msg = str(e.value)
    for fix in ("fewer frames", "--pool-stride", "--rope-scale 3", "11620", "10240"):
        assert fix in msg, fix
    with pytest.warns(RuntimeWarning, match="--rope-scale 3"):
        assert check_context(over, on_overflow="warn") is over
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_context(plan, on_overflow="warn")  # fits: no warning


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one frame"):
        video_tokens(0, VIDEO_7B)
    with pytest.raises(ValueError, match="larger than the 24x24"):
        video_tokens(8, VIDEO_7B, stride=25)
    full = VIDEO_7B.replace(vision=VIDEO_7B.vision.__class__(feature_strategy="full"))
    with pytest.raises(ValueError, match="feature_strategy"):
        video_tokens(8, full)
    with pytest.raises(ValueError, match="feature_strategy"):
        image_tokens((480, 640), full)
    with pytest.raises(ValueError, match=">= 0"):
        plan_context(-1, 10, VIDEO_7B)
