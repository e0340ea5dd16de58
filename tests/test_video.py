"""video.py: frame sampling, timestamps, decoding errors, memory, and pixel parity with transformers."""

import os
import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest
import torch

import media
from llava_next.inputs import video
from llava_next.inputs.video import VideoError, fps_indices, load_video, uniform_indices


def _decode_all_count(path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(c.streams.video[0]))


def _read_video_pyav(path, indices):
    """The llava-hf model card's reader (frames at `indices`, RGB24), the reference for frame choice."""
    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i > indices[-1]:
                break
            if i in indices:
                frames.append(frame)
    by_index = {i: f.to_ndarray(format="rgb24") for i, f in zip(sorted(set(indices)), frames)}
    return np.stack([by_index[i] for i in indices])


def _clip_processor(size=336):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# ---- sampling rules --------------------------------------------------------------------------------
def test_uniform_indices_are_linspace_with_both_ends():
    for total, n in [(132, 8), (132, 32), (1000, 16), (5, 8), (1, 4), (7, 7)]:
        got = uniform_indices(total, n)
        assert got == np.linspace(0, total - 1, n, dtype=int).tolist()
        assert got[0] == 0 and got[-1] == total - 1 and len(got) == n
    assert uniform_indices(5, 8) == [0, 0, 1, 1, 2, 2, 3, 4]  # fewer frames than asked: repeats
    with pytest.raises(ValueError):
        uniform_indices(0, 8)


def test_fps_indices_follow_the_original_load_video():
    # one frame per second = every round(avg_fps)-th frame
    assert fps_indices(132, 25.0, max_frames=32) == [0, 25, 50, 75, 100, 125]
    assert fps_indices(100, 29.97, max_frames=32) == [0, 30, 60, 90]
    # over the cap -> uniform over the whole video
    assert fps_indices(132, 25.0, max_frames=4) == uniform_indices(132, 4)
    assert fps_indices(132, 25.0, max_frames=32, target_fps=2.0) == list(range(0, 132, 12))  # round(12.5) == 12


# ---- real video ------------------------------------------------------------------------------------
def test_real_video_uniform_matches_transformers_model_card_pipeline():
    path = media.real_video()
    clip = load_video(path, 8)
    total = _decode_all_count(path)
    expected = np.linspace(0, total - 1, 8, dtype=int).tolist()
    assert clip.total_frames == total and clip.frame_indices == expected
    assert clip.pixel_values.shape == (8, 3, 336, 336) and clip.pixel_values.dtype == torch.float32
    assert clip.frames.shape == (8, 336, 336, 3) and clip.frames.dtype == np.uint8
    # constant frame rate: timestamps are index / fps
    assert clip.fps == pytest.approx(25.0)
    assert clip.timestamps == pytest.approx([i / 25 for i in expected], abs=1e-6)
    assert clip.duration == pytest.approx(total / 25, abs=1e-3)
    # pixels: the model card's PyAV reader + transformers' CLIP processor (PIL path)
    ref = _clip_processor()(list(_read_video_pyav(path, expected)), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(clip.pixel_values, ref, atol=1e-6, rtol=0)


def test_real_video_fps_sampling_has_one_frame_per_second():
    clip = load_video(media.real_video(), 32, sampling="fps")
    assert clip.frame_indices == list(range(0, clip.total_frames, 25))
    assert clip.timestamps == pytest.approx([float(s) for s in range(len(clip.frame_indices))], abs=1e-6)


# ---- frame preprocessing parity (CLIPImageProcessor, PIL) -------------------------------------------
@pytest.mark.parametrize("name,crop", [("astronaut", None), ("chelsea", None), ("rocket", None),
                                        ("motorcycle_left", None), ("coffee", (400, 337)), ("coffee", (97, 333)),
                                        ("chelsea", (9, 17)), ("rocket", (500, 41))])
def test_frame_preprocessing_matches_clip_image_processor(name, crop):
    rgb = media.photo_array(name)
    if crop is not None:  # portrait, landscape, smaller than 336 (upscaled), extreme aspect ratios
        rgb = np.ascontiguousarray(rgb[: crop[0], : crop[1]])
    ours = video.frames_to_pixels(video.preprocess_frame(rgb)[None])
    ref = _clip_processor()([rgb], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_shortest_edge_size_is_transformers_rule():
    assert video.shortest_edge_size((720, 1280), 336) == (336, int(336 * 1280 / 720))
    assert video.shortest_edge_size((9, 17), 336) == (336, 634)
    assert video.shortest_edge_size((500, 41), 336) == (int(336 * 500 / 41), 336)


# ---- videos encoded in the tests -------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["libx264", "mpeg4", "mjpeg", "ffv1", "libvpx-vp9"])
def test_odd_sized_video_in_every_container(codec):
    path = media.cached_video("odd", frames=12, size_hw=(9, 17), fps=10, codec=codec)
    clip = load_video(path, 4)
    assert clip.size_hw == (9, 17) and clip.total_frames == 12
    assert clip.frame_indices == [0, 3, 7, 11]
    assert clip.timestamps == pytest.approx([0.0, 0.3, 0.7, 1.1], abs=1e-6)
    assert clip.pixel_values.shape == (4, 3, 336, 336)
    assert torch.isfinite(clip.pixel_values).all()


def test_single_frame_video_repeats_its_frame():
    clip = load_video(media.cached_video("single", frames=1, size_hw=(48, 64), fps=25, codec="libx264"), 8)
    assert clip.total_frames == 1 and clip.frame_indices == [0] * 8 and clip.timestamps == [0.0] * 8
    assert torch.equal(clip.pixel_values[0], clip.pixel_values[7])


def test_variable_frame_rate_timestamps_come_from_pts():
    times = [0.0, 0.1, 0.15, 0.4, 1.0, 1.05, 2.5, 2.52, 3.0]
    path = media.cached_video("vfr", frames=len(times), size_hw=(48, 64), fps=10, codec="libx264", times=times)
    clip = load_video(path, 5)
    assert clip.frame_indices == [0, 2, 4, 6, 8]
    assert clip.timestamps == pytest.approx([times[i] for i in clip.frame_indices], abs=1e-3)
    assert clip.duration >= times[-1]


def test_wrong_frame_count_in_the_index_is_corrected(monkeypatch):
    """If the container's count lies, sampling is redone over the frames that really decode."""
    path = media.cached_video("odd", frames=12, size_hw=(9, 17), fps=10, codec="mpeg4")
    honest = load_video(path, 4)
    monkeypatch.setattr(video, "estimate_total", lambda p: (40, 10.0))
    fixed = load_video(path, 4)
    assert fixed.total_frames == 12 and fixed.frame_indices == honest.frame_indices
    torch.testing.assert_close(fixed.pixel_values, honest.pixel_values, atol=0, rtol=0)


def test_truncated_stream_samples_what_decodes(tmp_path):
    full = media.cached_video("trunc_src", frames=60, size_hw=(48, 64), fps=25, codec="ffv1")
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(full.read_bytes()[: os.path.getsize(full) // 2])
    clip = load_video(cut, 4)
    n = _decode_all_count(cut)
    assert 0 < n < 60 and clip.total_frames == n and clip.frame_indices == uniform_indices(n, 4)


def test_long_video_is_not_held_in_memory():
    """Sampling 8 of 1000 frames must not keep the decoded stream (~115 MB as YUV, ~230 MB as RGB)."""
    long = media.cached_video("long", frames=1000, size_hw=(240, 320), fps=30, codec="mpeg4", period=50)
    warm = media.cached_video("odd", frames=12, size_hw=(9, 17), fps=10, codec="mpeg4")
    script = textwrap.dedent(f"""
        import threading, time
        from llava_next.inputs.video import load_video

        def rss_mb():  # resident memory now (a high-water mark would still hold the import's peak)
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2**20

        load_video({str(warm)!r}, 2)  # decoder libraries loaded and warmed up
        base, peak, done = rss_mb(), [0.0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb())
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        clip = load_video({str(long)!r}, 8)
        done.set()
        watcher.join()
        print(clip.total_frames, max(peak[0], rss_mb()) - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         timeout=600).stdout.split()  # a hang guard only
    total, grown_mb = int(out[0]), float(out[1])
    assert total == 1000
    assert grown_mb < 50, f"peak memory grew by {grown_mb:.0f} MB while sampling 8 frames"


# ---- errors: one line, naming the file ------------------------------------------------------------
def _error(path, **kw) -> str:
    with pytest.raises(VideoError) as e:
        load_video(path, 4, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_errors_name_the_file_and_the_problem(tmp_path):
    assert "no such file" in _error(tmp_path / "missing.mp4")
    assert "is an empty folder" in _error(tmp_path)  # a folder is read as its frame images
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a readable video" in _error(tmp_path / "junk.mp4")
    (tmp_path / "notes.mp4").write_text("not a video\n" * 50)
    assert "not a readable video" in _error(tmp_path / "notes.mp4")
    assert "sampling" in _error(media.real_video(), sampling="random")


def test_frame_folder_is_a_video_of_its_images_in_number_order(tmp_path):
    """A folder of frame images (MVBench's episodic_reasoning): the images in the order of the numbers in their
    names ("2" before "10"), sampled by the video rules at 3 fps; as PNGs, the pixels equal decoding the video at
    the same frames."""
    path = media.real_video()
    with av.open(str(path)) as c:  # every 10th frame of the sample video, unpadded names: 1.png ... 14.png
        kept = [f.to_image() for i, f in enumerate(c.decode(video=0)) if i % 10 == 0][:12]
    for k, image in enumerate(kept):
        image.save(tmp_path / f"{k + 1}.png", compress_level=0)  # stored: zlib's default takes ~0.4 s a frame
    (tmp_path / "notes.txt").write_text("not a frame")  # other files are left out
    assert [os.path.basename(f) for f in video.frame_files(str(tmp_path))] == [f"{k}.png" for k in range(1, 13)]
    clip = load_video(tmp_path, 4)
    assert clip.frame_indices == np.linspace(0, 11, 4, dtype=int).tolist() == [0, 3, 7, 11]
    assert clip.total_frames == 12 and clip.fps == 3.0 and clip.timestamps == pytest.approx([0, 1, 7 / 3, 11 / 3])
    same = load_video(path, 4, pick=lambda n: [10 * i for i in clip.frame_indices])
    torch.testing.assert_close(clip.pixel_values, same.pixel_values, atol=0, rtol=0)
    assert video.estimate_total(str(tmp_path)) == (12, 3.0)
    assert load_video(tmp_path, 6, sampling="fps").frame_indices == [0, 3, 6, 9]  # 1 of every 3: 1 fps
    (tmp_path / "4.png").write_bytes(b"cut off")  # a sampled frame
    assert "4.png: not an image file" in _error(tmp_path) and "a frame of the folder" in _error(tmp_path)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.txt").write_text("x")
    assert "holds no frame images (.jpg, .jpeg, .png), only 1 other file(s): a.txt" in _error(tmp_path / "none")


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        c.mux(s.encode(frame))
        c.mux(s.encode())
    assert "no video stream" in _error(path)


def test_video_stream_without_frames(tmp_path):
    path = media.make_video(tmp_path / "none.avi", 0, (48, 64), 25, "mjpeg")
    assert "no decodable frames" in _error(path)


def test_corrupt_data_mid_stream(tmp_path):
    full = media.cached_video("trunc_src", frames=60, size_hw=(48, 64), fps=25, codec="ffv1")
    data = bytearray(full.read_bytes())
    mid = len(data) // 3
    data[mid:mid + 3000] = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    (tmp_path / "bad.mkv").write_bytes(bytes(data))
    assert "corrupt video" in _error(tmp_path / "bad.mkv")
