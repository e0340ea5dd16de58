"""`llava-next inspect` on real media: the printed plan, --json fields, --png output and exit codes.

Three runs go through a real subprocess (``python -m llava_next.cli.main`` and the installed ``llava-next``
script); the rest call ``cli.main(argv)`` in-process, which is the same code without the start-up cost.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import media
from llava_next import LlavaNextConfig
from llava_next.cli import main as cli
from llava_next.inputs.tokens import image_tokens, video_tokens

VIDEO_7B = LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")


def _run(*args, script=False):
    exe = Path(sys.executable).with_name("llava-next")
    cmd = [str(exe)] if script and exe.exists() else [sys.executable, "-m", "llava_next.cli.main"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600)  # a hang guard only


def _png_ok(path, min_size=(200, 150)):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_size[0] and im.height >= min_size[1]
        im.load()
        assert np.asarray(im).std() > 10  # a picture, not a blank canvas


# ---- subprocess: the real entry points ---------------------------------------------------------------
def test_video_json_and_png_subprocess(tmp_path):
    out = tmp_path / "plan.png"
    r = _run("inspect", "--video", str(media.real_video()), "--frames", "8", "--json", "--png", str(out))
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    total = plan["total_frames"]
    assert plan["kind"] == "video" and plan["preset"] == "LLaVA-NeXT-Video-7B"
    assert plan["frame_indices"] == np.linspace(0, total - 1, 8, dtype=int).tolist()
    assert plan["timestamps"] == pytest.approx([i / plan["fps"] for i in plan["frame_indices"]], abs=1e-3)
    assert plan["tokens_per_frame"] == 144 and plan["visual_tokens"] == 1152 == video_tokens(8, VIDEO_7B)
    assert plan["total"] == 1152 + plan["text_tokens"] + 256 and plan["fits"] is True  # run's default answer budget
    assert plan["context"]["factor"] == 2.5 and plan["context"]["positions_available"] == 10240
    _png_ok(out, (1000, 300))


def test_image_text_and_png_via_console_script(tmp_path):
    out = tmp_path / "tiles.png"
    photos = [media.real_photo("motorcycle_left"), media.real_photo("astronaut")]
    r = _run("inspect", "--image", *map(str, photos), "--png", str(out), script=True)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for expected in ("500x741 px", "best resolution 672x672", "grid 2x2", "unpadded to 32x48", "2144",
                     "512x512 px", "2928", "visual   5072 tokens in 2 images", "fits"):
        assert expected in text, expected
    _png_ok(out, (800, 1000))


def test_bad_media_exits_2_with_one_line_subprocess(tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00" * 2048)
    r = _run("inspect", "--video", str(bad))
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "not a readable video" in lines[0], r.stderr


# ---- in-process ------------------------------------------------------------------------------------
def _main(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_image_json_fields(capsys):
    photo = media.real_photo("rocket")
    code, out, _ = _main(capsys, "inspect", "--image", str(photo), "--json", "--preset", "llava-v1.6-vicuna-7b")
    plan = json.loads(out)
    assert code == 0 and plan["kind"] == "image"
    (entry,) = plan["images"]
    assert entry["image_hw"] == [427, 640] and entry["tokens"] == image_tokens((427, 640), VIDEO_7B)
    assert plan["visual_tokens"] == entry["tokens"] and plan["total"] == entry["tokens"] + 100 + 256
    assert (entry["canvas_hw"], entry["grid_hw"], entry["num_tiles"]) == ([672, 672], [2, 2], 4)
    assert plan["context"]["positions_available"] == 4096  # vicuna: no RoPE scaling


def test_video_options_change_the_plan(capsys):
    path = str(media.real_video())
    code, out, _ = _main(capsys, "inspect", "--video", _small_video(), "--frames", "4", "--pool-stride", "4",
                         "--pool-mode", "bilinear", "--newline", "grid", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["pooled_hw"] == [6, 6] and plan["tokens_per_frame"] == 36
    assert plan["newline_tokens"] == 4 * 6 and plan["visual_tokens"] == 4 * 36 + 24
    code, out, _ = _main(capsys, "inspect", "--video", path, "--frames", "32", "--sampling", "fps", "--json")
    plan = json.loads(out)
    assert plan["frame_indices"] == list(range(0, plan["total_frames"], round(plan["fps"])))
    assert plan["visual_tokens"] == 144 * len(plan["frame_indices"])


def _small_video() -> str:
    """Token counts do not depend on content: a 12-frame clip keeps these runs cheap."""
    return str(media.cached_video("odd", frames=12, size_hw=(9, 17), fps=10, codec="mpeg4"))


def test_overflow_is_reported_with_the_fix(capsys):
    path = _small_video()
    code, out, _ = _main(capsys, "inspect", "--video", path, "--frames", "80")
    assert code == 0
    assert "DOES NOT FIT" in out and "--rope-scale 3" in out and "--pool-stride" in out and "fewer frames" in out
    code, out, _ = _main(capsys, "inspect", "--video", path, "--frames", "80", "--rope-scale", "auto", "--json")
    ctx = json.loads(out)["context"]
    assert ctx["fits"] and ctx["factor"] == 3.0 and ctx["factor_source"] == "auto"
    code, out, _ = _main(capsys, "inspect", "--video", path, "--frames", "32", "--rope-scale", "1")
    assert "DOES NOT FIT" in out and "--rope-scale 2 " in out


def test_video_png_with_newlines(capsys, tmp_path):
    out = tmp_path / "v.png"
    path = _small_video()
    code, _, err = _main(capsys, "inspect", "--video", path, "--frames", "3", "--newline", "frame", "--png", str(out))
    assert code == 0, err
    _png_ok(out, (300, 200))


@pytest.mark.parametrize("args,message", [
    (["--video", "{tmp}/missing.mp4"], "{tmp}/missing.mp4: no such file"),
    (["--video", "{tmp}"], "{tmp}/notes.png: not an image file PIL can read"),  # a folder: its frames
    (["--image", "{tmp}/missing.png"], "{tmp}/missing.png: no such file"),
    (["--image", "{tmp}/notes.png"], "{tmp}/notes.png"),
    (["--image", "{tmp}"], "{tmp}: is a directory"),
    (["--video", "{video}", "--pool-stride", "30"], "larger than the 24x24 patch grid"),
    (["--video", "{tmp}/notes.png"], "{tmp}/notes.png: not a readable video"),
    (["--image", "{photo}", "--frames", "3"], "--frames: video options, but no --video was given"),
    (["--video", "{video}", "--png", "{tmp}/no/such/dir/x.png"], "cannot write the PNG"),
])
def test_user_errors_exit_2_with_one_line(capsys, tmp_path, args, message):
    (tmp_path / "notes.png").write_text("not an image")
    fill = dict(tmp=str(tmp_path), video=_small_video(), photo=str(media.real_photo("chelsea")))
    code, out, err = _main(capsys, "inspect", *[a.format(**fill) for a in args])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message.format(**fill) in err, err


@pytest.mark.parametrize("args", [[], ["inspect"], ["inspect", "--video", "b.mp4", "--pool-position", "middle"],
                                  ["inspect", "--video", "b.mp4", "--rope-scale", "0.5"],
                                  ["inspect", "--video", "b.mp4", "--preset", "nope"],
                                  ["inspect", "--video", "b.mp4", "--frames", "0"]])
def test_usage_errors_exit_2(capsys, args):
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    assert "usage: llava-next" in capsys.readouterr().err


def test_text_output_for_video(capsys):
    code, out, _ = _main(capsys, "inspect", "--video", _small_video(), "--frames", "4")
    assert code == 0
    assert "9x17 px, 12 frames, 10.00 fps, 1.20 s" in out
    assert "sampled         4 frames (uniform): 0@0.00s, 3@0.30s, 7@0.70s, 11@1.10s" in out
    assert "per frame       24x24 patches -> average pool stride 2 -> 12x12 = 144 tokens" in out
    assert "tokens          4 x 144 = 576" in out
    assert os.path.basename(_small_video()) in out
