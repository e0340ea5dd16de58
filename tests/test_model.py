"""The whole model at logit parity with transformers' LlavaNext(Video)ForConditionalGeneration.

Tiny random checkpoints are saved by transformers in the llava-hf on-disk format, renamed into the
original LLaVA-NeXT format, and both are converted by our converter and loaded by our loader. Inputs are
real photos (scikit-image) and a real video decoded with PyAV; ids are the same expanded ids on both
sides (transformers' processors expand each placeholder to its visual-token count; we use the same
token accounting). Reference: fp32, eager attention.

Tolerance: max |ours - theirs| <= 1e-4 * max |theirs| (fp32). Greedy decoding token-identical.
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_llava_hf_checkpoint, make_original_checkpoint
from media import cached_video, real_photo
from llava_next.inputs.image import preprocess_image
from llava_next.model.llava import LlavaNextModel, MediaMismatchError
from llava_next.inputs.prompt import expand_placeholders
from llava_next.inputs.tokens import image_tokens, video_tokens
from llava_next.inputs.video import load_video
from llava_next_weights.convert import convert
from llava_next_weights.load import load_into, read_config

pytest.importorskip("transformers")

TEXT = [1, 5, 17, 33, 7]  # arbitrary in-vocabulary text ids (vocab 128 in the original format)


def load_ours(directory) -> LlavaNextModel:
    config = read_config(directory)
    with torch.device("meta"):
        model = LlavaNextModel(config)
    return load_into(model, directory).eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * scale, f"max |diff| {diff:.3g} > 1e-4 x scale {scale:.3g}"


@pytest.fixture(scope="module")
def video_pair(tmp_path_factory):
    """(ours from llava-hf, ours from original, transformers) for a tiny LLaVA-NeXT-Video checkpoint."""
    root = tmp_path_factory.mktemp("video")
    hf_dir, hf = make_llava_hf_checkpoint(root / "hf", kind="video")
    hf.set_attn_implementation("eager")
    orig_dir = make_original_checkpoint(root / "orig", hf_dir)
    ours = load_ours(convert(hf_dir, root / "ours", progress=False))
    ours_orig = load_ours(convert(orig_dir, root / "ours_orig", progress=False))
    return ours, ours_orig, hf


@pytest.fixture(scope="module")
def media(video_pair):
    cfg = video_pair[0].config
    images = [preprocess_image(real_photo("chelsea"), cfg), preprocess_image(real_photo("rocket"), cfg)]
    clip = load_video(cached_video("model_parity", frames=24, size_hw=(90, 160), fps=12, photo="coffee"), 4,
                      size=cfg.tile_size)
    return images, clip


def hf_image_args(images) -> dict:
    """transformers' LlavaNext inputs: tiles padded to the most tiles, original sizes (height, width)."""
    most = max(im.pixel_values.shape[0] for im in images)
    pixels = torch.zeros(len(images), most, *images[0].pixel_values.shape[1:])
    for i, im in enumerate(images):
        pixels[i, :im.pixel_values.shape[0]] = im.pixel_values
    return {"pixel_values": pixels, "image_sizes": torch.tensor([im.image_size for im in images])}


def prompt_ids(cfg, images=(), clips=()) -> list[int]:
    ids = [TEXT[0]] + [cfg.image_token_id] * len(images) + [cfg.video_token_id] * len(clips) + TEXT[1:]
    return expand_placeholders(ids, cfg.image_token_id, cfg.video_token_id,
                               [image_tokens(im.image_size, cfg) for im in images],
                               [video_tokens(c.num_frames, cfg) for c in clips])


def original_ids(ids: list[int], hf_cfg, orig_cfg) -> list[int]:
    """The same prompt for the original-format model, whose placeholder ids differ."""
    swap = {hf_cfg.image_token_id: orig_cfg.image_token_id, hf_cfg.video_token_id: orig_cfg.video_token_id}
    return [swap.get(i, i) for i in ids]


@pytest.mark.parametrize("case", ["one_image", "two_images", "video", "image_and_video"])
def test_logits_match_transformers(video_pair, media, case):
    ours, ours_orig, hf = video_pair
    images, clip = media
    use_images = {"one_image": images[:1], "two_images": images, "video": [], "image_and_video": images[:1]}[case]
    use_clips = [clip] if "video" in case else []
    ids = prompt_ids(ours.config, use_images, use_clips)
    hf_args = hf_image_args(use_images) if use_images else {}
    if use_clips:
        hf_args["pixel_values_videos"] = clip.pixel_values[None]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), **hf_args).logits
        got = ours(torch.tensor([ids]), images=use_images, videos=[c.pixel_values for c in use_clips])
        got_orig = ours_orig(torch.tensor([original_ids(ids, ours.config, ours_orig.config)]), images=use_images,
                             videos=[c.pixel_values for c in use_clips])
    assert got.shape == ref.shape
    assert_close(got, ref)
    vocab = ours_orig.config.text.vocab_size  # the original format has no placeholder rows
    assert_close(got_orig, ref[..., :vocab])


def test_left_padded_batch_equals_each_prompt_alone(video_pair, media):
    ours, _, hf = video_pair
    images, clip = media
    cfg = ours.config
    rows = [prompt_ids(cfg, images[:1]), prompt_ids(cfg, clips=[clip])]
    T = max(map(len, rows))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, T - len(row):] = torch.tensor(row)
        mask[r, T - len(row):] = True
    with torch.no_grad():
        batch = ours(ids, images=images[:1], videos=[clip.pixel_values], attention_mask=mask)
        alone = [ours(torch.tensor([rows[0]]), images=images[:1]),
                 ours(torch.tensor([rows[1]]), videos=[clip.pixel_values])]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ref = hf(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids,
                 pixel_values_videos=clip.pixel_values[None], **hf_image_args(images[:1])).logits
    for r, row in enumerate(rows):
        assert_close(batch[r, T - len(row):], alone[r][0])
        assert_close(batch[r, T - len(row):], ref[r, T - len(row):])


def test_greedy_generation_is_token_identical(video_pair, media):
    from llava_next.model.generate import generate

    ours, _, hf = video_pair
    images, clip = media
    ids = prompt_ids(ours.config, images[:1], [clip])
    with torch.no_grad():
        embeds = ours.embed(torch.tensor([ids]), ours.image_features(images[:1]), [ours.video_features(clip.pixel_values)])
        got = generate(ours.language_model, input_embeds=embeds, max_new_tokens=20, eos_token_id=())
        ref = hf.generate(input_ids=torch.tensor([ids]), pixel_values_videos=clip.pixel_values[None],
                          **hf_image_args(images[:1]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert got[0].tolist() == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("text, rope_factor", [("mistral", None), ("llama", 2.0)])
def test_image_model_variants(tmp_path, text, rope_factor):
    """llava-v1.6 image model: a Mistral (GQA) decoder, and a Llama one with linear RoPE x2."""
    hf_dir, hf = make_llava_hf_checkpoint(tmp_path / "hf", kind="image", text=text, rope_factor=rope_factor)
    hf.set_attn_implementation("eager")
    ours = load_ours(convert(hf_dir, tmp_path / "ours", progress=False))
    assert ours.config.text.rope_scaling_factor == (rope_factor or 1.0)
    images = [preprocess_image(real_photo("astronaut"), ours.config)]
    ids = prompt_ids(ours.config, images)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), **hf_image_args(images)).logits
        got = ours(torch.tensor([ids]), images=images)
    assert_close(got, ref)


def test_placeholders_and_media_must_match(video_pair, media):
    ours, _, _ = video_pair
    images, _ = media
    ids = prompt_ids(ours.config, images[:1])
    with pytest.raises(MediaMismatchError, match=r"prompt has \d+ image placeholder tokens but the 2 image"):
        ours(torch.tensor([ids]), images=images)
    with pytest.raises(MediaMismatchError, match="0 image"):
        ours(torch.tensor([TEXT + [ours.config.image_token_id]]))
