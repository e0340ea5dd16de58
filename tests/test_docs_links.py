"""The docs hold together: every relative link of README.md and docs/*.md points at a file that exists (and at a
heading that exists, when it names one), and docs/layout.md names exactly the modules the packages have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("llava_next", "kernels/llava_next_kernels", "weights/llava_next_weights")


def _without_code(text: str) -> str:
    """The text with fenced blocks and inline code removed (a ``[x](y)`` inside code is not a link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (lower case, punctuation dropped, spaces to hyphens;
    a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M).splitlines():
        m = re.match(r"^#{1,6} (.+?)\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _without_code(path.read_text()))


def test_every_relative_link_resolves():
    broken, count = [], 0
    for doc in DOCS:
        for link in links(doc):
            if re.match(r"^[a-z]+:", link):  # http:, https:, mailto: -- not checked here (no network)
                continue
            count += 1
            target, _, anchor = link.partition("#")
            file = (doc.parent / target).resolve() if target else doc
            if not file.exists():
                broken.append(f"{doc.name}: {link} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{doc.name}: {link} (no heading with that anchor in {file.name})")
    assert count > 30, count  # the collector finds the links (a test that finds none cannot fail)
    assert not broken, "\n".join(broken)


def test_anchor_rule_matches_githubs():
    """Spot checks of the slug rule against anchors GitHub gives these headings."""
    doc = ROOT / "docs" / "performance.md"
    assert "int8--int4-and-the-compiled-step-against-llamacpp" in anchors(doc)
    assert "see-the-plan-before-running-llava-next-inspect" in anchors(ROOT / "docs" / "usage.md")


def test_layout_names_every_module_and_only_those():
    listed = set(re.findall(r"`((?:llava_next|kernels|weights)/[\w/]+\.py)`", (ROOT / "docs" / "layout.md").read_text()))
    present = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
               if p.name != "__init__.py"}
    assert not present - listed, f"docs/layout.md does not list: {sorted(present - listed)}"
    assert not listed - present, f"docs/layout.md lists modules that do not exist: {sorted(listed - present)}"
