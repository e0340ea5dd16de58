"""Dataset-scale tracing (runtime/trace_jobs.py): every item traced into a float16 shard equal to
``Pipeline.trace`` of the same request, bad items as error lines, a rerun finishes only what is missing, and
``load_traces`` reads the whole directory as one DataFrame."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from media import real_video
from llava_next.runtime.batch import Defaults
from llava_next.runtime.pipeline import Pipeline
from llava_next.runtime.trace_jobs import load_traces, read_shard, run_trace_jobs, shard_name

LAYERS, QUERIES = [0, -1], ("last", "generated")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained("tiny-random", dtype=torch.float32, cache_dir=tmp_path_factory.mktemp("tiny"),
                                    progress=False)


def _jobs(tmp_path):
    video = str(real_video())
    lines = [{"id": "a/1", "prompt": "What happens?", "video": video, "frames": 2},
             {"id": "b", "prompt": "Describe it.", "video": video, "frames": 3},
             {"id": "bad", "prompt": "?", "video": str(tmp_path / "missing.mp4")}]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_shards_equal_pipeline_trace_and_resume(pipe, tmp_path):
    jobs, out = _jobs(tmp_path), tmp_path / "traces"
    kw = dict(defaults=Defaults(max_new_tokens=2), layers=LAYERS, queries=QUERIES, lens=("last",), progress=None)
    counts = run_trace_jobs(lambda: pipe, jobs, out, **kw)
    index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in index) == ["a/1", "b", "bad"] and counts.errors == 1
    bad = next(r for r in index if r["id"] == "bad")
    assert bad["status"] == "error" and "missing.mp4" in bad["error"]

    arrays, meta = read_shard(out / "shards" / shard_name("a/1"))
    req = pipe.prepare("What happens?", video=str(real_video()), frames=2, max_new_tokens=2)
    res = pipe.trace(req, layers=LAYERS, queries=list(QUERIES), lens=["last"], lens_top_k=1, max_new_tokens=2)
    assert meta["generated"] == res.generated and meta["layers"] == res.layers and arrays["attention"].dtype == np.float16
    for i, layer in enumerate(res.layers):
        for j, g in enumerate(QUERIES):
            assert np.abs(arrays["attention"][i, j].astype(np.float32) - res.attention[layer][g].numpy()).max() <= 1e-3
    assert np.array_equal(arrays["frame"], res.provenance.frame.numpy())
    last = res.provenance.prompt_len - 1
    assert arrays["lens_top_id"][1, last] == int(res.logit_lens[res.layers[1]].ids[0, -1, 0])

    # a kill after the shard of "b" but before its index line: the rerun redoes only "b"
    kept = [x for x in (out / "index.jsonl").read_text().splitlines() if json.loads(x)["id"] != "b"]
    (out / "index.jsonl").write_text("\n".join(kept) + "\n")
    again = run_trace_jobs(lambda: pipe, jobs, out, **kw)
    assert again.done == 1 and again.skipped == 2
    assert len((out / "index.jsonl").read_text().splitlines()) == 3

    df = load_traces(out)
    sums = df.groupby(["id", "layer", "group"])["weight"].sum()
    assert len(sums) == 2 * len(LAYERS) * len(QUERIES) and np.allclose(sums.values, 1, atol=2e-2)
    assert set(df["kind"]) >= {"video", "text", "generated"}
    visual = load_traces(out, layers=[0], groups=["last"], visual_only=True)
    assert set(visual["kind"]) <= {"video", "video_newline"} and set(visual["layer"]) == {0}


def test_command_line(tmp_path, capsys):
    from llava_next.cli.main import main

    jobs, out = _jobs(tmp_path), tmp_path / "cli"
    base = ["trace", "--model", "tiny-random", "--dtype", "fp32", "--quiet"]
    assert main(base + ["--inputs", str(jobs), "What?"]) == 2
    assert "--inputs JOBS.jsonl and --out DIR go together" in capsys.readouterr().err
    assert main(base + ["--inputs", str(jobs), "--out", str(out), "--png", str(tmp_path / "p")]) == 2
    assert "--png: per-request options" in capsys.readouterr().err
    assert main(base + ["--inputs", str(jobs), "--out", str(out), "--layers", "0", "--max-new-tokens", "1"]) == 0
    index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert [r["status"] for r in sorted(index, key=lambda r: r["id"])] == ["ok", "ok", "error"]
    _, meta = read_shard(out / next(r["shard"] for r in index if r["id"] == "b"))
    assert meta["layers"] == [0] and meta["run"]["torch"] == torch.__version__ and meta["run"]["model"] == "tiny-random"
