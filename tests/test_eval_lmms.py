"""The lmms-eval backend (issue 24.4): ``python -m lmms_eval --model llava_next_reimpl`` in a subprocess, found
through the ``lmms_eval.models`` entry point of the editable install (no file of lmms-eval patched), on two local
lmms-eval tasks (``--include_path``) over a dataset the test writes from real media (bigbuckbunny.mp4 and
chelsea.jpg, the image handed over as a PIL image as lmms-eval's image tasks do): a ``generate_until`` task and a
``multiple_choice`` (loglikelihood) task. Their logged samples equal ``llava-next eval`` on the same data:
the same generated texts, the same log-probabilities (1e-5) and greedy flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llava_next
from test_batch import TIMEOUT_S

pytest.importorskip("lmms_eval")

MEDIA = Path(llava_next.__file__).parent / "samples"
ROWS = [
    {"id": "v1", "question": "What animal is in the video?", "options": ["A rabbit", "A dog", "A bird", "A fish"],
     "answer": "A", "video": str(MEDIA / "bigbuckbunny.mp4"), "image": None},
    {"id": "i1", "question": "What animal is this?", "options": ["A cat", "A dog"], "answer": "A", "video": None,
     "image": str(MEDIA / "chelsea.jpg")},
    {"id": "v2", "question": "Where is it?", "options": ["Underwater", "A meadow", "Space"], "answer": "B",
     "video": str(MEDIA / "bigbuckbunny.mp4"), "image": None},
]
PROMPT = "{question}\n{options}\nAnswer with the option's letter."
UTILS = '''from PIL import Image

def doc_to_visual(doc):
    if doc["video"]:
        return [doc["video"]]
    return [Image.open(doc["image"]).convert("RGB")]

def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = "\\n".join(f"{l}. {o}" for l, o in zip("ABCDEFGH", doc["options"]))
    return PROMPT.format(question=doc["question"], options=options)

def doc_to_choice(doc):
    return doc["options"]

def doc_to_target(doc):
    return "ABCDEFGH".index(doc["answer"])

def process_results(doc, results):
    return {"acc": float(results[0].strip()[:1] == doc["answer"])}
'''
LMMS_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
{extra}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN = """doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
  until: ["never-in-tiny-random-output"]"""
MC = """doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target"""
# ``python -m lmms_eval``, after conftest's torchvision operator schemas (its docstring): this machine's
# torchvision 0.28.0 does not match the CPU torch, and lmms-eval imports it (through evaluate and transformers)
LMMS_EVAL = [sys.executable, "-c", f"import sys, runpy; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             f"import conftest; runpy.run_module('lmms_eval', run_name='__main__', alter_sys=True)"]
OURS = """name: {name}
data: data.jsonl
answer: {answer}
prompt: "{{question}}\\n{{options}}\\nAnswer with the option's letter."
frames: 3
max_new_tokens: 4
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(f"PROMPT = {PROMPT!r}\n" + UTILS)
    for name, output_type, extra in (("tiny_gen", "generate_until", GEN), ("tiny_mc", "multiple_choice", MC)):
        (tasks / f"{name}.yaml").write_text(LMMS_TASK.format(name=name, data=root / "data.jsonl",
                                                             output_type=output_type, extra=extra))
    env = dict(os.environ, LLAVA_NEXT_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(root / "hf"), LLAVA_NEXT_COMPILE="0", WANDB_MODE="disabled")
    said = root / "lmms.log"  # stdout and stderr; a file, so a full pipe cannot stall it while ours run
    with open(said, "w") as log:
        lmms = subprocess.Popen([*LMMS_EVAL, "--model", "llava_next_reimpl", "--model_args",
                                 "pretrained=tiny-random,frames=3,dtype=fp32", "--batch_size", "2", "--tasks",
                                 "tiny_gen,tiny_mc", "--include_path", str(tasks), "--log_samples", "--output_path",
                                 str(root / "lmms-out")], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    ours = {}
    from llava_next.cli.main import main

    for name, answer in (("gen", "mc_generate"), ("mc", "mc_loglikelihood")):  # ours: in this process meanwhile
        (root / f"{name}.yaml").write_text(OURS.format(name=name, answer=answer))
        with pytest.MonkeyPatch.context() as mp:
            for key in ("LLAVA_NEXT_CACHE", "LLAVA_NEXT_COMPILE"):
                mp.setenv(key, env[key])
            code = main(["eval", "--task", str(root / f"{name}.yaml"), "--out", str(root / f"ours-{name}"),
                         "--model", "tiny-random", "--dtype", "fp32", "--batch-size", "2", "--quiet"])
        assert code in (0, None), code
        ours[name] = {json.loads(line)["id"]: json.loads(line)
                      for line in (root / f"ours-{name}" / "samples.jsonl").read_text().splitlines()}
    try:
        code = lmms.wait(timeout=TIMEOUT_S)
    finally:
        if lmms.poll() is None:
            lmms.kill()
            lmms.wait()
    output = said.read_text()
    assert code == 0, output[-5000:]
    assert "Error during evaluation" not in output, output[-5000:]  # exit 0
    return root, ours


def logged(root: Path, task: str) -> dict[str, dict]:
    """lmms-eval's --log_samples lines by the sample's id (its doc_id is the row's index)."""
    (path,) = (root / "lmms-out").rglob(f"*_samples_{task}.jsonl")
    return {ROWS[s["doc_id"]]["id"]: s for s in map(json.loads, path.read_text().splitlines())}


def test_generate_until_equals_llava_next_eval(runs):
    root, ours = runs
    theirs = logged(root, "tiny_gen")
    assert set(theirs) == set(ours["gen"]) == {r["id"] for r in ROWS}
    for sample_id, line in ours["gen"].items():
        assert line["status"] == "ok"
        assert theirs[sample_id]["filtered_resps"] == line["prediction"], sample_id
        assert theirs[sample_id]["input"] == line["prompt"]
        (counts,) = theirs[sample_id]["token_counts"]
        assert counts["input_tokens"] == line["input_tokens"]


def test_multiple_choice_loglikelihoods_equal_llava_next_eval(runs):
    root, ours = runs
    theirs = logged(root, "tiny_mc")
    assert set(theirs) == set(ours["mc"])
    for sample_id, line in ours["mc"].items():
        pairs = theirs[sample_id]["filtered_resps"]  # per choice: [-logprob, is_greedy], logged as strings
        assert len(pairs) == len(line["scores"])
        for (nll, greedy), mine in zip(pairs, line["scores"]):
            assert -float(nll) == pytest.approx(mine["logprob"], abs=1e-5)
            assert greedy == str(mine["is_greedy"])
        assert theirs[sample_id]["acc"] == float(line["correct"])  # lmms-eval's argmin over -logprob
    assert sum(line["correct"] for line in ours["mc"].values()) > 0  # so acc is checked on a right answer too


def test_model_args_registry_and_reduction(monkeypatch, tmp_path):
    """The entry point resolves through lmms-eval's registry; ``reduce=fastv:layer=2:keep=0.5`` is ``--reduce
    fastv:layer=2,keep=0.5`` and reaches the prepared request; bad arguments and sampling are refused."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from llava_next.eval.lmms import LlavaNextReimpl, LmmsArgumentError, reduction_spec, split_visuals
    from llava_next.reduce import parse_reduction

    assert get_model("llava_next_reimpl") is LlavaNextReimpl
    assert reduction_spec("fastv:layer=2:keep=0.5+visionzip") == ["fastv:layer=2,keep=0.5", "visionzip"]
    assert split_visuals([str(MEDIA / "bigbuckbunny.mp4"), str(MEDIA / "chelsea.jpg")]).videos == \
        [str(MEDIA / "bigbuckbunny.mp4")]
    assert split_visuals([str(tmp_path)]).videos == [str(tmp_path)]  # a folder of frames (MVBench episodic_reasoning)
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path))
    with pytest.raises(LmmsArgumentError, match="unknown model_args colour"):
        LlavaNextReimpl(pretrained="tiny-random", colour="red")
    lm = LlavaNextReimpl.create_from_arg_string("pretrained=tiny-random,frames=3,dtype=fp32,"
                                                "reduce=fastv:layer=2:keep=0.5", {"batch_size": "2"})
    assert lm.reduction == parse_reduction(None, ["fastv:layer=2,keep=0.5"]) and lm.batch_size == 2
    doc = {"video": str(MEDIA / "bigbuckbunny.mp4")}
    lm.task_dict = {"t": {"test": [doc]}}
    request = Instance("generate_until", ("What happens?", {"max_new_tokens": 2, "until": ["\n\n"]},
                                          lambda d: [d["video"]], 0, "t", "test"), idx=0,
                       metadata={"task": "t", "doc_id": 0, "repeats": 1})
    seen = []
    prepare = lm.pipe.prepare
    monkeypatch.setattr(lm.pipe, "prepare", lambda *a, **k: seen.append(k["reduction"]) or prepare(*a, **k))
    (result,) = lm.generate_until([request])
    assert isinstance(result.text, str) and seen == [lm.reduction]
    request.arguments[1].update(do_sample=True, temperature=0.7)
    with pytest.raises(LmmsArgumentError, match="decodes greedily"):
        lm.generate_until([request])
