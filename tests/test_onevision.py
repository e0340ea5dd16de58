"""LLaVA-OneVision / LLaVA-Video through llava-hf: parity with transformers' LlavaOnevisionForConditionalGeneration.

A tiny random checkpoint saved by transformers (tests/checkpoints_qwen.py: 70 px SigLIP tiles of 5 x 5
patches, pinpoints every (a, b) with a, b in 70/140/210), converted by our converter, compared on real
photos and the real video: one image (anyres_max_9: base first, unpadded map, newline per row), one image
under anyres_max_1 (the map is downscaled bilinearly), three images (each padded to a square, one tile +
one newline), a video (projector, then bilinear 5 -> 3 pooling, one newline after the video) and an image
with a video. Token counts are checked against transformers' OneVision processor arithmetic at the real
so400m shape, including the published 899x1024 count. Tolerance: max |diff| <= 1e-4 * max |ref|.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from checkpoints_qwen import IMAGE_ID, VIDEO_ID, make_onevision_checkpoint, real_clip
from media import real_photo, real_video
from llava_next.config import PRESETS
from llava_next.inputs.image import preprocess_image
from llava_next.inputs.prompt import expand_placeholders
from llava_next.inputs.tokens import image_aspect, image_plan, image_tokens, video_tokens
from llava_next.model.llava import LlavaNextModel
from llava_next_weights.convert import convert
from llava_next_weights.load import load_into, read_config

pytest.importorskip("transformers")


def load_ours(directory) -> LlavaNextModel:
    with torch.device("meta"):
        model = LlavaNextModel(read_config(directory))
    return load_into(model, directory).eval()


def _pair(tmp_path_factory, aspect: str):
    root = tmp_path_factory.mktemp("ov")
    src, hf = make_onevision_checkpoint(root / "hf", aspect)
    return load_ours(convert(src, root / "ours", progress=False)), hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return _pair(tmp_path_factory, "anyres_max_9")


@pytest.fixture(scope="module")
def pair_max_1(tmp_path_factory):
    return _pair(tmp_path_factory, "anyres_max_1")


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale, diff = ref.abs().max().item(), (ours - ref).abs().max().item()
    assert diff <= 1e-4 * scale, f"max |diff| {diff:.3g} > 1e-4 x scale {scale:.3g}"


def run_both(ours, hf, images=(), clips=()):
    cfg = ours.config
    aspect = image_aspect(cfg, len(images))
    ids = [5] + [IMAGE_ID] * len(images) + [VIDEO_ID] * len(clips) + [17, 9]
    ids = expand_placeholders(ids, IMAGE_ID, VIDEO_ID, [image_tokens(im.image_size, cfg, aspect) for im in images],
                              [video_tokens(c.num_frames, cfg) for c in clips])
    args = {}
    if images:
        most = max(im.pixel_values.shape[0] for im in images)
        pixels = torch.zeros(len(images), most, *images[0].pixel_values.shape[1:])
        for i, im in enumerate(images):
            pixels[i, :im.pixel_values.shape[0]] = im.pixel_values
        args = dict(pixel_values=pixels, image_sizes=torch.tensor([im.image_size for im in images]),
                    batch_num_images=torch.tensor([len(images)]))
    if clips:
        args["pixel_values_videos"] = torch.stack([c.pixel_values for c in clips])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), **args).logits
        got = ours(torch.tensor([ids]), images=images, videos=[c.pixel_values for c in clips])
    assert got.shape == ref.shape
    assert_close(got, ref)


def test_converted_config_is_onevision(pair):
    cfg = pair[0].config
    assert (cfg.vision.kind, cfg.spatial_pool_mode, cfg.pool_position, cfg.video_newline, cfg.multi_image_aspect_ratio) \
        == ("siglip", "bilinear", "after_projector", "one_token", "pad")
    assert cfg.anyres_max_patches == 9 and cfg.untiled_image_newline and cfg.template == "qwen_onevision_hf"


def test_one_image_anyres_max_9(pair):
    ours, hf = pair
    run_both(ours, hf, images=[preprocess_image(real_photo("rocket"), ours.config)])


def test_one_image_anyres_max_1_downscales(pair_max_1):
    ours, hf = pair_max_1
    assert ours.config.anyres_max_patches == 1
    image = preprocess_image(real_photo("chelsea"), ours.config)
    plan = image_plan(image.image_size, ours.config)
    assert plan.unpadded_hw[0] * plan.unpadded_hw[1] < 25 * plan.num_tiles  # the unpadded map was shrunk
    run_both(ours, hf, images=[image])


def test_three_images_padded_one_tile_each(pair):
    ours, hf = pair
    images = [preprocess_image(real_photo(n), ours.config, aspect="pad") for n in ("chelsea", "rocket", "coffee")]
    assert all(im.grid == (0, 0) for im in images)
    assert image_tokens((300, 451), ours.config, "pad") == 25 + 1
    run_both(ours, hf, images=images)


def test_video_and_image_with_video(pair):
    ours, hf = pair
    clip = real_clip(4)
    assert video_tokens(4, ours.config) == 4 * 3 * 3 + 1  # 5x5 -> bilinear 3x3, one newline per video
    run_both(ours, hf, clips=[clip])
    run_both(ours, hf, images=[preprocess_image(real_photo("astronaut"), ours.config)], clips=[clip])


def hf_processor_count(config, image_hw) -> int:
    """transformers' LlavaOnevisionProcessor._get_number_of_features for the config's geometry."""
    from transformers import LlavaOnevisionProcessor

    proc = object.__new__(LlavaOnevisionProcessor)
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints])
    proc.num_image_tokens = config.vision.num_patches
    proc.vision_aspect_ratio = f"anyres_max_{config.anyres_max_patches}"
    proc.vision_feature_select_strategy = "full"
    return proc._get_number_of_features(*image_hw, config.tile_size, config.tile_size)


@pytest.mark.parametrize("name", ["llava-onevision-qwen2-0.5b-ov", "LLaVA-Video-7B-Qwen2"])
def test_token_counts_equal_transformers_processor(name):
    cfg = PRESETS[name].config
    sizes = [(899, 1024), (384, 384), (500, 500), (1024, 1024), (300, 1200), (47, 423), (49, 1323), (2000, 300),
             (503, 316), (4000, 3000), (300, 451), (427, 640)]
    for hw in sizes:
        assert image_tokens(hw, cfg) == hf_processor_count(cfg, hw), hw
    # the published test: llava-onevision-qwen2-0.5b-ov-hf, 899x1024 -> 10 tiles, input_ids length 6567 for
    # "user\n<image>\nWhat do you see in this image?<|im_end|>\n<|im_start|>assistant\n" (16 text tokens)
    plan = image_plan((899, 1024), cfg)
    assert (plan.num_tiles + 1, plan.total, plan.total + 16) == (10, 6551, 6567)
    assert image_tokens((899, 1024), cfg, "pad") == 730 and video_tokens(8, cfg) == 8 * 196 + 1


def test_published_processor_test_count_with_a_clip_tower():
    """transformers' OneVision processor test: a (503, 316) image, pinpoints [[672, 336]], 336 px / 14 px tiles,
    strategy "default" -> 1525. That processor subtracts one token for "default" after counting the features
    (docs/references.md), which its model does not do: the model's features for this image are
    576 (base, CLS dropped) + 38 x 24 + 38 = 1526. llava-next counts features, so 1526 = 1525 + 1."""
    from llava_next.config import LlavaNextConfig, VisionConfig

    cfg = LlavaNextConfig(vision=VisionConfig(), image_grid_pinpoints=((672, 336),), anyres_max_patches=9)
    plan = image_plan((503, 316), cfg)
    assert (plan.base_tokens, plan.feature_map_hw, plan.unpadded_hw) == (576, (48, 24), (38, 24))
    assert image_tokens((503, 316), cfg) == 576 + 38 * 24 + 38 == 1525 + 1


def test_inspect_text_json_png_for_the_new_presets(tmp_path, capsys):
    from PIL import Image

    from llava_next.cli.main import main

    photos = [str(real_photo("chelsea")), str(real_photo("rocket"))]
    assert main(["inspect", "--preset", "llava-onevision-qwen2-0.5b-ov", "--image", *photos, "--json",
                 "--png", str(tmp_path / "plan.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(e["tokens"], e["aspect"]) for e in report["images"]] == [(730, "pad")] * 2  # several images: padded
    assert Image.open(tmp_path / "plan.png").size[0] > 300
    assert main(["inspect", "--preset", "llava-onevision-qwen2-0.5b-ov", "--image", photos[0]]) == 0
    assert "tokens          1836" in capsys.readouterr().out  # anyres_max_9: 300x451 -> 1836
    assert main(["inspect", "--preset", "llava-interleave-qwen-7b", "--video", str(real_video()), "--frames", "4",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["visual_tokens"] == 4 * 729 and report["tokens_per_frame"] == 729
    assert report["context"]["max_position_embeddings"] == 32768
