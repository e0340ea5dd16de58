"""Notebook display (research/notebook.py): the HTML of a provenance, a trace and a cache says what they hold,
escaped; a provenance's DataFrame has one row per position with the fields of ``to_records``."""

from __future__ import annotations

import pytest
import torch

from research_models import tiny_pair
from llava_next.research import Attention, Provenance, Record, run_with_cache, trace


@pytest.fixture(scope="module")
def video():
    ours, _, ids, mine, _ = tiny_pair("video")
    prov = Provenance.build(ids[0].tolist(), ours.config, videos=[{"num_frames": 4, "frame_hw": (240, 320)}])
    return ours, ids, mine, prov


def test_provenance_html_and_dataframe(video):
    _, _, _, prov = video
    page = prov._repr_html_()
    assert f"{len(prov)} positions" in page and "<table>" in page and "more positions" in page
    df = prov.to_dataframe()
    assert len(df) == len(prov) and df.index.name == "position"
    assert {"kind", "segment", "frame", "row", "col", "x0", "y1"} <= set(df.columns)
    video_rows = df[df.kind == "video"]
    assert sorted(video_rows.frame.unique().tolist()) == [0, 1, 2, 3]
    records = prov.to_records()
    first = int(video_rows.index[0])
    assert df.loc[first, "x1"] == records[first]["box"][2]


def test_trace_and_cache_html(video):
    ours, ids, mine, _ = video
    with torch.no_grad(), trace(ours, record=[Record("blocks.0.hook_resid_post")],
                                attention=Attention(layers=[1], key_mass=True)) as tr:
        ours(ids, **mine)
    page = tr._repr_html_()
    assert "blocks.0.hook_resid_post" in page and f"(1, {ids.shape[1]}, " in page and "key_mass" in page
    _, cache = run_with_cache(ours, ids, **mine, names_filter=["blocks.0.hook_resid_pre", "hook_embed"])
    page = cache._repr_html_()
    assert "2 tensors" in page and "hook_resid_pre" in page and "hook_embed" in page


def test_cells_are_escaped():
    from llava_next.research.notebook import table

    assert "&lt;script&gt;" in table(["a"], [["<script>"]])
