"""Packaging: the three import names resolve unambiguously (repo root, editable install, wheel), and the
runtime never imports transformers or torchvision (test-time references only)."""

import json
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
        if info.name != "llava_next.eval.lmms":  # the lmms-eval backend: only lmms-eval imports it (and brings transformers)
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


# Without the `kernels` extra (no triton): every llava_next module imports, the model runs on its PyTorch
# paths, and asking for the Triton kernels says which extra brings them.
WITHOUT_TRITON = r"""
import importlib, pkgutil, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("triton", "transformers", "torchvision", "open_clip", "timm"):
            raise ImportError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Block())
import torch, llava_next
for info in pkgutil.walk_packages(llava_next.__path__, "llava_next."):
    if info.name != "llava_next.eval.lmms":  # the lmms-eval backend: only lmms-eval imports it
        importlib.import_module(info.name)
from llava_next.model import attention, pooling
q = torch.randn(1, 2, 5, 8)
out = attention.attention(q, q, q, causal=True)  # auto on CPU: SDPA
for force in (lambda: attention.use_backend("triton"), lambda: pooling.use_pool_backend("triton")):
    try:
        with force():
            attention.attention(q, q, q, causal=True)
            pooling.pool_frames(torch.randn(2, 16, 8), (4, 4))
    except RuntimeError as e:
        print("refused:", e)
try:
    import llava_next_kernels
except ImportError as e:
    print("kernels:", e)
"""


def test_runtime_runs_without_the_kernels_extra(tmp_path):
    out = _run(WITHOUT_TRITON, cwd=tmp_path)
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["refused", "refused", "kernels"], out
    assert all("pip install 'llava-next[kernels]'" in line for line in lines), out


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


def test_the_kernels_folder_never_poses_as_the_kernels_module_and_hub_kernels_stay_off():
    # From the repo root, where `kernels/` is a folder without __init__.py: the module `kernels` Python
    # imports must never be that folder. transformers >= 5.25 depends on the PyPI package `kernels` (its
    # kernel hub), so it is installed and must win; if it is absent, `kernels` must not import at all.
    # And the reference must stay transformers' own torch code: with the suite's environment (conftest sets
    # USE_HUB_KERNELS=NO) from_pretrained leaves the hub-kernel path off, as transformers' own tests do.
    pytest.importorskip("transformers")
    code = ("import importlib.util, importlib.metadata, json, os, tempfile\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "try: dist = importlib.metadata.version('kernels')\n"
            "except importlib.metadata.PackageNotFoundError: dist = None\n"
            f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import conftest  # the suite's setup\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
            "                  num_attention_heads=4, num_key_value_heads=4)\n"
            "d = tempfile.mkdtemp(); LlamaForCausalLM(cfg).save_pretrained(d)\n"
            "m = LlamaForCausalLM.from_pretrained(d)\n"
            "print(json.dumps({'origin': spec and spec.origin, 'locations': list(spec.submodule_search_locations or [])\n"
            "                  if spec else [], 'dist': dist, 'use_kernels': m.use_kernels}))\n")
    found = json.loads(_run(code, cwd=REPO).strip().splitlines()[-1])
    ours = (REPO / "kernels").resolve()
    places = [p for p in [found["origin"], *found["locations"]] if p]
    assert all(ours != Path(p).resolve() and ours not in Path(p).resolve().parents for p in places), found
    if found["dist"] is None:
        assert found["origin"] is None and not found["locations"], found  # nothing named kernels imports
    else:
        assert found["origin"] and Path(found["origin"]).name == "__init__.py", found  # the PyPI package
    assert found["use_kernels"] is False, "transformers' kernel hub is on: the reference would not be plain torch"


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
    assert {"llava_next/model/cpu_gemv.c", "llava_next/model/cpu_dequant.c"} <= set(names)  # C loops, compiled on the user's machine
    for task in (REPO / "llava_next" / "eval" / "benchmarks").glob("*.yaml"):  # the bundled benchmark tasks
        assert f"llava_next/eval/benchmarks/{task.name}" in names, f"{task.name} is not in the wheel (package-data)"
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "llava-next = llava_next.cli.main:main" in entry_points
    assert "[lmms_eval.models]\nllava_next_reimpl = llava_next.eval.lmms:manifest" in entry_points  # lmms-eval finds it

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs by unpacking
    env = dict(os.environ, PYTHONPATH=str(site))
    out = _run(BLOCKED_IMPORT, cwd=tmp_path, env=env)
    for line in out.splitlines():
        name, file = line.split()
        assert Path(file).is_relative_to(site), f"{name} imported from {file}, not from the wheel"
