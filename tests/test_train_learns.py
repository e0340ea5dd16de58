"""It learns (issue 29, item 6): ``llava-next train --method sft`` fine-tunes the built-in tiny model on four real
video clips with a Korean caption each until ``llava-next run --adapter DIR`` streams every caption to stdout
byte-exact (greedy), while the base model says none of them.

The recipe (docs/training.md, "Does it learn?"): four clips that look different (pans over four real photos:
the random vision tower tells them apart far better than four quarters of one video), a caption of one word
each with a distinct first syllable (byte-level Korean: three tokens a syllable), 2 frames, the four items in
one batch, LoRA rank 16 on every decoder linear and on lm_head, no dropout, AdamW at 3e-3 with 10 warmup steps
and cosine decay over 90 steps. Run by hand, the loss per step is in OUT/steps.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from llava_next.train.sft import SFTConfig, SFTRun
from media import cached_video

# the clips' photos (tests/media.py) and what each shows: astronaut, coffee, rocket, cat
CLIPS = {"astronaut": "우주인", "coffee": "커피", "rocket": "로켓", "chelsea": "고양이"}
PROMPT = "이 영상을 한국어로 상세히 묘사해주세요."
FRAMES, STEPS = "2", "90"


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    """``llava-next ARGS`` as a user runs it; stdout as bytes (the caption must arrive byte-exact)."""
    return subprocess.run([sys.executable, "-m", "llava_next.cli.main", *args], env=env, capture_output=True,
                          timeout=600)


def in_process(capfdbinary, *args: str) -> tuple[int, bytes, bytes]:
    """``llava-next ARGS`` as ``main`` in this process, as a one-thread process computes (like_a_rank: one
    thread, no compile); returns (code, stdout bytes, stderr bytes) as ``cli`` does."""
    from llava_next.cli.main import main
    from test_tensor_parallel import like_a_rank

    capfdbinary.readouterr()
    with like_a_rank():
        code = main(list(args))
    out, err = capfdbinary.readouterr()
    return (0 if code is None else code), out, err


def test_sft_makes_run_say_each_clips_caption(tmp_path, capfdbinary, monkeypatch):
    # 2 s at 12 fps, 224 x 126: small frames decode fast (the vision tower sees 112 px tiles anyway)
    videos = [cached_video(f"learn_{photo}", frames=24, size_hw=(126, 224), fps=12, photo=photo) for photo in CLIPS]
    captions = list(CLIPS.values())
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"clip{k}", "video": str(v), "conversations": [
        {"from": "human", "value": f"<video>\n{PROMPT}"}, {"from": "gpt", "value": captions[k]}]},
        ensure_ascii=False) + "\n" for k, v in enumerate(videos)), encoding="utf-8")
    # one thread: on the shared 2-core machine two threads per process spin against the other work (measured:
    # 529 s of CPU for this test at the default against 74 s with one thread, same result)
    env = dict(os.environ, LLAVA_NEXT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    # the training process runs on one core; meanwhile the base model answers (below) on the other
    log = tmp_path / "train.stderr"
    with open(log, "wb") as err:
        training = subprocess.Popen([sys.executable, "-m", "llava_next.cli.main", "train", "--method", "sft",
                                     "--data", str(data), "--model", "tiny-random", "--out", str(tmp_path / "run"),
                                     "--frames", FRAMES, "--frame-sampling", "uniform", "--batch-size", "4",
                                     "--steps", STEPS, "--lr", "3e-3", "--warmup-steps", "10", "--lora-rank", "16",
                                     "--lora-alpha", "32", "--lora-dropout", "0", "--lora-targets",
                                     "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head",
                                     "--save-every", STEPS, "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        # the base model (one batch run for the four clips, greedy) says none of the captions
        monkeypatch.setenv("LLAVA_NEXT_CACHE", env["LLAVA_NEXT_CACHE"])
        jobs = tmp_path / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({"id": v.name, "video": str(v)}) + "\n" for v in videos), encoding="utf-8")
        code, _, err_base = in_process(capfdbinary, "batch", "--model", "tiny-random", "--inputs", str(jobs),
                                       "--out", str(tmp_path / "base.jsonl"), "--prompt", PROMPT, "--frames", FRAMES,
                                       "--max-new-tokens", "8", "--quiet")
        assert code == 0, err_base.decode()
        assert training.wait(timeout=600) == 0, log.read_text()
    finally:
        if training.poll() is None:
            training.kill()
            training.wait()
    answers = {line["id"]: line["text"] for line in map(json.loads, (tmp_path / "base.jsonl").read_text().splitlines())}
    assert len(answers) == 4 and not any(c in answers[v.name] for v, c in zip(videos, captions)), answers

    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == int(STEPS) and steps[-1]["loss"] < 0.1 * steps[0]["loss"]
    assert [s["lr"] for s in steps[:2]] == pytest.approx([3e-3 * 2 / 10, 3e-3 * 3 / 10])  # the rate of the next step

    # streamed to stdout: exactly the caption and the newline; the first clip by ``llava-next run`` in a console
    # process of its own (its stdout's bytes), the other three by the same command's ``main`` in this process
    for k, (video, caption) in enumerate(zip(videos, captions)):
        args = ("run", "--model", "tiny-random", "--adapter", str(tmp_path / "run" / "adapter"), "--video", str(video),
                "--frames", FRAMES, "--quiet", PROMPT)
        if k == 0:
            tuned = cli(env, *args)
            code, out, err = tuned.returncode, tuned.stdout, tuned.stderr
        else:
            code, out, err = in_process(capfdbinary, *args)
        assert code == 0, err.decode()
        assert out == (caption + "\n").encode("utf-8"), (video.name, out.decode(errors="replace"), steps[-1])


def test_lr_schedules_warm_up_then_decay_or_hold():
    def rates(**settings) -> list[float]:
        run = SimpleNamespace(cfg=SFTConfig(out="unused", **settings), total_steps=6)
        return [SFTRun._lr_factor(run, step) for step in range(6)]

    assert rates(warmup_steps=2, lr_schedule="constant") == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert rates(warmup_steps=2) == pytest.approx([0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464], abs=1e-4)  # cosine
    assert rates(lr_schedule="constant") == [1.0] * 6
