"""Progress of long work on stderr (runtime/progress.py), through the real CLI: every stage is reported,
nothing of it reaches stdout (so ``--json`` stays one object), and ``--quiet`` turns it off."""

from __future__ import annotations

import io
import json

import pytest

from llava_next.cli import main as cli
from llava_next.runtime.progress import Progress

STAGES = ("loading: tiny-random", "loading: done in", "images: 1 image(s) -> 5 tiles", "frames: ",
          "decoded 132 frames, kept 3", "vision tower: 8/8 frames+tiles", "prefill: ", "decoding: 3 tokens, ")


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path_factory.getbasetemp() / "progress-cache"))


def _run(capsys, *extra):
    code = cli.main(["run", "--model", "tiny-random", "--image", "sample:cat", "--video", "sample:bunny", "--frames",
                     "3", "--max-new-tokens", "3", "--dtype", "fp32", *extra, "What happens?"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_every_stage_on_stderr_and_json_stdout_stays_clean(capsys):
    out, err = _run(capsys, "--json")
    result = json.loads(out)  # stdout: exactly one JSON object
    assert len(result["tokens"]) == 3
    for stage in STAGES:
        assert stage in err, stage
    assert "tokens/s" in err and "[llava-next]" not in out
    assert err.count("decoding: 3 tokens") == 1  # the final state once, not repeated


def test_text_mode_streams_the_answer_and_quiet_turns_progress_off(capsys):
    out, err = _run(capsys)  # the answer streams on stdout: no decoding lines interleaved, one summary at the end
    assert out.strip() and "vision tower: 8/8" in err and "decoding:" not in err and "3 tokens; first token" in err
    out, err = _run(capsys, "--quiet")
    assert out.strip() and len(err.strip().splitlines()) == 1 and "RANDOM weights" in err  # only the notice


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_rewrites_a_line_in_place_and_logs_throttle():
    term = _Terminal()
    p = Progress(term, interval=0.0)
    p.update("decoding", "1 tokens")
    p.update("decoding", "2 tokens")
    p.say("note", "x")
    p.update("decoding", "3 tokens", final=True)
    assert term.getvalue() == ("\r\x1b[K[llava-next] decoding: 1 tokens\r\x1b[K[llava-next] decoding: 2 tokens\n"
                               "[llava-next] note: x\n\r\x1b[K[llava-next] decoding: 3 tokens\n")
    log = io.StringIO()
    p = Progress(log, interval=3600)
    for i in range(5):
        p.update("decoding", f"{i} tokens", final=i == 4)
    assert log.getvalue().splitlines() == ["[llava-next] decoding: 0 tokens", "[llava-next] decoding: 4 tokens"]
    silent = io.StringIO()
    Progress(silent, enabled=False).say("loading", "x")
    assert silent.getvalue() == ""
    skipping = io.StringIO()
    Progress(skipping, skip=("decoding",)).update("decoding", "1 tokens", final=True)
    assert skipping.getvalue() == ""
