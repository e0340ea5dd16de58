"""``Pipeline.trace`` (runtime/tracing.py) as a library call, without the command line: what a traced reduced
prefill pruned is what a plain run of the same request reports; layers come back normalized; the attention
of every query group is a distribution over the whole sequence (NaN only where a pruned layer lost a key)."""

from __future__ import annotations

import pytest
import torch

from llava_next.model.attention import use_backend
from llava_next.reduce import FastV, Reduction
from llava_next.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained("tiny-random", dtype=torch.float32, cache_dir=tmp_path_factory.mktemp("tiny"),
                                    progress=False)


def test_trace_of_a_pruned_prefill_reports_what_a_run_pruned(pipe):
    reduction = Reduction(pruner=FastV(layer=1, keep=0.5))
    with use_backend("sdpa"):
        ran = pipe.prepare("What happens?", video="sample:bunny", frames=4, reduction=reduction)
        pipe.generate(ran, max_new_tokens=2)
        traced = pipe.prepare("What happens?", video="sample:bunny", frames=4, reduction=reduction)
        res = pipe.trace(traced, layers=[0, -1, 1], queries=["last", "generated", "all"], max_new_tokens=2)
    assert res.generated == ran.tokens and res.in_decoder
    assert traced.reduction_report == ran.reduction_report and ran.reduction_report["pruned_at_layer"] == 1
    assert res.reduction["visual_tokens_after_pruning"] == ran.reduction_report["visual_tokens_after_pruning"]
    assert res.layers == [0, res.num_layers - 1, 1]
    T = len(res.provenance)
    assert T == len(traced.input_ids) + 2
    for layer in res.layers:
        for group in ("last", "generated", "all"):
            w = res.attention[layer][group]
            assert w.shape == (T,) and abs(float(w.nan_to_num(0.0).sum()) - 1) < 1e-4
            assert not (layer == 0 and bool(w.isnan().any()))  # before the pruning layer every key is there
    assert bool(res.attention[1]["last"].isnan().any())  # the pruned keys of the pruning layer


def test_trace_without_generation_or_reduction(pipe):
    req = pipe.prepare("What is this?", images=["sample:cat"])
    res = pipe.trace(req, layers=None, queries=["question"], lens=["last"], lens_top_k=3)
    assert res.generated == [] and res.text == "" and res.reduction is None and not res.in_decoder
    assert res.layers == list(range(res.num_layers)) and len(res.provenance) == len(req.input_ids)
    assert set(res.logit_lens) == set(res.layers)
    assert all(r.ids.shape[-1] == 3 for r in res.logit_lens.values())
