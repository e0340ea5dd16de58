"""``llava-next eval`` (issue 24.2): lmms-eval's letter parsing, task files and their errors, and the command as a
user runs it — a real process killed with SIGKILL while a batch's answers are in hand (stuck on the output's
lock, as tests/test_batch.py does it), then rerun: every sample exactly once, the records equal to an
uninterrupted run's, and a summary with accuracy, its bootstrap interval, tokens, time and the provenance
record; another run's directory is refused."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_batch import TIMEOUT_S, wait_until, waiting_for_lock
from test_tensor_parallel import torchrun
from llava_next.eval.answers import exact_match, letter_correct, mvbench_letter, videomme_letter
from llava_next.eval.tasks import TaskError, load_task, read_samples


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("The best answer is C.", "C"), ("(D) a fish", "D"), ("  A. A rabbit", "A"),
    ("the rabbit", ""),  # no capital A-D
    ("one two three four five six seven eight nine ten eleven", ""),  # long and no letter
    ("Answer: b", "A"),  # sic: the first capital A-D anywhere, here Answer's A (lmms-eval's regex)
    ("it is b", ""),  # lower case is no letter (the regex is case-sensitive)
    ("E", ""),
])
def test_videomme_letter_is_lmms_evals(text, letter):
    assert videomme_letter(text) == letter


@pytest.mark.parametrize("text, parsed", [
    ("B. a dog", "B"), ("(C) a bird", "C"), ("c", "C"), ("The answer is (a).", "A"), ("'E'", "E"),
    ("no idea", "no idea"),
])
def test_mvbench_letter_is_lmms_evals(text, parsed):
    assert mvbench_letter(text) == parsed


def test_judging():
    assert letter_correct("videomme", "The best answer is B", "B") == ("B", True)
    assert letter_correct("mvbench", "(b) dog", "B") == ("B", True)
    assert exact_match(" Paris ", ["paris"]) == ("paris", True)
    assert exact_match("Paris.", ["paris"], ignore_punctuation=True)[1]
    assert not exact_match("Paris.", ["paris"])[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_task_file_errors_name_the_key(tmp_path):
    _write(tmp_path / "d.jsonl", '{"id": "1", "question": "Q?", "options": ["x", "y"], "answer": "y"}\n')
    with pytest.raises(TaskError, match="unknown key.*colour"):
        load_task(_write(tmp_path / "a.yaml", "data: d.jsonl\nanswer: mc_generate\ncolour: red\n"))
    with pytest.raises(TaskError, match="answer must be one of"):
        load_task(_write(tmp_path / "b.yaml", "data: d.jsonl\nanswer: vibes\n"))
    task = load_task(_write(tmp_path / "t.yaml", "data: d.jsonl\nanswer: mc_loglikelihood\nprompt: '{question} {letters}'\n"))
    (sample,) = read_samples(task)
    assert sample.gold == 1 and sample.gold_letter == "B" and sample.prompt == "Q? A, B"
    _write(tmp_path / "d.jsonl", '{"id": "1", "question": "Q?", "options": ["x", "y"], "answer": "z"}\n')
    with pytest.raises(TaskError, match="line 1.*must be a letter"):
        read_samples(task)


def test_benchmark_keys_are_checked(tmp_path):
    """option_letters (MLVU), score (MME) and an image field without bytes are refused with the key named."""
    _write(tmp_path / "d.jsonl", '{"question": "Q?", "answer": "Yes", "image": {"bytes": null, "path": "a.png"}}\n')
    with pytest.raises(TaskError, match="option_letters must be the letters from A"):
        load_task(_write(tmp_path / "a.yaml", "data: d.jsonl\nanswer: mc_generate\noption_letters: [A, C]\n"))
    with pytest.raises(TaskError, match="score must be .mme."):
        load_task(_write(tmp_path / "b.yaml", "data: d.jsonl\nanswer: yes_no\nscore: mme\n"))
    task = load_task(_write(tmp_path / "c.yaml", "data: d.jsonl\nanswer: yes_no\n"))
    with pytest.raises(TaskError, match="line 1: the image field holds no bytes"):
        read_samples(task)


def test_parquet_and_datasets_folders_read_as_json_lines(tmp_path):
    """The same rows as JSON lines, a parquet file, a ``save_to_disk`` folder (Arrow stream files listed in
    state.json) and a DatasetDict folder give the same samples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"r{i}", "question": f"Q{i}?", "options": ["x", "y", "z"], "answer": "ABC"[i % 3],
             "video": None if i % 2 else "clip.mp4"} for i in range(5)]
    table = pa.Table.from_pylist(rows)
    _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(table, tmp_path / "d.parquet")
    for folder in (tmp_path / "ds", tmp_path / "dd" / "test"):
        folder.mkdir(parents=True)
        for k, part in enumerate((table.slice(0, 3), table.slice(3))):  # two shards, as datasets writes them
            with pa.OSFile(str(folder / f"data-{k:05d}-of-00002.arrow"), "wb") as sink:
                with pa.ipc.new_stream(sink, part.schema) as writer:
                    writer.write_table(part)
        _write(folder / "state.json", json.dumps({"_data_files": [{"filename": f"data-{k:05d}-of-00002.arrow"}
                                                                 for k in range(2)], "_split": None}))
    _write(tmp_path / "dd" / "dataset_dict.json", json.dumps({"splits": ["test"]}))
    got = {}
    for data in ("d.jsonl", "d.parquet", "ds", "dd"):
        task = load_task(_write(tmp_path / "t.yaml", f"data: {data}\nanswer: mc_generate\n"))
        got[data] = [(s.id, s.prompt, s.videos, s.options, s.gold) for s in read_samples(task)]
    assert got["d.jsonl"][1][2] == [] and got["d.jsonl"][0][2] == [str(tmp_path / "clip.mp4")]
    assert got["d.parquet"] == got["d.jsonl"] == got["ds"] == got["dd"]  # media: relative to the data's folder
    _write(tmp_path / "dd" / "dataset_dict.json", json.dumps({"splits": ["test", "val"]}))
    with pytest.raises(TaskError, match="splits test, val: say which"):
        read_samples(load_task(_write(tmp_path / "t.yaml", "data: dd\nanswer: mc_generate\n")))


SAMPLES = [  # 7 samples: a missing video is one sample's error line
    {"id": "v1", "question": "What animal is in the video?", "options": ["A rabbit", "A dog", "A bird", "A fish"],
     "answer": "A", "video": "sample:bunny"},
    {"id": "i1", "question": "What animal is this?", "options": ["A cat", "A dog"], "answer": 0, "image": "sample:cat"},
    {"id": "v2", "question": "Where is it?", "options": ["Underwater", "A meadow", "Space"], "answer": "A meadow",
     "video": "sample:bunny"},
    {"id": "t1", "question": "Which letter comes first?", "options": ["B", "A"], "answer": "B"},
    {"id": "gone", "question": "What happens?", "options": ["x", "y"], "answer": "A", "video": "missing.mp4"},
    {"id": "i2", "question": "Is it indoors?", "options": ["Yes", "No"], "answer": "B", "image": "sample:cat"},
    {"id": "v3", "question": "What time of day?", "options": ["Morning", "Night"], "answer": "A", "video": "sample:bunny"},
]
TASK = """name: tiny-mc
data: data.jsonl
answer: {answer}
parser: videomme
prompt: "{{question}}\\n{{options}}\\nAnswer with the option's letter."
frames: 2
max_new_tokens: 4
"""


def eval_cmd(task: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llava_next.cli.main", "eval", "--task", str(task), "--out", str(out),
            "--model", "tiny-random", "--dtype", "fp32", "--batch-size", "2", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    _write(root / "data.jsonl", "".join(json.dumps(s) + "\n" for s in SAMPLES))
    env = dict(os.environ, LLAVA_NEXT_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", LLAVA_NEXT_COMPILE="0")
    return root, env


def lines(path: Path) -> dict[str, dict]:
    out = {}
    for raw in path.read_text().splitlines():
        record = json.loads(raw)
        assert record["id"] not in out, f"{record['id']} written twice"
        record.pop("timings", None)
        out[record["id"]] = record
    return out


def eval_in_process(env: dict, capsys, task: Path, out: Path, *extra: str) -> tuple[int, str]:
    """``eval_cmd``'s command as ``main`` in this process with ``env``'s cache and compile switch; (code, stderr)."""
    from llava_next.cli.main import main

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("LLAVA_NEXT_CACHE", "LLAVA_NEXT_COMPILE"):
            mp.setenv(key, env[key])
        code = main(eval_cmd(task, out, *extra)[3:])
    return (0 if code is None else code), capsys.readouterr().err


@pytest.mark.parametrize("answer", ["mc_generate", "mc_loglikelihood"])
def test_killed_run_resumes_to_the_uninterrupted_result(setup, answer, capsys):
    """The killed run and its rerun are console processes (a kill, then a fresh start); the uninterrupted
    reference and the refused rerun with other switches are the same command's ``main`` in this process."""
    root, env = setup
    task = _write(root / f"{answer}.yaml", TASK.format(answer=answer))
    ref_out, kill_out = root / f"ref-{answer}", root / f"killed-{answer}"
    ranks_out = root / f"ranks-{answer}"
    ranks = subprocess.Popen(torchrun("--standalone", "--nproc-per-node", "2", *eval_cmd(task, ranks_out)[1:]),
                             env=dict(env, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) if answer == "mc_generate" else None
    code, err = eval_in_process(env, capsys, task, ref_out)
    assert code == 0, err[-3000:]
    if ranks is not None:  # two ranks share the samples: one merged result, the same as one process's
        assert ranks.wait(timeout=TIMEOUT_S) == 0, ranks.stderr.read()[-3000:]
        assert lines(ranks_out / "samples.jsonl") == lines(ref_out / "samples.jsonl")
        merged, alone = (json.loads((d / "summary.json").read_text()) for d in (ranks_out, ref_out))
        assert merged["complete"] and merged["accuracy"] == alone["accuracy"]
    kill_out.mkdir()
    samples_file = kill_out / "samples.jsonl"
    lock = open(samples_file, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)  # the run goes only where we let it
    victim = subprocess.Popen(eval_cmd(task, kill_out), env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    count = lambda: samples_file.read_text().count("\n")
    try:
        while True:  # one access at a time until 2+ lines are written and it waits to append the next
            wait_until(lambda: victim.poll() is not None or waiting_for_lock(victim.pid, samples_file),
                       "the run to be killed reaches the output's lock")
            assert victim.poll() is None, "the run to be killed ended on its own"
            written = count()
            if written >= 2:
                break
            fcntl.flock(lock, fcntl.LOCK_UN)
            wait_until(lambda: victim.poll() is not None or not waiting_for_lock(victim.pid, samples_file),
                       "the run to be killed takes the lock")
            fcntl.flock(lock, fcntl.LOCK_EX)
        assert written < len(SAMPLES)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=TIMEOUT_S)
    finally:
        if victim.poll() is None:
            victim.kill()
        lock.close()
    assert not (kill_out / "summary.json").exists()
    with open(samples_file, "a") as f:  # what a kill in the middle of a write leaves
        f.write('{"id": "zz", "status": "ok", "pre')
    rerun = subprocess.run(eval_cmd(task, kill_out), env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{written} already in" in rerun.stderr, rerun.stderr
    want = lines(ref_out / "samples.jsonl")
    assert lines(samples_file) == want
    assert set(want) == {s["id"] for s in SAMPLES} and want["gone"]["status"] == "error"
    ok = [r for r in want.values() if r["status"] == "ok"]
    assert all(set(r) >= {"prompt", "prediction", "parsed", "gold", "correct", "visual_tokens"} for r in ok)
    assert want["v2"]["gold"] == "B" and want["i1"]["visual_tokens"] > 0
    summary = json.loads((kill_out / "summary.json").read_text())
    assert summary["complete"] and summary["answered"] == 6 and summary["errors"] == 1
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in ok) / 6)
    lo, hi = summary["accuracy_ci95"]
    assert 0 <= lo <= summary["accuracy"] <= hi <= 1
    assert summary["visual_tokens_per_sample"] == pytest.approx(sum(r["visual_tokens"] for r in ok) / 6)
    assert summary["seconds_per_sample"] > 0
    record = summary["record"]
    assert set(record) >= {"version", "commit", "torch", "dtype", "device", "seed", "checkpoint_sha256", "switches"}
    assert record["dtype"] == "float32" and len(record["checkpoint_sha256"]) == 64
    if answer == "mc_loglikelihood":
        assert all(len(r["scores"]) == len(s["options"]) for r, s in zip(want.values(), SAMPLES) if r["status"] == "ok")
    code, err = eval_in_process(env, capsys, task, kill_out, "--frames", "3")
    assert code == 2 and "holds another run (switches differ" in err, err


def test_exact_match_and_reduction_switches_in_process(setup, tmp_path, monkeypatch):
    """exact_match through the command; --reduce (an in-decoder pruner) applies to generated answers and makes
    each log-likelihood sample an error line saying why; the switches are recorded."""
    from llava_next.cli.main import main

    root, env = setup
    monkeypatch.setenv("LLAVA_NEXT_CACHE", env["LLAVA_NEXT_CACHE"])
    _write(tmp_path / "em.jsonl", json.dumps({"id": "e1", "question": "Say yes.", "answer": ["yes", "Yes."],
                                              "video": "sample:bunny"}) + "\n")
    em = _write(tmp_path / "em.yaml", "data: em.jsonl\nanswer: exact_match\nprompt: '{question}'\nframes: 2\n"
                                      "max_new_tokens: 3\nignore_punctuation: true\n")
    reduce = ["--reduce", "fastv:layer=2,keep=0.5"]
    assert main(["eval", "--task", str(em), "--model", "tiny-random", "--out", str(tmp_path / "em"), "--quiet",
                 *reduce]) == 0
    (line,) = map(json.loads, (tmp_path / "em" / "samples.jsonl").read_text().splitlines())
    assert line["status"] == "ok" and line["gold"] == ["yes", "Yes."]
    assert line["correct"] == (line["parsed"] in ("yes",))
    summary = json.loads((tmp_path / "em" / "summary.json").read_text())
    assert summary["record"]["switches"]["reduce"] == ["fastv:layer=2,keep=0.5"]
    _write(tmp_path / "data.jsonl", "".join(json.dumps(s) + "\n" for s in SAMPLES[:2]))
    ll = _write(tmp_path / "ll.yaml", TASK.format(answer="mc_loglikelihood"))
    assert main(["eval", "--task", str(ll), "--model", "tiny-random", "--out", str(tmp_path / "ll"), "--quiet",
                 *reduce]) == 0
    lines = [json.loads(x) for x in (tmp_path / "ll" / "samples.jsonl").read_text().splitlines()]
    assert [x["type"] for x in lines] == ["ScoreError"] * 2 and "in-decoder reduction" in lines[0]["error"]
