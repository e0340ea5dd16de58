"""What a new user sees (issue 22, items 10 and 11): messages that say the real cause and what helps, the
built-in tiny-random model's notice wherever its weights go, Ctrl-C and closed pipes without tracebacks,
one error vocabulary for every command, and progress that suits a log file. Each test runs the real
``llava-next`` in a subprocess, as a user would, mostly on ``tiny-random`` (built once into a shared cache);
where a test asks the same kind of question again (another near-miss name, another command's wording of the
same error, the same run with --json), the repeat is ``main`` in the test process (``here``): the same code
writes the same stdout/stderr and returns the same exit code, without a process start and a model load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("messages-cache")
    return dict(os.environ, LLAVA_NEXT_CACHE=str(cache), HF_HUB_OFFLINE="1", LLAVA_NEXT_COMPILE="0")


def cli(env, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_next.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S, **kwargs)


@pytest.fixture
def here(env, capsys, monkeypatch):
    """``cli``'s twin in this process: ``main(ARGS)`` with ``env``'s cache and compile switch, stdout/stderr
    captured; a ``CompletedProcess`` as ``cli`` returns."""
    from llava_next.cli.main import main

    for key in ("LLAVA_NEXT_CACHE", "LLAVA_NEXT_COMPILE"):
        monkeypatch.setenv(key, env[key])

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        said = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), 0 if code is None else code, said.out, said.err)
    return run


def one_error_line(r: subprocess.CompletedProcess, command: str) -> str:
    """The stderr of a user error: exit 2, no traceback, one ``llava-next COMMAND: error:`` line."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith(f"llava-next {command}: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


# ---- 10c: Ctrl-C while torch is still importing -----------------------------------------------------------
SIGINT_AT_TORCH_IMPORT = """\
import os, signal, sys

class _InterruptTorchImport:  # Ctrl-C exactly when the command first imports torch (no timing involved)
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)  # os.kill runs the KeyboardInterrupt handler before returning
        return None

sys.meta_path.insert(0, _InterruptTorchImport())
"""


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_while_importing_is_one_line_and_exit_130(env, tmp_path, as_json):
    (tmp_path / "sitecustomize.py").write_text(SIGINT_AT_TORCH_IMPORT)
    hooked = dict(env, PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]))
    r = cli(hooked, "run", "--model", "tiny-random", "--prompt", "hi", *(["--json"] if as_json else []))
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr
    if as_json:
        assert json.loads(r.stdout) == {"error": "interrupted", "kind": "interrupted", "type": "KeyboardInterrupt"}
        assert r.stderr == ""
    else:
        assert r.stderr.strip().splitlines() == ["llava-next run: interrupted"]


# ---- 11g: a reader that stops early (| head) -------------------------------------------------------------
def test_closed_stdout_exits_quietly(env):
    p = subprocess.Popen([sys.executable, "-m", "llava_next.cli.main", "inspect", "--model", "tiny-random",
                          "--image", "sample:cat", "--video", "sample:bunny"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # what `| head -1` does once it has its line; here before the first one
    err = p.stderr.read()
    assert p.wait(timeout=TIMEOUT_S) == 141, err  # 128 + SIGPIPE, as a C tool killed by the signal reports
    assert err == "", err


# ---- 10b: a near-miss model name -------------------------------------------------------------------------
def test_near_miss_model_name_suggests_the_preset(env, here):
    for command in ("run", "inspect"):
        args = ["--prompt", "hi"] if command == "run" else ["--image", "sample:cat"]
        argv = (command, "--model", "llava-next-video-7b", *args)
        line = one_error_line(cli(env, *argv) if command == "run" else here(*argv), command)
        assert "did you mean 'LLaVA-NeXT-Video-7B'?" in line, line
    line = one_error_line(here("run", "--model", "tiny-randon", "--prompt", "hi"), "run")
    assert "did you mean 'tiny-random'?" in line, line
    line = one_error_line(here("run", "--model", "xyzzy", "--prompt", "hi"), "run")
    assert "did you mean" not in line, line


# ---- 10a: int4 on a decoder whose widths the int4 kernel cannot take ---------------------------------------
def write_checkpoint(out: Path, **text_changes) -> Path:
    """tiny-random's layout with other decoder widths (llava-next's converted format)."""
    import dataclasses

    from safetensors.torch import save_file

    from llava_next.runtime import tiny

    base = tiny.tiny_config()
    config = dataclasses.replace(base, text=dataclasses.replace(base.text, **text_changes))
    out.mkdir(parents=True)
    save_file(tiny.random_weights(config), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    return out


def test_int4_message_states_the_failing_condition_and_what_helps(env, here, tmp_path):
    rows = write_checkpoint(tmp_path / "mlp344", hidden_size=128, intermediate_size=344)
    line = one_error_line(cli(env, "convert", str(rows), str(tmp_path / "q"), "--quantize", "int4"), "convert")
    # gate/up (344, 128): 344 output rows, not a multiple of 16, whatever the group size
    assert "344" in line and "multiple of 16" in line and "no --group-size can help" in line, line
    assert "use --quantize int8" in line and "group_size that divides" not in line, line

    cols = write_checkpoint(tmp_path / "mlp352", hidden_size=128, intermediate_size=352)  # 352 = 11 x 32
    line = one_error_line(here("convert", str(cols), str(tmp_path / "q"), "--quantize", "int4"), "convert")
    # down_proj (128, 352): 352 input features, a multiple of 32 but not of 64, 128 or 256
    assert "352" in line and "--group-size 32" in line and "--group-size 64" not in line, line
    ok = here("convert", str(cols), str(tmp_path / "q32"), "--quantize", "int4", "--group-size", "32")
    assert ok.returncode == 0, ok.stderr
    assert not (tmp_path / "q").exists()


# ---- 11b, 11c, 11d: convert tiny-random; the notice follows its weights; progress in a log ---------------
def test_convert_tiny_random_and_the_notice_follows_its_weights(env, here, tmp_path):
    """The int8 convert in a process of its own (its stderr is a pipe); the other commands in this one."""
    plain = here("convert", "tiny-random", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    assert (tmp_path / "plain" / "config.json").is_file() and (tmp_path / "plain" / "tiny-random.json").is_file()

    r = cli(env, "convert", "tiny-random", str(tmp_path / "q8"), "--quantize", "int8", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    # stderr is a pipe here: one line per update, no carriage returns, and the last one says it is complete
    assert "\r" not in r.stderr, repr(r.stderr)
    progress = [line for line in r.stderr.splitlines() if "converting" in line and "->" not in line]
    assert progress and "100%" in progress[-1], r.stderr

    run = here("run", "--model", str(tmp_path / "q8"), "--prompt", "hi", "--max-new-tokens", "2", "--json")
    assert run.returncode == 0, run.stderr
    assert "RANDOM weights" in run.stderr
    result = json.loads(run.stdout)
    assert result["random_weights"] is True and "RANDOM" in result["notice"]
    inspect = here("inspect", "--model", str(tmp_path / "q8"), "--image", "sample:cat", "--json")
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["random_weights"] is True


# ---- 11a: batch ------------------------------------------------------------------------------------------
def test_batch_says_random_weights_and_leaves_no_lock_file(env, here, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "prompt": "hi", "max_new_tokens": 2}) + "\n")
    out = tmp_path / "out" / "results.jsonl"
    r = cli(env, "batch", "--model", "tiny-random", "--inputs", str(jobs), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr  # said even with --quiet, as run does
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.jsonl"]
    assert json.loads(out.read_text())["status"] == "ok"
    # a job that stops before answering anything (here: no such model) leaves no output and no lock behind
    failed = tmp_path / "failed" / "results.jsonl"
    r = here("batch", "--model", str(tmp_path / "no-model"), "--inputs", str(jobs), "--out", str(failed))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert list(failed.parent.iterdir()) == []


# ---- 10d: one error shape and type vocabulary for every command -----------------------------------------
def test_missing_file_is_the_same_error_in_run_inspect_and_batch(env, here, tmp_path):
    missing = str(tmp_path / "rockett.jpg")
    want = {"error": f"{missing}: no such file", "kind": "user", "type": "FileNotFoundError"}
    for command, args in (("run", ["--prompt", "hi"]), ("inspect", [])):
        argv = (command, "--model", "tiny-random", "--image", missing, "--json", *args)
        r = cli(env, *argv) if command == "run" else here(*argv)
        assert r.returncode == 2 and json.loads(r.stdout) == want, (r.stdout, r.stderr)
    folder = str(tmp_path)
    r = here("run", "--model", "tiny-random", "--image", folder, "--json", "--prompt", "hi")
    assert json.loads(r.stdout) == {"error": f"{folder}: is a directory, not an image file", "kind": "user",
                                    "type": "IsADirectoryError"}

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "prompt": "hi", "images": [missing]}) + "\n"
                    + json.dumps({"id": "b", "prompt": "hi", "images": [folder]}) + "\n")
    out = tmp_path / "results.jsonl"
    r = here("batch", "--model", "tiny-random", "--inputs", str(jobs), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    lines = {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert lines["a"] == {"id": "a", "status": "error", **want}
    assert lines["b"] == {"id": "b", "status": "error", "error": f"{folder}: is a directory, not an image file",
                          "kind": "user", "type": "IsADirectoryError"}


# ---- 11e, 11f: what auto choices and reducers change is said -------------------------------------------
def test_rope_scale_auto_says_why_it_differs_from_the_config(env, here):
    from llava_next.runtime.tiny import tiny_config

    config_factor = tiny_config().text.rope_scaling_factor
    assert config_factor > 1  # tiny-random's factor (2.5, as Video-7B's): auto lowers it for a short prompt
    args = ["run", "--model", "tiny-random", "--prompt", "hi", "--max-new-tokens", "2", "--rope-scale", "auto"]
    r = cli(env, *args)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "--rope-scale auto" in line]
    assert len(notes) == 1 and "factor 1" in notes[0] and "smallest" in notes[0], r.stderr
    assert f"config's {config_factor:g}" in notes[0], notes
    plan = json.loads(here(*args, "--json").stdout)["plan"]
    assert any("--rope-scale auto" in n and "smallest" in n for n in plan["notes"]), plan["notes"]
    inspect = here("inspect", "--model", "tiny-random", "--image", "sample:cat", "--rope-scale", "auto")
    assert "smallest" in inspect.stdout and f"config's {config_factor:g}" in inspect.stdout, inspect.stdout


def test_a_reducer_that_adds_tokens_says_so(env, here):
    args = ["--model", "tiny-random", "--image", "sample:cat", "--reduce", "visionzip"]
    r = cli(env, "run", *args, "--prompt", "hi", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "note:" in line and "visionzip" in line]
    assert notes and "more than" in notes[0] and "per frame or crop" in notes[0], r.stderr
    inspect = here("inspect", *args)
    assert inspect.returncode == 0 and "more than" in inspect.stdout, inspect.stdout + inspect.stderr
