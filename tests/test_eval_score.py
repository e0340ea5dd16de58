"""``llava_next.eval.score`` (issue 24.1): each candidate's teacher-forced log-probability equals transformers'
on the same weights and the same ids (fp32, tiny llava-hf LLaVA-NeXT with the real photo, LLaVA-NeXT-Video
with real video frames, 1e-5), token by token, with lm-eval's is_greedy; a batch of items with candidates of
different lengths (one shared prefill per prompt) gives what each item gives alone; the continuation ids are
lm-eval's ``_encode_pair``; bad requests are refused with what to change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llava_next
from checkpoints import make_runnable_checkpoint
from test_model import hf_image_args
from llava_next.eval import ScoreError, ScoreItem, score
from llava_next.eval.score import continuation_ids, prepare_item
from llava_next.runtime.pipeline import Pipeline

pytest.importorskip("transformers")

SAMPLES = Path(llava_next.__file__).parent / "samples"
PHOTO, VIDEO = SAMPLES / "chelsea.jpg", SAMPLES / "bigbuckbunny.mp4"
CANDIDATES = ["cat", "a small dog", "The animal in the picture is a cat.", "B"]


@pytest.fixture(scope="module", params=["image", "video"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"score-{request.param}")
    directory, hf = make_runnable_checkpoint(root / "ckpt", kind=request.param)
    hf = hf.float().eval()
    pipe = Pipeline.from_pretrained(directory, dtype=torch.float32, cache_dir=root / "cache", progress=False)
    pipe.source = (directory, root / "cache")  # for the command-line test
    return request.param, pipe, hf


def _item(kind: str, item_id: str = "q", prompt: str = "What is shown here?") -> ScoreItem:
    if kind == "image":
        return ScoreItem(item_id, prompt, CANDIDATES, images=(PHOTO,))
    return ScoreItem(item_id, prompt, CANDIDATES, videos=(VIDEO,), frames=4)


def _reference(hf, request, cont: list[int]) -> tuple[list[float], bool]:
    """transformers' full forward on prompt + continuation: each continuation token's log-probability."""
    ids = torch.tensor([request.input_ids + cont])
    media = hf_image_args(request.images) if request.images else {}
    if request.videos:
        media["pixel_values_videos"] = request.videos[0].pixel_values[None]
    with torch.no_grad():
        logits = hf(input_ids=ids, **media).logits[0].float()  # (T + L, V)
    T = len(request.input_ids)
    predicting = logits[T - 1:T - 1 + len(cont)]  # (L, V): position t predicts token t + 1
    logp = predicting.log_softmax(-1).gather(-1, torch.tensor(cont)[:, None])[:, 0]
    return logp.tolist(), bool((predicting.argmax(-1) == torch.tensor(cont)).all())


def test_each_token_logprob_equals_transformers(pair):
    kind, pipe, hf = pair
    item = _item(kind)
    result = next(score(pipe, [item]))
    request, conts = prepare_item(pipe, item)
    assert [c.tokens for c in result.candidates] == conts
    assert len({len(c) for c in conts}) > 1  # candidates of different lengths in one batch
    for cand, cont in zip(result.candidates, conts):
        ref, ref_greedy = _reference(hf, request, cont)
        assert len(cand.token_logprobs) == len(ref)
        for mine, theirs in zip(cand.token_logprobs, ref):
            assert abs(mine - theirs) <= 1e-5 * max(1.0, abs(theirs)), (cand.text, mine, theirs)
        assert abs(cand.logprob - sum(ref)) <= 1e-5 * max(1.0, abs(sum(ref)))
        assert cand.is_greedy == ref_greedy
        assert cand.per_token == pytest.approx(cand.logprob / len(cont))
        assert cand.per_char == pytest.approx(cand.logprob / len(cand.text))
        assert cand.per_byte == pytest.approx(cand.logprob / len(cand.text.encode()))


def test_greedy_candidate_is_greedy(pair):
    """The model's own greedy answer, scored as a candidate, is greedy at every token (and its log-probability
    is the highest of any continuation of that length: here, the other candidates of the same token count)."""
    kind, pipe, _ = pair
    item = _item(kind)
    request, _ = prepare_item(pipe, item)
    greedy_ids = pipe.generate_batch([request], max_new_tokens=3, template=None)[0]
    text = pipe.tokenizer.decode(greedy_ids)
    # score the exact ids: the tokenizer may not round-trip random tokens, so check through score_requests
    from llava_next.eval.score import score_requests

    lps, greedy = score_requests(pipe, [request], [[greedy_ids, greedy_ids[:1]]])
    assert all(greedy[0][0]) and all(greedy[0][1])
    assert lps[0][0][0] == pytest.approx(lps[0][1][0], abs=1e-6)  # the same first token, the same prefill
    assert isinstance(text, str)


def test_batch_of_items_equals_each_alone(pair):
    kind, pipe, _ = pair
    items = [_item(kind, "a"), _item(kind, "b", "Describe it in one word, please, as briefly as you can."),
             ScoreItem("c", "Is this text only?", ["yes", "no"])]
    together = list(score(pipe, items, batch_size=3))
    alone = [next(score(pipe, [it])) for it in items]
    assert [r.id for r in together] == ["a", "b", "c"]
    for t, a in zip(together, alone):
        for ct, ca in zip(t.candidates, a.candidates):
            assert ct.tokens == ca.tokens and ct.is_greedy == ca.is_greedy
            assert ct.logprob == pytest.approx(ca.logprob, abs=1e-4)


def test_continuation_ids_follow_lm_eval_encode_pair(pair):
    _, pipe, _ = pair
    tok = pipe.tokenizer
    context, cont = "USER: Which? ASSISTANT:", " a cat"
    assert continuation_ids(tok, context, cont) == tok.encode(context + cont)[len(tok.encode(context)):]
    # trailing whitespace of the context moves into the continuation
    assert continuation_ids(tok, context + " ", "a cat") == continuation_ids(tok, context, " a cat")


def test_bad_requests_are_refused(pair):
    kind, pipe, _ = pair
    with pytest.raises(ScoreError, match="no candidate answers"):
        next(score(pipe, [ScoreItem("x", "Hi", [])]))
    from llava_next.reduce.stages import Reduction
    from llava_next.reduce.fastv import FastV

    with pytest.raises(ScoreError, match="in-decoder reduction"):
        next(score(pipe, [_item(kind)], reduction=Reduction(pruner=FastV(layer=1, keep=0.5))))


def test_command_writes_a_line_per_item_and_resumes(pair, tmp_path, capsys):
    """``llava-next score --out``: one line per item (the API's numbers; a missing file is that item's error
    line), and a rerun skips the ids already written."""
    import json

    from llava_next.cli.main import main

    kind, pipe, _ = pair
    directory, cache = pipe.source
    media = {"image": str(PHOTO)} if kind == "image" else {"video": str(VIDEO), "frames": 4}
    rows = [{"id": "a", "prompt": "What is shown here?", "candidates": CANDIDATES, **media},
            {"id": "gone", "prompt": "What?", "candidates": ["x"], "image": "missing.jpg"},
            {"id": "b", "prompt": "Is this text only?", "candidates": ["yes", "no"]}]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--data", str(data), "--model", str(directory), "--cache-dir", str(cache), "--dtype", "fp32",
            "--out", str(out), "--batch-size", "3", "--quiet"]
    assert main(argv) == 0
    lines = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"a", "gone", "b"} and lines["gone"]["status"] == "error"
    assert "no such file" in lines["gone"]["error"]
    api = next(score(pipe, [_item(kind, "a")]))
    assert [c["logprob"] for c in lines["a"]["candidates"]] == pytest.approx([c.logprob for c in api.candidates],
                                                                              abs=1e-5)
    assert lines["a"]["best"]["logprob"] == api.best("logprob")
    assert main(argv) == 0  # a rerun: nothing left to do
    assert out.read_text().count("\n") == 3
    out.unlink()
    k = argv.index("--out")
    assert main(argv[:k] + argv[k + 2:]) == 0  # no --out: the lines go to stdout
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["id"] for r in printed) == ["a", "b", "gone"]  # error lines come before their batch
