"""From a model name to a converted llava-next directory: local paths, the Hugging Face hub, a cache.

    path = resolve("llava-hf/LLaVA-NeXT-Video-7B-hf")   # download once, convert once, then reuse
    path = resolve("/data/llava-v1.6-vicuna-7b")        # an original or llava-hf dir: converted once
    path = resolve("/data/converted")                   # already llava-next's layout: used as is

Where things go
- Converted models live in ``$LLAVA_NEXT_CACHE`` (default ``~/.cache/llava-next``):
  ``<org>--<name>/<commit>[-<dtype>]/`` for hub ids (a new hub commit converts anew) and
  ``local/<dirname>-<fingerprint>[-<dtype>]/`` for local directories, where the fingerprint hashes the
  directory's path and its config / weight files' names, sizes and modification times — edit the
  files and the next call converts again. Conversion is atomic, so a directory that exists is complete.
- Downloads go to the normal Hugging Face cache through ``huggingface_hub.snapshot_download``, and only
  what conversion needs: config, safetensors weights and index, tokenizer / chat-template files.
  Pickle weights (``*.bin``) are never downloaded.
- Offline (``HF_HUB_OFFLINE=1`` or no network): a hub id resolves from the Hugging Face cache, or else
  from an earlier conversion in llava-next's cache; with neither, a clear error says what to do.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from llava_next_weights.convert import INDEX_FILE, SIDE_FILES, convert
from llava_next.model.quant import DEFAULT_GROUP_SIZE, QuantConfig
from llava_next_weights.load import PICKLE_SUFFIXES, is_llava_next_dir, parse_dtype
from llava_next_weights.quantize import read_quant_config

CACHE_ENV = "LLAVA_NEXT_CACHE"
ALLOW_PATTERNS = ["config.json", "*.safetensors", INDEX_FILE, *SIDE_FILES]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubError(RuntimeError):
    """A model could not be found or fetched; the message says what to do."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """llava-next's cache of converted models."""
    root = cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/llava-next"
    return Path(root).expanduser()


def fingerprint(src: Path) -> str:
    """A short hash of a checkpoint directory: its path and its config / weight files' sizes and mtimes."""
    h = hashlib.sha256(str(src.resolve()).encode())
    for p in sorted(src.iterdir()):
        if p.name == "config.json" or p.name == INDEX_FILE or p.suffix == ".safetensors":
            st = p.stat()  # follows hub-cache symlinks to the blobs
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _suffix(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else "-" + str(dtype).removeprefix("torch.")


def _quant_suffix(quantize: str | None, group_size: int) -> str:
    return "" if quantize is None else f"-{quantize}" + (f"-g{group_size}" if quantize == "int4" else "")


def _convert_once(src: Path, out: Path, dtype: torch.dtype | None, progress: bool, quantize: str | None = None,
                  group_size: int = DEFAULT_GROUP_SIZE) -> Path:
    if is_llava_next_dir(out):
        return out
    try:
        return convert(src, out, dtype=dtype, progress=progress, quantize=quantize, group_size=group_size)
    except FileExistsError:
        if is_llava_next_dir(out):  # a concurrent run finished first
            return out
        raise


def _did_you_mean(name: str) -> str:
    from llava_next.config.presets import did_you_mean

    return did_you_mean(name, extra=("tiny-random",))  # the built-in model (llava_next.runtime.tiny)


def download(repo_id: str, *, revision: str | None = None, hf_cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub snapshot directory of ``repo_id`` with only the files conversion needs."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=hf_cache_dir,
                                      allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:  # offline, or no network, and not in the Hugging Face cache
        raise HubError(
            f"{repo_id!r} is not in the Hugging Face cache and the hub cannot be reached (HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', '0')}). Download it where there is network "
            f"(`hf download {repo_id} --include 'config.json' '*.safetensors' '*.json' 'tokenizer*'`), "
            f"or pass a local directory{_did_you_mean(repo_id)}") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise HubError(f"{repo_id!r} (revision {revision or 'main'}) was not found on the Hugging Face hub; "
                       f"check the name, or log in (`hf auth login`) if the repo is private or gated"
                       f"{_did_you_mean(repo_id)}") from e


def resolve(model_id_or_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
            dtype: torch.dtype | str | None = None, revision: str | None = None,
            hf_cache_dir: str | os.PathLike | None = None, progress: bool = True,
            quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> Path:
    """The path of a converted llava-next directory for a local directory or a hub id.

    ``dtype`` (e.g. ``torch.bfloat16``) is the dtype of the converted files; it is part of the cache
    key. A directory already in llava-next's layout is returned as is (cast at load time instead).
    ``quantize`` ("int8" / "int4" with ``group_size`` / "nf4"): the converted copy stores the decoder's linears
    quantized (convert.py, quantize.py), made once and cached like a conversion (the method and group
    size are part of the cache key); a llava-next directory is then quantized into the cache too.
    """
    out_dtype = parse_dtype(dtype)
    if quantize is not None:
        QuantConfig(quantize, group_size)  # a bad method or group size fails before any work
    qsuffix = _quant_suffix(quantize, group_size)
    root = cache_root(cache_dir)
    local = Path(model_id_or_dir).expanduser()
    if local.exists():
        if not local.is_dir():
            if local.suffix in PICKLE_SUFFIXES:
                raise HubError(f"{local} is a pickle file: loading a pickle can run arbitrary code, so llava-next "
                               f"never unpickles. Give a checkpoint directory with safetensors weights")
            raise HubError(f"{local} is a file; give the checkpoint directory (config.json beside the weights)")
        if is_llava_next_dir(local) and (quantize is None or _already(local, quantize, group_size)):
            return local
        out = root / "local" / f"{local.name}-{fingerprint(local)}{_suffix(out_dtype)}{qsuffix}"
        return _convert_once(local, out, out_dtype, progress, quantize, group_size)

    repo_id = str(model_id_or_dir)
    if not _HUB_ID.match(repo_id):
        raise HubError(f"{repo_id!r} is neither an existing directory nor a hub id of the form 'org/name'"
                       f"{_did_you_mean(repo_id)}")
    repo_dir = root / repo_id.replace("/", "--")
    try:
        snapshot = download(repo_id, revision=revision, hf_cache_dir=hf_cache_dir)
    except HubError:
        # offline and not in the Hugging Face cache (e.g. deleted after converting): reuse the newest
        # earlier conversion of this repo in the same dtype
        same_dtype = re.compile(r"[^-]+" + re.escape(_suffix(out_dtype) + qsuffix))
        earlier = [p for p in repo_dir.glob("*") if same_dtype.fullmatch(p.name) and is_llava_next_dir(p)]
        if earlier and revision is None:
            return max(earlier, key=lambda p: p.stat().st_mtime)
        raise
    if is_llava_next_dir(snapshot) and (quantize is None or _already(snapshot, quantize, group_size)):
        return snapshot  # a repo published in llava-next's layout
    return _convert_once(snapshot, repo_dir / f"{snapshot.name}{_suffix(out_dtype)}{qsuffix}", out_dtype, progress,
                         quantize, group_size)


def _already(path: Path, quantize: str, group_size: int) -> bool:
    """True when the llava-next directory ``path`` is quantized as asked; False when it is float (it is
    quantized into the cache); an error when it is quantized otherwise."""
    qc = read_quant_config(path)
    if qc is None:
        return False
    if qc != QuantConfig(quantize, group_size, qc.scope):
        raise HubError(f"{path} is already quantized ({qc.method}"
                       f"{f', group_size {qc.group_size}' if qc.method == 'int4' else ''}); it cannot be quantized "
                       f"again to {quantize}: run it without --quantize, or quantize its float source")
    return True
