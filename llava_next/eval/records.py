"""What a result records about how it was made: package version, commit, torch version, dtype, device, seed,
checkpoint hash and the switches, so two result files can be told apart (or shown to be comparable).

- ``commit``: ``git rev-parse HEAD`` of the checkout the package runs from (None for an installed wheel),
  with ``dirty`` True when tracked files differ from it.
- ``checkpoint_sha256``: sha256 over the checkpoint directory's config.json and weight files (``*.safetensors``,
  sorted by name; name and bytes of each), read in 8 MiB blocks: a content hash, so a re-converted or
  re-downloaded checkpoint with the same weights has the same hash. It reads every byte (a 7B checkpoint:
  ~15 GB, seconds to tens of seconds), once per run.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD's hash, whether tracked files differ) of the checkout holding this package, or (None, None)."""
    where = Path(__file__).resolve().parents[1]  # llava_next/
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def checkpoint_sha256(directory: str | os.PathLike) -> str:
    """sha256 of config.json and every ``*.safetensors`` file of ``directory`` (module docstring)."""
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*.safetensors")) + [p for p in [directory / "config.json"] if p.exists()]
    if not files:
        raise FileNotFoundError(f"{directory}: no config.json or *.safetensors to hash")
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
    return h.hexdigest()


def provenance(*, model: str, checkpoint_dir: str | os.PathLike | None, dtype: torch.dtype,
               device: str | torch.device, seed: int | None, switches: dict) -> dict:
    """The record every output of an evaluation carries."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("llava-next")
    except PackageNotFoundError:  # run from a source tree that was never installed
        package_version = None
    commit, dirty = git_commit()
    return {"package": "llava-next", "version": package_version, "commit": commit, "dirty": dirty,
            "torch": torch.__version__, "python": platform.python_version(), "model": model,
            "checkpoint_sha256": checkpoint_sha256(checkpoint_dir) if checkpoint_dir is not None else None,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device), "seed": seed, "switches": switches}
