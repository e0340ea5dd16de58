"""The main job through real files, as a user runs it: a checkpoint directory in the llava-hf format
(weights + tokenizer.json), a real photo and a real video, a question; the answer streamed.

The tiny checkpoint is random, so the answer is gibberish — what is checked is that every step a real
run takes (conversion into the cache, mmap loading, chat template, tokenization, placeholder expansion,
the context plan, encoding, splicing, cached generation, streaming decode) produces exactly what
transformers produces from the same files: the same prompt ids and the same generated tokens.
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_runnable_checkpoint
from media import cached_video, real_photo
from test_model import hf_image_args
from llava_next.runtime.pipeline import Pipeline
from llava_next.inputs.tokens import ContextOverflowError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def runnable(tmp_path_factory):
    root = tmp_path_factory.mktemp("runnable")
    directory, hf = make_runnable_checkpoint(root / "LLaVA-NeXT-Video-tiny", kind="video")
    hf.set_attn_implementation("eager")
    pipe = Pipeline.from_pretrained(directory, cache_dir=root / "cache", progress=False)
    return directory, hf, pipe


@pytest.fixture(scope="module")
def video():
    return cached_video("model_parity", frames=24, size_hw=(90, 160), fps=12, photo="coffee")


def test_prompt_ids_match_transformers_tokenizer(runnable, video):
    """Our rendering of the llava_next_video template, tokenized and expanded, equals transformers'
    tokenizer on the same text with each placeholder repeated to its count (the expansion counts
    themselves are checked against transformers' processors in test_tokens.py)."""
    from transformers import PreTrainedTokenizerFast

    directory, _, pipe = runnable
    req = pipe.prepare("What is happening?", images=[real_photo("chelsea")], video=video, frames=4)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    text = "USER: <image>\n<video>\nWhat is happening? ASSISTANT:"
    expanded = (text.replace("<image>", "<image>" * req.image_token_counts[0])
                .replace("<video>", "<video>" * req.video_token_counts[0]))
    assert req.input_ids == tokenizer(expanded)["input_ids"]


def test_streamed_answer_is_transformers_greedy_answer(runnable, video):
    _, hf, pipe = runnable
    req = pipe.prepare("What is happening?", images=[real_photo("chelsea")], video=video, frames=4,
                       max_new_tokens=12)
    text = "".join(pipe.stream(req, max_new_tokens=12))
    ids = torch.tensor([req.input_ids])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values_videos=req.videos[0].pixel_values[None],
                          **hf_image_args(req.images), max_new_tokens=12, do_sample=False)
    ref_tokens = ref[0, ids.shape[1]:].tolist()
    assert req.tokens == ref_tokens[:len(req.tokens)]
    assert text == pipe.tokenizer.decode(req.tokens)
    assert set(req.timings) >= {"preprocess_s", "encode_s", "first_token_s", "total_s"}


def test_batch_of_different_media_equals_each_alone(runnable, video):
    _, _, pipe = runnable
    a = pipe.prepare("Describe the picture.", images=[real_photo("rocket")])
    b = pipe.prepare("What is happening?", video=video, frames=3)
    c = pipe.prepare("And now?", video=video, frames=5)  # a different frame count in the same batch
    batch = pipe.generate_batch([a, b, c], max_new_tokens=8)
    alone = [pipe.generate_batch([r], max_new_tokens=8)[0] for r in (a, b, c)]
    assert batch == alone


def test_context_overflow_is_refused_before_running_with_the_fix(runnable, video):
    _, _, pipe = runnable  # tiny checkpoint: 512 positions, 4 tokens per frame
    with pytest.raises(ContextOverflowError, match=r"--rope-scale 2 .*smallest linear factor"):
        pipe.prepare("What is happening?", video=video, frames=24, max_new_tokens=450)
    req = pipe.prepare("What is happening?", video=video, frames=24, max_new_tokens=450, rope_scale="auto")
    assert req.plan.factor == 2.0 and req.plan.factor_source == "auto"
