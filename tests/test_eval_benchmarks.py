"""The bundled benchmark task files (issue 24.3: llava_next/eval/benchmarks/*.yaml): each runs through
``llava-next eval --task NAME --data FILE --media-root DIR`` on a small fixture in the official schema (parquet
or MVBench's JSON array) that the test builds around the real sample video; each prompt equals lmms-eval's
``doc_to_text`` on the same record and each answer parser equals lmms-eval's function on the same responses
(the functions are read from the installed lmms-eval's task folders, so the test skips without it)."""

from __future__ import annotations

import ast
import json
import random
import re
import shutil
import string
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import llava_next
from llava_next.eval.answers import PARSERS
from llava_next.eval.tasks import bundled_tasks, load_task, read_samples

lmms_eval = pytest.importorskip("lmms_eval")
TASKS = Path(lmms_eval.__file__).parent / "tasks"
VIDEO = Path(llava_next.__file__).parent / "samples" / "bigbuckbunny.mp4"
IMAGE = Path(llava_next.__file__).parent / "samples" / "chelsea.jpg"


def official(folder: str, name: str, file: str = "utils.py", scope: dict | None = None):
    """A function of lmms-eval's ``tasks/FOLDER/utils.py`` (or FILE), compiled alone (the module itself downloads
    NLTK data and reads HF_HOME at import); ``scope``: extra globals it needs."""
    source = (TASKS / folder / file).read_text()
    scope = {"np": np, "re": re, "string": string, "random": random, "OPTIONS": ["A", "B", "C", "D", "E"],
             **(scope or {})}
    with warnings.catch_warnings():  # its regexes' "\d" in plain strings
        warnings.simplefilter("ignore", DeprecationWarning)
        (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name]
        exec(compile(ast.Module([node], []), str(TASKS / folder / file), "exec"), scope)
    return scope[name]


def mcq_extract():
    """lmms-eval's ``_task_utils/mcq_extract.py`` ``extract_mcq_answer`` (MLVU's parser), with its constants."""
    source = (TASKS / "_task_utils" / "mcq_extract.py").read_text()
    scope: dict = {}
    exec(compile(source, str(TASKS / "_task_utils" / "mcq_extract.py"), "exec"), scope)
    return scope["extract_mcq_answer"]


VIDEOMME = {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
            "url": "https://www.youtube.com/watch?v=x", "videoID": "fFjv93ACGo8", "question_id": "001-1",
            "task_type": "Counting Problem", "question": "How many rabbits appear in the video?",
            "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "A"}
MVBENCH = {"video": "bunny_clip.mp4", "question": "What is the rabbit doing?",
           "candidates": ["Sleeping.", "Stretching.", "Eating."], "answer": "Stretching."}
MVBENCH_EPISODIC = {"video": "s01e01_seg02_clip_00", "question": "What does the rabbit do after it wakes up?",
                    "candidates": ["It sleeps again.", "It stretches.", "It eats.", "It runs away."],
                    "answer": "It stretches.", "start": 0.0, "end": 4.6}  # a TVQA clip: a folder of frames
NEXTQA = {"video": 4010069381, "frame_count": 150, "width": 640, "height": 480, "question": "why did the rabbit wake",
          "answer": 2, "qid": 6, "type": "CW", "a0": "noise", "a1": "hungry", "a2": "sunrise", "a3": "bird",
          "a4": "dream"}
EGOSCHEMA = {"question_idx": "0074f737-11cb-497d-8d07-77c3a8127391", "question": "What is the overall activity?",
             "answer": "3", "video_idx": "0074f737-11cb-497d-8d07-77c3a8127391",
             "option": ["A. cooking", "B. cleaning", "C. reading", "D. waking up and stretching", "E. running"]}

LVB = {"video_id": "86CxyhFV9MI", "video_path": "86CxyhFV9MI.mp4", "duration": 5.0, "duration_group": 15,
       "question": "What does the rabbit do after waking up?", "option0": "It eats.", "option1": "It stretches.",
       "option2": "It sleeps again.", "option3": "N/A", "option4": "N/A", "correct_choice": 1,
       "id": "86CxyhFV9MI_0", "question_category": "E2O", "subtitle_path": "86CxyhFV9MI_en.json",
       "starting_timestamp_for_subtitles": 0}

LVB_SUBTITLES = [{"start": "00:00:00.200", "end": "00:00:01.500", "line": "The rabbit sleeps."},
                 {"start": "00:00:02.100", "end": "00:00:02.600", "line": "It wakes up."},  # under 1 s: widened
                 {"timestamp": [3.4, 3.6], "text": "It yawns."},  # widened to (3, 4): no frame inside, left out
                 {"timestamp": [4.1, None], "text": "It stretches."}]  # no end: the video's duration

MLVU = {"video_name": "1_plotQA/bunny.mp4", "duration": 5.0, "task_type": "plotQA",
        "question": "What does the rabbit do after waking up?\n(A) It eats.\n(B) It stretches.\n(C) It sleeps.\n"
                    "(D) It runs.", "answer": "B", "question_id": "plotQA_1"}

ANQA = {"question_id": "v_JspVuT6rsLA_3", "video_name": "JspVuT6rsLA", "question": "what is the rabbit doing",
        "answer": "stretching", "type": 0}

SRT = ("1\n00:00:00,000 --> 00:00:01,000\n<font color=\"white\" size=\".72c\">The rabbit sleeps.</font>\n\n"
       "2\n00:00:01,000 --> 00:00:02,500\n<font color=\"white\" size=\".72c\">It wakes up</font>\nand yawns\n\n"
       "3\n00:00:03,000 --> 00:00:04,000\nno font tag here\n\n"
       "4\n00:00:04,000 --> 00:00:09,000\n<font color=\"white\" size=\".72c\">It stretches.</font>\n")


def mme_rows() -> list[dict]:
    """MME's schema (lmms-lab/MME): the image as {"bytes", "path"}, two questions per image (question_id)."""
    image = {"bytes": IMAGE.read_bytes(), "path": "chelsea.jpg"}
    row = {"question_id": "existence/chelsea.jpg", "image": image, "category": "existence",
           "question": "Is there a cat in this image? Please answer yes or no.", "answer": "Yes"}
    code = {**row, "question_id": "code_reasoning/chelsea.jpg", "category": "code_reasoning"}
    return [{**code, "question": "  Is the cat asleep? Please answer yes or no. ", "answer": "No"},
            row, {**row, "question": "Is there a dog in this image? Please answer yes or no.", "answer": "No"},
            {**code, "answer": "Yes"}]


def mmbench_rows() -> list[dict]:
    """MMBench's schema (lmms-lab-encoder/MMBench, en): options in columns A-D (None where fewer), a hint or None."""
    image = {"bytes": IMAGE.read_bytes(), "path": None}
    row = {"index": 241, "question": "What animal is in the image?", "hint": "The photo was taken indoors.",
           "A": "A dog", "B": "A cat", "C": "A rabbit", "D": None, "answer": "B", "category": "image_topic",
           "image": image, "source": "MMBench", "L2-category": "coarse_perception", "comment": None, "split": "dev"}
    return [row, {**row, "index": 242, "hint": None, "question": "Is it asleep?", "A": "yes", "B": "no", "C": None,
                  "answer": "A"}]


def videomme_subtitle_prompt():
    """lmms-eval's videomme_doc_to_text_subtitle with its helpers (OpenCV reads the frame count and rate),
    reading the fixture's folder as its HF cache."""
    import os

    cv2 = pytest.importorskip("cv2")
    path = TASKS / "videomme" / "utils.py"
    names = {"videomme_doc_to_text_subtitle", "extract_subtitles", "load_subtitles", "parse_subtitle_time",
             "convert_time_to_frame"}
    nodes = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name in names]
    scope = {"os": os, "np": np, "re": re, "cv2": cv2, "base_cache_dir": str(_FIXTURE_ROOT[0]), "cache_name": "vm"}
    exec(compile(ast.Module(nodes, []), str(path), "exec"), scope)
    return scope["videomme_doc_to_text_subtitle"]


_FIXTURE_ROOT: list = []


class _Frames:
    """decord's VideoReader as lmms-eval's LongVideoBench load_video uses it: the rate (PyAV's) and the indices
    asked for (the frames themselves are not compared: decord is not installed)."""
    asked: list = []

    def __init__(self, path, ctx=None, num_threads=1):
        import av

        with av.open(str(path)) as container:
            self.fps = float(container.streams.video[0].average_rate)

    def get_avg_fps(self):
        return self.fps

    def get_batch(self, indices):
        _Frames.asked = list(indices)
        return types.SimpleNamespace(asnumpy=lambda: np.zeros((len(indices), 4, 4, 3), np.uint8))


def lvb_functions() -> dict:
    """lmms-eval LongVideoBench's doc_to_text with insert_subtitles_into_frames and its helpers, and load_video
    over the _Frames stand-in, reading the fixture's subtitles/ folder as its cache."""
    import os

    from PIL import Image

    path = TASKS / "longvideobench" / "utils.py"
    names = {"longvideobench_doc_to_text", "insert_subtitles_into_frames", "compute_frame_timestamps",
             "timestamp_to_seconds", "load_video"}
    nodes = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name in names]
    subtitles = str(_FIXTURE_ROOT[0] / "lvb" / "subtitles")
    scope = {"os": os, "json": json, "np": np, "Image": Image, "VideoReader": _Frames, "cpu": lambda i: None,
             "torch": __import__("torch"), "_resolve_dataset_dir": lambda *a: (subtitles, {"max_num_frames": 16})}
    exec(compile(ast.Module(nodes, []), str(path), "exec"), scope)
    return scope


def mmbench_evaluator():
    """lmms-eval's MMBench_Evaluator class (mmbench_evals.py), compiled alone, with the English sys_prompt."""
    import pandas as pd

    path = TASKS / "mmbench" / "mmbench_evals.py"
    (node,) = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]
    scope = {"pd": pd, "string": string, "eval_logger": _Quiet(), "os": __import__("os")}
    exec(compile(ast.Module([node], []), str(path), "exec"), scope)
    return scope["MMBench_Evaluator"](sys_prompt="There are several options:")


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _tvqa_frames(folder: Path, every: int = 8) -> None:
    """The sample video as TVQA's frame folders hold a clip: 00001.jpg, 00002.jpg, ... (every 8th frame: 17)."""
    import av

    folder.mkdir(parents=True)
    with av.open(str(VIDEO)) as container:
        frames = [f.to_image() for i, f in enumerate(container.decode(video=0)) if i % every == 0]
    for k, image in enumerate(frames):
        image.save(folder / f"{k + 1:05d}.jpg", quality=90)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """name -> (data file, media root, the record), laid out as the official downloads are."""
    root = tmp_path_factory.mktemp("bench")
    _FIXTURE_ROOT[:] = [root]
    second = {**VIDEOMME, "question_id": "001-2", "question": "What colour is the sky?", "answer": "C"}
    out = {"videomme": (_parquet(root / "vm" / "test.parquet", [VIDEOMME, second]), root / "vm", VIDEOMME)}
    (root / "vm" / "data").mkdir()
    shutil.copy(VIDEO, root / "vm" / "data" / "fFjv93ACGo8.mp4")
    (root / "vm" / "subtitle").mkdir()
    (root / "vm" / "subtitle" / "fFjv93ACGo8.srt").write_text(SRT)
    out["videomme_w_subtitle"] = out["videomme"]
    (root / "mv" / "json").mkdir(parents=True)
    (root / "mv" / "json" / "action_sequence.json").write_text(json.dumps([MVBENCH, {**MVBENCH, "answer": "Eating."}]))
    (root / "mv" / "star" / "Charades_segment").mkdir(parents=True)
    shutil.copy(VIDEO, root / "mv" / "star" / "Charades_segment" / "bunny_clip.mp4")
    out["mvbench_action_sequence"] = (root / "mv" / "json" / "action_sequence.json", root / "mv" / "star" /
                                      "Charades_segment", MVBENCH)
    _tvqa_frames(root / "mv" / "tvqa" / "video_fps3_hq_segment" / MVBENCH_EPISODIC["video"])
    (root / "mv" / "json" / "episodic_reasoning.json").write_text(json.dumps([MVBENCH_EPISODIC]))
    out["mvbench_episodic_reasoning"] = (root / "mv" / "json" / "episodic_reasoning.json", root / "mv" / "tvqa" /
                                         "video_fps3_hq_segment", MVBENCH_EPISODIC)
    out["nextqa_mc"] = (_parquet(root / "nq" / "test.parquet", [NEXTQA, {**NEXTQA, "qid": 7, "answer": 0}]),
                        root / "nq" / "NExTVideo", NEXTQA)
    (root / "nq" / "NExTVideo").mkdir()
    shutil.copy(VIDEO, root / "nq" / "NExTVideo" / "4010069381.mp4")
    out["egoschema_subset"] = (_parquet(root / "ego" / "test.parquet", [EGOSCHEMA]), root / "ego" / "videos", EGOSCHEMA)
    (root / "ego" / "videos").mkdir()
    shutil.copy(VIDEO, root / "ego" / "videos" / f"{EGOSCHEMA['video_idx']}.mp4")
    (root / "lvb" / "videos").mkdir(parents=True)
    (root / "lvb" / "lvb_val.json").write_text(json.dumps([LVB]))
    shutil.copy(VIDEO, root / "lvb" / "videos" / LVB["video_path"])
    out["longvideobench_val_v"] = (root / "lvb" / "lvb_val.json", root / "lvb" / "videos", LVB)
    (root / "lvb" / "subtitles").mkdir()
    (root / "lvb" / "subtitles" / LVB["subtitle_path"]).write_text(json.dumps(LVB_SUBTITLES))
    out["longvideobench_val_i"] = out["longvideobench_val_v"]
    (root / "mlvu" / "1_plotQA").mkdir(parents=True)
    shutil.copy(VIDEO, root / "mlvu" / "1_plotQA" / "bunny.mp4")
    out["mme"] = (_parquet(root / "mme" / "test.parquet", mme_rows()), root / "mme", mme_rows()[0])
    out["mmbench_en_dev"] = (_parquet(root / "mmb" / "dev.parquet", mmbench_rows()), root / "mmb", mmbench_rows()[0])
    (root / "anqa" / "all_test").mkdir(parents=True)
    shutil.copy(VIDEO, root / "anqa" / "all_test" / f"v_{ANQA['video_name']}.mp4")
    shutil.copy(VIDEO, root / "anqa" / "all_test" / "v_other.mkv")  # the second template of the task's list
    second = {**ANQA, "question_id": "v_other_0", "video_name": "other", "question": "is it a rabbit", "answer": "yes"}
    out["activitynetqa"] = (_parquet(root / "anqa" / "test.parquet", [ANQA, second]), root / "anqa" / "all_test", ANQA)
    out["mlvu_dev"] = (_parquet(root / "mlvu" / "test-00000-of-00001.parquet", [MLVU, {**MLVU, "answer": "D"}]),
                       root / "mlvu", MLVU)
    return out


def lmms_prompt(name: str, doc: dict) -> str:
    """lmms-eval's doc_to_text for the task, with the "default" model kwargs of its YAML."""
    if name == "videomme":
        kwargs = {"pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}
        return official("videomme", "videomme_doc_to_text")(doc, kwargs)
    if name.startswith("mvbench_"):
        return official("mvbench", "mvbench_doc_to_text")(doc, {"post_prompt": "Only give the best option.\n"})
    if name == "nextqa_mc":
        return official("nextqa", "nextqa_doc_to_text_mc")(doc, {})
    if name == "longvideobench_val_v":
        kwargs = {"pre_prompt": "", "post_prompt": "Answer with the option's letter from the given choices directly.\n"}
        return official("longvideobench", "longvideobench_doc_to_text")(doc, kwargs)
    if name == "longvideobench_val_i":
        kwargs = {"pre_prompt": "", "post_prompt": "Answer with the option's letter from the given choices directly.\n",
                  "insert_interleave_subtitles": True}
        return lvb_functions()["longvideobench_doc_to_text"](doc, kwargs)
    if name == "videomme_w_subtitle":
        return videomme_subtitle_prompt()(doc, {"frame_num": 32, "pre_prompt": "", "post_prompt": "\nAnswer the "
                                                "question using a single word or phrase."})
    if name == "mme":
        mme_text = official("mme", "mme_doc_to_text", scope={"replace_prompt": " Please answer yes or no."})
        return mme_text(doc, {"pre_prompt": "", "post_prompt": "\nAnswer the question "
                                                        "using a single word or phrase."})
    if name == "mmbench_en_dev":
        scope = {"mmbench_evaluator": mmbench_evaluator(), "pd": __import__("pandas")}
        kwargs = {"pre_prompt": "", "post_prompt": "Answer with the option's letter from the given choices directly."}
        return official("mmbench", "mmbench_doc_to_text", "en_utils.py", scope)(doc, kwargs)
    if name == "activitynetqa":
        kwargs = {"pre_prompt": "", "post_prompt": " Answer the question using a single word or phrase."}
        return official("activitynetqa", "activitynetqa_doc_to_text")(doc, kwargs)
    if name == "mlvu_dev":
        kwargs = {"pre_prompt": "", "post_prompt": "\nOnly give the best option.\nBest option: ("}
        return official("mlvu", "mlvu_doc_to_text")(doc, kwargs)
    return official("egoschema", "egoschema_doc_to_text")(doc, {"pre_prompt": "", "post_prompt": ""})


BUNDLED = ["videomme", "mvbench_action_sequence", "mvbench_episodic_reasoning", "nextqa_mc", "egoschema_subset",
           "longvideobench_val_v", "mlvu_dev", "mme", "mmbench_en_dev", "videomme_w_subtitle", "activitynetqa",
           "longvideobench_val_i"]


def test_every_bundled_task_loads_and_is_listed():
    names = set(bundled_tasks())
    assert set(BUNDLED) <= names
    assert len([n for n in names if n.startswith("mvbench_")]) == 20
    for name in names:
        task = load_task(name)
        assert task.name == name and task.answer in ("mc_generate", "yes_no", "caption", "exact_match") and task.parser in PARSERS


@pytest.mark.parametrize("name", BUNDLED)
def test_prompts_gold_and_media_follow_lmms_eval(fixtures, name):
    data, media, doc = fixtures[name]
    (sample, *_) = read_samples(load_task(name, data=data, media_root=media))
    assert sample.prompt == lmms_prompt(name, doc)
    if name == "mme":  # the image's bytes written to a file
        assert Path(sample.images[0]).read_bytes() == IMAGE.read_bytes() and sample.gold == ["No"]
        assert sample.meta == {"category": "code_reasoning", "question_id": "code_reasoning/chelsea.jpg"}
        return
    if name == "activitynetqa":  # judged by normalised exact match (the task file's stated divergence)
        second = read_samples(load_task(name, data=data, media_root=media))[1]
        assert sample.gold == ["stretching"] and second.videos[0].endswith("v_other.mkv")
        assert Path(sample.videos[0]).name == "v_JspVuT6rsLA.mp4"
        return
    if name == "mmbench_en_dev":  # the second row has no hint: lmms-eval's other prompt
        second = read_samples(load_task(name, data=data, media_root=media))[1]
        assert second.prompt == lmms_prompt(name, mmbench_rows()[1]) and second.options == ["yes", "no"]
        assert Path(sample.images[0]).read_bytes() == IMAGE.read_bytes()
    elif name == "mvbench_episodic_reasoning":  # a folder of frames, read as a video (inputs/video.py)
        assert Path(sample.videos[0]).is_dir() and Path(sample.videos[0]).name == doc["video"]
    elif name != "longvideobench_val_i":
        assert Path(sample.videos[0]).is_file()
    if name == "longvideobench_val_i":  # the frames as images, at lmms-eval's indices
        from PIL import Image

        lvb_functions()["load_video"](str(VIDEO), doc["duration"], 16)
        assert not sample.videos and len(sample.images) == len(_Frames.asked) == 5
        assert [int(p.rsplit("-", 1)[1].split(".")[0]) for p in sample.images] == _Frames.asked
        assert all(Image.open(p).size == (640, 360) for p in sample.images)
        assert "It yawns." not in sample.prompt and sample.prompt.count("<image>") == 5
    gold = {"videomme": "A", "videomme_w_subtitle": "A", "mvbench_action_sequence": "B",
            "mvbench_episodic_reasoning": "B", "nextqa_mc": "C", "egoschema_subset": "D",
            "longvideobench_val_v": "B", "longvideobench_val_i": "B", "mlvu_dev": "B", "mmbench_en_dev": "B"}[name]
    assert sample.gold_letter == gold


RESPONSES = ["B", "(C)", "C.", "The answer is (A) and not (B).", "A B", " d", "It is B. because", "E",
             "I believe the rabbit is hungry because it has not eaten since the morning", "The answer: A",
             "The rabbit wakes at sunrise and then the bird sings loudly", "(a)", "'B'", "A. noise", "B, maybe A."]


@pytest.mark.parametrize("parser, folder", [("nextqa", "nextqa"), ("egoschema", "egoschema"),
                                            ("longvideobench", "longvideobench")])
def test_letter_parsers_equal_lmms_evals(parser, folder):
    parse = official(folder, "parse_multi_choice_response")
    options = [NEXTQA[f"a{i}"] for i in range(5)]
    letters = list("ABCDE")
    compared = 0
    for response in RESPONSES:
        ours = PARSERS[parser](response, options)
        theirs = parse(response, letters, dict(zip(letters, options)))
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs  # egoschema's returns (letter, found)
        if ours == "":  # no candidate: lmms-eval draws a random letter
            continue
        assert ours == theirs, response
        compared += 1
    assert compared >= 10  # most responses hold a letter or an option
    assert PARSERS[parser]("no idea at all", options) == ""


MCQ_RESPONSES = RESPONSES + ["B)", "Answer: C", "I choose D because", "the correct answer is c", "C: it stretches",
                             "(B", "A) It eats.", "It is D", "Best option: (A)", "", "   ", "none of these", "B.\nC.",
                             "选C", "The answer is B, not (A)."]


@pytest.mark.parametrize("parser, folder", [("mlvu", "mlvu"), ("mcq", "videomme")])
def test_mlvu_and_videomme_parsers_equal_lmms_evals_extract_mcq_answer(parser, folder):
    """0.7.3's MLVU and Video-MME extract_characters_regex: extract_mcq_answer over A-D."""
    source = (TASKS / folder / "utils.py").read_text()
    assert 'extract_mcq_answer(s, choices=["A", "B", "C", "D"])' in source
    extract = mcq_extract()
    for response in MCQ_RESPONSES:
        assert PARSERS[parser](response) == extract(response, choices=["A", "B", "C", "D"]), response
    assert PARSERS[parser]("E") == ""  # their choices are A-D


YES_NO = ["Yes", "no", "Yes.", "y", "N", "x", "Yes, there is a cat.", "No, it is not.", "Not at all", "Nope",
          "The answer is yes", "yes no", "  YES  ", "noo", "I think so", "", "n."]


def test_mme_parsing_and_scores_equal_lmms_evals():
    from collections import defaultdict

    from llava_next.eval.answers import mme_label, mme_scores, yes_no

    parse = official("mme", "parse_pred_ans")
    for response in YES_NO:
        assert mme_label(response) == parse(response), response
    process = official("mme", "mme_process_results", scope={"eval_type_dict": {"Perception": [
        "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR"]},
        "parse_pred_ans": parse})
    aggregate = official("mme", "mme_aggregate_results", scope={"defaultdict": defaultdict, "eval_logger": _Quiet()})
    rng = random.Random(0)
    rows = [{"question_id": f"{c}/{i}.png", "category": c, "answer": a} for c in ("existence", "OCR", "count",
            "code_reasoning", "text_translation") for i in range(3) for a in ("Yes", "No")]
    preds = [rng.choice(YES_NO) for _ in rows]
    results = [process(doc, [p]) for doc, p in zip(rows, preds)]
    ours = mme_scores([(d["category"], d["question_id"], yes_no(p, [d["answer"]])[1]) for d, p in zip(rows, preds)])
    perception = aggregate([r["mme_perception_score"] for r in results if "mme_perception_score" in r])
    cognition = aggregate([r["mme_cognition_score"] for r in results if "mme_cognition_score" in r])
    assert ours["perception"] == pytest.approx(perception) and ours["cognition"] == pytest.approx(cognition)
    assert 0 < ours["perception"] < 600 and ours["incomplete_images"] == 0
    assert mme_scores([("count", "a.png", True)])["incomplete_images"] == 1  # a --limit run: one of the pair


def test_mmbench_parser_equals_lmms_evals_can_infer():
    evaluator = mmbench_evaluator()
    options = ["A dog", "A cat", "A rabbit", "A bird"]
    responses = RESPONSES + MCQ_RESPONSES + ["a cat", "It is a cat, not a dog", "A", "A cat is shown here in it",
                                             "(B).", ":C", "B).", "C, D", "The rabbit", "Failed to obtain answer"]
    for response in responses:
        theirs = evaluator.can_infer(response.strip(), dict(zip("ABCD", options)))
        assert PARSERS["mmbench"](response, options) == (theirs or ""), response


def test_videomme_subtitles_are_the_lines_at_lmms_evals_frames(fixtures):
    from llava_next.eval.subtitles import NONE, subtitle_text

    data, media, doc = fixtures["videomme_w_subtitle"]
    text = subtitle_text(media / "data" / "fFjv93ACGo8.mp4", media / "subtitle" / "fFjv93ACGo8.srt")
    assert text.splitlines() and set(text.splitlines()) <= {"The rabbit sleeps.", "It wakes up", "It stretches."}
    assert "The rabbit sleeps." in text and "no font tag" not in text
    assert subtitle_text(media / "data" / "fFjv93ACGo8.mp4", media / "subtitle" / "none.srt") == NONE


class _Quiet:
    def info(self, *_):
        pass


@pytest.mark.parametrize("name", BUNDLED)
def test_llava_next_eval_runs_each_bundled_task(fixtures, name, tmp_path, monkeypatch):
    from llava_next.cli.main import main

    data, media, _ = fixtures[name]
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path.parent / "shared-cache"))
    assert main(["eval", "--task", name, "--data", str(data), "--media-root", str(media), "--model", "tiny-random",
                 "--frames", "2", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert lines and all(line["status"] == "ok" and line["visual_tokens"] > 0 for line in lines), lines
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] and summary["answered"] == len(lines)
    if name == "mmbench_en_dev":  # two questions, no rotated copies in the fixture
        assert summary["mmbench"]["questions"] == 2 and summary["mmbench"]["rows"] == 2
    if name == "mlvu_dev":  # lmms-eval's score: the mean of the 7 categories (here one, plotQA, answered)
        assert summary["mlvu"]["samples"]["plotQA"] == 2 and summary["mlvu"]["average"] == pytest.approx(
            summary["mlvu"]["categories"]["plotQA"] / 7)
    if name == "mme":
        assert set(summary["mme"]["categories"]) == {"existence", "code_reasoning"}
        assert summary["mme"]["incomplete_images"] == 0


def test_activitynetqa_is_judged_by_normalised_exact_match():
    """The stated divergence of activitynetqa.yaml: no GPT judge; lower case, punctuation removed, then equal."""
    from llava_next.eval.answers import exact_match

    task = load_task("activitynetqa")
    judge = lambda pred, gold: exact_match(pred, [gold], ignore_case=task.ignore_case,  # noqa: E731
                                           ignore_punctuation=task.ignore_punctuation)[1]
    assert judge("Yes.", "yes") and judge(" Stretching! ", "stretching") and judge("3", "3")
    assert not judge("The rabbit is stretching.", "stretching") and not judge("no", "yes")


def test_mlvu_category_average_equals_lmms_evals():
    """The summary's "mlvu": lmms-eval's mlvu_aggregate_results_dev (the mean of the 7 categories' accuracies)."""
    from llava_next.eval.answers import MLVU_TASK_TYPES, mlvu_scores

    aggregate = official("mlvu", "mlvu_aggregate_results_dev", scope={"eval_logger": _Quiet()})
    rng = random.Random(1)
    for types in (MLVU_TASK_TYPES, ("plotQA", "count", "needle")):  # all categories; a subset (the rest count 0)
        rows = [(rng.choice(types), rng.random() < 0.4) for _ in range(60)]
        theirs = aggregate([{"task_type": t, "pred_answer": "A" if ok else "B", "answer": "A"} for t, ok in rows])
        ours = mlvu_scores(rows)
        assert ours["average"] == pytest.approx(theirs)
        assert ours["average_present"] == pytest.approx(sum(ours["categories"][t] for t in types) / len(types))
    with pytest.raises(ValueError, match="not one of the dev set's"):
        mlvu_scores([("plot", True)])


def test_mmbench_circular_equals_lmms_evals_eval_result(monkeypatch):
    """The summary's "mmbench": lmms-eval's MMBench_Evaluator.eval_result (eval_method "static", no API) on the
    same predictions: a question is a hit only when it and its rotated copies (index + k * 1e6) are all right."""
    import math
    import sys
    import types

    import pandas as pd

    from llava_next.eval.answers import mmbench_circular, mmbench_letter

    module = types.ModuleType("mcq_extract")
    module.extract_mcq_answer = mcq_extract()  # its static fallback's import, without lmms_eval.tasks' package
    monkeypatch.setitem(sys.modules, "lmms_eval.tasks._task_utils.mcq_extract", module)
    path = TASKS / "mmbench" / "mmbench_evals.py"
    (node,) = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]
    scope = {"pd": pd, "string": string, "eval_logger": _Quiet(), "os": __import__("os"), "rd": random, "math": math}
    exec(compile(ast.Module([node], []), str(path), "exec"), scope)
    evaluator = scope["MMBench_Evaluator"](sys_prompt="There are several options:")
    rng = random.Random(2)
    options = ["A dog", "A cat", "A rabbit", "A bird"]
    results, rows = [], []
    for q in range(40):
        category = rng.choice(["image_topic", "ocr", "counting"])
        for k in range(rng.choice([1, 4])):  # a question alone, or with its 3 rotations
            gold = "ABCD"[(q + k) % 4]
            pred = rng.choice([gold] * 6 + ["A", "(B)", "C.", "It is a bird", "I do not know"])
            results.append({"index": q + k * 1_000_000, "question": "What is it?", "answer": gold, "prediction": pred,
                            "hint": "nan", "source": "x", "split": "dev", "category": category,
                            "L2-category": "perception", **dict(zip("ABCD", options)), "E": "nan"})
            rows.append((q + k * 1_000_000, category, mmbench_letter(pred, options) == gold))
    overall, category_acc, _ = evaluator.eval_result(results, eval_method="static")
    ours = mmbench_circular(rows)
    assert ours["overall_acc"] == pytest.approx(overall) and ours["questions"] == 40
    assert ours["category_acc"] == pytest.approx(category_acc)
    assert ours["overall_acc"] < sum(ok for _, _, ok in rows) / len(rows)  # circular is stricter than single-pass
