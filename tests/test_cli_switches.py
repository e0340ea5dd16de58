"""No switch is accepted and ignored (issue 22.6): every optional switch of every command's argparse parser
(discovered from the parsers, so a new switch is covered the day it is added) either changes something
observable — stdout (the answer, the plan, the JSON), stderr, or the files written — or is refused with a
clear one-line error (exit 2, no traceback).

Each command runs in this process on tiny-random (no download) from a baseline command line; a switch is
then added (or, when the baseline has it, removed) and the observation compared with the baseline's. A
switch without choices needs a probe value in PROBES (the test fails naming it otherwise); a switch with
choices tries them in order until one differs. ``_contexts`` gives a switch the other switches it acts with
(``--group-size`` with ``--quantize int4``, ``--seed`` with ``--temperature``, ``--allow-overflow`` with a
prompt that overflows); without them they are refused (checked below). ``UNOBSERVABLE`` is the allow-list:
switches whose effect cannot show on tiny-random, each with the reason and where its effect is tested.

Observed: stdout, stderr, the files written, and what the command handed the pipeline (the load options;
per request the prepare options and the model config: the plan), so a switch that a random model's answer
happens not to show still counts once it reaches the model. Left out, as they vary run to run: JSON keys
ending in ``_s`` / ``seconds`` / ``timings`` and digits in stderr (timings and rates).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_next.cli.main import build_parser, main

# switch -> why its effect cannot be observed on tiny-random on a CPU, and where it is tested instead
UNOBSERVABLE = {
    ("run", "--compile-step"): "decoding path only: the compiled step gives the same tokens by construction "
                               "(test_engines.py); that run/trace pass it on: test_compile_step_reaches_stream",
    ("trace", "--compile-step"): "as run's (test_compile_step_reaches_stream)",
    ("batch", "--batch-size"): "how many greedy requests run together; the answers are the same by design "
                               "(test_batch.py checks batched == one by one)",
}

CAT = "sample:cat"


def _probes(media: dict) -> dict:
    """switch -> [argument lists to try], per command where they differ (key (command, switch))."""
    return {
        "--model": [[media["model"]]],
        "--adapter": [[str(media["work"] / "no-adapter")]],  # refused clearly; its effect: test_lora.py (CLI test)
        ("inspect", "--model"): [["tiny-random"]],
        ("batch", "--model"): [["tiny-random"]],
        "--image": [[media["image2"]]],
        "--video": [["sample:bunny"]],
        "--frames": [["3"]],
        "--pool-stride": [["4"]],
        "--rope-scale": [["3"]],
        "--max-image-pixels": [["1000"]],
        "--select-frames": [["maxinfo"]],
        "--scene-threshold": [["1000"]],  # with --sampling scene, min_len 1 (below): no cut, where 27 cuts every frame
        "--scene-min-len": [["1"]],
        "--reduce": [["fastv:layer=1,keep=0.5"]],
        "--prompt": [["Describe the picture."]],
        "--max-new-tokens": [["3"]],
        ("inspect", "--max-new-tokens"): [["500"]],
        "--text-tokens": [["700"]],
        ("inspect", "--train-memory"): [["24"]],  # with media: refused; its answers: test_train_memory.py
        ("inspect", "--lora-rank"): [["8"]],  # without --train-memory: refused; with it: test_train_memory.py
        "--temperature": [["0.5"]],
        "--top-p": [["0.3"]],
        "--seed": [["7"]],
        "--cache-dir": [[str(media["work"] / "cache2")]],
        "--png": [[str(media["work"] / "png")]],
        ("inspect", "--png"): [[str(media["work"] / "plan.png")]],
        "--layers": [["1"]],
        "--query": [["question"]],
        "--lens": [["last"]],
        "--lens-top-k": [["2"]],
        "--ig-steps": [["2"]],
        "--vmin": [["0.5"]],  # (trace: with --png, below; the colours: test_figures.py)
        "--vmax": [["0.001"]],
        "--inputs": [[media["jobs2"]]],
        "--videos": [[media["video"]]],  # with --inputs: refused (one of the two); its effect: test_captions.py
        "--out": [[str(media["work"] / "other.jsonl")]],
    }


# the other switches a switch acts with, applied to both sides of the comparison: (switch, values), values
# None = the baseline without that switch
def _contexts(media: dict) -> dict:
    int4 = [("--model", [media["model"]]), ("--quantize", ["int4"]), ("--group-size", ["32"])]  # tiny-random's
    overflow = [("--rope-scale", ["1"]), ("--pool-stride", ["1"]), ("--frames", ["70"])]  # 344-wide MLP has no int4
    sample = [("--max-new-tokens", ["2"]), ("--temperature", ["1.0"])]
    return {
        "--group-size": int4,
        "--activations": [("--quantize", ["int8"])],  # int8 / int4 models (refused without: below)
        ("convert", "--group-size"): [("--quantize", ["int4"]), ("--group-size", ["32"])],
        "--seed": [("--temperature", ["1.0"])],
        "--top-p": [("--temperature", ["1.0"])],
        ("trace", "--temperature"): [("--max-new-tokens", ["2"])],
        ("trace", "--seed"): sample,
        ("trace", "--top-p"): sample,
        **{("trace", f): [("--png", [str(media["work"] / "figs")])] for f in ("--format", "--vmin", "--vmax", "--scale")},
        "--allow-overflow": overflow,
        ("inspect", "--template"): [("--model", ["tiny-random"]), ("--prompt", ["What happens?"])],
        "--quiet": [("--json", None)],  # --json's stdout carries no progress either way
        "--sampling": [("--frames", ["8"])],  # 12 frames at 4 fps: "fps" keeps 0, 4, 8; uniform 8 of them
        # the scene detector's switches act with --sampling scene (refused without it); on the 12-frame pan no
        # frame is a cut at the defaults (threshold 27, min_len 15)
        "--scene-threshold": [("--sampling", ["scene"]), ("--scene-min-len", ["1"])],
        "--scene-min-len": [("--sampling", ["scene"]), ("--scene-threshold", ["0.01"])],
    }


def _apply(argv: list[str], context) -> list[str]:
    for switch, values in context:
        if values is None:
            argv = _without(argv, switch, 0) if switch in argv else argv
        else:
            argv = _with(argv, switch, values) or argv
    return argv


def _lookup(table: dict, command: str, switch: str, default=None):
    return table.get((command, switch), table.get(switch, default))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from checkpoints_qwen import make_onevision_checkpoint
    from media import photo_array

    root = tmp_path_factory.mktemp("switches")
    # 60x104: a size whose AnyRes unpadding differs between --anyres-compat hf and original on tiny-random
    image = root / "small.png"
    Image.fromarray(photo_array("chelsea")[:60, :104]).save(image)
    image2 = root / "other.png"
    Image.fromarray(np.ascontiguousarray(photo_array("chelsea")[::-1, :200])).save(image2)
    from media import make_video

    video = make_video(root / "pan.mp4", 12, (64, 96), fps=4)  # small and short: decoded once per command line
    src, _ = make_onevision_checkpoint(root / "ov-hf")  # SigLIP + Qwen2, with its tokenizer
    work = root / "work"
    m = {"root": root, "image": str(image), "image2": str(image2), "video": str(video), "src": str(src),
         "work": work, "model": str(src)}
    jobs = root / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "v", "video": str(video)}) + "\n"
                    + json.dumps({"id": "i", "images": [str(image)]}) + "\n")
    jobs2 = root / "jobs2.jsonl"
    jobs2.write_text(json.dumps({"id": "w", "images": [str(image2)]}) + "\n")
    m["jobs"], m["jobs2"] = str(jobs), str(jobs2)
    return m


def _baselines(m: dict) -> dict[str, list[str]]:
    out = str(m["work"] / "out")
    return {
        "run": ["run", "--model", "tiny-random", "--image", m["image"], "--video", m["video"], "--frames", "2",
                "--max-new-tokens", "2", "--json", "--prompt", "What happens?"],
        "trace": ["trace", "--model", "tiny-random", "--image", m["image"], "--video", m["video"], "--frames",
                  "2", "--layers", "0", "--json", "--prompt", "What happens?"],
        "inspect": ["inspect", "--image", m["image"], "--video", m["video"], "--json"],
        "batch": ["batch", "--model", m["model"], "--inputs", m["jobs"], "--out", str(m["work"] / "results.jsonl"),
                  "--max-new-tokens", "4", "--frames", "2", "--prompt", "What happens?"],
        "convert": ["convert", m["src"], out],
    }


def _strip(obj):
    """JSON without what varies run to run (timings)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()
                if not (k.endswith("_s") or k in ("timings", "seconds", "decode_tokens_per_s"))}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _text(s: str, digits: bool = True) -> str:
    """One JSON document or JSON lines without timings; other lines as they are (``digits=False``: numbers
    masked, for stderr's progress lines)."""
    try:
        return json.dumps(_strip(json.loads(s)), sort_keys=True)
    except ValueError:
        pass
    lines = []
    for line in s.splitlines():
        try:
            lines.append(json.dumps(_strip(json.loads(line)), sort_keys=True))
        except ValueError:
            lines.append(line if digits else re.sub(r"\d+(\.\d+)?", "#", line))
    return "\n".join(lines)


def _files(work: Path) -> dict[str, str]:
    out = {}
    for p in sorted(work.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.suffix in (".jsonl", ".json"):
                data = _text(data.decode()).encode()
            out[str(p.relative_to(work))] = hashlib.sha1(data).hexdigest()
    return out


PIPELINE_CALLS: list[str] = []  # what the command handed the pipeline (filled by the _spy_pipeline fixture)
_LOADED: dict[str, tuple] = {}  # load options -> (pipeline, its config, its progress) as loaded


def _observe(argv: list[str], work: Path, setup=None) -> tuple:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if setup is not None:
        setup(work)
    out, err = io.StringIO(), io.StringIO()
    PIPELINE_CALLS.clear()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, _text(out.getvalue()), _text(err.getvalue(), digits=False), _files(work), tuple(PIPELINE_CALLS)


def _switches(command: str) -> list[argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _with(argv: list[str], switch: str, values: list[str]) -> list[str] | None:
    """argv with ``switch values`` (replacing the baseline's own value), or None if nothing would change."""
    if switch in argv:
        i = argv.index(switch)
        n = 1
        while i + n < len(argv) and not argv[i + n].startswith("--"):
            n += 1  # the baseline's own values of the switch
        new = argv[:i] + [switch, *values] + argv[i + n:]
        return None if new == argv else new
    return argv[:1] + [switch, *values] + argv[1:]


def _without(argv: list[str], switch: str, nvalues: int) -> list[str]:
    i = argv.index(switch)
    return argv[:i] + argv[i + 1 + nvalues:]


COMMANDS = ("run", "trace", "inspect", "batch", "convert")


@pytest.fixture(autouse=True)
def _spy_pipeline(monkeypatch):
    """The plan a command hands the pipeline, observed beside its output: the load options and, per request,
    the prepare options and the model config they run under. (A random model's answer can be the same for
    two plans; a switch that reaches neither the output nor the pipeline is ignored.)"""
    from llava_next.runtime.pipeline import Pipeline

    load, prepare = Pipeline.from_pretrained.__func__, Pipeline.prepare

    def spy_load(cls, *args, **kw):
        PIPELINE_CALLS.append(f"load {args!r} {sorted(kw.items())!r}")
        key = repr((args, sorted(kw.items())))
        if key not in _LOADED:  # loaded once per set of load options; each command line gets it as loaded
            pipe = load(cls, *args, **kw)
            _LOADED[key] = (pipe, pipe.model.config, pipe.progress)
        pipe, config, progress = _LOADED[key]
        pipe.model.config, pipe.progress = config, progress  # what a command changed (plan switches)
        return pipe

    def spy_prepare(self, *args, **kw):
        PIPELINE_CALLS.append(f"prepare {args!r} {sorted(kw.items())!r} {self.config!r}")
        return prepare(self, *args, **kw)

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(spy_load))
    monkeypatch.setattr(Pipeline, "prepare", spy_prepare)


@pytest.fixture(autouse=True)
def _env(monkeypatch, media):
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(media["root"] / "cache"))
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_switch_is_observable_or_refused(command, media):
    work = media["work"]
    base = _baselines(media)[command]
    probes, contexts = _probes(media), _contexts(media)
    ignored, refused_unclear = [], []
    baseline_cache: dict[tuple, tuple] = {}

    def baseline(context: list, setup=None) -> tuple:
        key = (repr(context), setup is not None)
        if key not in baseline_cache:
            baseline_cache[key] = _observe(_apply(base, context), work, setup)
        return baseline_cache[key]

    for action in _switches(command):
        switch = action.option_strings[-1]
        if (command, switch) in UNOBSERVABLE:
            continue
        context = _lookup(contexts, command, switch, [])
        setup = None
        if command == "convert" and switch == "--overwrite":  # OUT exists: refused without, replaced with
            setup = lambda w: (w / "out").mkdir()  # noqa: E731
        want = baseline(context, setup)  # (may be a refusal: --allow-overflow's context overflows)
        assert baseline([])[0] == 0, (command, baseline([]))
        if isinstance(action, argparse._StoreTrueAction):
            tries = [[]]
        elif action.choices is not None:
            tries = [[str(c)] for c in action.choices if str(c) != str(action.default)]
        else:
            tries = _lookup(probes, command, switch)
            assert tries is not None, f"{command} {switch}: add a probe value to PROBES (or an UNOBSERVABLE reason)"
        outcome = None
        for values in tries:
            argv = _apply(base, context)
            if switch in argv and not values:  # a flag of the baseline: compare without it
                argv = _without(argv, switch, 0)
            else:
                argv = _with(argv, switch, values)
                if argv is None:
                    continue
            got = _observe(argv, work, setup)
            if got[0] == 2:
                err = got[2]
                clear = err.count("\n") == 0 and "Traceback" not in err and err.strip() != ""
                if "--json" in argv and not clear:  # --json: errors are one JSON object on stdout
                    clear = '"kind": "user"' in got[1]
                outcome = "refused" if clear else "refused unclearly"
                if outcome == "refused":
                    break
                refused_unclear.append(f"{switch} {' '.join(values)}: {err.strip()[:200]}")
            elif got != want:
                outcome = "changed"
                break
        if outcome is None:
            ignored.append(f"{switch} ({', '.join(' '.join(v) for v in tries) or 'flag'})")
    assert not ignored, f"{command}: accepted and ignored: {ignored}"
    assert not refused_unclear, f"{command}: refused without a clear one-line error: {refused_unclear}"


@pytest.mark.parametrize("command", ["run", "trace"])
def test_compile_step_reaches_stream(command, media, monkeypatch):
    """--compile-step (UNOBSERVABLE in the output: same tokens by construction) reaches Pipeline.stream, for
    trace as for run (trace once took it from run's parser and dropped it)."""
    from llava_next.runtime.pipeline import Pipeline

    seen = []
    real = Pipeline.stream

    def spy(self, request, **kw):
        seen.append(kw.get("compile_step"))
        return real(self, request, **{**kw, "compile_step": False})  # no compile in a test

    monkeypatch.setattr(Pipeline, "stream", spy)
    base = _baselines(media)[command]
    argv = _with(base, "--max-new-tokens", ["1"]) if command == "trace" else base
    for value, want in (("on", True), ("off", False), ("auto", None)):
        assert _observe(_with(argv, "--compile-step", [value]) or argv, media["work"])[0] == 0
        assert seen[-1] is want, (command, value, seen)


@pytest.mark.parametrize("argv,message", [
    (["run", "--group-size", "64"], "--group-size 64: the group size is int4's"),
    (["run", "--quantize", "int8", "--group-size", "64"], "--group-size 64: the group size is int4's"),
    (["trace", "--group-size", "32"], "--group-size 32: the group size is int4's"),
    (["run", "--quantize", "nf4", "--activations", "int8"],
     "--activations int8: they are for int8 or int4 weights, not nf4; use --quantize int8 or int4"),
    (["run", "--activations", "int8"], "tiny-random has no int8 or int4 layers; quantize it (--quantize int8 or int4)"),
    (["trace", "--temperature", "0.7"], "act on generated tokens"),
    (["trace", "--seed", "3"], "act on generated tokens"),
    (["trace", "--compile-step", "on"], "act on generated tokens"),
    (["run", "--seed", "3"], "--seed 3: these act on sampling, and decoding is greedy (--temperature 0)"),
    (["run", "--top-p", "0.5"], "--top-p 0.5: these act on sampling, and decoding is greedy"),
    (["batch", "--seed", "3"], "--seed 3: these act on sampling, and decoding is greedy"),
    (["inspect", "--template", "vicuna_v1"], "--template vicuna_v1: inspect renders a template only around --prompt"),
    (["inspect", "--allow-overflow"], "--allow-overflow: inspect never refuses"),
    (["inspect", "--quiet"], "unrecognized arguments: --quiet"),
])
def test_switches_that_cannot_apply_are_refused(argv, message, media, capsys):
    """Where a switch cannot act (no int4, no generated tokens, no prompt to render, nothing on stderr), it
    is refused with a message that names it and says what to do, instead of being accepted and ignored."""
    base = {b[0]: b for b in _baselines(media).values()}[argv[0]]
    full = base[:1] + argv[1:] + [a for a in base[1:] if a != "--json"]
    with pytest.raises(SystemExit) if "unrecognized" in message else contextlib.nullcontext():
        assert main(full) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_convert_group_size_needs_int4(media, capsys, tmp_path):
    assert main(["convert", media["src"], str(tmp_path / "o"), "--group-size", "32"]) == 2
    assert "--group-size 32: the group size is int4's" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
