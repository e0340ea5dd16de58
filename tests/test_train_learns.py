"""It learns (issue 29, item 6; issue 27, item 1): ``llava-next train --method sft`` fine-tunes the built-in tiny
model on four real video clips with a Korean caption each until ``llava-next run --adapter DIR`` streams the
captions to stdout byte-exact (greedy), while the base model says none of them; then ``train --method dpo`` from
that adapter, compared against it, makes ``run`` say the chosen answer of every preference pair, one of which
the SFT adapter did not say.

The recipe (docs/training.md, "Does it learn?"): four clips that look different (pans over four real photos:
the random vision tower tells them apart far better than four quarters of one video), a caption of one word
each with a distinct first syllable (byte-level Korean: three tokens a syllable), and the coffee clip captioned a
second time, 커피잔 (coffee cup) beside 커피: five items in one batch, 1 frame, LoRA rank 16 on every decoder
linear and on lm_head, no dropout, AdamW at 3e-3 with 10 warmup steps and cosine decay over 90 steps. Run by
hand, the loss per step is in OUT/steps.jsonl.

SFT on both coffee captions leaves the choice between them open (the two continuations after 커피 at about
even odds): the adapter says one of them, a near tie. DPO (docs/training.md, "DPO after SFT: does the
preference win?") then takes four pairs, the other coffee caption chosen over the one the SFT adapter says and
each other clip's caption chosen over a word it never learned, and ``run`` says every chosen answer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llava_next.train.sft import SFTConfig, SFTRun
from media import cached_video

# the clips' photos (tests/media.py) and what each shows: astronaut, coffee, rocket, cat
CLIPS = {"astronaut": "우주인", "coffee": "커피", "rocket": "로켓", "chelsea": "고양이"}
SECOND = ("coffee", "커피잔")  # a second caption of one clip: SFT learns both, DPO settles which one
# DPO's rejected answers for the other clips: words the SFT data never has, each starting with another UTF-8 lead
# byte (its first byte token) than the chosen caption (a shared first token cancels out of the DPO loss)
REJECTED = {"astronaut": "토끼", "rocket": "풍선", "chelsea": "다람쥐"}
PROMPT = "이 영상을 한국어로 상세히 묘사해주세요."
FRAMES, STEPS = "1", "90"


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


class SFTProcess:
    """The ``llava-next train --method sft`` process of this module's tests, started once: the first test answers
    with the base model while it trains; ``wait()`` returns its output directory (and asserts it succeeded)."""

    def __init__(self, root: Path) -> None:
        self.videos = [cached_video(f"learn_{photo}", frames=24, size_hw=(126, 224), fps=12, photo=photo)
                       for photo in CLIPS]  # 2 s at 12 fps, 224 x 126: the vision tower sees 112 px tiles anyway
        items = [(v, c) for v, c in zip(self.videos, CLIPS.values())]
        items.append((self.videos[list(CLIPS).index(SECOND[0])], SECOND[1]))
        self.data = root / "train.jsonl"
        self.data.write_text("".join(json.dumps({"id": f"item{k}", "video": str(v), "conversations": [
            {"from": "human", "value": f"<video>\n{PROMPT}"}, {"from": "gpt", "value": c}]},
            ensure_ascii=False) + "\n" for k, (v, c) in enumerate(items)), encoding="utf-8")
        # two threads, set explicitly: the first test answers with the base model in this process meanwhile, on one
        # thread (like_a_rank), and a default OMP setting spun against it (529 s of CPU for this test once, 74 s
        # with one training thread; two threads took the training from 48 to 38 s once the answers are in)
        self.env = dict(os.environ, LLAVA_NEXT_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
        self.out, self.log = root / "run", root / "train.stderr"
        self.said: dict[str, bytes] = {}  # the tuned adapter's answer per photo, once a test has run it
        with open(self.log, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "llava_next.cli.main", "train", "--method", "sft", "--data", str(self.data),
                 "--model", "tiny-random", "--out", str(self.out), "--frames", FRAMES, "--frame-sampling", "uniform",
                 "--batch-size", str(len(items)), "--steps", STEPS, "--lr", "3e-3", "--warmup-steps", "10",
                 "--lora-rank", "16", "--lora-alpha", "32", "--lora-dropout", "0", "--lora-targets",
                 "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head", "--save-every", STEPS, "--quiet"],
                env=self.env, stdout=subprocess.DEVNULL, stderr=err)

    def wait(self) -> Path:
        try:
            code = self.process.wait(timeout=600)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        assert code == 0, self.log.read_text()
        return self.out


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    training = SFTProcess(tmp_path_factory.mktemp("learns"))
    yield training
    if training.process.poll() is None:
        training.process.kill()
        training.process.wait()


def run_args(adapter: Path, video: Path) -> tuple[str, ...]:
    return ("run", "--model", "tiny-random", "--adapter", str(adapter), "--video", str(video), "--frames", FRAMES,
            "--quiet", PROMPT)


def test_sft_makes_run_say_each_clips_caption(sft, tmp_path, capfdbinary, monkeypatch):
    videos, captions = sft.videos, list(CLIPS.values())
    # the training process runs on one core; meanwhile the base model answers (below) on the other
    # the base model (one batch run for the four clips, greedy) says none of the captions
    monkeypatch.setenv("LLAVA_NEXT_CACHE", sft.env["LLAVA_NEXT_CACHE"])
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": v.name, "video": str(v)}) + "\n" for v in videos), encoding="utf-8")
    code, _, err_base = in_process(capfdbinary, "batch", "--model", "tiny-random", "--inputs", str(jobs),
                                   "--out", str(tmp_path / "base.jsonl"), "--prompt", PROMPT, "--frames", FRAMES,
                                   "--max-new-tokens", "8", "--quiet")
    assert code == 0, err_base.decode()
    out_dir = sft.wait()
    answers = {line["id"]: line["text"] for line in map(json.loads, (tmp_path / "base.jsonl").read_text().splitlines())}
    assert len(answers) == 4 and not any(c in answers[v.name] for v, c in zip(videos, captions)), answers

    steps = [json.loads(line) for line in (out_dir / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == int(STEPS) and steps[-1]["loss"] < 0.1 * steps[0]["loss"]
    assert [s["lr"] for s in steps[:2]] == pytest.approx([3e-3 * 2 / 10, 3e-3 * 3 / 10])  # the rate of the next step

    # streamed to stdout: exactly the caption and the newline (the coffee clip: one of its two captions); the
    # first clip by ``llava-next run`` in a console process of its own (its stdout's bytes), the other three by
    # the same command's ``main`` in this process
    for k, (photo, video) in enumerate(zip(CLIPS, videos)):
        args = run_args(out_dir / "adapter", video)
        if k == 0:
            tuned = cli(sft.env, *args)
            code, out, err = tuned.returncode, tuned.stdout, tuned.stderr
        else:
            code, out, err = in_process(capfdbinary, *args)
        assert code == 0, err.decode()
        sft.said[photo] = out
        expected = [CLIPS[photo]] + [SECOND[1]] * (photo == SECOND[0])
        assert out in [(c + "\n").encode("utf-8") for c in expected], (video.name, out.decode(errors="replace"),
                                                                        steps[-1])


def test_dpo_after_sft_makes_run_say_every_chosen_answer(sft, tmp_path, capfdbinary, monkeypatch):
    """DPO from the SFT adapter with it as the reference (``--adapter`` and ``--ref-adapter``): the coffee clip's
    chosen answer is the caption the SFT adapter does not say, every other clip's is its caption; after three
    steps ``run --adapter`` says each chosen answer byte-exact. Three steps at beta 1 (docs/training.md, "DPO
    after SFT", per pair): DPO keeps lowering the easy pairs' chosen answers along with their rejected ones, so
    six steps lost two clips' captions; at beta 0.1 the easy pairs keep their weight longer and the contested
    pair moves less (its lead 1.4 against 2.0 nats after three steps, the weakest easy pair's 0.3 against 0.7)."""
    monkeypatch.setenv("LLAVA_NEXT_CACHE", sft.env["LLAVA_NEXT_CACHE"])
    adapter = sft.wait() / "adapter"
    photos = list(CLIPS)
    coffee = sft.videos[photos.index(SECOND[0])]
    if SECOND[0] not in sft.said:  # this test alone: ask the SFT adapter here
        code, sft.said[SECOND[0]], err = in_process(capfdbinary, *run_args(adapter, coffee))
        assert code == 0, err.decode()
    said = sft.said[SECOND[0]].decode("utf-8").strip()
    assert said in (CLIPS[SECOND[0]], SECOND[1])
    pairs = {photo: (CLIPS[photo], REJECTED[photo]) for photo in REJECTED}
    pairs[SECOND[0]] = (SECOND[1] if said == CLIPS[SECOND[0]] else CLIPS[SECOND[0]], said)  # not what SFT says
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"id": photo, "video": str(video), "prompt": PROMPT, "chosen": pairs[photo][0],
                                         "rejected": pairs[photo][1]}, ensure_ascii=False) + "\n"
                             for photo, video in zip(photos, sft.videos)), encoding="utf-8")
    code, _, err = in_process(capfdbinary, "train", "--method", "dpo", "--data", str(prefs), "--model", "tiny-random",
                              "--out", str(tmp_path / "dpo"), "--adapter", str(adapter), "--ref-adapter", str(adapter),
                              "--frames", FRAMES, "--frame-sampling", "uniform", "--batch-size", "4", "--steps", "3",
                              "--lr", "2e-4", "--beta", "1", "--save-every", "3", "--quiet")
    assert code == 0, err.decode()
    steps = [json.loads(line) for line in (tmp_path / "dpo" / "steps.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # the policy starts as its reference
    assert steps[-1]["rewards/accuracies"] == 1.0 and steps[-1]["rewards/margins"] > steps[1]["rewards/margins"] > 0
    for photo, video in zip(photos, sft.videos):
        code, out, err = in_process(capfdbinary, *run_args(tmp_path / "dpo" / "adapter", video))
        assert code == 0, err.decode()
        assert out == (pairs[photo][0] + "\n").encode("utf-8"), (photo, out.decode(errors="replace"), pairs, steps)


def test_lr_schedules_warm_up_then_decay_or_hold():
    def rates(**settings) -> list[float]:
        run = SimpleNamespace(cfg=SFTConfig(out="unused", **settings), total_steps=6)
        return [SFTRun._lr_factor(run, step) for step in range(6)]

    assert rates(warmup_steps=2, lr_schedule="constant") == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert rates(warmup_steps=2) == pytest.approx([0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464], abs=1e-4)  # cosine
    assert rates(lr_schedule="constant") == [1.0] * 6
