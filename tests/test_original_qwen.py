"""The original lmms-lab SigLIP + Qwen checkpoints (LlavaQwenForCausalLM) through the converter, each difference a switch.

The tiny llava-hf checkpoints of checkpoints_qwen.py are renamed into the lmms-lab layout (the HF converters'
key mapping reversed; no <image> rows in the vocabulary, placeholders past it; no lm_head when tied) with
lmms-lab config.json fields, converted by our converter, and compared with transformers where the two
implementations compute the same thing: logits over the original vocabulary on the same pixels and ids.
- interleave 7b-dpo (image_aspect_ratio "pad", mm_patch_merge_type "flat"): every image padded to a square,
  one tile, no newline == LlavaForConditionalGeneration on those pixels;
- OneVision / LLaVA-Video (anyres_max_9, spatial_unpad, bilinear pooling, one_token): == transformers'
  LlavaOnevision on one image (a size where pinpoint order and unpad rounding agree) and on a video.
Where they differ, the switch is checked: interleave 0.5b/7b (anyres + spatial_unpad) give an untiled
image 730 tokens and a single image full AnyRes; the template has the system prompt; the ignored
mm_vision_select_layer.
"""

from __future__ import annotations

import pytest
import torch

from checkpoints_qwen import (IMAGE_ID, ORIGINAL_VOCAB, VIDEO_ID, make_interleave_checkpoint, real_clip,
                              make_onevision_checkpoint, make_original_qwen_checkpoint)
from media import real_photo
from llava_next.inputs.image import preprocess_image
from llava_next.inputs.prompt import expand_placeholders, render_prompt
from llava_next.inputs.tokens import image_aspect, image_tokens, video_tokens
from llava_next_weights.convert import convert
from test_onevision import assert_close, load_ours

pytest.importorskip("transformers")


def swap(ids, ours_cfg):
    """HF placeholder ids -> the converted original model's (past the vocabulary)."""
    table = {IMAGE_ID: ours_cfg.image_token_id, VIDEO_ID: ours_cfg.video_token_id}
    return [table.get(i, i) for i in ids]


def test_interleave_dpo_pad_flat_matches_llava(tmp_path):
    src, hf = make_interleave_checkpoint(tmp_path / "hf")
    orig = make_original_qwen_checkpoint(tmp_path / "orig", src, image_aspect_ratio="pad", mm_patch_merge_type="flat",
                                         image_grid_pinpoints=None, mm_newline_position="grid")
    ours = load_ours(convert(orig, tmp_path / "ours", progress=False))
    cfg = ours.config
    assert (cfg.image_aspect_ratio, cfg.untiled_image_newline, cfg.video_as_images, cfg.template) == \
        ("pad", False, True, "qwen_1_5")
    assert ours.image_newline is None and cfg.text.vocab_size == ORIGINAL_VOCAB and cfg.image_token_id == ORIGINAL_VOCAB
    images = [preprocess_image(real_photo(n), cfg, aspect=image_aspect(cfg, 2)) for n in ("chelsea", "rocket")]
    ids = [5] + [IMAGE_ID, 40] * 2 + [9]
    ids = expand_placeholders(ids, IMAGE_ID, None, [image_tokens(im.image_size, cfg, "pad") for im in images])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=torch.cat([im.pixel_values for im in images])).logits
        got = ours(torch.tensor([swap(ids, cfg)]), images=images)
    assert_close(got, ref[..., :ORIGINAL_VOCAB])


def test_onevision_original_matches_transformers_on_an_image_and_a_video(tmp_path):
    src, hf = make_onevision_checkpoint(tmp_path / "hf")
    pins = [[a, b] for a in (70, 140, 210) for b in (70, 140, 210)]
    orig = make_original_qwen_checkpoint(tmp_path / "orig", src, image_aspect_ratio="anyres_max_9",
                                         image_grid_pinpoints=pins, mm_spatial_pool_mode="bilinear",
                                         mm_newline_position="one_token", mm_spatial_pool_stride=4)
    ours = load_ours(convert(orig, tmp_path / "ours", progress=False))
    cfg = ours.config
    assert (cfg.anyres_compat, cfg.anyres_max_patches, cfg.spatial_pool_stride, cfg.video_newline) == \
        ("original", 9, 2, "one_token")  # the original ignores mm_spatial_pool_stride
    image = preprocess_image(real_photo("rocket"), cfg)
    clip = real_clip(3)
    # a size where the two readings (pinpoint order, unpad rounding) agree, so transformers is the reference
    assert image_tokens(image.image_size, cfg) == image_tokens(image.image_size, cfg.replace(anyres_compat="hf"))
    ids = [5, IMAGE_ID, VIDEO_ID, 17, 9]
    ids = expand_placeholders(ids, IMAGE_ID, VIDEO_ID, [image_tokens(image.image_size, cfg)], [video_tokens(3, cfg)])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=image.pixel_values[None],
                 image_sizes=torch.tensor([image.image_size]), pixel_values_videos=clip.pixel_values[None]).logits
        got = ours(torch.tensor([swap(ids, cfg)]), images=[image], videos=[clip.pixel_values])
    assert_close(got, ref[..., :ORIGINAL_VOCAB])


def test_interleave_anyres_unpad_switches(tmp_path):
    """lmms-lab interleave 0.5b / 7b: anyres + spatial_unpad, pinpoints read (width, height), unpad truncating;
    an untiled image (several in a prompt) gets a newline: 730 tokens at the real shape."""
    from llava_next.config import LlavaNextConfig

    pins = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
    raw = {"architectures": ["LlavaQwenForCausalLM"], "hidden_size": 1024, "intermediate_size": 2816,
           "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
           "rope_theta": 1e6, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
           "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_vision_select_layer": -2,
           "image_aspect_ratio": "anyres", "image_grid_pinpoints": pins, "mm_patch_merge_type": "spatial_unpad"}
    cfg = LlavaNextConfig.from_original_config(raw)
    assert (cfg.vision.num_layers, cfg.vision.layers_used, cfg.vision.tokens_per_tile) == (26, 26, 729)
    assert cfg.anyres_compat == "original" and cfg.video_as_images and cfg.text.tie_word_embeddings
    assert image_tokens((300, 451), cfg, image_aspect(cfg, 2)) == 730
    # a square image: the (w, h) reading picks the portrait 1x2 canvas, the HF reading the landscape one
    from llava_next.inputs.tokens import image_plan

    assert image_plan((384, 384), cfg).canvas_hw == (768, 384)
    assert render_prompt("Hi", 1, 0, cfg.template).startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_original_interleave_runs_an_anyres_image_and_a_video_sent_as_frames(tmp_path):
    """Issue 22: an original-format interleave checkpoint (anyres + spatial_unpad) sends a video as its
    frames; the user's image keeps its AnyRes plan, each frame its one-tile "resize" plan, and every planned
    count equals the features the model makes of that image (the run once died with a shape mismatch: the
    image was planned as one tile)."""
    import shutil

    from media import cached_video
    from llava_next.inputs.tokens import image_plan
    from llava_next.runtime.pipeline import Pipeline

    src, _ = make_interleave_checkpoint(tmp_path / "hf")
    pins = [[70, 140], [140, 70], [140, 140]]
    orig = make_original_qwen_checkpoint(tmp_path / "orig", src, image_grid_pinpoints=pins)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, orig / name)
    pipe = Pipeline.from_pretrained(orig, cache_dir=tmp_path / "cache", progress=False, dtype=torch.float32)
    cfg = pipe.config
    assert cfg.video_as_images and cfg.image_aspect_ratio == "anyres"
    video = cached_video("odd", frames=12, size_hw=(9, 17), fps=10, codec="mpeg4")
    req = pipe.prepare("What is shown?", images=[real_photo("rocket")], video=video, frames=2)
    image = req.images[0]
    assert image.grid != (0, 0) and req.image_plans[0].aspect == "anyres"
    assert req.image_token_counts[0] == image_plan(image.image_size, cfg).total
    assert [p.aspect for p in req.image_plans[1:]] == ["resize", "resize"] and len(req.frame_clips) == 1
    with torch.no_grad():
        features = pipe.model.image_features(req.images)
    assert [len(f) for f in features] == req.image_token_counts
    assert req.plan.video_tokens == sum(req.image_token_counts[1:])
    assert len(pipe.generate_batch([req], max_new_tokens=2)[0]) >= 1
