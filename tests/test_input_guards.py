"""Issue 22, found by trying the project as a new user: what the inputs accept and refuse, before any work.

- A frame count that cannot fit (``--frames 100000``) is refused from the plan, before a single frame is
  decoded: the context from the token plan (run), the decoded frames' memory from frames x 336 x 336 x 3
  (inspect, load_video); exit 2, one line, no traceback. The tests check that the decoder is never
  called (a spy), not how long it took.
- The context-overflow advice names what dominates: --max-new-tokens when the answer budget does, frames
  and --pool-stride only when there is a video.
- ``inspect`` counts run's default --max-new-tokens (256), so both print the same positions.
- ``sample:NAME`` works in the Python API as on the command line (one resolver).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import media
from llava_next.cli import main as cli
from llava_next.inputs import video as video_mod
from llava_next.inputs.tokens import ContextOverflowError, plan_context
from llava_next.runtime.tiny import tiny_config


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path_factory.getbasetemp() / "guards-cache"))
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from llava_next.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained("tiny-random", cache_dir=tmp_path_factory.mktemp("tiny"), progress=False)


def _small_video() -> str:
    return str(media.cached_video("odd", frames=12, size_hw=(9, 17), fps=10, codec="mpeg4"))


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any frame is decoded."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(video_mod, "_decode", spy)
    return calls


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llava_next.cli.main", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


# ---- item 3: huge frame counts ---------------------------------------------------------------------
def test_prepare_refuses_a_frame_count_over_the_context_before_decoding(pipe, no_decoding):
    with pytest.raises(ContextOverflowError) as e:
        pipe.prepare("What happens?", video=_small_video(), frames=100000)
    message = str(e.value)
    assert "1600000 visual" in message and "fewer frames" in message  # tiny-random: 16 tokens per frame
    assert "has only 12 frames" in message  # the clip is 12 frames: more only repeat them
    assert not no_decoding


def test_load_video_refuses_frames_that_cannot_fit_in_memory_before_decoding(monkeypatch, no_decoding):
    monkeypatch.setattr(video_mod, "_available_bytes", lambda: 100 * 2**20)  # 100 MiB
    with pytest.raises(video_mod.VideoError) as e:
        video_mod.load_video(_small_video(), 1000)
    message = str(e.value)
    # 1000 x 336 x 336 x 3 uint8 + the float32 pixels = 1.58 GiB
    assert "1000 frames" in message and "1.58 GiB" in message and "100.00 MiB" in message
    assert "has only 12 frames" in message and "--frames" in message
    assert not no_decoding


def test_inspect_and_run_refuse_huge_frame_counts_with_exit_2_and_one_line(tmp_path):
    video = _small_video()
    for argv in (["inspect", "--video", video, "--frames", "100000000"],
                 ["run", "--model", "tiny-random", "--video", video, "--frames", "100000", "--dtype", "fp32",
                  "--quiet", "What happens?"]):
        r = _cli(*argv)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "has only 12 frames" in r.stderr, r.stderr
        errors = [line for line in r.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, r.stderr


def test_more_frames_than_the_video_has_still_repeat_with_a_note(pipe):
    req = pipe.prepare("What happens?", video=_small_video(), frames=20)  # documented: linspace repeats
    assert req.videos[0].num_frames == 20 and any("fewer than the 20 requested" in n for n in req.notes)


# ---- item 10: the advice names what dominates ------------------------------------------------------
def test_overflow_advice_names_max_new_tokens_when_the_answer_dominates():
    plan = plan_context(20, 300, tiny_config(), new_tokens=20000)
    fix = plan.fix()
    assert "--max-new-tokens" in fix and "frames" not in fix and "--pool-stride" not in fix
    assert "--rope-scale 5" in fix and "at most 9920 fit" in fix  # 20320 positions; 10240 - 320 left for the answer


def test_overflow_advice_names_frames_only_with_a_video():
    plan = plan_context(20, 16 * 1000, tiny_config(), video_tokens=16 * 1000)
    fix = plan.fix()
    assert "fewer frames" in fix and "--pool-stride" in fix and "--max-new-tokens" not in fix
    assert fix.index("fewer frames") < fix.index("--rope-scale")


def test_run_overflow_from_max_new_tokens_says_so(capsys):
    code = cli.main(["run", "--model", "tiny-random", "--image", str(media.real_photo("rocket")), "--max-new-tokens",
                     "20000", "--dtype", "fp32", "--quiet", "Describe."])
    _, err = capsys.readouterr()
    assert code == 2 and "--max-new-tokens" in err and "frames" not in err, err


# ---- item 11: inspect counts the same new tokens as run -------------------------------------------
def test_inspect_counts_run_default_max_new_tokens(capsys):
    assert cli.main(["inspect", "--model", "tiny-random", "--video", _small_video(), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["context"]["new_tokens"] == 256
    assert plan["total"] == plan["visual_tokens"] + plan["text_tokens"] + 256


# ---- item 8: sample names in the Python API ---------------------------------------------------------
def test_prepare_accepts_sample_names(pipe):
    from llava_next.cli.options import sample_path

    req = pipe.prepare("What is this?", images=["sample:cat"], video="sample:bunny", frames=2)
    assert req.videos[0].path == sample_path("sample:bunny") and req.images[0].image_size == (300, 451)
    with pytest.raises(ValueError, match="sample:nope: no such sample"):
        pipe.prepare("What is this?", video="sample:nope")


def test_one_sample_resolver():
    from llava_next.cli import options
    from llava_next.inputs import samples

    assert options.sample_path("sample:cat") == samples.sample_path("sample:cat")
    assert Path(samples.sample_path("sample:bunny")).name == "bigbuckbunny.mp4"


def test_inspect_plans_frames_without_preprocessing_their_pixels(capsys, monkeypatch):
    """inspect (without --png) shows the plan, which needs the frame indices and timestamps, not pixels: a
    large --frames costs a decode pass, not frames x 336 x 336 x 3 bytes of preprocessed copies."""
    def spy(*args, **kwargs):
        raise AssertionError("a frame was preprocessed")

    monkeypatch.setattr(video_mod, "preprocess_frame", spy)
    assert cli.main(["inspect", "--video", _small_video(), "--frames", "2000", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_frames"] == 2000 and len(plan["frame_indices"]) == 2000 and not plan["fits"]


def test_memory_advice_names_frames_only_with_a_video(pipe, monkeypatch):
    """The memory refusal, like the context one, names fewer frames / a larger pool stride only for a video."""
    from llava_next.runtime import memory as memory_mod
    from llava_next.runtime.memory import MemoryBudgetError

    image = pipe.prepare("What is this?", images=["sample:cat"])
    video = pipe.prepare("What happens?", video="sample:bunny", frames=2)
    monkeypatch.setattr(memory_mod, "available_memory", lambda device: 1)
    with pytest.raises(MemoryBudgetError) as e:
        pipe.generate(image, max_new_tokens=4)
    assert "--frames" not in str(e.value) and "--pool-stride" not in str(e.value) and "fewer images" in str(e.value)
    with pytest.raises(MemoryBudgetError, match="fewer frames \\(--frames\\) or a larger --pool-stride"):
        pipe.generate(video, max_new_tokens=4)
