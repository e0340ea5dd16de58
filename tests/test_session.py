"""``Pipeline.session`` (runtime/session.py): the one-line setup gives exactly what the manual setup gives
(prepare, provenance with the question, trace, forward), ``sel.generated()`` resolves against the answer, and
segments are named by provenance field."""

from __future__ import annotations

import pytest
import torch

from llava_next.research import Attention, Provenance, Record, ResearchError, trace
from llava_next.research import select as sel
from llava_next.runtime.pipeline import Pipeline
from llava_next.runtime.session import SessionError

QUESTION = "What happens in this video?"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained("tiny-random", dtype=torch.float32, cache_dir=tmp_path_factory.mktemp("tiny"),
                                    progress=False)


def test_one_line_equals_the_manual_setup(pipe):
    attention = dict(layers=[0, 2], queries=sel.last_text(), rows=True)
    record = [Record("blocks.1.hook_resid_post", positions=sel.question(), reduce="mean")]
    with pipe.session(QUESTION, video="sample:bunny", frames=4) as s:
        tr = s.trace(record=record, attention=Attention(**attention, segments="frame"))

    req = pipe.prepare(QUESTION, video="sample:bunny", frames=4)  # the six lines it replaces
    prov = Provenance.from_request(req, pipe.config, tokenizer=pipe.tokenizer, question=QUESTION)
    ids = torch.tensor([req.input_ids])
    decoder = pipe.model.language_model
    previous, decoder.rope_scaling_factor = decoder.rope_scaling_factor, req.plan.factor
    try:
        with torch.no_grad(), trace(pipe.model, provenance=prov, record=record,
                                    attention=Attention(**attention, segments=prov.frame)) as ref:
            logits = pipe.model(ids, videos=[c.pixel_values for c in req.videos])
    finally:
        decoder.rope_scaling_factor = previous
    assert torch.equal(s.logits, logits)
    assert torch.equal(tr["blocks.1.hook_resid_post"], ref["blocks.1.hook_resid_post"])
    for layer in (0, 2):
        assert torch.equal(tr.attention[layer].rows, ref.attention[layer].rows)
        assert torch.equal(tr.attention[layer].segment_rows, ref.attention[layer].segment_rows)
    assert tr.attention[0].segment_rows.shape[-1] == 4  # one column per frame


def test_generated_positions_resolve_against_the_answer(pipe):
    with pipe.session(QUESTION, video="sample:bunny", frames=2) as s:
        text = s.generate(max_new_tokens=4)
        tr = s.trace(record=[Record("blocks.0.hook_resid_post", positions=sel.generated())])
        with pytest.raises(SessionError, match="already generated"):
            s.generate(max_new_tokens=4)
    n, P = len(s.generated), s.provenance.prompt_len
    assert n >= 1 and text == pipe.tokenizer.decode(s.generated)
    assert tr["blocks.0.hook_resid_post"].shape[1] == n
    # teacher forcing the answer gives back the greedy tokens
    assert s.logits[0, P - 1:P - 1 + n].argmax(-1).tolist() == s.generated


def test_segment_names_are_checked(pipe):
    with pipe.session(QUESTION, video="sample:bunny", frames=4) as s:
        with pytest.raises(ResearchError, match="names no per-position field"):
            s.trace(attention=Attention(layers=[0], segments="frames"))
