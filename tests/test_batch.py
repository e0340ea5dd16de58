"""`llava-next batch` as a user runs it, in real processes on a tiny checkpoint with real photos and videos.

- Resume: a run is killed with SIGKILL in the middle, with an item in flight (the test holds the output's
  lock and lets the run through one access at a time; it kills it once it has written 2+ lines and the
  kernel lists it waiting for that lock in an append: provably stuck with an answer it has not written;
  no step depends on how fast anything runs), a cut-off line is appended
  as a kill in the middle of a write would leave it, and the rerun completes the output: every id
  exactly once, records equal to an uninterrupted run's.
- Sharing: two ranks under torchrun append to one file; the set of records equals one process's.
- Bad items (missing file, corrupt video, context overflow, unknown option) are error lines, the job goes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints import make_runnable_checkpoint
from media import cached_video, real_photo
from test_tensor_parallel import child_env, like_a_rank, torchrun

pytest.importorskip("transformers")

TIMEOUT_S = 600  # a hang guard for the runs and waits below, not a speed limit (4 runs share 2 busy cores)


def waiting_for_lock(pid: int, path: Path) -> bool:
    """Whether process ``pid`` is blocked in ``flock`` on ``path``: a ``->`` line of /proc/locks (man 5 proc)."""
    ino = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()  # "1: -> FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF"
        if len(f) > 6 and f[1] == "->" and f[2] == "FLOCK" and f[5] == str(pid) and f[6].endswith(f":{ino}"):
            return True
    return False


def wait_until(ready, what: str) -> None:
    """Poll ``ready()`` until true; fail naming ``what`` only if TIMEOUT_S passes (something is broken)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        assert time.monotonic() < deadline, f"not within {TIMEOUT_S} s: {what}"
        time.sleep(0.01)


def records(path: Path) -> dict[str, dict]:
    """id -> record without its timing; fails if an id appears twice or a line is not JSON."""
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert record["id"] not in out, f"id {record['id']} written twice"
        record.pop("seconds", None)
        out[record["id"]] = record
    return out


def jobs(video: Path, corrupt: Path, missing: Path) -> list[dict]:
    """13 items, 4 of them bad."""
    return [
        {"id": "a", "prompt": "Describe the picture.", "images": [str(real_photo("chelsea"))]},
        {"id": "b", "prompt": "What happens?", "video": str(video), "frames": 3},
        {"id": "c", "prompt": "What happens?", "video": str(missing)},
        {"id": "d", "prompt": "And this one?", "images": [str(real_photo("rocket"))]},
        {"id": "e", "prompt": "What happens?", "video": str(video), "frames": 2},
        {"id": "f", "prompt": "What happens?", "video": str(corrupt)},
        {"id": "g", "prompt": "Say something."},
        {"id": "h", "prompt": "What happens here?", "video": str(video), "frames": 2},
        {"id": "i", "prompt": "Compare them.", "images": [str(real_photo("astronaut"))], "video": str(video),
         "frames": 2},
        {"id": "j", "prompt": "Too long.", "video": str(video), "frames": 2, "max_new_tokens": 600},
        {"id": "k", "prompt": "Sampled.", "temperature": 0.7, "seed": 3},
        {"id": "l", "prompt": "Four frames.", "video": str(video), "frames": 4, "colour": "red"},
        {"id": "m", "prompt": "Four frames.", "video": str(video), "frames": 4},
    ]


def write_jobs(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from llava_next_weights.hub import resolve

    root = tmp_path_factory.mktemp("batch")
    directory, _ = make_runnable_checkpoint(root / "hf", kind="video")
    model = resolve(directory, cache_dir=root / "cache", progress=False)
    video = cached_video("model_parity", frames=24, size_hw=(90, 160), fps=12, photo="coffee")
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(video.read_bytes()[:2000])
    return root, model, video, corrupt


def batch_cmd(model: Path, inputs: Path, out: Path) -> list[str]:
    return ["-m", "llava_next.cli.main", "batch", "--inputs", str(inputs), "--out", str(out), "--model", str(model),
            "--dtype", "fp32", "--max-new-tokens", "6", "--batch-size", "2"]


def test_kill_rerun_and_two_ranks_equal_one_uninterrupted_run(setup):
    import fcntl

    root, model, video, corrupt = setup
    inputs = write_jobs(root / "jobs.jsonl", jobs(video, corrupt, root / "not-there.mp4"))
    env = child_env()
    ref_out, kill_out, ranks_out = root / "ref.jsonl", root / "resumed.jsonl", root / "ranks.jsonl"
    lines = lambda: kill_out.read_text().count("\n") if kill_out.exists() else 0
    lock_path = kill_out  # the output file is its own lock: every access to it takes the lock
    lock = open(lock_path, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)  # held before the run to be killed starts: it goes only where we let it
    # three runs at once: uninterrupted, to be killed, two ranks
    ref = subprocess.Popen([sys.executable, *batch_cmd(model, inputs, ref_out)], env=env, stderr=subprocess.PIPE,
                           text=True)
    victim = subprocess.Popen([sys.executable, *batch_cmd(model, inputs, kill_out)], env=env,
                              stderr=subprocess.DEVNULL)
    ranks = subprocess.Popen(torchrun("--standalone", "--nproc-per-node", "2", *batch_cmd(model, inputs, ranks_out)),
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        while True:  # one access at a time (done ids, loading, appends) until 2+ lines are written
            wait_until(lambda: victim.poll() is not None or waiting_for_lock(victim.pid, lock_path),
                       "the run to be killed reaches the output's lock")
            assert victim.poll() is None, "the run to be killed ended on its own"
            written = lines()
            if written >= 2:  # waiting in an append: its answer in hand, not written
                break
            fcntl.flock(lock, fcntl.LOCK_UN)  # let it through ...
            wait_until(lambda: victim.poll() is not None or not waiting_for_lock(victim.pid, lock_path),
                       "the run to be killed takes the lock")
            fcntl.flock(lock, fcntl.LOCK_EX)  # ... and stop it at its next access
        assert written < 13 and waiting_for_lock(victim.pid, lock_path) and lines() == written
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=TIMEOUT_S)
    finally:
        if victim.poll() is None:
            victim.kill()
        lock.close()
    with open(kill_out, "a") as f:  # what a kill in the middle of writing a line leaves
        f.write('{"id": "zz", "status": "ok", "te')
    rerun = subprocess.run([sys.executable, *batch_cmd(model, inputs, kill_out)], env=env, capture_output=True,
                           text=True, timeout=TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{written} already in" in rerun.stderr and f"done: {13 - written} item(s)" in rerun.stderr, rerun.stderr
    assert ref.wait(timeout=TIMEOUT_S) == 0, ref.stderr.read()[-3000:]
    assert ranks.wait(timeout=TIMEOUT_S) == 0, ranks.stderr.read()[-3000:]

    want = records(ref_out)
    assert sorted(want) == list("abcdefghijklm")
    assert records(kill_out) == want
    assert records(ranks_out) == want
    assert {k for k, r in want.items() if r["status"] == "error"} == set("cfjl")
    assert "no such file" in want["c"]["error"] and want["j"]["type"] == "ContextOverflowError"
    assert want["f"]["type"] == "VideoError" and "colour" in want["l"]["error"]


def test_answers_equal_the_pipeline_alone(setup):
    """The batched records (2 per batch, left-padded) carry what generate() gives each request alone."""
    from llava_next.runtime.batch import Defaults, read_items, BatchJob
    from llava_next.runtime.pipeline import Pipeline

    root, model, video, corrupt = setup
    items = read_items(write_jobs(root / "small.jsonl", jobs(video, corrupt, root / "none.mp4")[:5]),
                       Defaults(max_new_tokens=6))
    with like_a_rank():
        pipe = Pipeline.from_pretrained(model, progress=False)
        got = {r["id"]: r for r in BatchJob(pipe, batch_size=2).answer(items)}
        for item in items:
            if item.id == "c":
                assert got["c"]["status"] == "error"
                continue
            req = pipe.prepare(item.prompt, images=list(item.images), videos=list(item.videos), frames=item.frames)
            assert got[item.id]["tokens"] == pipe.generate_batch([req], max_new_tokens=6)[0]


def test_unusable_inputs_are_refused_before_anything_runs(tmp_path):
    from llava_next.runtime.batch import BatchInputError, read_items

    for text, match in (('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "already used on line 1"),
                        ('{"id": "a", "prompt": "x"}\nnot json\n', "line 2: not JSON"),
                        ('{"prompt": "x"}\n', "non-empty string \"id\""),
                        ('{"id": "a", "prompt": "\xa0"}\n'.encode("latin-1"), "line 1: not UTF-8 text"),
                        ('{"id": "a", "prompt": ' + "[" * 5000 + "]" * 5000 + "}\n", "line 1: JSON nested too deeply")):
        path = tmp_path / "jobs.jsonl"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(BatchInputError, match=match):
            read_items(path)
