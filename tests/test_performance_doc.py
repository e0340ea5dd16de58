"""docs/performance.md is generated from the committed result files (benchmarks/make_performance.py reads
benchmarks/published/): regenerate it and compare, so a measured number is changed in one place and the page
cannot drift from its sources; and the README states no measured number of its own."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "performance.md"
PUBLISHED = ROOT / "benchmarks" / "published"


def test_performance_page_is_fresh(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_performance.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    fresh, committed = (tmp_path / "performance.md").read_text(), PAGE.read_text()
    if fresh != committed:
        diff = [f"- {a}\n+ {b}" for a, b in zip(committed.splitlines(), fresh.splitlines()) if a != b][:5]
        raise AssertionError("docs/performance.md differs from benchmarks/published/. Regenerate it with "
                             "`python benchmarks/make_performance.py` and commit the result. First differences:\n"
                             + "\n".join(diff or ["(one is a prefix of the other)"]))


def test_every_result_file_is_used_and_says_where_it_comes_from():
    tables = {p.stem for p in PUBLISHED.glob("*.csv")}
    writeups = {p.name: p.read_text() for p in PUBLISHED.glob("*.md")}
    used = {m for text in writeups.values() for m in re.findall(r"^\{\{table (\S+)\}\}$", text, re.M)}
    assert tables == used, f"result files not shown: {sorted(tables - used)}; shown but missing: {sorted(used - tables)}"
    for name, text in writeups.items():  # each run names its commit (the run's or the one that published it)
        assert re.search(r"commits? [0-9a-f]{7}", text), f"benchmarks/published/{name} does not say which run it is"
    for name in tables:
        rows = list(csv.reader((PUBLISHED / f"{name}.csv").open(newline="")))
        assert len(rows) >= 2 and len({len(r) for r in rows}) == 1, f"{name}.csv: a header and rows of its width"


def test_readme_prose_states_no_measurement():
    """Measured numbers live in docs/performance.md: no timing, rate, ratio or speed-up in the README's prose."""
    text = re.sub(r"^```.*?^```", "", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    found = re.findall(r"\b\d+(?:\.\d+)?\s?(?:ms|tok/s|tokens/s|GB/s|GFLOP/s|TFLOP/s|x faster|x slower)\b"
                       r"|\b\d+\.\d+x\b|\b\d+(?:\.\d+)? ?(?:s|seconds|minutes) (?:to|per|on)\b", text)
    assert not found, found
