"""The reduction harness in accuracy (benchmarks/eval_reduction.py, ``bench_reduction.py --eval``): one point per
method with its fields through the eval job on the built-in model, and the Pareto front on hand-made points."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import eval_reduction as er  # noqa: E402


def _p(name: str, acc: float | None, tokens: float | None) -> er.Point:
    return er.Point(name, "", acc, acc, acc, 1, 0, tokens, 1.0)


def test_pareto_front_on_hand_made_points():
    points = [_p("a", 0.5, 100), _p("b", 0.6, 200), _p("c", 0.4, 150),  # c: a is better and cheaper
              _p("d", 0.6, 250),  # d: as good as b, dearer
              _p("e", 0.5, 120),  # e: as good as a, dearer
              _p("f", 0.2, 50),  # f: the cheapest: on the front however bad
              _p("g", 0.9, 900), _p("refused", None, None)]
    assert [p.method for p in er.pareto_front(points)] == ["f", "a", "b", "g"]
    assert er.pareto_front([_p("x", 0.5, 100), _p("y", 0.5, 100)]) != []  # ties dominate neither


def test_harness_gives_one_point_per_method(tmp_path, monkeypatch):
    from bench_reduction import methods

    from llava_next.eval.tasks import load_task
    from llava_next.runtime.pipeline import Pipeline

    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"id": f"q{i}", "question": "What animal is in the video?", "options": ["A rabbit", "A dog"],
             "answer": "A", "video": "sample:bunny"} for i in range(2)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text("name: t\ndata: d.jsonl\nanswer: mc_generate\nparser: videomme\n"
                                     "prompt: '{question}\\n{options}'\nframes: 2\nmax_new_tokens: 2\n")
    task = load_task(str(tmp_path / "t.yaml"))
    todo = [m for m in methods(2) if m.label == "unreduced" or m.label.startswith(("FastV (", "MaxInfo, budget"))]
    assert len(todo) == 3
    pipe = Pipeline.from_pretrained("tiny-random", progress=False)
    points = er.run_methods(pipe, task, todo, tmp_path / "out", model="tiny-random", checkpoint_dir=None,
                            limit=None, frames=2, batch_size=2)
    assert [p.method for p in points] == [m.label for m in todo]
    for p in points:
        assert p.answered == 2 and p.errors == 0 and 0 <= p.ci_low <= p.accuracy <= p.ci_high <= 1
        assert p.visual_tokens > 0 and p.seconds > 0
        assert (Path(p.out) / "summary.json").is_file() and (Path(p.out) / "samples.jsonl").is_file()
    base, fastv, maxinfo = points
    assert maxinfo.visual_tokens == base.visual_tokens / 2  # 1 of 2 frames kept
    assert fastv.visual_tokens == base.visual_tokens  # FastV prunes inside the decoder
    assert [p.pareto for p in points] == [p in er.pareto_front(points) for p in points]
    if base.accuracy == fastv.accuracy == maxinfo.accuracy:  # the fewest tokens win alone
        assert [p.pareto for p in points] == [False, False, True]
    er.write_csv(tmp_path / "t.csv", points)
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 1 + len(points)
    assert er.table(points).count("\n") == 1 + len(points)
    image = er.draw(points, "title", er.RANDOM_NOTE)
    assert image.width == 2 * er.W and image.height > er.H
