"""Captions to training data and back (issue 27 item 4): ``llava-next batch --videos`` over a folder of real
clips, the answers corrected by hand, ``llava-next data captions`` into LLaVA conversations that ``llava-next
train --method sft`` trains on; ``llava-next data pairs`` from two answers per video into preference pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_next.cli.main import main
from llava_next.runtime.batch import BatchInputError, Defaults, video_items
from llava_next.train.captions import CaptionDataError, preference_pairs, read_results

PROMPT = "이 영상을 한국어로 상세히 묘사해주세요."
CAPTIONS = {"a.mp4": "우주비행사가 카메라를 바라본다.", "b.mp4": "커피 잔이 탁자 위에 놓여 있다."}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """clips/a.mp4 and clips/b.mp4: pans over two real photos (tests/media.py), plus a file that is not a video."""
    from media import make_video

    root = tmp_path_factory.mktemp("captions")
    (root / "clips").mkdir()
    make_video(root / "clips" / "a.mp4", frames=12, size_hw=(64, 96), fps=12, photo="astronaut")
    make_video(root / "clips" / "b.mp4", frames=12, size_hw=(64, 96), fps=12, photo="coffee")
    (root / "clips" / "notes.txt").write_text("not a video")
    return root


@pytest.fixture
def env(workdir, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return workdir


def _batch(out: str, *extra: str) -> None:
    code = main(["batch", "--videos", "clips/", "--prompt", PROMPT, "--out", out, "--model", "tiny-random",
                 "--frames", "2", "--max-new-tokens", "6", "--dtype", "fp32", "--quiet", *extra])
    assert code == 0


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_video_items_from_folders_files_and_globs(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    d = Defaults(prompt=PROMPT, frames=3)
    items = video_items(["clips", "clips/*.mp4", "clips/b.mp4"], d)  # each file once, in order found
    assert [(i.id, i.videos, i.prompt, i.frames) for i in items] == [
        ("clips/a.mp4", ("clips/a.mp4",), PROMPT, 3), ("clips/b.mp4", ("clips/b.mp4",), PROMPT, 3)]
    assert [i.id for i in video_items(["clips/**/*.mp4"], d)] == ["clips/a.mp4", "clips/b.mp4"]
    with pytest.raises(BatchInputError, match="--videos needs --prompt"):
        video_items(["clips"], Defaults())
    with pytest.raises(BatchInputError, match=r"no file matches 'clips/\*.mkv'"):
        video_items(["clips/*.mkv"], d)
    (workdir / "empty").mkdir(exist_ok=True)
    with pytest.raises(BatchInputError, match="the folder empty holds no video file"):
        video_items(["empty"], d)


def test_caption_zero_shot_correct_convert_and_train(env, capsys):
    _batch("results.jsonl")
    results = _lines(env / "results.jsonl")
    assert [(r["id"], r["status"], r["prompt"], r["video"]) for r in results] == [
        ("clips/a.mp4", "ok", PROMPT, "clips/a.mp4"), ("clips/b.mp4", "ok", PROMPT, "clips/b.mp4")]
    # the hand correction: the text of each line replaced, the file saved as an editor saves it (UTF-8)
    fixed = [{**r, "text": CAPTIONS[Path(r["video"]).name]} for r in results]
    (env / "results.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fixed), "utf-8")

    assert main(["data", "captions", "results.jsonl", "--out", "train.jsonl"]) == 0
    assert "2 training item(s) -> train.jsonl" in capsys.readouterr().err
    raw = (env / "train.jsonl").read_bytes()
    assert CAPTIONS["a.mp4"].encode("utf-8") in raw  # readable for the next hand edit, not \u escapes
    assert _lines(env / "train.jsonl") == [
        {"id": f"clips/{name}", "video": f"clips/{name}",
         "conversations": [{"from": "human", "value": f"<video>\n{PROMPT}"}, {"from": "gpt", "value": caption}]}
        for name, caption in CAPTIONS.items()]
    assert main(["data", "captions", "results.jsonl", "--out", "train.jsonl"]) == 2  # hand edits are kept
    assert "exists" in capsys.readouterr().err

    # the labels are the corrected captions (then </s>), and train accepts the file
    from llava_next.runtime import tiny
    from llava_next.inputs.prompt import Tokenizer
    from llava_next.train.data import IGNORE_INDEX, TrainingData

    tok = Tokenizer.load(tiny.ensure())
    data = TrainingData(env / "train.jsonl", tok, tiny.tiny_config(), frames=2)
    labels = [t for t in data[0].labels.tolist() if t != IGNORE_INDEX]
    assert tok.decode(labels) == CAPTIONS["a.mp4"]
    assert main(["train", "--method", "sft", "--data", "train.jsonl", "--model", "tiny-random", "--out", "runs/ko",
                 "--steps", "1", "--frames", "2", "--lora-rank", "4", "--quiet"]) == 0
    assert (env / "runs" / "ko" / "adapter" / "adapter_model.safetensors").is_file()


def test_two_sampled_answers_per_video_become_preference_pairs(env, capsys):
    _batch("greedy.jsonl")
    _batch("sampled.jsonl", "--temperature", "1.0", "--seed", "3")
    assert main(["data", "pairs", "greedy.jsonl", "sampled.jsonl", "--out", "prefs.jsonl", "--overwrite"]) == 0
    pairs = _lines(env / "prefs.jsonl")
    greedy, sampled = {r["id"]: r["text"] for r in _lines(env / "greedy.jsonl")}, \
        {r["id"]: r["text"] for r in _lines(env / "sampled.jsonl")}
    assert pairs and all(set(p) == {"id", "video", "prompt", "chosen", "rejected"} for p in pairs)
    assert all(p["prompt"] == PROMPT and p["video"] == p["id"] and (env / p["video"]).is_file() for p in pairs)
    assert all((p["chosen"], p["rejected"]) == (greedy[p["id"]], sampled[p["id"]]) for p in pairs)


def _result(id_: str, text: str, **extra) -> dict:
    return {"id": id_, "status": "ok", "text": text, "prompt": PROMPT, "video": f"clips/{id_}", **extra}


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_the_user_picks_the_chosen_answer(env, capsys):
    first = _write(env / "one.jsonl", [_result("a.mp4", "좋은 답"), _result("b.mp4", "같은 답"),
                                       {"id": "c.mp4", "status": "error", "error": "x"}])
    second = _write(env / "two.jsonl", [_result("b.mp4", "같은 답"), _result("a.mp4", "더 좋은 답", chosen=True)])
    pairs, report = preference_pairs(read_results(first)[0], read_results(second)[0], media_root="clips")
    assert pairs == [{"id": "a.mp4", "video": "a.mp4", "prompt": PROMPT, "chosen": "더 좋은 답", "rejected": "좋은 답"}]
    assert (report.pairs, report.chosen_from_second, report.same_text, report.unmatched) == (1, 1, 1, 0)
    both = _write(env / "both.jsonl", [_result("a.mp4", "다른 답", chosen=True)])
    with pytest.raises(CaptionDataError, match="both .* are marked \"chosen\": true; mark one"):
        preference_pairs(read_results(both)[0], read_results(second)[0], media_root=".")
    other = _write(env / "other.jsonl", [{**_result("a.mp4", "답"), "prompt": "다른 질문"}])
    with pytest.raises(CaptionDataError, match="asked different things"):
        preference_pairs(read_results(other)[0], read_results(first)[0], media_root=".")
    missing = _write(env / "missing.jsonl", [{**_result("a.mp4", "답"), "video": "clips/zz.mp4"}])
    assert main(["data", "captions", "missing.jsonl", "--out", "t.jsonl"]) == 2
    assert "clips/zz.mp4: no such file" in capsys.readouterr().err
    old = _write(env / "old.jsonl", [{"id": "a", "status": "ok", "text": "답"}])
    with pytest.raises(CaptionDataError, match="no \"prompt\"; the results of llava-next batch carry it"):
        read_results(old)
