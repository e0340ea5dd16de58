"""LLaVA-NeXT-Interleave through llava-hf: transformers' LlavaForConditionalGeneration (SigLIP + Qwen2) at parity.

A tiny random checkpoint saved by transformers in the llava-hf format (tests/checkpoints_qwen.py), converted
by ``llava-next convert``, run in-process (logits) and by ``llava-next run --json`` (greedy tokens) on real
photos (one image, three interleaved with text) and the real test video as frames (one <image> each).
Every image is one squashed tile: 25 tokens here (729 for so400m), no AnyRes, no newline. Reference: fp32,
eager attention, the same pixels and the same expanded ids. Tolerance: max |diff| <= 1e-4 * max |ref|.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints_qwen import IMAGE_ID, TILE, make_interleave_checkpoint, real_clip
from media import real_photo, real_video
from llava_next.inputs.image import SIGLIP_STATS, normalize, preprocess_image
from llava_next.inputs.prompt import expand_placeholders, render_prompt
from llava_next.inputs.tokens import image_tokens
from llava_next.inputs.video import frame_options
from llava_next.model.llava import LlavaNextModel
from llava_next_weights.load import load_into, read_config

pytest.importorskip("transformers")
PHOTOS = ("chelsea", "rocket", "coffee")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from llava_next.cli.main import main

    root = tmp_path_factory.mktemp("interleave")
    src, hf = make_interleave_checkpoint(root / "llava-interleave-tiny-hf")
    env = dict(os.environ, LLAVA_NEXT_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", LLAVA_NEXT_COMPILE="0")
    assert main(["convert", str(src), str(root / "converted")]) == 0  # the CLI's code, in this process
    config = read_config(root / "converted")
    with torch.device("meta"):
        ours = LlavaNextModel(config)
    load_into(ours, root / "converted").eval()
    return root, src, hf, ours, env


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale, diff = ref.abs().max().item(), (ours - ref).abs().max().item()
    assert diff <= 1e-4 * scale, f"max |diff| {diff:.3g} > 1e-4 x scale {scale:.3g}"


def test_converted_config_is_interleave(setup):
    _, _, _, ours, _ = setup
    cfg = ours.config
    assert (cfg.vision.kind, cfg.image_aspect_ratio, cfg.video_as_images, cfg.template) == \
        ("siglip", "resize", True, "qwen_interleave_hf")
    assert cfg.text.qkv_bias and cfg.text.tie_word_embeddings and ours.image_newline is None
    assert image_tokens((300, 451), cfg) == (TILE // 14) ** 2 == 25


def test_pixels_equal_transformers_siglip_pil_processor(setup):
    from transformers import SiglipImageProcessorPil

    cfg = setup[3].config
    proc = SiglipImageProcessorPil(size={"height": TILE, "width": TILE})
    for name in PHOTOS[:2]:
        ours = preprocess_image(real_photo(name), cfg).pixel_values
        ref = proc(Image.open(real_photo(name)).convert("RGB"), return_tensors="pt")["pixel_values"]
        assert ours.shape == ref.shape == (1, 3, TILE, TILE)
        assert (ours - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("case", ["one_image", "three_images", "video_frames"])
def test_logits_match_transformers(setup, case):
    _, _, hf, ours, _ = setup
    cfg = ours.config
    if case == "video_frames":
        clip = real_clip(3)
        images = [preprocess_image(f, cfg) for f in clip.frames]  # the frames as images (already squashed)
        assert all(torch.equal(im.pixel_values[0], clip.pixel_values[i]) for i, im in enumerate(images))
    else:
        images = [preprocess_image(real_photo(n), cfg) for n in PHOTOS[:1 if case == "one_image" else 3]]
    ids = [5, 17] + [IMAGE_ID, 40] * len(images) + [9]  # images interleaved with text
    ids = expand_placeholders(ids, IMAGE_ID, None, [image_tokens(im.image_size, cfg) for im in images])
    pixels = torch.cat([im.pixel_values for im in images])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
        got = ours(torch.tensor([ids]), images=images)
    assert got.shape == ref.shape
    assert_close(got, ref)


def hf_greedy(setup, text: str, pixels: torch.Tensor, new: int) -> list[int]:
    from transformers import PreTrainedTokenizerFast

    _, src, hf, _, _ = setup
    ids = torch.tensor([PreTrainedTokenizerFast.from_pretrained(src)(text)["input_ids"]])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=new, do_sample=False)
    return out[0, ids.shape[1]:].tolist(), ids.shape[1]


def test_run_json_interleaved_images_and_video_frames_tokens_equal_transformers(setup, monkeypatch, capsys):
    """``llava-next run --json`` (its entry point, in this process: test_cli_run covers the console script in a
    process of its own): three photos interleaved with text, then the real video's 3 frames as images."""
    from llava_next.cli.main import main

    root, _, _, ours, env = setup
    for key in ("LLAVA_NEXT_CACHE", "LLAVA_NEXT_COMPILE"):
        monkeypatch.setenv(key, env[key])
    cfg = ours.config
    photos = [str(real_photo(n)) for n in PHOTOS]
    prompt = "Compare <image> with <image>, then <image>; what happens in <video>?"
    code = main(["run", "--model", str(root / "converted"), *[a for p in photos for a in ("--image", p)],
                 "--video", str(real_video()), "--frames", "3", "--dtype", "fp32", "--max-new-tokens", "12", "--json",
                 prompt])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["plan"]["image_tokens"] == [25] * 6 and out["plan"]["video_tokens"] == []
    assert len(out["plan"]["video_frames"][0]["frame_indices"]) == 3
    text = render_prompt(prompt.replace("<video>", "<image>" * 3), 6, 0, "qwen_interleave_hf")
    assert text.startswith("<|im_start|>user\n\nCompare <image> with")
    clip = real_clip(3)
    pixels = torch.cat([preprocess_image(p, cfg).pixel_values for p in photos] + [clip.pixel_values])
    ref, n_ids = hf_greedy(setup, text.replace("<image>", "<image>" * 25), pixels, 12)
    assert out["plan"]["input_tokens"] == n_ids
    assert out["tokens"] == ref[:len(out["tokens"])] and out["tokens"]


def test_video_frames_are_squashed_and_placed_first_by_the_template(setup):
    cfg = setup[3].config
    assert frame_options(cfg) == dict(size=TILE, resize="squash", stats=SIGLIP_STATS)
    clip = real_clip(2)  # = load_video(real_video(), 2, **frame_options(cfg)), cached
    # SigLIP's processors resize frames straight to the tile (no centre crop) and normalize to [-1, 1]
    whole = np.asarray(Image.fromarray(np.asarray(Image.open(real_photo("chelsea")).convert("RGB"))).resize(
        (TILE, TILE), Image.BICUBIC))
    assert torch.equal(preprocess_image(real_photo("chelsea"), cfg).pixel_values[0], normalize(whole, SIGLIP_STATS))
    assert clip.frames.shape == (2, TILE, TILE, 3)
    assert torch.equal(clip.pixel_values, normalize(clip.frames, SIGLIP_STATS))
    text = render_prompt("What happens in this video?", 2, 0, "qwen_interleave_hf")
    assert text == "<|im_start|>user\n<image><image>\nWhat happens in this video?<|im_end|>\n<|im_start|>assistant\n"


# the llava-hf llava-interleave-qwen-*-hf chat_template.json, verbatim (docs/references.md)
HF_INTERLEAVE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}{% else %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ '\\n' + content['text'] }}"
    "{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("n_images, system, history", [(1, None, ()), (3, "Be brief.", ()), (0, None, [("Hi", "Hello")])])
def test_qwen_interleave_template_renders_as_the_llava_hf_chat_template(setup, n_images, system, history):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(setup[1])
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for q, a in history:
        messages += [{"role": "user", "content": [{"type": "text", "text": q}]},
                     {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    messages.append({"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": "What?"}]})
    ref = tok.apply_chat_template(messages, chat_template=HF_INTERLEAVE_TEMPLATE, tokenize=False,
                                  add_generation_prompt=True)
    assert render_prompt("What?", n_images, 0, "qwen_interleave_hf", system=system, history=history) == ref
