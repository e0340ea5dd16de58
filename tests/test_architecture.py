"""Imports go one way: down the layer table of docs/architecture.md (read from there, its only copy).

Every module of the three packages is parsed with ``ast``; every import (module level, inside functions,
under ``if TYPE_CHECKING:``; relative ones resolved) is mapped to the package it names. A package may
import only packages of a lower layer. A failure names each ``file:line import``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
SOURCES = {"llava_next": REPO / "llava_next", "llava_next_weights": REPO / "weights" / "llava_next_weights",
           "llava_next_kernels": REPO / "kernels" / "llava_next_kernels"}
NEVER = ("transformers", "peft", "trl", "torchvision", "open_clip")  # references for the tests only


def read_table(text: str) -> dict[str, tuple[int, set[str]]]:
    """package -> (layer, packages its row says it may import), from the doc's
    ``| layer | package | what it holds | may import |`` table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].isdigit():
            continue
        (package,) = re.findall(r"`([\w.]+)`", cells[1])
        rows[package] = (int(cells[0]), set(re.findall(r"`([\w.]+)`", cells[3])))
    return rows


TABLE = read_table(DOC.read_text())


def module_name(path: Path) -> tuple[str, bool]:
    """(dotted module name, whether it is a package's ``__init__``) of a source file."""
    for top, folder in SOURCES.items():
        if path.is_relative_to(folder):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                return ".".join(parts[:-1]), True
            return ".".join(parts), False
    raise AssertionError(path)


def package_of(module: str) -> str | None:
    """The table's package a dotted module name belongs to (the longest prefix), None outside the project."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in TABLE:
            return ".".join(parts[:n])
    return None


def imported_modules(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement brings in (``from a import b``: a.b too, b may be a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" for a in node.names]


def imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, source text, imported dotted name) of every import in ``path``."""
    module, is_package = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.lineno, ast.unparse(node), name) for node in ast.walk(tree)
            for name in imported_modules(node, module, is_package)]


def sources() -> list[Path]:
    return sorted(p for folder in SOURCES.values() for p in folder.rglob("*.py"))


def test_the_table_is_consistent():
    """Each row's "may import" column is exactly the packages of the layers below it."""
    assert TABLE, f"no layer table found in {DOC}"
    for package, (layer, allowed) in TABLE.items():
        below = {p for p, (other, _) in TABLE.items() if other < layer}
        assert allowed == below, (f"{DOC.name}: {package} (layer {layer}) lists {sorted(allowed)}, but the layers "
                                  f"below it hold {sorted(below)}")


def test_every_package_is_in_the_table():
    missing = sorted({str(p.relative_to(REPO)) for p in sources() if package_of(module_name(p)[0]) is None})
    assert not missing, f"modules of no package in {DOC.name}'s layer table: {missing}"


def violations() -> list[str]:
    found = []
    for path in sources():
        source = package_of(module_name(path)[0])
        layer = TABLE[source][0]
        for line, text, name in imports(path):
            target = package_of(name)
            if target is None or target == source or TABLE[target][0] < layer:
                continue
            found.append(f"{path.relative_to(REPO)}:{line} {text}  ({source}, layer {layer} -> {target}, "
                         f"layer {TABLE[target][0]})")
    return list(dict.fromkeys(found))  # one line per statement, not per imported name


def test_imports_go_down_the_layers():
    found = violations()
    assert not found, (f"{len(found)} import(s) against the layer table of docs/architecture.md (a package "
                       "imports only lower layers):\n" + "\n".join(found))


def test_no_reference_library_at_runtime():
    found = [f"{p.relative_to(REPO)}:{line} {text}" for p in sources() for line, text, name in imports(p)
             if name.split(".")[0] in NEVER]
    assert not found, f"runtime code imports a test-only reference ({', '.join(NEVER)}):\n" + "\n".join(found)


@pytest.mark.parametrize("code, expected", [
    ("from ..runtime.memory import available_memory", "llava_next.runtime"),  # relative, up two layers
    ("from llava_next.cli import main", "llava_next.cli"),
    ("import llava_next_weights.load", "llava_next_weights"),
])
def test_an_upward_import_is_caught(tmp_path, monkeypatch, code, expected):
    """The check itself: an upward import written into a model module is reported with its file and line."""
    fake = SOURCES["llava_next"] / "model" / "_architecture_probe.py"
    original = sources()
    monkeypatch.setitem(globals(), "sources", lambda: [*original, fake])
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (f"def f():\n    {code}\n" if self == fake
                                                                   else real_read(self, *a, **k)))
    found = violations()
    assert len(found) == 1 and found[0].startswith("llava_next/model/_architecture_probe.py:2 ") and expected in found[0]
