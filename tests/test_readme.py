"""The README's first screen works as written: its commands run through the installed ``llava-next``
(the install part of the one-line command is what CI has already done), offline, on a fresh cache."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def first_screen_commands() -> list[list[str]]:
    """The ``llava-next ...`` commands of the README's "First run" section, in order."""
    section = README.read_text().split("## First run", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.strip().splitlines():
            for part in line.split(" && "):
                if part.strip().startswith("llava-next "):
                    commands.append(shlex.split(part.strip())[1:])
    return commands


def test_first_screen_commands_run_as_written(tmp_path):
    commands = first_screen_commands()
    assert len(commands) == 2, commands
    first, real = commands
    assert "pip install -e ." in README.read_text().split("## First run", 1)[1].split("```bash", 2)[1]
    exe = Path(sys.executable).with_name("llava-next")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "llava_next.cli.main"]
    env = dict(os.environ, LLAVA_NEXT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run(cmd + first, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "RANDOM weights" in r.stderr and "frames: " in r.stderr and "tokens/s" in r.stderr
    assert (tmp_path / "cache" / "tiny-random").is_dir()  # built on first use, into $LLAVA_NEXT_CACHE
    # the real model: here the hub cannot be reached, so it must stop at the download with the clear
    # message (every option parsed, the sample found), not with a usage error or a traceback
    r = subprocess.run(cmd + real, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "usage:" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "llava-hf/LLaVA-NeXT-Video-7B-hf' is not in the Hugging Face cache" in r.stderr


def test_no_example_passes_a_literal_backslash_n():
    """Inside bash double quotes ``\\n`` is a backslash and an n, not a newline; llava-next sends a prompt as given
    (``--template none``: byte for byte), so an example that means a newline must write ``$'...\\n...'``."""
    bad = []
    docs = [README, *sorted(README.parent.glob("docs/*.md"))]  # the README's long-form commands live in docs/
    for block in re.findall(r"```bash\n(.*?)```", "\n".join(d.read_text() for d in docs), re.S):
        for line in block.splitlines():
            code = line.split("  #", 1)[0]
            # double-quoted strings, and single-quoted ones not written as $'...' (bash expands \n only there)
            strings = re.findall(r'"((?:[^"\\]|\\.)*)"', code) + re.findall(r"(?<!\$)'([^']*)'", code)
            if any("\\n" in s for s in strings):
                bad.append(line.strip())
    assert not bad, bad
