"""Packaging: the three import names resolve unambiguously (repo root, editable install, wheel), and the
runtime never imports transformers or torchvision (test-time references only)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("llava_next", "llava_next_kernels", "llava_next_weights")
FOLDERS = {"llava_next": REPO / "llava_next", "llava_next_kernels": REPO / "kernels" / "llava_next_kernels",
           "llava_next_weights": REPO / "weights" / "llava_next_weights"}

# Imports every runtime module with transformers and torchvision made unimportable.
BLOCKED_IMPORT = r"""
import importlib, pkgutil, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "torchvision"):
            raise ImportError(f"{name} is blocked: runtime code must not import it")
        return None

sys.meta_path.insert(0, Block())
import os
os.environ.setdefault("TRITON_INTERPRET", "1")
for top in ("llava_next", "llava_next_kernels", "llava_next_weights"):
    pkg = importlib.import_module(top)
    for info in pkgutil.walk_packages(pkg.__path__, top + "."):
        importlib.import_module(info.name)
    print(top, pkg.__file__)
assert "transformers" not in sys.modules and "torchvision" not in sys.modules
"""


def _run(code: str, cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_runtime_never_imports_transformers(tmp_path):
    out = _run(BLOCKED_IMPORT, cwd=tmp_path)
    for top in PACKAGES:
        assert f"{top} " in out


def test_imports_from_repo_root_resolve_to_the_project_folders():
    # From the repo root (REPL, notebook, `python -m`) the folders `kernels/` and `weights/` must not
    # pose as the PyPI packages of those names, and our import names must map to our folders.
    code = ("import importlib, llava_next, llava_next_kernels, llava_next_weights\n"
            "for m in (llava_next, llava_next_kernels, llava_next_weights): print(m.__name__, m.__file__)\n"
            "for name in ('kernels', 'weights', 'benchmarks'):\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    assert spec is None or spec.origin is not None or not str(spec.submodule_search_locations)"
            ".count('llava'), name\n")
    out = _run(code, cwd=REPO)
    for line in out.splitlines():
        name, file = line.split()
        assert Path(file).resolve().parent == FOLDERS[name].resolve()
    for folder in ("kernels", "weights", "tests", "benchmarks"):
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow a PyPI package"


def test_transformers_does_not_mistake_kernels_folder_for_the_kernels_package():
    pytest.importorskip("transformers")
    code = ("import os; os.environ['HF_HUB_OFFLINE'] = '1'\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "print(is_kernels_available())\n")
    assert _run(code, cwd=REPO).strip().endswith("False")


def test_wheel_contains_the_three_packages_and_imports_from_it(tmp_path):
    # build from a copy: setuptools reuses ./build/lib, which would leave build debris in the repo and can
    # carry stale modules into the wheel
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             "results", ".pytest_cache"))
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--quiet", "-w", str(wheel_dir), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("llava_next-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for top in PACKAGES:
        assert f"{top}/__init__.py" in names
    # every module of the tree is in the wheel (a subpackage missing from pyproject's list would be dropped)
    for folder in (REPO / "llava_next", REPO / "kernels", REPO / "weights"):
        for module in folder.rglob("*.py"):
            rel = module.relative_to(folder if folder.name == "llava_next" else folder).as_posix()
            rel = f"llava_next/{rel}" if folder.name == "llava_next" else rel
            assert rel in names, f"{rel} is not in the wheel: add its package to pyproject.toml"
    assert not any(n.startswith(("kernels/", "weights/", "tests/", "benchmarks/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "llava-next = llava_next.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs by unpacking
    env = dict(os.environ, PYTHONPATH=str(site))
    out = _run(BLOCKED_IMPORT, cwd=tmp_path, env=env)
    for line in out.splitlines():
        name, file = line.split()
        assert Path(file).is_relative_to(site), f"{name} imported from {file}, not from the wheel"
