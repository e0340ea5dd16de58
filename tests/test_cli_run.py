"""`llava-next run` and `llava-next convert` exactly as a user calls them, on a tiny checkpoint directory
in the llava-hf format (weights + tokenizer.json), a real photo and a real video."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from checkpoints import make_runnable_checkpoint
from media import cached_video, real_photo
from test_model import hf_image_args

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    directory, hf = make_runnable_checkpoint(root / "tiny-video-hf", kind="video")
    hf.set_attn_implementation("eager")
    env = dict(os.environ, LLAVA_NEXT_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1")
    video = cached_video("model_parity", frames=24, size_hw=(90, 160), fps=12, photo="coffee")
    return root, directory, hf, env, video


def cli(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_next.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_run_json_tokens_equal_transformers_greedy(setup):
    from llava_next.inputs.image import preprocess_image
    from llava_next.inputs.video import load_video
    from llava_next_weights.load import read_config

    root, directory, hf, env, video = setup
    photo = real_photo("chelsea")
    r = cli(env, "run", "--model", str(directory), "--image", str(photo), "--video", str(video), "--frames", "4",
            "--dtype", "fp32", "--max-new-tokens", "10", "--json", "What is happening?")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"tokens", "text", "timings", "plan"}
    plan = out["plan"]
    assert plan["video_frames"][0]["frame_indices"] == [0, 7, 15, 23]
    assert plan["context"]["fits"] and plan["context"]["visual_tokens"] == sum(plan["image_tokens"] + plan["video_tokens"])

    # the same prompt through transformers: ids rebuilt from the template text, same pixels
    from transformers import PreTrainedTokenizerFast

    cfg = read_config(next((root / "cache").rglob("config.json")).parent)
    image, clip = preprocess_image(photo, cfg), load_video(video, 4, size=cfg.tile_size)
    text = (f"USER: {'<image>' * plan['image_tokens'][0]}\n{'<video>' * plan['video_tokens'][0]}\n"
            f"What is happening? ASSISTANT:")
    ids = torch.tensor([PreTrainedTokenizerFast.from_pretrained(directory)(text)["input_ids"]])
    assert ids.shape[1] == plan["input_tokens"]
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values_videos=clip.pixel_values[None], **hf_image_args([image]),
                          max_new_tokens=10, do_sample=False)
    assert out["tokens"] == ref[0, ids.shape[1]:].tolist()[:len(out["tokens"])]


def test_run_streams_text_and_reports_the_plan_on_stderr(setup):
    _, directory, _, env, video = setup
    r = cli(env, "run", "--model", str(directory), "--video", str(video), "--frames", "24", "--dtype", "fp32",
            "--max-new-tokens", "450", "--rope-scale", "auto", "--temperature", "0.7", "--seed", "1",
            "What is happening?")
    assert r.returncode == 0, r.stderr
    assert "--rope-scale auto: using linear RoPE factor 2" in r.stderr
    assert "positions" in r.stderr and r.stdout.strip()


def test_run_template_none_sends_the_prompt_as_given(setup):
    _, directory, _, env, video = setup
    ok = cli(env, "run", "--model", str(directory), "--video", str(video), "--frames", "2", "--dtype", "fp32",
             "--template", "none", "--max-new-tokens", "3", "--json", "<video>\nraw prompt")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["plan"]["input_tokens"] > 8
    bad = cli(env, "run", "--model", str(directory), "--video", str(video), "--template", "none", "--json", "no placeholder")
    assert bad.returncode == 2
    err = json.loads(bad.stdout)
    assert err["kind"] == "user" and "placeholder" in err["error"]


def test_run_user_errors_are_one_line_exit_2(setup):
    _, directory, _, env, _ = setup
    r = cli(env, "run", "--model", str(directory), "--video", "/no/such/video.mp4", "Hi")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["llava-next run: error: /no/such/video.mp4: no such file"]


def test_convert_writes_a_loadable_directory(setup):
    root, directory, _, env, _ = setup
    out = root / "converted-bf16"
    r = cli(env, "convert", str(directory), str(out), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    from llava_next_weights.load import load_state_dict_mmap

    assert all(t.dtype == torch.bfloat16 for t in load_state_dict_mmap(out).values())
    again = cli(env, "convert", str(directory), str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
