"""Open-ended caption metrics (issue 24.2, llava_next/eval/captions.py): BLEU-1..4, METEOR, ROUGE-L and CIDEr
over a corpus equal lmms-eval's own ``coco_aggregation_result`` (its source, read from the installed lmms-eval's
``tasks/coco_cap/utils.py`` and called on the same predictions), both with pycocoevalcap's PTB tokenizer in
Java; the Python tokenizer equals it on captions; the bundled ``coco2017_cap_val`` task runs through
``llava-next eval`` on a fixture in the official schema around the sample photo, its summary equal to lmms-eval's
aggregation of the run's own predictions."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

import llava_next
from llava_next.eval.captions import METRICS, CaptionMetricError, caption_scores, check_available, tokenize
from llava_next.eval.tasks import TaskError, load_task, read_samples

pytest.importorskip("pycocoevalcap")
lmms_eval = pytest.importorskip("lmms_eval")
TASKS = Path(lmms_eval.__file__).parent / "tasks"
IMAGE = Path(llava_next.__file__).parent / "samples" / "chelsea.jpg"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer and METEOR "
                                                                     "run in Java")

REFERENCES = [
    ["A cat lies on a wooden floor.", "An orange tabby cat looking at the camera.", "A close-up of a cat's face.",
     "A ginger cat resting indoors, its eyes open.", "The cat (a tabby) sits near a wall."],
    ["Two people are riding bikes down a street next to a bus.", "Cyclists ride past a red double-decker bus.",
     "A bus and two bicycles on a city road.", "People on bicycles share the road with a bus.",
     "Bikers pedal along a busy street."],
    ["A man in a hat rides a horse across a field.", "A cowboy on horseback in the grass.",
     "Someone riding a brown horse outdoors.", "A rider and his horse in an open meadow.",
     "The man's horse gallops over the field!"],
]
PREDICTIONS = ["A tabby cat lying on the floor and looking at the camera.", "Two people ride bicycles next to a bus.",
               "A man riding a horse in a field -- wearing a hat."]


class _Quiet:
    def info(self, *_):
        pass


_PER_IMAGE: list = []  # the per-image scores of each scorer lmms-eval's aggregation runs (it keeps only the corpus')


def _keeping(scorer):
    """pycocoevalcap's ``scorer`` class, its compute_score's second answer (one value per image) kept."""
    class Keeping(scorer):
        def compute_score(self, gts, res, *args, **kwargs):
            score, per_image = super().compute_score(gts, res, *args, **kwargs)
            _PER_IMAGE.append(per_image)
            return score, per_image
    return Keeping


class _LazyMeteor:
    """pycocoevalcap's Meteor, started at its first compute_score: lmms-eval's aggregation builds every scorer on
    each call (one per metric), and each Meteor start loads its paraphrase table in Java (~10-30 s of CPU)."""

    def compute_score(self, gts, res):
        from pycocoevalcap.meteor.meteor import Meteor

        score, per_image = Meteor().compute_score(gts, res)
        _PER_IMAGE.append(per_image)
        return score, per_image


_TOKENIZED: dict[str, dict] = {}  # _OncePTB's answers by input


class _OncePTB:
    """pycocoevalcap's PTBTokenizer, each distinct input tokenized once (in Java) and the answer reused: lmms-eval's
    aggregation tokenizes the same references and predictions again for every metric (two Java starts a call)."""

    def tokenize(self, captions: dict) -> dict:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        key = json.dumps(captions, sort_keys=True, default=str)
        if key not in _TOKENIZED:
            _TOKENIZED[key] = PTBTokenizer().tokenize(captions)
        return {k: list(v) for k, v in _TOKENIZED[key].items()}


def coco_aggregation(tmp_path: Path):
    """lmms-eval's ``coco_aggregation_result(results, metric, args)``, compiled alone from its utils.py (importing
    the package's task modules pulls in torchvision), with the names it uses; each call also returns the per-image
    scores its scorer computed (pycocoevalcap's, which lmms-eval drops): (corpus value, [value per result])."""
    from types import SimpleNamespace

    from pycocoevalcap.eval import Bleu, Cider, COCOEvalCap, Rouge
    from pycocotools.coco import COCO

    path = TASKS / "coco_cap" / "utils.py"
    (node,) = [n for n in ast.parse(path.read_text()).body
               if isinstance(n, ast.FunctionDef) and n.name == "coco_aggregation_result"]
    scope = {"Bleu": _keeping(Bleu), "Cider": _keeping(Cider), "COCOEvalCap": COCOEvalCap, "Meteor": _LazyMeteor,
             "Rouge": _keeping(Rouge),
             "PTBTokenizer": _OncePTB, "COCO": COCO, "eval_logger": _Quiet(), "os": __import__("os"),
             "json": json, "generate_submission_file": lambda name, args: str(tmp_path / name)}
    exec(compile(ast.Module([node], []), str(path), "exec"), scope)

    def aggregate(results, metric):
        value = scope["coco_aggregation_result"](results, metric, SimpleNamespace())
        per_image = _PER_IMAGE[-1][int(metric[-1]) - 1] if metric.startswith("Bleu_") else _PER_IMAGE[-1]
        return value, [float(v) for v in per_image]
    return aggregate


def lmms_results(predictions, references) -> list[dict]:
    """What lmms-eval's ``coco_process_result`` hands the aggregation: one dict per sample."""
    return [{"answer": refs, "pred": pred, "image_id": 1000 + i, "id": i}
            for i, (pred, refs) in enumerate(zip(predictions, references))]


@needs_java
def test_corpus_metrics_equal_lmms_evals_coco_aggregation(tmp_path, capsys):
    from concurrent.futures import ThreadPoolExecutor

    aggregate = coco_aggregation(tmp_path)
    results = lmms_results(PREDICTIONS, REFERENCES)
    # both sides mostly wait on their Java processes (tokenizer, METEOR): ours runs in a thread meanwhile
    with ThreadPoolExecutor(1) as pool:
        mine = pool.submit(caption_scores, PREDICTIONS, REFERENCES, resamples=0)
        theirs = {metric: aggregate(results, metric) for metric in METRICS}
        ours, each = mine.result()["metrics"], mine.result()["per_sample"]
    for metric in METRICS:  # the corpus value, and each sample's (pycocoevalcap's per-image list)
        assert ours[metric] == pytest.approx(theirs[metric][0], rel=1e-12, abs=1e-12), metric
        assert each[metric] == pytest.approx(theirs[metric][1], rel=1e-12, abs=1e-12), metric
    assert len(set(each["CIDEr"])) == 3 and each["ROUGE_L"] != each["Bleu_1"]  # three samples, real values
    assert 0.3 < ours["Bleu_1"] < 1 and ours["CIDEr"] > 0.5 and 0 < ours["METEOR"] < 1  # real overlap: not all 0
    worse = caption_scores(["A bowl of soup on a table."] * 3, REFERENCES, resamples=0)["metrics"]
    assert all(worse[m] < ours[m] for m in METRICS)


@needs_java
def test_python_tokenizer_equals_pycocoevalcaps_ptb_on_captions():
    sentences = [c for refs in REFERENCES for c in refs] + PREDICTIONS + [
        'He can\'t go; she won\'t, I\'d say & they\'ll: "fine"!', "The dog's bone costs $5 or 50% off...",
        "It's 5:30 p.m. in the U.S., isn't it?", "The dogs' toys are 'really' nice [sic] {ok}",
        "A well-known cat - sitting on a mat"]
    captions = {i: [s] for i, s in enumerate(sentences)}
    assert tokenize(captions, "python") == tokenize(captions, "ptb")
    # the stated divergence: Stanford keeps the period of the abbreviations it knows
    assert tokenize({0: ["Mr. Smith"]}, "python") == {0: ["mr smith"]}
    assert tokenize({0: ["Mr. Smith"]}, "ptb") == {0: ["mr. smith"]}


@needs_java
def test_bootstrap_intervals_resample_the_samples():
    refs, preds = REFERENCES * 4, PREDICTIONS[:2] + ["A bowl of soup."] + PREDICTIONS * 3
    one = caption_scores(preds, refs, resamples=30, seed=3, metrics=["Bleu_4", "ROUGE_L", "CIDEr"])
    assert one == caption_scores(preds, refs, resamples=30, seed=3, metrics=["Bleu_4", "ROUGE_L", "CIDEr"])
    assert set(one["ci95"]) == {"Bleu_4", "ROUGE_L", "CIDEr"} and one["bootstrap_resamples"] == 30
    for metric, (low, high) in one["ci95"].items():
        assert low < high and low <= one["metrics"][metric] * 1.2, metric  # a spread around the corpus value
    assert "SPICE" in one["not_run"]


def test_caption_switches_are_checked(tmp_path, monkeypatch):
    task = tmp_path / "t.yaml"
    for bad, what in [("caption_tokenizer: nltk", "caption_tokenizer must be one of ptb, python"),
                      ("caption_metrics: [BLEU]", "caption_metrics must be a list of Bleu_1"),
                      ("caption_bootstrap: -1", "caption_bootstrap must be an integer >= 0")]:
        task.write_text(f"data: d.jsonl\nanswer: caption\n{bad}\n")
        with pytest.raises(TaskError, match=what):
            load_task(task)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # a machine without Java
    with pytest.raises(CaptionMetricError, match="java is not on PATH: install a Java runtime"):
        check_available(["Bleu_4"], "ptb")
    with pytest.raises(CaptionMetricError, match="METEOR runs in Java"):
        check_available(["METEOR"], "python")
    check_available(["Bleu_4", "CIDEr"], "python")  # the Java-free choice
    assert caption_scores(PREDICTIONS, REFERENCES, tokenizer="python", resamples=0,
                          metrics=["Bleu_4", "CIDEr"])["metrics"]["CIDEr"] > 0


def coco_rows() -> list[dict]:
    """lmms-lab-encoder/COCO-Caption2017's val schema: the image as {"bytes", "path"}, "answer" its 5 captions."""
    image = {"bytes": IMAGE.read_bytes(), "path": "000000000139.jpg"}
    return [{"question_id": f"{139 + i:012d}.jpg", "image": image, "question": "Please carefully observe the "
             "image and come up with a caption for the image.", "answer": refs, "id": 139 + i,
             "license": 2, "file_name": f"{139 + i:012d}.jpg", "height": 300, "width": 451}
            for i, refs in enumerate(REFERENCES)]


@needs_java
def test_llava_next_eval_runs_the_coco_caption_task(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llava_next.cli.main import main

    data = tmp_path / "coco" / "val.parquet"
    data.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(coco_rows()), data)
    (sample, *_) = read_samples(load_task("coco2017_cap_val", data=data))
    assert sample.prompt == "Provide a one-sentence caption for the provided image."  # coco_doc_to_text
    assert sample.gold == REFERENCES[0] and Path(sample.images[0]).read_bytes() == IMAGE.read_bytes()
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path.parent / "shared-cache"))
    assert main(["eval", "--task", "coco2017_cap_val", "--data", str(data), "--model", "tiny-random",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [line["gold"] for line in lines] == REFERENCES and all(line["correct"] is None for line in lines)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    caption = summary["caption"]
    assert summary["accuracy"] is None and set(caption["metrics"]) == set(METRICS) and caption["tokenizer"] == "ptb"
    assert set(caption["ci95"]) == set(METRICS) - {"METEOR"} and caption["bootstrap_resamples"] == 100
    aggregate = coco_aggregation(tmp_path)
    results = lmms_results([line["prediction"] for line in lines], REFERENCES)
    each = [json.loads(x) for x in (tmp_path / "out" / "caption_scores.jsonl").read_text().splitlines()]
    assert caption["per_sample"] == "caption_scores.jsonl" and [e["id"] for e in each] == [x["id"] for x in lines]
    for metric in set(METRICS) - {"METEOR"}:  # METEOR's parity: the test above (a Java start saved)
        value, per_image = aggregate(results, metric)
        assert caption["metrics"][metric] == pytest.approx(value, abs=1e-12), metric
        assert [e[metric] for e in each] == pytest.approx(per_image, abs=1e-12), metric
