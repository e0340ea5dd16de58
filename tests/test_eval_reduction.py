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


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """The built-in model, built once for the module's harness runs."""
    from llava_next.runtime.pipeline import Pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAVA_NEXT_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield Pipeline.from_pretrained("tiny-random", progress=False)


def test_harness_gives_one_point_per_method(tmp_path, pipe):
    from bench_reduction import methods

    from llava_next.eval.tasks import load_task

    rows = [{"id": f"q{i}", "question": "What animal is in the video?", "options": ["A rabbit", "A dog"],
             "answer": "A", "video": "sample:bunny"} for i in range(2)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text("name: t\ndata: d.jsonl\nanswer: mc_generate\nparser: videomme\n"
                                     "prompt: '{question}\\n{options}'\nframes: 2\nmax_new_tokens: 2\n")
    task = load_task(str(tmp_path / "t.yaml"))
    todo = [m for m in methods(2) if m.label == "unreduced" or m.label.startswith(("FastV (", "MaxInfo, budget"))]
    assert len(todo) == 3
    points = er.run_methods(pipe, task, todo, tmp_path / "out", model="tiny-random", checkpoint_dir=None,
                            limit=None, frames=2, batch_size=2)
    assert [p.method for p in points] == [m.label for m in todo]
    for p in points:
        assert p.answered == 2 and p.errors == 0 and 0 <= p.ci_low <= p.score <= p.ci_high <= 1
        assert p.metric == "accuracy"
        assert p.visual_tokens > 0 and p.seconds > 0
        assert (Path(p.out) / "summary.json").is_file() and (Path(p.out) / "samples.jsonl").is_file()
    base, fastv, maxinfo = points
    assert maxinfo.visual_tokens == base.visual_tokens / 2  # 1 of 2 frames kept
    assert fastv.visual_tokens == base.visual_tokens  # FastV prunes inside the decoder
    assert [p.pareto for p in points] == [p in er.pareto_front(points) for p in points]
    if base.score == fastv.score == maxinfo.score:  # the fewest tokens win alone
        assert [p.pareto for p in points] == [False, False, True]
    er.write_csv(tmp_path / "t.csv", points)
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 1 + len(points)
    assert er.table(points).count("\n") == 1 + len(points)
    image = er.draw(points, "title", er.RANDOM_NOTE)
    assert image.width == 2 * er.W and image.height > er.H


def test_caption_task_points_are_cider(tmp_path):
    """A caption task (no accuracy): each point is its summary's corpus CIDEr with the bootstrap interval, in the
    table, the CSV and the plot. The summaries are the eval job's own (run.py's ``summarize``) over hand-written
    answers (the Python tokenizer, no METEOR: no Java, no model)."""
    from llava_next.eval.run import summarize
    from llava_next.eval.tasks import load_task, read_samples

    refs = [["A big rabbit wakes up in a meadow.", "A rabbit stretches on the grass."],
            ["A bird flies over a tree.", "A small bird sits on a branch."]]
    rows = [{"id": f"c{i}", "video": "sample:bunny", "answer": r} for i, r in enumerate(refs)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text("name: cap\ndata: d.jsonl\nanswer: caption\nprompt: Describe the video.\n"
                                     "caption_tokenizer: python\ncaption_metrics: [Bleu_1, CIDEr]\n"
                                     "caption_bootstrap: 20\n")
    task = load_task(str(tmp_path / "t.yaml"))
    assert er.task_metric(task) == "CIDEr"
    samples = read_samples(task)

    def summary(predictions: list[str], tokens: int) -> dict:
        lines = {s.id: {"id": s.id, "status": "ok", "prediction": p, "gold": s.gold, "correct": None,
                        "visual_tokens": tokens, "input_tokens": tokens + 9, "timings": {"seconds": 0.1}}
                 for s, p in zip(samples, predictions)}
        return summarize(task, samples, lines, {}, seed=0)

    runs = [("unreduced", summary(["A rabbit wakes up in a meadow.", "A bird on a branch."], 64)),
            ("half", summary(["A rabbit in the grass.", "A dog runs."], 32)), ("refused", summary([], 0))]
    points = [er.point(label, "", s, tmp_path / label, er.task_metric(task)) for label, s in runs]
    for p, (_, s) in zip(points[:2], runs):
        assert p.metric == "CIDEr" and p.score == s["caption"]["metrics"]["CIDEr"] > 0
        assert [p.ci_low, p.ci_high] == s["caption"]["ci95"]["CIDEr"]
    assert points[2].score is None and points[2].ci_low is None  # no sample answered: no point
    assert points[0].score > 1  # CIDEr-D is not bounded by 1: the plot's axis follows the values
    assert "| method | CIDEr (95% CI) |" in er.table(points) and f"{points[0].score:.3f}" in er.table(points)
    er.write_csv(tmp_path / "t.csv", points)
    assert (tmp_path / "t.csv").read_text().splitlines()[1].endswith(",CIDEr")
    assert er.draw(points, "title", er.RANDOM_NOTE).width == 2 * er.W
