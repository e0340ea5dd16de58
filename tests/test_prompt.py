"""Chat templates and tokenization (llava_next/inputs/prompt.py) against docs/references.md and transformers.

References: the literal strings of docs/references.md; transformers' LlavaNextVideoProcessor rendering
the llava-hf video chat template; PreTrainedTokenizerFast on the same tokenizer files; transformers'
LlavaNextProcessor / LlavaNextVideoProcessor expanding <image>/<video>; a transcription of the
original ``tokenizer_image_token``; tokenizers' own DecodeStream.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tokenizers.decoders import DecodeStream
from tokenizers_fixture import RARE_TEXT, build_tokenizer, make_hf_tokenizer, make_tokenizer_json

from llava_next.model.anyres import select_best_resolution, unpadded_size
from llava_next.config import LlavaNextConfig, TextConfig, VisionConfig
from llava_next.inputs.prompt import (PromptError, Tokenizer, build_input_ids, expand_placeholders, render_prompt,
                               stop_token_ids)

Q = "What is shown in this image?"
LLAVA_SYS = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
             "helpful, detailed, and polite answers to the human's questions.")
VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")

# A tiny video checkpoint: 56 px tiles of 14 px patches (4x4), pinpoints scaled by 56/336; ids laid out
# like LLaVA-NeXT-Video-7B-hf (<video> first, then <image>).
TINY = LlavaNextConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=56, patch_size=14),
    text=TextConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
    image_grid_pinpoints=((56, 112), (112, 56), (112, 112), (168, 56), (56, 168)),
    image_token_id=601, video_token_id=600, template="llava_next_video")

# transcribed from llava-hf/LLaVA-NeXT-Video-7B-hf chat_template.json (transformers ships no default);
# it agrees with docs/references.md: images, then videos, then text + " "; no default system prompt
HF_VIDEO_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

# processor_config.json of the llava-hf repos: the count drops CLS ("default") after adding it (+1)
HUB_PROCESSOR = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)

TEXTS = ["USER: <video>\nWhy is this video funny? ASSISTANT:", f"<image>\n{Q}", "", " leading  and   double spaces ",
         "USER: <image><video> back to back<image>", f"{RARE_TEXT} café\n\n  indented\ttab", "<s>literal specials</s>"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """(folder with tokenizer.json + tokenizer_config.json, transformers tokenizer)."""
    return make_hf_tokenizer(tmp_path_factory.mktemp("tok"), TINY)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.load(tiny_dir[0])


def _pil_image_processor(cfg):
    from transformers import LlavaNextImageProcessorPil
    s = cfg.vision.image_size
    return LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                      image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints])


def _video_processor(cfg):
    from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor
    s = cfg.vision.image_size
    return LlavaNextVideoVideoProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


def _image_tokens(cfg, image_hw):
    """Visual tokens of one image (docs/references.md): base tile + unpadded grid with a newline per row."""
    g = cfg.vision.grid_size
    canvas_h, canvas_w = select_best_resolution(image_hw, cfg.image_grid_pinpoints)
    rows, cols = unpadded_size(image_hw, (canvas_h // cfg.tile_size * g, canvas_w // cfg.tile_size * g))
    return g * g + rows * (cols + 1)


def _video_tokens(cfg, frames):
    return frames * (cfg.vision.grid_size // cfg.spatial_pool_stride) ** 2


# --------------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template, expected", [
    ("llava_v1", f"{LLAVA_SYS} USER: <image>\n{Q} ASSISTANT:"),
    ("vicuna_v1", f"{VICUNA_SYS} USER: <image>\n{Q} ASSISTANT:"),
    ("mistral_instruct", f"[INST] <image>\n{Q} [/INST]"),
    ("chatml_direct", f"<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n{Q}<|im_end|>"
                      f"<|im_start|>assistant\n"),
    ("llava_next_video", f"USER: <image>\n{Q} ASSISTANT:"),
])
def test_templates_render_the_reference_strings(template, expected):
    assert render_prompt(Q, n_images=1, template=template) == expected


def test_multi_turn_and_system_strings():
    h = [("Hi", "Hello.")]
    assert render_prompt(Q, 1, 0, "llava_v1", history=h) == \
        f"{LLAVA_SYS} USER: <image>\nHi ASSISTANT: Hello.</s>USER: {Q} ASSISTANT:"
    assert render_prompt(Q, 1, 0, "mistral_instruct", history=h) == \
        f"[INST] <image>\nHi [/INST] Hello. </s>[INST] {Q} [/INST]"
    assert render_prompt(Q, 1, 0, "mistral_instruct", system="Be brief.") == \
        f"[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\n{Q} [/INST]"
    assert render_prompt(Q, 0, 1, "chatml_direct", history=h, system="S") == (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\n<video>\nHi<|im_end|><|im_start|>assistant\nHello.<|im_end|>"
        f"<|im_start|>user\n{Q}<|im_end|><|im_start|>assistant\n")
    assert render_prompt("Why is this video funny?", 0, 1, "llava_next_video") == \
        "USER: <video>\nWhy is this video funny? ASSISTANT:"  # docs/references.md / HF test prompt
    assert render_prompt("q", 2, 1, "vicuna_v1", system="") == " USER: <image>\n<image>\n<video>\nq ASSISTANT:"


@pytest.mark.parametrize("n_images, n_videos, system, history", [
    (0, 1, None, []), (1, 1, None, []), (2, 0, "You are terse.", []), (1, 2, None, [("First?", "An answer.")]),
    (0, 0, "Sys.", [("a", "b"), ("c", "d")])])
def test_llava_next_video_matches_the_hf_chat_template(n_images, n_videos, system, history, tiny_dir):
    from transformers import LlavaNextVideoProcessor
    proc = LlavaNextVideoProcessor(video_processor=_video_processor(TINY), image_processor=_pil_image_processor(TINY),
                                   tokenizer=tiny_dir[1], chat_template=HF_VIDEO_CHAT_TEMPLATE, **HUB_PROCESSOR)
    media = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for i, (q, a) in enumerate([*history, ("Why is this funny?", None)]):
        messages.append({"role": "user", "content": [{"type": "text", "text": q}, *(media if i == 0 else [])]})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    expected = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ours = render_prompt("Why is this funny?", n_images, n_videos, "llava_next_video", system=system, history=history)
    assert ours == expected


def test_placeholders_in_the_prompt_are_used_where_they_are():
    assert render_prompt("Compare <image> with <image>.", 2, 0, "mistral_instruct") == \
        "[INST] Compare <image> with <image>. [/INST]"
    assert render_prompt("Q", 1, 0, "llava_next_video", history=[("Look: <image>", "ok")]) == \
        "USER: Look: <image> ASSISTANT: ok USER: Q ASSISTANT:"
    assert render_prompt("raw <video> text", 0, 1, "none") == "raw <video> text"


@pytest.mark.parametrize("text, n_images, n_videos, template, counts", [
    ("<image> and <image>", 1, 0, "llava_v1", "2 <image> and 0 <video> placeholders but 1 image(s) and 0 video(s)"),
    ("<image> only", 1, 1, "llava_next_video", "1 <image> and 0 <video> placeholders but 1 image(s) and 1 video(s)"),
    ("no placeholder", 1, 0, "none", "0 <image> and 0 <video> placeholders but 1 image(s) and 0 video(s)"),
    ("<video>", 0, 0, "none", "0 <image> and 1 <video> placeholders but 0 image(s) and 0 video(s)"),
])
def test_placeholder_media_mismatch_names_the_counts(text, n_images, n_videos, template, counts):
    with pytest.raises(PromptError, match=counts.replace("(", r"\(").replace(")", r"\)")):
        render_prompt(text, n_images, n_videos, template)


def test_bad_template_arguments():
    with pytest.raises(PromptError, match="unknown template 'llava'"):
        render_prompt("q", 0, 0, "llava")  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="'none' sends the prompt exactly as given"):
        render_prompt("q", 0, 0, "none", system="s")
    with pytest.raises(PromptError, match="media counts must be >= 0"):
        render_prompt("q", -1, 0, "llava_v1")


# --------------------------------------------------------------------------------------------------
# tokenizer parity with transformers
# --------------------------------------------------------------------------------------------------
def test_encode_decode_match_transformers(tiny_dir, tok):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast.from_pretrained(str(tiny_dir[0]))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (1, 2, True, False)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text).input_ids, text
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), text
    rng = random.Random(0)
    for _ in range(50):  # random ids: byte runs, specials, placeholders, fillers
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), ids


def test_placeholders_are_single_ids_with_the_hf_space_pattern(tok):
    """HF test ids for 'USER: <video>\\nWhy …': [1, …, 29871 '▁', 32000, 13 '\\n', …] (docs/references.md)."""
    ids = tok.encode("USER: <video>\nWhy is this video funny? ASSISTANT:")
    k = ids.index(TINY.video_token_id)
    assert ids[0] == 1 and ids.count(TINY.video_token_id) == 1
    assert [tok.backend.id_to_token(i) for i in ids[k - 1:k + 2]] == ["▁", "<video>", "\n"]


@pytest.mark.parametrize("config_fields", [{"add_bos_token": True, "add_eos_token": False}, {"add_bos_token": False},
                                           {"add_eos_token": True}, {"pad_token": "<unk>"}])
def test_hub_style_tokenizer_config_matches_transformers(tmp_path, config_fields):
    """llava-hf folders carry add_bos_token / add_eos_token in tokenizer_config.json (written by transformers
    4.x). transformers 5 lets tokenizer.json's post-processor decide; so do we."""
    from transformers import PreTrainedTokenizerFast
    make_tokenizer_json(tmp_path, TINY)
    fields = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **config_fields}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(fields))
    ours, hf = Tokenizer.load(tmp_path / "tokenizer.json"), PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids, (config_fields, text)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)


def test_tokenizer_json_without_post_processor_takes_the_config_flags(tmp_path):
    """No post-processor: BOS/EOS come from tokenizer_config.json (transformers 4 did this; 5 adds nothing)."""
    backend = build_tokenizer(TINY)
    backend.post_processor = None
    backend.save(str(tmp_path / "tokenizer.json"))
    plain = backend.encode("hi").ids
    for flags, expected in [({"add_bos_token": True}, [1, *plain]), ({}, plain),
                            ({"add_bos_token": True, "add_eos_token": True}, [1, *plain, 2])]:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", **flags}))
        assert Tokenizer.load(tmp_path).encode("hi") == expected, flags


def test_bare_tokenizer_json_uses_its_post_processor(tmp_path):
    path = make_tokenizer_json(tmp_path / "t.json", TINY)
    ours = Tokenizer.load(path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (1, 2, None, True)
    assert ours.encode("hi") == build_tokenizer(TINY).encode("hi").ids


def test_missing_tokenizer_json_says_how_to_convert(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(PromptError, match="no tokenizer.json.*tokenizer.model.*save_pretrained"):
        Tokenizer.load(tmp_path)


# --------------------------------------------------------------------------------------------------
# ids for the model, and the processors' expansion
# --------------------------------------------------------------------------------------------------
def test_build_input_ids_and_expansion_match_llava_next_processors(tiny_dir, tok):
    from transformers import LlavaNextProcessor, LlavaNextVideoProcessor
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, hw + (3,), dtype=np.uint8) for hw in [(80, 120), (150, 60)]]
    video = rng.integers(0, 255, (3, 60, 70, 3), dtype=np.uint8)
    image_counts = [_image_tokens(TINY, im.shape[:2]) for im in images]

    ids = build_input_ids("Compare them.", tok, TINY, n_images=2, template="llava_v1")
    proc = LlavaNextProcessor(image_processor=_pil_image_processor(TINY), tokenizer=tiny_dir[1], **HUB_PROCESSOR)
    expected = proc(text=render_prompt("Compare them.", 2, 0, "llava_v1"), images=images)["input_ids"][0]
    assert expand_placeholders(ids, TINY.image_token_id, TINY.video_token_id, image_counts) == expected

    vproc = LlavaNextVideoProcessor(video_processor=_video_processor(TINY), image_processor=_pil_image_processor(TINY),
                                    tokenizer=tiny_dir[1], **HUB_PROCESSOR)
    ids = build_input_ids("Why is this funny?", tok, TINY, n_images=1, n_videos=1)  # config.template
    text = render_prompt("Why is this funny?", 1, 1, "llava_next_video")
    expected = vproc(text=text, images=images[:1], videos=[video])["input_ids"][0].tolist()
    got = expand_placeholders(ids, TINY.image_token_id, TINY.video_token_id, image_counts[:1], [_video_tokens(TINY, 3)])
    assert got == expected


@pytest.mark.slow
def test_real_video_7b_ids_and_counts(tmp_path):
    """LLaVA-NeXT-Video-7B-hf ids (<video> 32000, <image> 32001) and its processor at 336 px: 640x480 → 2340
    image tokens, 8 frames → 1152 video tokens (docs/references.md)."""
    from transformers import LlavaNextVideoProcessor
    cfg = LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")
    folder, hf = make_hf_tokenizer(tmp_path, cfg)
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    video = np.zeros((8, 64, 64, 3), dtype=np.uint8)
    assert (_image_tokens(cfg, (480, 640)), _video_tokens(cfg, 8)) == (2340, 1152)
    vproc = LlavaNextVideoProcessor(video_processor=_video_processor(cfg), image_processor=_pil_image_processor(cfg),
                                    tokenizer=hf, **HUB_PROCESSOR)
    text = render_prompt("Why is this video funny?", 1, 1, "llava_next_video")
    expected = vproc(text=text, images=[image], videos=[video])["input_ids"][0].tolist()
    ids = build_input_ids("Why is this video funny?", Tokenizer.load(folder), cfg, 1, 1)
    assert ids[:2] == [1, hf.convert_tokens_to_ids("▁USER:")] and 32000 in ids and 32001 in ids
    assert expand_placeholders(ids, 32001, 32000, [2340], [1152]) == expected


def _orig_tokenizer_image_token(prompt, tokenizer, image_token_index):
    """llava/mm_utils.py tokenizer_image_token (LLaVA-VL/LLaVA-NeXT @ df17966), verbatim but for the id."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def test_original_tokenizer_without_placeholders_splits_like_the_original(tmp_path):
    """An original checkpoint: no <image> token; placeholders become config.image_token_id (== vocab size)."""
    orig = TINY.replace(image_token_id=640, video_token_id=None, template="llava_v1")
    folder, hf = make_hf_tokenizer(tmp_path, {}, vocab_size=640)
    tok = Tokenizer.load(folder)
    assert tok.added_token_id("<image>") is None
    for question, n in [(Q, 1), ("Compare <image> and <image>.", 2), ("", 1)]:
        ids = build_input_ids(question, tok, orig, n_images=n)
        text = render_prompt(question, n, 0, "llava_v1")
        assert ids == _orig_tokenizer_image_token(text, hf, 640), question
    # an original video checkpoint (config: image id = vocab size, video id = vocab size + 1); the original
    # writes "<image>" for the video too, so its ids are ours with the video id put back
    orig_video = orig.replace(video_token_id=641, template="vicuna_v1")
    ids = build_input_ids("Why?", tok, orig_video, n_images=1, n_videos=1)
    reference = _orig_tokenizer_image_token(render_prompt("Why?", 2, 0, "vicuna_v1"), hf, 640)
    second = [i for i, t in enumerate(reference) if t == 640][1]
    assert ids == reference[:second] + [641] + reference[second + 1:]
    ids = build_input_ids(Q, tok, orig, n_images=1)
    after = ids[ids.index(640) + 1:][:2]  # the original's extra "▁" after the image (docs/references.md)
    assert [tok.backend.id_to_token(i) for i in after] == ["▁", "\n"]


def test_mismatched_tokenizer_and_config_are_errors(tok):
    with pytest.raises(PromptError, match="tokenizer has <image> at id 601 but the model config expects 599"):
        build_input_ids(Q, tok, TINY.replace(image_token_id=599), n_images=1)
    with pytest.raises(PromptError, match="1 video.* image-only"):
        build_input_ids(Q, tok, TINY.replace(video_token_id=None), n_videos=1)
    small = TINY.replace(text=TextConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2,
                                         num_heads=4, num_kv_heads=2))
    with pytest.raises(PromptError, match="token id 4.. is outside the model's vocabulary .vocab_size 260."):
        build_input_ids("USER: hi", tok, small, template="none")


def test_expand_placeholders_errors_and_shared_ids():
    with pytest.raises(PromptError, match="hold 2 image and 0 video placeholders but counts were given for 1 image"):
        expand_placeholders([1, 7, 5, 7], 7, 8, [3])
    with pytest.raises(PromptError, match=">= 1"):
        expand_placeholders([1, 7], 7, 8, [0])
    # original-format configs give images and videos one id: images first, then videos
    assert expand_placeholders([1, 9, 5, 9, 4], 9, 9, [2], [3]) == [1, 9, 9, 5, 9, 9, 9, 4]
    assert expand_placeholders([8, 1, 7], 7, 8, [2], [1]) == [8, 1, 7, 7]


# --------------------------------------------------------------------------------------------------
# streaming decode and stop tokens
# --------------------------------------------------------------------------------------------------
def test_stream_decode_equals_full_decode(tok):
    rng = random.Random(1)
    cases = [tok.encode(t) for t in TEXTS] + [tok.encode(RARE_TEXT * 3, add_special_tokens=False)]
    cases += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))] for _ in range(100)]
    for ids in cases:
        for skip in (True, False):
            assert "".join(tok.decode_stream(ids, skip)) == tok.decode(ids, skip), ids


def test_stream_pieces_match_tokenizers_decode_stream(tok):
    """Without byte-fallback pieces our pieces are tokenizers' DecodeStream pieces, one per visible token."""
    ids = tok.encode("USER: <image>\nWhat  is shown, in detail? ASSISTANT: A cat.</s>")
    assert not set(ids) & tok.byte_ids
    stream = DecodeStream(skip_special_tokens=True)
    assert list(tok.decode_stream(ids)) == [p for p in (stream.step(tok.backend, i) for i in ids) if p]


def test_stream_holds_byte_runs_until_they_end(tok):
    ids = tok.encode(f"Hi {RARE_TEXT} <image> done")
    pieces = list(tok.decode_stream(ids))
    assert all("\ufffd" not in p for p in pieces) and pieces[0] == "Hi"  # first "▁" dropped as in full decode
    assert any("猫" in p for p in pieces) and any("🙂" in p for p in pieces)  # 3- and 4-byte characters whole
    # a valid character followed by a stray byte: the decoder turns the whole run into U+FFFD, and the
    # stream must not have shown the character before it knew
    cat = tok.encode("猫", add_special_tokens=False)[-3:]
    bad = [*cat, tok.token_id("<0xE7>"), tok.token_id("<image>"), tok.token_id("<0x41>"), tok.token_id("<s>")]
    decoder = tok.stream()
    assert [decoder.step(i) for i in bad] == ["", "", "", "", "", "", ""]
    assert decoder.finish() == tok.decode(bad) == "\ufffd" * 5


def test_stream_decode_with_a_byte_level_tokenizer():
    """GPT-2-style byte-level BPE (no "<0x..>" pieces): a character's bytes can end mid-token; the stream waits
    while the text ends in U+FFFD, and stays exact on random ids."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    from tokenizers_fixture import CORPUS
    backend = Backend(models.BPE())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    backend.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(backend)
    ids = tok.encode(f"Hi {RARE_TEXT} end")
    pieces = list(tok.decode_stream(ids))
    assert "".join(pieces) == tok.decode(ids) and all("\ufffd" not in p for p in pieces)
    assert any("🙂" in p for p in pieces) and len(pieces) > 5
    rng = random.Random(2)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 20))]
        assert "".join(tok.decode_stream(ids)) == tok.decode(ids), ids


def test_stop_token_ids(tmp_path):
    ids = {"<image>": 500, "<|im_start|>": 501, "<|im_end|>": 502}
    tok = Tokenizer.load(make_tokenizer_json(tmp_path, ids))
    assert stop_token_ids(tok, "chatml_direct") == (2, 502)
    assert stop_token_ids(tok, "llava_v1") == stop_token_ids(tok, "mistral_instruct") == (2,)
    assert stop_token_ids(tok, "none") == (2,)
