"""Progress of long work, on stderr: loading, frames decoded, the vision tower over frames and tiles,
prefill, and tokens/s while decoding.

    progress = Progress(sys.stderr)            # Progress(enabled=False) says nothing (--quiet)
    pipe.progress = progress                   # Pipeline reports through it; None (the default) is silent
    progress.say("loading", "tiny-random ...")

Every line starts with ``[llava-next] STAGE:``. On a terminal a stage that updates (the vision tower,
decoding) rewrites its line in place (``\\r``); elsewhere (a pipe, a log file, a test) each update is its
own line, at most one per ``interval`` seconds per stage plus the final one, so a log stays short.
Progress never goes to stdout: stdout is the answer (or the one JSON object of ``--json``).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, interval: float = 1.0,
                 skip: tuple[str, ...] = ()) -> None:
        """``skip``: stages not to report (``run`` skips "decoding" while it streams the answer to the same
        terminal: the answer itself shows the progress, and a line rewritten in place would garble it)."""
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.interval = interval
        self.skip = frozenset(skip)
        self._last: dict[str, float] = {}
        self._shown: dict[str, str] = {}  # the last message shown per updating stage
        self._open = False  # a terminal line being rewritten in place
        isatty = getattr(self.stream, "isatty", None)
        self._tty = bool(isatty and isatty())

    def say(self, stage: str, message: str) -> None:
        """One finished line."""
        if not self.enabled or stage in self.skip:
            return
        self._end_open_line()
        print(f"[llava-next] {stage}: {message}", file=self.stream, flush=True)

    def update(self, stage: str, message: str, *, final: bool = False) -> None:
        """A line that changes (``final``: the last state, always shown)."""
        if not self.enabled or stage in self.skip:
            return
        now = time.perf_counter()
        if not final and now - self._last.get(stage, -1e9) < self.interval:
            return
        if final and self._shown.get(stage) == message and not self._tty:  # already the last line shown
            self._last.pop(stage, None)
            self._shown.pop(stage, None)
            return
        self._last[stage] = now
        self._shown[stage] = message
        line = f"[llava-next] {stage}: {message}"
        if self._tty:
            self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
            self.stream.flush()
            self._open = not final
        else:
            print(line, file=self.stream, flush=True)
        if final:
            self._last.pop(stage, None)
            self._shown.pop(stage, None)

    def _end_open_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
