"""Bad media and bad prompts, fed as real files through the public entry points (``Pipeline.prepare`` /
``stream``, ``load_image``, ``llava-next run`` / ``inspect``): each gives one clear line that names the
file and what to do, nothing is written, and odd-but-valid input (1x1 images, 17x9 or one-frame
videos) runs. The table of messages is docs/errors.md; checkpoints and runtime are in
test_errors_checkpoint.py and test_errors_runtime.py."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import media
from checkpoints import make_runnable_checkpoint
from llava_next.cli.main import main
from llava_next.inputs.image import ImageError, load_image
from llava_next.runtime.pipeline import Pipeline
from llava_next.inputs.prompt import PromptError
from llava_next.inputs.tokens import ContextOverflowError, image_tokens
from llava_next.inputs.video import VideoError
from llava_next_weights.convert import convert

pytest.importorskip("transformers")


def tree(path) -> set[str]:
    """Every path under ``path`` (to assert that nothing was written)."""
    return {os.path.relpath(os.path.join(d, n), path) for d, dirs, files in os.walk(path) for n in dirs + files}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(converted checkpoint dir, fp32 Pipeline) of a tiny video model with a real tokenizer."""
    root = tmp_path_factory.mktemp("bad_input")
    hf_dir, _ = make_runnable_checkpoint(root / "tiny-hf", kind="video")
    directory = convert(hf_dir, root / "tiny", progress=False)
    return directory, Pipeline.from_pretrained(directory, dtype=torch.float32, progress=False)


def one_line(e: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


# ---- video ------------------------------------------------------------------------------------------
def _encode(path, frames: int, *, options=None, rotation: int = 0):
    """An H.264 MP4 panning over a real photo (``options``: muxer options such as faststart)."""
    photo = media.photo_array("coffee")
    with av.open(str(path), "w", options=options or {}) as c:
        s = c.add_stream("libx264", rate=Fraction(10))
        s.width, s.height, s.pix_fmt = 160, 90, "yuv420p"
        if rotation:
            s.set_display_rotation(rotation)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(media._pan_zoom_frame(photo, i, frames, (90, 160)), format="rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_videos")
    good = _encode(d / "good.mp4", 40).read_bytes()  # index (moov) at the end, as most encoders write
    faststart = _encode(d / "faststart.mp4", 40, options={"movflags": "faststart"}).read_bytes()  # index first
    mkv = media.cached_video("trunc_src", frames=60, size_hw=(48, 64), fps=25, codec="ffv1").read_bytes()
    rng = np.random.default_rng(0)
    files = {
        "truncated.mp4": good[:len(good) // 2],
        "truncated_faststart.mp4": faststart[:len(faststart) * 2 // 3],
        "corrupt_header.mp4": rng.integers(0, 256, 64, dtype=np.uint8).tobytes() + good[64:],
        "corrupt_middle.mkv": mkv[:len(mkv) // 3] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
                              + mkv[len(mkv) // 3 + 3000:],
        "zero.mp4": b"",
        "notes.mp4": b"this is a text file, not a video\n" * 40,
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    with av.open(str(d / "audio.mp4"), "w") as c:  # audio only: AAC in an MP4
        s = c.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            c.mux(s.encode(frame))
        c.mux(s.encode())
    (d / "a_directory.mp4").mkdir()
    return d


VIDEO_ERRORS = {  # file -> what the message must say
    "truncated.mp4": ["truncated MP4", "'mdat' box needs", "incomplete download", "get it again"],
    "truncated_faststart.mp4": ["truncated MP4", "of its 40 frames decode", "get it again"],
    "corrupt_header.mp4": ["not a readable video", "re-encode"],
    "corrupt_middle.mkv": ["corrupt video, decoding failed after", "re-encode"],
    "zero.mp4": ["is an empty file"],
    "notes.mp4": ["not a readable video", "not a video file, or cut off"],
    "audio.mp4": ["has no video stream (it holds audio)", "give a file with video"],
    "a_directory.mp4": ["is an empty folder", "a folder of frame images"],  # a folder is read as its frames
    "missing.mp4": ["no such file"],
}


@pytest.mark.parametrize("name", VIDEO_ERRORS)
def test_bad_video_is_one_clear_line(tiny, bad_videos, name):
    _, pipe = tiny
    before = tree(bad_videos)
    with pytest.raises(VideoError) as e:
        pipe.prepare("What happens?", video=bad_videos / name, frames=8)
    one_line(e, str(bad_videos / name), *VIDEO_ERRORS[name])
    assert tree(bad_videos) == before


def test_bad_video_through_the_cli_exits_2_with_one_line(tiny, bad_videos, capsys):
    directory, _ = tiny
    assert main(["run", "--model", str(directory), "--video", str(bad_videos / "notes.mp4"), "Hi"]) == 2
    out, err = capsys.readouterr()
    err = "".join(line for line in err.splitlines(True) if not line.startswith("[llava-next] "))  # progress
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"llava-next run: error: {bad_videos / 'notes.mp4'}: not a readable video")


def test_short_odd_rotated_and_variable_rate_videos_run(tiny, tmp_path):
    """Valid but unusual: they run, and what is unusual is said (notes), never silently changed."""
    _, pipe = tiny
    one = media.cached_video("single", frames=1, size_hw=(48, 64), fps=25, codec="libx264")
    req = pipe.prepare("What happens?", video=one, frames=8)
    assert req.videos[0].frame_indices == [0] * 8 and req.video_token_counts == [8 * 4]
    assert req.notes == [f"{one}: has 1 frame(s), fewer than the 8 requested; 7 sampled frame(s) repeat earlier "
                         f"ones (use --frames 1 to avoid the repeats)"]
    few = media.cached_video("five", frames=5, size_hw=(48, 64), fps=25, codec="libx264")
    assert "3 sampled frame(s) repeat" in pipe.prepare("Hi", video=few, frames=8).notes[0]

    rotated = _encode(tmp_path / "rotated.mp4", 6, rotation=90)
    req = pipe.prepare("Hi", video=rotated, frames=4)
    assert req.videos[0].size_hw == (90, 160)  # as stored, like both references
    assert req.notes == [f"{rotated}: asks players to rotate it by 90 degrees; frames are used as stored, 90x160 "
                         f"(height x width), as the reference implementations do; re-encode it upright if that "
                         f"matters"]

    times = [0.0, 0.1, 0.15, 0.4, 1.0, 1.05, 2.5, 2.52, 3.0]
    vfr = media.cached_video("vfr", frames=len(times), size_hw=(48, 64), fps=10, codec="libx264", times=times)
    req = pipe.prepare("Hi", video=vfr, frames=5)
    assert req.to_dict()["video_frames"][0]["timestamps"] == pytest.approx([0.0, 0.15, 1.0, 2.5, 3.0], abs=1e-3)
    assert req.notes == []
    for size_hw in [(9, 17), (17, 9)]:  # odd sizes, landscape and portrait
        clip = media.cached_video("odd" if size_hw == (9, 17) else "odd_portrait", frames=12, size_hw=size_hw,
                                  fps=10, codec="libx264")
        req = pipe.prepare("Hi", video=clip, frames=4)
        assert req.videos[0].size_hw == size_hw
        assert len(pipe.generate_batch([req], max_new_tokens=2)[0]) >= 1


# ---- images -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_images")
    png, jpg = media.real_photo("astronaut").read_bytes(), media.real_photo("rocket").read_bytes()
    rng = np.random.default_rng(1)
    files = {
        "truncated.png": png[:len(png) // 2],
        "truncated.jpg": jpg[:len(jpg) // 2],
        "corrupt.png": png[:len(png) // 2] + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes() + png[len(png) // 2 + 2000:],
        # damaged Huffman tables (bytes 785..1027 of rocket.jpg). Damage inside the entropy-coded data can
        # decode to a garbled picture without any error: libjpeg recovers silently (docs/errors.md)
        "corrupt.jpg": jpg[:790] + np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes() + jpg[990:],
        "notes.png": b"not an image\n" * 20,
        "empty.jpg": b"",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "a_directory.png").mkdir()
    # a decompression bomb: 13400 x 13400 1-bit pixels in a ~20 kB PNG (180 MP; PIL itself refuses > 179 MP)
    Image.new("1", (13400, 13400)).save(d / "bomb.png")
    return d


IMAGE_ERRORS = {
    "truncated.png": ["truncated or corrupt image data", "image file is truncated", "get it again"],
    "truncated.jpg": ["truncated or corrupt image data", "get it again"],
    "corrupt.png": ["truncated or corrupt image data", "broken PNG file"],
    "corrupt.jpg": ["truncated or corrupt image data", "broken data stream"],
    "notes.png": ["not an image file PIL can read"],
    "empty.jpg": ["is an empty file, not an image"],
    "a_directory.png": ["is a directory, not an image file"],
    "bomb.png": ["13400x13400 px (height x width) = 179.6 megapixels is over the limit of 100 megapixels",
                 "decompression bombs", "--max-image-pixels 179560000", "max_pixels=179560000",
                 "LLAVA_NEXT_MAX_IMAGE_PIXELS=179560000"],
}


@pytest.mark.parametrize("name", IMAGE_ERRORS)
def test_bad_image_is_one_clear_line(tiny, bad_images, name, monkeypatch):
    _, pipe = tiny
    before, pil_limit = tree(bad_images), Image.MAX_IMAGE_PIXELS
    decoded, real_load = [], ImageFile.ImageFile.load

    def load(im):  # every PIL decode of a file goes through here (PNG, JPEG, ...: none overrides it)
        decoded.append(im.filename)
        return real_load(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(ImageError) as e:
        pipe.prepare("Describe it.", images=[media.real_photo("chelsea"), bad_images / name])
    one_line(e, str(bad_images / name), *IMAGE_ERRORS[name])
    assert str(media.real_photo("chelsea")) in decoded  # the spy sees decodes
    if name == "bomb.png":  # refused from its header, never decoded (180 megapixels)
        assert str(bad_images / name) not in decoded
    assert tree(bad_images) == before and Image.MAX_IMAGE_PIXELS == pil_limit
    with pytest.raises(FileNotFoundError, match="image file not found"):
        pipe.prepare("Describe it.", images=[bad_images / "missing.png"])


def test_pixel_limit_override_and_cli(tiny, bad_images, monkeypatch, capsys):
    _, pipe = tiny
    photo = media.real_photo("astronaut")  # 512 x 512 = 262144 px
    with pytest.raises(ImageError, match="over the limit of 0.1 megapixels.*--max-image-pixels 262144"):
        pipe.prepare("Hi", images=[photo], max_image_pixels=100_000)
    assert pipe.prepare("Hi", images=[photo], max_image_pixels=262_144).image_token_counts
    monkeypatch.setenv("LLAVA_NEXT_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageError, match="limit of 0.001 megapixels"):
        load_image(photo)
    assert load_image(photo, max_pixels=0).size == (512, 512)  # 0 = no limit
    assert main(["inspect", "--image", str(photo), "--max-image-pixels", "262144", "--json"]) == 0
    capsys.readouterr()
    monkeypatch.delenv("LLAVA_NEXT_MAX_IMAGE_PIXELS")
    assert main(["inspect", "--image", str(bad_images / "bomb.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-image-pixels 179560000" in err


def test_tiny_and_extreme_aspect_images_run(tiny, tmp_path):
    _, pipe = tiny
    cfg = pipe.config
    for w, h in [(1, 1), (10000, 10), (10, 10000)]:
        path = tmp_path / f"{w}x{h}.png"
        Image.fromarray(np.asarray(Image.open(media.real_photo("coffee")).convert("RGB").resize((w, h)))).save(path)
        req = pipe.prepare("Describe it.", images=[path])
        assert req.image_token_counts == [image_tokens((h, w), cfg)]
        assert len(pipe.generate_batch([req], max_new_tokens=2)[0]) >= 1


def test_image_modes_are_converted_as_documented(tmp_path):
    rgb = Image.open(media.real_photo("astronaut")).convert("RGB").resize((64, 48))
    gray8 = np.asarray(rgb.convert("L"))
    cases = {
        "cmyk.jpg": (rgb.convert("CMYK"), lambda im: np.asarray(im.convert("RGB"))),
        "palette.png": (rgb.convert("P"), lambda im: np.asarray(im.convert("RGB"))),
        "gray.png": (rgb.convert("L"), lambda im: np.repeat(gray8[..., None], 3, axis=2)),
        "gray16.png": (Image.fromarray(gray8.astype(np.uint16) * 257), lambda im: np.repeat(gray8[..., None], 3, 2)),
    }
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited over white
    cases["rgba.png"] = (rgba, lambda im: np.full((48, 64, 3), 255, np.uint8))
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as saved:
            want = expected(saved)
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / name)), want, err_msg=name)


# ---- prompts ----------------------------------------------------------------------------------------
def test_placeholder_and_media_mismatches(tiny):
    _, pipe = tiny
    photo, video = media.real_photo("chelsea"), media.cached_video("single", frames=1, size_hw=(48, 64), fps=25,
                                                                   codec="libx264")
    cases = [
        (dict(prompt="<image> <image> Compare them.", images=[photo]), "2 <image> and 0 <video> placeholders but 1 image(s)"),
        (dict(prompt="<image> Compare them.", images=[photo, photo]), "1 <image> and 0 <video> placeholders but 2 image(s)"),
        (dict(prompt="<video> What happens?"), "0 <image> and 1 <video> placeholders but 0 image(s) and 0 video(s)"),
        (dict(prompt="<image> What happens?", video=video), "1 <image> and 0 <video> placeholders but 0 image(s) and 1"),
        (dict(prompt="Describe it.", images=[photo], template="none"), "template 'none' sends the prompt as given"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(PromptError) as e:
            pipe.prepare(**kwargs)
        one_line(e, fragment)

    # media without placeholders: the template puts them at the front of the first user turn
    req = pipe.prepare("Describe it.", images=[photo], video=video, frames=2)
    ids = pipe.tokenizer.encode("USER: <image>\n<video>\nDescribe it. ASSISTANT:")
    cfg = pipe.config
    expanded = [t for i in ids for t in [i] * {cfg.image_token_id: req.image_token_counts[0],
                                              cfg.video_token_id: req.video_token_counts[0]}.get(i, 1)]
    assert req.input_ids == expanded


def test_context_overflow_through_the_cli(tiny):
    """512 positions in the tiny model: 8 frames + the prompt + 600 new tokens do not fit at factor 1."""
    directory, _ = tiny
    video = media.cached_video("model_parity", frames=24, size_hw=(90, 160), fps=12, photo="coffee")
    with pytest.raises(ContextOverflowError):
        tiny[1].prepare("What happens?", video=video, max_new_tokens=600)
    r = subprocess.run([sys.executable, "-m", "llava_next.cli.main", "run", "--model", str(directory), "--video", str(video),
                        "--max-new-tokens", "600", "What happens?"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 2 and r.stdout == ""
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("[llava-next] ")]  # progress
    assert len(lines) == 1, r.stderr
    assert "prompt does not fit the RoPE context" in lines[0] and "vs 512 x RoPE factor 1 (config) = 512" in lines[0]
    assert "--rope-scale 2 (the smallest linear factor" in lines[0]
