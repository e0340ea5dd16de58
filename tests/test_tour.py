"""docs/tour.md is generated from the code (docs/make_tour.py): regenerate it and compare, so the tour's
shapes, counts and code excerpts can never drift from the code they describe."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "docs" / "tour.md"


def test_tour_is_fresh(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "make_tour.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    fresh = (tmp_path / "tour.md").read_text()
    committed = TOUR.read_text()
    if fresh != committed:
        diff = [f"- {a}\n+ {b}" for a, b in zip(committed.splitlines(), fresh.splitlines()) if a != b][:5]
        raise AssertionError("docs/tour.md is stale: the code it describes changed. Regenerate it with "
                             "`python docs/make_tour.py` and commit the result. First differences:\n"
                             + "\n".join(diff))
    for name in ("video-plan.png", "image-plan.png", "trace-frames.png"):  # pictures are drawn again, not compared (fonts vary)
        assert (tmp_path / "tour" / name).stat().st_size > 10_000
        assert (ROOT / "docs" / "tour" / name).exists(), f"docs/tour/{name} is not committed"


def test_tour_links_resolve():
    text = TOUR.read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert len(links) > 20
    for link in links:
        assert (TOUR.parent / link).resolve().exists(), f"docs/tour.md links to {link}, which does not exist"


def test_readme_links_the_tour():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "docs/tour.md" in head, "the README's first screen must link the guided tour"
