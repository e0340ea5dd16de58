"""One command line (issue 15): the same media and token-plan switches in `inspect` and `run`, through the
real CLI (`main(argv)` in-process, as tests/test_cli_inspect.py does).

- For every token-plan switch, `run --json`'s plan equals `inspect --json`'s for the same flags (media
  entries, switch values and the whole context), and differs from the plan without the switch (so a
  command that dropped the switch would fail here).
- `--image a b` and `--image a --image b` give the same two images in both commands; several `--video`
  in `run`; the PROMPT rule (the last word of a media list) and its errors.
"""

from __future__ import annotations

import json

import pytest

import media
from llava_next.cli import main as cli


@pytest.fixture(scope="module")
def model():
    """The built-in tiny-random checkpoint (real architecture and formats, random weights; built into the
    test's cache on first use)."""
    return "tiny-random"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path_factory.getbasetemp() / "options-cache"))
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")


def _video() -> str:  # 24 frames at 12 fps: fps sampling (1/s) picks 2 frames, uniform 8
    return str(media.cached_video("model_parity", frames=24, size_hw=(90, 160), fps=12, photo="coffee"))


def _photo(name="chelsea") -> str:
    return str(media.real_photo(name))


def _json(capsys, *argv) -> dict:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, out + err
    return json.loads(out)


def _both(capsys, model, media_args, switch, prompt="What is happening?"):
    common = ["--model", model, *media_args, *switch, "--max-new-tokens", "2", "--json"]
    ran = _json(capsys, "run", *common, "--dtype", "fp32", "--prompt", prompt)["plan"]
    planned = _json(capsys, "inspect", *common, "--prompt", prompt)
    return ran, planned


def _same_plan(ran: dict, planned: dict) -> None:
    for key in ("images", "videos", "switches", "visual_tokens", "context"):
        assert ran[key] == planned[key], key
    # and what run actually expanded agrees with the plan it reports
    assert ran["video_tokens"] == [v["tokens"] for v in ran["videos"]]
    assert ran["image_tokens"] == [i["tokens"] for i in ran["images"]]
    assert ran["context"]["visual_tokens"] == ran["visual_tokens"]


SWITCHES = [  # (flags, what must change against the default plan)
    (["--frames", "3"], lambda p: p["videos"][0]["num_frames"] == 3),
    (["--sampling", "fps"], lambda p: p["videos"][0]["frame_indices"] == [0, 12]),
    (["--sampling", "scene", "--scene-threshold", "10", "--scene-min-len", "8"],
     lambda p: p["videos"][0].get("scene_cuts") == [8]
     and p["videos"][0]["frame_indices"] == [1, 4, 6, 9, 12, 16, 19, 22]),
    (["--pool-stride", "4"], lambda p: p["videos"][0]["pooled_hw"] == [2, 2]),
    (["--pool-mode", "max"], lambda p: p["videos"][0]["pool_mode"] == "max" and p["switches"]["pool_mode"] == "max"),
    (["--newline", "grid"], lambda p: p["videos"][0]["newline_tokens"] == 8 * 4),
    (["--pool-position", "after_projector"], lambda p: p["switches"]["pool_position"] == "after_projector"),
    (["--anyres-compat", "original"], lambda p: p["switches"]["anyres_compat"] == "original"),
    (["--rope-scale", "3"], lambda p: p["context"]["factor"] == 3.0 and p["context"]["factor_source"] == "user"),
    (["--rope-scale", "original"], lambda p: p["context"]["factor_source"] == "original"),
]


@pytest.mark.parametrize("switch,changed", SWITCHES, ids=[" ".join(s) for s, _ in SWITCHES])
def test_run_plan_equals_inspect_plan_for_each_switch(capsys, model, switch, changed):
    media_args = ["--image", _photo(), "--video", _video()]
    ran, planned = _both(capsys, model, media_args, switch)
    _same_plan(ran, planned)
    assert changed(ran) and changed(planned)
    if "default" not in _DEFAULT:
        _DEFAULT["default"] = _both(capsys, model, media_args, [])[0]
    assert not changed(_DEFAULT["default"]), "the switch's effect is also the default: this case tests nothing"


_DEFAULT: dict = {}  # the plan without switches, computed once


def test_both_media_forms_in_both_commands(capsys, model):
    a, b = _photo("chelsea"), _photo("coffee")
    for command in ("inspect", "run"):
        extra = ["--dtype", "fp32", "--max-new-tokens", "1", "Compare them."] if command == "run" else []
        repeated = _json(capsys, command, "--model", model, "--image", a, "--image", b, "--json", *extra)
        listed = _json(capsys, command, "--model", model, "--image", a, b, "--json", *extra)
        plans = [p.get("plan", p) for p in (repeated, listed)]
        assert [e["path"] for e in plans[0]["images"]] == [a, b] == [e["path"] for e in plans[1]["images"]]
        assert plans[0]["images"] == plans[1]["images"]


def test_run_takes_several_videos_and_the_prompt_after_a_list(capsys, model):
    v1 = _video()
    v2 = str(media.cached_video("odd", frames=12, size_hw=(9, 17), fps=10, codec="mpeg4"))
    out = _json(capsys, "run", "--model", model, "--video", v1, v2, "--frames", "2", "--dtype", "fp32",
                "--max-new-tokens", "1", "--json", "What differs?")
    plan = out["plan"]
    assert [v["path"] for v in plan["videos"]] == [v1, v2] and len(plan["video_tokens"]) == 2
    again = _json(capsys, "inspect", "--model", model, "--video", v1, "--video", v2, "--prompt", "What differs?",
                  "--frames", "2", "--max-new-tokens", "1", "--json")
    assert again["videos"] == plan["videos"] and again["context"] == plan["context"]


@pytest.mark.parametrize("argv,message", [
    (["run", "--video", "{video}"], "no PROMPT given"),
    (["run", "--image", "{photo}", "{photo}"], "is a file, not a question"),
    (["run", "--video", "{video}", "--prompt", "a", "b"], "two prompts given"),
    (["run", "--image", "{photo}", "--frames", "3", "Hi"], "--frames: video options, but no --video was given"),
    (["run", "--image", "{photo}", "--pool-position", "after_projector", "Hi"], "--pool-position: video options"),
    (["inspect", "--image", "{photo}", "--sampling", "fps"], "--sampling: video options"),
])
def test_option_errors_are_one_line_exit_2(capsys, model, argv, message):
    fill = dict(video=_video(), photo=_photo())
    code = cli.main([a.format(**fill) for a in argv] + ["--model", model])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err, err


def test_allow_overflow_runs_past_the_context_and_says_by_how_much(capsys, model):
    # tiny-random: 4096 positions x factor 1.2 = 4915; 78 frames x 64 tokens (stride 1) = 4992 visual + text
    argv = ["run", "--model", model, "--video", _video(), "--frames", "78", "--pool-stride", "1", "--rope-scale", "1.2",
            "--dtype", "fp32", "--max-new-tokens", "2", "--json", "Describe."]
    code = cli.main(argv)
    out, _ = capsys.readouterr()
    refused = json.loads(out)
    assert code == 2 and "does not fit the RoPE context" in refused["error"] and "--allow-overflow" in refused["error"]

    code = cli.main(argv + ["--allow-overflow", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    result = json.loads(out)
    ctx, over = result["plan"]["context"], result["overflow"]
    assert not ctx["fits"] and ctx["positions_available"] == 4915 and len(result["tokens"]) >= 1
    assert over["exceeded_by"] == ctx["tokens_needed"] - 4915 > 0 and over["positions_needed"] == ctx["tokens_needed"]
    assert f"the context is exceeded by {over['exceeded_by']} positions" in err
    lines = err.strip().splitlines()  # with --json --quiet: that warning (and tiny-random's notice), nothing else
    assert len(lines) == 2 and "RANDOM weights" in lines[0] and "--allow-overflow" in lines[1]

    # inspect reports the same overflow
    plan_args = [a for a in argv[1:-1] if a not in ("--dtype", "fp32")]
    planned = _json(capsys, "inspect", *plan_args, "--prompt", "Describe.")
    assert planned["overflow"] == over and planned["context"] == ctx
