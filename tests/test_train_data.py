"""llava_next/train/data.py on real media (the package's samples) and the built-in tiny models' tokenizers.

The label references below are written from the original code's rules (LLaVA-VL/LLaVA-NeXT,
llava/train/train.py), not from data.py: ``preprocess_v1`` / ``preprocess_llama_2`` (rounds split on "</s>",
lengths of separately tokenized pieces, the non-legacy -1) and ``preprocess_qwen`` (per message, then the
"\\n" / <|im_start|> / <|im_end|> unmasking).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_next.inputs.prompt import Tokenizer
from llava_next.inputs.samples import sample_path
from llava_next.runtime import tiny
from llava_next.train.data import (IGNORE_INDEX, DataError, TrainingData, collate, encode_conversation,
                                   frame_indices, pad_id, read_records)

BUNNY, CAT = sample_path("sample:bunny"), sample_path("sample:cat")
KOREAN_Q = "<video>\n이 영상을 한국어로 상세히 묘사해주세요."
KOREAN_A = ["토끼가 숲에서 나와 기지개를 켭니다.", "한 마리입니다. 😀 ㄱ"]


def model(name: str):
    path = tiny.ensure(name=name)
    return Tokenizer.load(path), tiny.tiny_config(name)


def video_item(answers=KOREAN_A, **extra) -> dict:
    conv = [{"from": "human", "value": KOREAN_Q}, {"from": "gpt", "value": answers[0]}]
    for a in answers[1:]:
        conv += [{"from": "human", "value": "몇 마리인가요?"}, {"from": "gpt", "value": a}]
    return {"id": "v", "video": BUNNY, "conversations": conv, **extra}


def image_item() -> dict:
    return {"id": "i", "image": CAT, "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                                       {"from": "gpt", "value": "A cat."}]}


def write_jsonl(tmp_path: Path, items: list, name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(it if isinstance(it, str) else json.dumps(it, ensure_ascii=False) for it in items) + "\n",
                    encoding="utf-8")
    return path


def encoded(tmp_path, name, template, item, supervise="answers"):
    tok, cfg = model(name)
    data = TrainingData(write_jsonl(tmp_path, [item]), tok, cfg, media_root="/", template=template, frames=4)
    video = int("video" in item)
    as_images = 4 if video and cfg.video_as_images else 0
    return tok, encode_conversation(data.records[0], tok, cfg, data.template, n_images=int("image" in item),
                                    n_videos=video, frames_as_images=as_images, supervise=supervise)


# --------------------------------------------------------------------------------------------------
# Labels against the original preprocess functions
# --------------------------------------------------------------------------------------------------
def legacy(tok: Tokenizer) -> bool:
    """The original's ``tokenizer.legacy``: text right after "</s>" gets a "▁" as at the start of a text."""
    return tok.encode("</s>USER", add_special_tokens=False)[1:] == tok.encode("USER", add_special_tokens=False)


def reference_sep_two(text: str, ids: list[int], tok: Tokenizer, sep: str) -> list[int]:
    """preprocess_v1 (sep "ASSISTANT: ", after conv.sep " ") / preprocess_llama_2 (sep "[/INST] ") masking."""
    target = list(ids)
    cur = 1
    target[:cur] = [IGNORE_INDEX] * cur
    for i, rou in enumerate(text.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if i == 0:  # its BOS stands for the "</s>" the split removed; -2: the BOS and the "▁" ending parts[0]
            round_len, instruction_len = len(tok.encode(rou)), len(tok.encode(parts[0])) - 2
        else:
            # the original's `if i != 0 and not tokenizer.legacy: round_len -= 1; instruction_len -= 1` stands for
            # the round as tokenized right after "</s>" (no "▁" prepended). The tiny tokenizer merged "▁USER:"
            # into one piece, so the -1 shortcut is off by 2 there (the original would mask the whole sample):
            # tokenize the round after "</s>" instead, which is what the shortcut approximates
            after = [len(tok.encode("</s>" + piece, add_special_tokens=False)) - 1 for piece in (rou, parts[0])]
            round_len, instruction_len = after[0] + 1, after[1] - 1
            if legacy(tok):
                raise AssertionError("the tiny tokenizer is non-legacy")
        target[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "tokenization mismatch: the original would mask the whole sample"
    return target


@pytest.mark.parametrize("template, sep", [("vicuna_v1", " ASSISTANT: "), ("llava_v1", " ASSISTANT: "),
                                           ("mistral_instruct", "[/INST] ")])
def test_labels_match_the_original_sep_two_and_llama_2_masking(tmp_path, template, sep):
    tok, enc = encoded(tmp_path, "tiny-random", template, video_item())
    assert enc.labels == reference_sep_two(enc.text, enc.input_ids, tok, sep)
    supervised = [t for t in enc.labels if t != IGNORE_INDEX]
    assert supervised.count(tok.eos_id) == 2  # each answer's </s>
    tail = " " if template == "mistral_instruct" else ""  # "[/INST] answer </s>"
    assert tok.decode(supervised) == "".join(f" {a}{tail}" for a in KOREAN_A).removeprefix(" ")


def reference_qwen(turns, tok: Tokenizer, system: str, original: bool) -> tuple[list[int], list[int]]:
    """preprocess_qwen: the system message and each message through the plain ChatML template, user and
    system masked, assistant messages supervised whole; then "\\n", <|im_start|>, <|im_end|> unmasked.
    ``original=False``: the assistant message's content and <|im_end|> only."""
    im_start, im_end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    (nl,) = tok.encode("\n", add_special_tokens=False)
    ids, target = [], []

    def message(role, content):
        return tok.encode(f"<|im_start|>{role}\n{content}<|im_end|>\n", add_special_tokens=False)

    ids += message("system", system)
    target += [IGNORE_INDEX] * len(ids)
    for human, gpt in turns:
        m = message("user", human)
        ids += m
        target += [IGNORE_INDEX] * len(m)
        m = message("assistant", gpt)
        ids += m
        if original:
            target += m
        else:
            content = tok.encode(gpt, add_special_tokens=False) + [im_end]
            head = len(tok.encode("<|im_start|>assistant\n", add_special_tokens=False))
            assert m[head:head + len(content)] == content
            target += [IGNORE_INDEX] * head + content + [IGNORE_INDEX] * (len(m) - head - len(content))
    if original:
        target = [t if t in (nl, im_start, im_end) else lab for t, lab in zip(ids, target)]
    return ids, target


@pytest.mark.parametrize("original", [False, True])
def test_qwen_labels_match_preprocess_qwen(tmp_path, original):
    tok, enc = encoded(tmp_path, "tiny-random-onevision", "qwen_1_5", video_item(),
                       supervise="original" if original else "answers")
    turns = [("<video>\n" + KOREAN_Q.removeprefix("<video>\n"), KOREAN_A[0]), ("몇 마리인가요?", KOREAN_A[1])]
    ids, target = reference_qwen(turns, tok, "You are a helpful assistant.", original)
    assert enc.input_ids == ids
    assert enc.labels == target


def test_system_turn_and_human_turns_are_masked(tmp_path):
    item = video_item()
    item["conversations"].insert(0, {"from": "system", "value": "너는 비디오 해설자다."})
    tok, enc = encoded(tmp_path, "tiny-random", "vicuna_v1", item)
    assert enc.text.startswith("너는 비디오 해설자다. USER:")
    first = next(i for i, t in enumerate(enc.labels) if t != IGNORE_INDEX)
    assert "ASSISTANT:" in tok.decode(enc.input_ids[:first]) and "묘사" in tok.decode(enc.input_ids[:first])
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == " ".join(KOREAN_A)


# --------------------------------------------------------------------------------------------------
# Korean round trip, on every built-in tokenizer and template
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, template, lead", [
    ("tiny-random", None, " "), ("tiny-random", "vicuna_v1", " "), ("tiny-random", "mistral_instruct", " "),
    ("tiny-random", "chatml_direct", ""), ("tiny-random-onevision", None, ""),
    ("tiny-random-onevision", "qwen_1_5", ""), ("tiny-random-interleave", None, "\n")])
def test_korean_answers_round_trip_byte_exact(tmp_path, name, template, lead):
    tok, cfg = model(name)
    data = TrainingData(write_jsonl(tmp_path, [video_item()]), tok, cfg, media_root="/", template=template,
                        frames=4)
    ex = data[0]
    ids = ex.input_ids.tolist()
    assert len(ex.answer_spans) == 2
    for (s, e), answer in zip(ex.answer_spans, KOREAN_A):
        assert all(ex.labels[s:e] == ex.input_ids[s:e])  # the span is supervised
        text = tok.decode(ids[:e])
        assert text.startswith(tok.decode(ids[:s]))
        shown = text[len(tok.decode(ids[:s])):]  # the answer in context: end-of-turn tokens are special
        if tok.token_id("<|im_end|>") is None:  # chatml_direct on a tokenizer without it: plain text
            shown = shown.removesuffix("<|im_end|>")
        assert shown.removesuffix(" ") == lead + answer, (shown, answer)
        assert shown.encode("utf-8") in (f"{lead}{answer}".encode("utf-8"), f"{lead}{answer} ".encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# Media: placeholder expansion equals the pipeline's, frames, batches
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe():
    from llava_next.runtime.pipeline import Pipeline
    return Pipeline.from_pretrained("tiny-random", progress=False)


def test_expanded_prompt_equals_pipeline_prepare(tmp_path, tiny_pipe):
    tok, cfg = tiny_pipe.tokenizer, tiny_pipe.config
    item = video_item(answers=KOREAN_A[:1])
    data = TrainingData(write_jsonl(tmp_path, [item, image_item()]), tok, cfg, media_root="/", frames=4,
                        frame_sampling="uniform")
    for ex, question, kwargs in ((data[0], KOREAN_Q, dict(video=BUNNY)),
                                 (data[1], "<image>\nWhat is this?", dict(images=[CAT]))):
        req = tiny_pipe.prepare(question, frames=4, **kwargs)
        assert ex.input_ids[:len(req.input_ids)].tolist() == req.input_ids
        assert (ex.image_token_counts, ex.video_token_counts) == (req.image_token_counts, req.video_token_counts)
        assert (ex.labels[:len(req.input_ids)] == IGNORE_INDEX).all()  # the whole prompt is masked
    assert data[0].videos[0].frame_indices == tiny_pipe.prepare(KOREAN_Q, video=BUNNY, frames=4).videos[0].frame_indices


def test_mixed_image_and_video_batch(tmp_path, tiny_pipe):
    tok, cfg = tiny_pipe.tokenizer, tiny_pipe.config
    data = TrainingData(write_jsonl(tmp_path, [video_item(), image_item()]), tok, cfg, media_root="/", frames=4)
    examples = [data[0], data[1]]
    batch = collate(examples, pad_id(tok))
    B, T = batch.input_ids.shape
    assert (B, T) == (2, max(len(e.input_ids) for e in examples))
    for row, e in enumerate(examples):  # right padding: the row as it was, then pads with IGNORE_INDEX labels
        n = len(e.input_ids)
        assert torch.equal(batch.input_ids[row, :n], e.input_ids) and torch.equal(batch.labels[row, :n], e.labels)
        assert (batch.labels[row, n:] == IGNORE_INDEX).all() and (batch.input_ids[row, n:] == pad_id(tok)).all()
        assert batch.attention_mask[row].sum() == n and batch.attention_mask[row, :n].all()
    assert len(batch.images) == 1 and len(batch.videos) == 1
    model = tiny_pipe.model
    with torch.no_grad():  # the counts fit the model's features exactly
        embeds = model.embed(batch.input_ids, model.image_features(batch.images),
                             [model.video_features(v.pixel_values) for v in batch.videos])
    assert embeds.shape[:2] == (B, T)


def test_interleave_video_is_its_frames(tmp_path):
    tok, cfg = model("tiny-random-interleave")
    ex = TrainingData(write_jsonl(tmp_path, [video_item()]), tok, cfg, media_root="/", frames=4)[0]
    assert len(ex.images) == 4 and not ex.videos and len(ex.image_token_counts) == 4
    assert int((ex.input_ids == cfg.image_token_id).sum()) == sum(ex.image_token_counts)


def test_frames_are_drawn_once_per_seed_and_epoch(tmp_path):
    tok, cfg = model("tiny-random")
    path = write_jsonl(tmp_path, [video_item(), video_item()])

    def frames(seed, epoch, item=0):
        data = TrainingData(path, tok, cfg, media_root="/", frames=4, seed=seed)
        data.set_epoch(epoch)
        return data[item].videos[0].frame_indices

    assert frames(0, 0) == frames(0, 0)  # the same in every run
    assert frames(0, 0) != frames(0, 1)  # new each epoch
    assert frames(0, 0) != frames(1, 0) and frames(0, 0, item=0) != frames(0, 0, item=1)
    total = 120  # bigbuckbunny.mp4: 5 s at 24 fps
    for epoch in range(5):  # one frame in each quarter
        idx = frame_indices(total, 4, seed=0, epoch=epoch, index=0)
        assert [i // 30 for i in idx] == [0, 1, 2, 3]
    assert frame_indices(3, 4, seed=0, epoch=0, index=0) == [0, 0, 1, 2]  # short video: the original's repeats


# --------------------------------------------------------------------------------------------------
# Bad items: one error each, naming the line (JSONL) or index (JSON), all found by validate()
# --------------------------------------------------------------------------------------------------
def test_each_bad_item_is_named_by_its_line(tmp_path):
    tok, cfg = model("tiny-random")
    not_a_video = tmp_path / "broken.mp4"
    not_a_video.write_text("not a video")
    no_answer = image_item()
    no_answer["conversations"] = no_answer["conversations"][:1]
    swapped = image_item()
    swapped["conversations"].reverse()
    too_long = video_item(answers=["긴 답 " * 2000])
    lines = [image_item(), {"id": "x", "image": CAT}, no_answer, swapped, {**image_item(), "image": "nope.jpg"},
             {**video_item(), "video": "broken.mp4"}, {**image_item(), "image": [CAT, CAT]}, too_long,
             "{not json", "", video_item()]
    path = write_jsonl(tmp_path, lines)
    with pytest.raises(DataError) as e:  # the structure of every item first
        TrainingData(path, tok, cfg, media_root=tmp_path, frames=4)
    message = str(e.value)
    assert message.startswith(f"{path}: 4 of 10 items cannot be used:")
    expected = {2: 'no "conversations" list', 3: "turns go human; turns must alternate",
                4: "turns go gpt -> human", 9: "not valid JSON"}
    for line, words in expected.items():
        assert f"train.jsonl line {line}: {words}" in message, (line, message)
    lines[1:4] = [image_item()] * 3
    lines[8] = video_item()
    path = write_jsonl(tmp_path, lines)
    with pytest.raises(DataError) as e:  # then media, placeholders and lengths, all of them before training
        TrainingData(path, tok, cfg, media_root=tmp_path, frames=4).validate()
    message = str(e.value)
    assert message.startswith(f"{path}: 4 of 10 items cannot be used:")
    expected = {5: f"{tmp_path}/nope.jpg: no such file; fix the path or the media root",
                6: f"{tmp_path}/broken.mp4: not a readable video",
                7: "the text has 1 <image> and 0 <video> but the item has 2 image(s)",
                8: "prompt does not fit the RoPE context"}
    for line, words in expected.items():
        assert f"train.jsonl line {line}: {words}" in message, (line, message)
    assert "line 1:" not in message and "line 11:" not in message


def test_json_list_errors_name_the_index_and_a_single_error_stands_alone(tmp_path):
    tok, cfg = model("tiny-random")
    path = tmp_path / "train.json"
    path.write_text(json.dumps([image_item(), {**image_item(), "conversations": "hi"}]))
    with pytest.raises(DataError, match=r"^train\.json item \[1\]: \"conversations\" must be a non-empty list"):
        TrainingData(path, tok, cfg, media_root="/").validate()


def test_max_length_and_a_good_file_validates(tmp_path):
    tok, cfg = model("tiny-random")
    path = write_jsonl(tmp_path, [video_item(), image_item()])
    summary = TrainingData(path, tok, cfg, media_root="/", frames=4).validate()
    assert (summary.items, summary.images, summary.videos) == (2, 1, 1)
    assert 0 < summary.supervised_tokens < summary.tokens
    with pytest.raises(DataError, match=r"line 1: \d+ positions, more than max_length 100"):
        TrainingData(path, tok, cfg, media_root="/", frames=4, max_length=100)[0]


def test_original_video_data_writes_image_for_the_video(tmp_path):
    item = video_item()
    item["conversations"][0]["value"] = "<image>\n이 영상을 설명해 주세요."
    tok, enc = encoded(tmp_path, "tiny-random", None, item)
    _, cfg = model("tiny-random")
    assert enc.input_ids.count(cfg.video_token_id) == 1 and enc.input_ids.count(cfg.image_token_id) == 0
