"""Convert a LLaVA-NeXT checkpoint (llava-hf or original release) into llava-next's own safetensors layout.

    convert("llava-v1.6-mistral-7b-hf/", "llava-v1.6-mistral-7b-llava-next/", dtype=torch.bfloat16)

The output directory holds llava-next's ``config.json`` (``LlavaNextConfig.to_dict()``), sharded
``model-0000i-of-0000N.safetensors`` files with ``model.safetensors.index.json``, a small
``conversion.json`` (where it came from), and the tokenizer / chat-template files copied as they are.

How it works, and the choices made
- **Plan first, from the headers only.** Every source key and shape is read from the safetensors
  headers (no tensor data), renamed through the key tables of ``llava_next/model/keymaps.py`` and checked against
  ``shapes.expected_shapes(config)``: an unmapped source key, a missing or unexpected target key, or
  a wrong shape is an error that names the key(s) — before a byte of data is copied.
- **Stream one tensor at a time.** Each output shard's header is known from the plan, so it is written
  first and the tensors follow one by one (read from the mmapped source, cast if ``dtype`` is given,
  written, dropped). Peak memory is about one tensor, never the model. The writer is the plain
  safetensors format (8-byte header length, JSON header, raw little-endian bytes); the files are read
  back with the ``safetensors`` library itself.
- **Atomic, and clean after a kill.** Everything is written into a staging directory next to
  ``out_dir`` (``.<name>.XXXX.partial/out``, config.json written last) and renamed into place at the
  end, so ``out_dir`` exists only when complete. On an error or Ctrl-C the staging directory is
  removed. A SIGKILL (or power loss) cannot be caught, so the staging directory carries a lock file
  that its process holds (``flock``) until it ends; the next conversion to the same ``out_dir``
  removes staging directories whose lock is free — a dead run's — before it starts. An existing
  ``out_dir`` is refused unless ``overwrite=True``; it is replaced by two renames through the
  staging directory, and a run killed between them gets the old directory back on the next run.
- **Cut-off files** (interrupted downloads) are found from each file's own header before reading
  (``load.check_safetensors``): the error names the file and both sizes.
- **Never unpickles.** ``.bin`` / ``.pt`` / ``.pth`` checkpoints can run code when loaded; they are
  refused with a message saying to get the safetensors files.
- Source dtypes are kept (mixed dtypes stay mixed) unless ``dtype`` is given, which casts floating
  tensors only. The original release's vocabulary (32000 rows, no ``<image>`` row) is kept as is; its
  config gives the media tokens placeholder ids past the vocabulary (image: ``vocab_size``), which the
  model replaces before embedding.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open

from llava_next.config import ConfigError, LlavaNextConfig
from llava_next.model.quant import DEFAULT_GROUP_SIZE, QuantConfig
from llava_next.model.keymaps import Split, UnmappedKeyError, drop_unused_vision_layers, map_key
from llava_next_weights.load import (PICKLE_SUFFIXES, check_safetensors, index_shards, is_llava_next_dir, parse_dtype,
                                     read_config, read_json, safetensors_errors)
from llava_next_weights.quantize import QUANT_FILE, quantized_entries, quantizing_reader, write_quant_file
from llava_next_weights.shapes import Shape, expected_shapes

SOURCE_FORMATS = ("llava_hf", "llava_hf_new", "original")
DEFAULT_SHARD_BYTES = 2 * 2**30
GET_AGAIN = ": get it again"  # a damaged source file: the remedy is downloading it again
INDEX_FILE = "model.safetensors.index.json"
# copied unchanged when present (tokenizer, chat template, generation defaults)
SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "chat_template.json", "chat_template.jinja", "generation_config.json")
# copied too: what the weights are (tiny-random.json marks random weights; its notice follows every copy)
MARKER_FILES = ("tiny-random.json",)

# safetensors dtype names <-> torch dtypes
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# the key that identifies each source format (see keymaps.TABLES)
_FORMAT_MARKERS = {"original": "model.mm_projector.", "llava_hf_new": "model.multi_modal_projector.",
                   "llava_hf": "multi_modal_projector."}


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the key / file and what to do."""


@dataclass(frozen=True)
class Piece:
    """One output tensor and where it comes from (chunk ``part`` of ``parts`` along dim 0 for a Split)."""

    target: str
    source: str
    shape: Shape
    part: int = 0
    parts: int = 1


# --------------------------------------------------------------------------------------------------
# Reading the source: files, config, format
# --------------------------------------------------------------------------------------------------
def source_files(src: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (by its index when there is one)."""
    index = src / INDEX_FILE
    if index.is_file():
        files, missing = index_shards(index, ConversionError, GET_AGAIN)
        if missing:
            raise ConversionError(f"{index} lists shard(s) that are not in {src}: {', '.join(missing)}; "
                                  f"the download is incomplete, fetch the missing files")
        return files
    files = sorted(src.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConversionError(
            f"{src} has only pickle checkpoint files ({', '.join(pickles[:4])}). Loading a pickle can run "
            f"arbitrary code, so llava-next never unpickles. Get the safetensors files of this model instead "
            f"(most hub repos have them: `hf download <repo> --include '*.safetensors' '*.json'`), or convert "
            f"the pickles to safetensors with a tool you trust")
    raise ConversionError(f"no *.safetensors files in {src}")


def read_headers(files: list[Path]) -> dict[str, tuple[Path, Shape, torch.dtype]]:
    """{key: (file, shape, dtype)} from the safetensors headers only (no tensor data is read)."""
    out: dict[str, tuple[Path, Shape, torch.dtype]] = {}
    for path in files:
        check_safetensors(path, ConversionError)
        with safetensors_errors(path, ConversionError), safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in out:
                    raise ConversionError(f"key {key!r} is in two files: {out[key][0].name} and {path.name}")
                s = f.get_slice(key)
                dt = s.get_dtype()
                if dt not in _ST_DTYPES:
                    raise ConversionError(f"{path.name}: {key!r} has dtype {dt}, which llava-next does not read")
                out[key] = (path, tuple(s.get_shape()), _ST_DTYPES[dt])
    return out


def detect_format(raw_config: dict, keys: list[str]) -> str:
    """'llava_hf', 'llava_hf_new' or 'original', from the key names, checked against config.json."""
    if "vision" in raw_config and "text" in raw_config and "model_type" not in raw_config:
        raise ConversionError("this directory is already in llava-next's layout; load it directly (or give a dtype or "
                              "quantize to write a cast or quantized copy)")
    found = [fmt for fmt, marker in _FORMAT_MARKERS.items() if any(k.startswith(marker) for k in keys)]
    if not found and any(k.startswith("projector.") for k in keys):  # llava-next's own key names
        raise ConversionError("the tensors are in llava-next's own layout but config.json is not a llava-next config "
                              "(it needs 'vision' and 'text' objects and no 'model_type'): it is damaged; restore it "
                              "or convert the original checkpoint again")
    if len(found) != 1:
        raise ConversionError(f"cannot tell the checkpoint format from its key names (found markers of "
                              f"{found or 'none'}); pass fmt= one of {list(SOURCE_FORMATS)}")
    fmt = found[0]
    is_original_config = "mm_vision_tower" in raw_config
    if is_original_config != (fmt == "original"):
        raise ConversionError(f"the key names are {fmt!r} but config.json is "
                              f"{'an original LLaVA-NeXT' if is_original_config else 'a llava-hf'} config; "
                              f"the directory mixes two checkpoints")
    return fmt


def read_source_config(raw_config: dict, fmt: str, where: Path | str = "config.json") -> LlavaNextConfig:
    try:
        if fmt == "original":
            return LlavaNextConfig.from_original_config(raw_config)
        return LlavaNextConfig.from_hf_config(raw_config)
    except ConfigError as e:
        raise ConversionError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------------
# The plan: source keys -> llava-next keys, fully checked
# --------------------------------------------------------------------------------------------------
def plan(fmt: str, source_shapes: Mapping[str, Shape], config: LlavaNextConfig) -> list[Piece]:
    """Every output tensor of llava-next's layout, in ``expected_shapes`` order, with its source.

    Pure function of key names and shapes (works on meta tensors / real-size shapes without data).
    Raises ``ConversionError`` naming every unmapped source key, duplicate / unexpected / missing
    target and wrong shape.
    """
    if fmt not in SOURCE_FORMATS:
        raise ConversionError(f"unknown source format {fmt!r}; expected one of {list(SOURCE_FORMATS)}")
    expected = expected_shapes(config)
    pieces: dict[str, Piece] = {}
    unmapped, problems = [], []
    for key, shape in source_shapes.items():
        shape = tuple(shape)
        try:
            target = map_key(fmt, key)
        except UnmappedKeyError:
            unmapped.append(key)
            continue
        if isinstance(target, Split):
            n = len(target.targets)
            if shape[0] % n:
                problems.append(f"{key} {shape}: dim 0 does not split into {n} equal parts")
                continue
            candidates = [Piece(t, key, (shape[0] // n, *shape[1:]), i, n) for i, t in enumerate(target.targets)]
        else:
            candidates = [Piece(target, key, shape)] if target is not None else []
        for p in candidates:
            if drop_unused_vision_layers(p.target, config.vision.layers_used) is None:
                continue  # a vision layer after the feature layer: never computed
            if p.target == "language_model.lm_head.weight" and config.text.tie_word_embeddings:
                continue  # tied (Qwen 0.5B): the output projection is embed_tokens, as transformers ties it
            if p.target in pieces:
                problems.append(f"{p.target} comes from two source keys: {pieces[p.target].source} and {key}")
            elif p.target not in expected:
                problems.append(f"{key} -> {p.target} is not part of llava-next's layout for this config")
            elif p.shape != expected[p.target]:
                problems.append(f"{key} -> {p.target}: source shape {p.shape}, expected {expected[p.target]} "
                                f"from config.json")
            else:
                pieces[p.target] = p
    if unmapped:
        more = f", ... ({len(unmapped) - 10} more)" if len(unmapped) > 10 else ""
        problems.insert(0, f"{len(unmapped)} source key(s) not in the {fmt!r} key table (refusing to guess "
                           f"what they are): {', '.join(unmapped[:10])}{more}")
    missing = [k for k in expected if k not in pieces]
    if missing:
        more = f", ... ({len(missing) - 10} more)" if len(missing) > 10 else ""
        problems.append(f"{len(missing)} llava-next key(s) have no source tensor: {', '.join(missing[:10])}{more}")
    if any("expected" in p and "from config.json" in p for p in problems):
        problems.append("the expected shapes come from config.json: if it was edited or belongs to another model, "
                        "restore the config.json these weights came with")
    if problems:
        raise ConversionError(f"cannot convert this {fmt!r} checkpoint:\n  " + "\n  ".join(problems))
    return [pieces[k] for k in expected]


def plan_identity(source_shapes: Mapping[str, Shape], config: LlavaNextConfig) -> list[Piece]:
    """The plan for a source already in llava-next's layout (to quantize it): every key kept, checked
    against ``expected_shapes`` like ``plan``."""
    expected = expected_shapes(config)
    problems = [f"{k}: unexpected key" for k in source_shapes if k not in expected]
    problems += [f"{k}: missing" for k in expected if k not in source_shapes]
    problems += [f"{k}: shape {tuple(source_shapes[k])}, expected {expected[k]} from config.json"
                 for k in expected if k in source_shapes and tuple(source_shapes[k]) != expected[k]]
    if problems:
        raise ConversionError("cannot quantize this llava-next directory:\n  " + "\n  ".join(problems[:20]))
    return [Piece(k, k, expected[k]) for k in expected]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _write_tensor(f, tensor: torch.Tensor) -> None:
    """Append one tensor's raw bytes (C order, little-endian) to an open shard file."""
    f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_shard(path: Path, entries: list[tuple[str, Shape, torch.dtype]],
                 read: Callable[[str], torch.Tensor], advance: Callable[[int], None]) -> None:
    """A safetensors file: u64 header length, JSON header (offsets planned up front), then the data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)  # the data starts 64-byte aligned in the (page-aligned) mmap
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            t = read(name)
            assert tuple(t.shape) == shape and t.dtype == dtype, (name, t.shape, shape, t.dtype, dtype)
            _write_tensor(f, t)
            advance(t.numel() * dtype.itemsize)


def _shards(entries: list[tuple[str, Shape, torch.dtype]], shard_bytes: int) -> list[list[tuple[str, Shape, torch.dtype]]]:
    """Greedy split in order; inside a shard, wider dtypes first so every tensor stays aligned."""
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nbytes = torch.Size(e[1]).numel() * e[2].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    # integer (quantized) weights whose sizes are multiples of 64 bytes go first: they stay 64-byte aligned
    # in the mmap, which torch's int8 kernel needs (quant.py); the rest keeps its natural alignment after them
    def order(e):
        nbytes = torch.Size(e[1]).numel() * e[2].itemsize
        return (0 if not e[2].is_floating_point and nbytes % 64 == 0 else 1, -e[2].itemsize)

    return [sorted(s, key=order) for s in shards]


def _progress(total: int, enabled: bool):
    """A bar on a terminal (tqdm); elsewhere (a pipe, a log file) whole lines, at most one a second, the last
    one the complete count."""
    if not sys.stderr.isatty():
        return _LineProgress(total, enabled)
    from tqdm import tqdm  # a dependency of huggingface-hub

    return tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not enabled, file=sys.stderr)


class _LineProgress:
    """Whole lines on stderr, at most one a second per update, the last one the complete count: the lines
    ``runtime.progress.Progress`` writes off a terminal (``[llava-next] converting: ...``), written here
    because the weights package sits below runtime and does not import it (docs/architecture.md)."""

    interval = 1.0

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.enabled = enabled
        self._last, self._shown = -1e9, None  # when the last line was written, and what it said

    def __enter__(self) -> "_LineProgress":
        return self

    def update(self, n: int) -> None:
        self.done += n
        self._show(self._line(), final=self.done >= self.total)

    def _show(self, message: str, *, final: bool) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self._last < self.interval:
            return
        if final and self._shown == message:  # already the last line written
            self._last, self._shown = -1e9, None
            return
        self._last, self._shown = now, message
        print(f"[llava-next] converting: {message}", file=sys.stderr, flush=True)
        if final:
            self._last, self._shown = -1e9, None

    def _line(self) -> str:
        return (f"{self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB ({100 * self.done // max(self.total, 1)}%), "
                f"{time.perf_counter() - self.t0:.1f} s")

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None and self.done < self.total:  # never end on a partial count
            self.done = self.total
            self._show(self._line(), final=True)


# --------------------------------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------------------------------
def convert(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str | None = None,
            dtype: torch.dtype | str | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False, progress: bool = True, quantize: str | None = None,
            group_size: int = DEFAULT_GROUP_SIZE) -> Path:
    """Convert ``src_dir`` (llava-hf or original LLaVA-NeXT) into llava-next's layout at ``out_dir``.

    ``fmt`` is detected from the key names when None; ``dtype`` casts floating tensors (None keeps the
    source dtypes). ``quantize`` ("int8" / "int4", with ``group_size`` / "nf4") stores the decoder's linear
    weights quantized (quantize.py); then ``src_dir`` may also be a (float) llava-next directory.
    Returns ``out_dir``.
    """
    src, out = Path(src_dir), Path(out_dir)
    out_dtype = parse_dtype(dtype)
    qc = None if quantize is None else QuantConfig(quantize, group_size)
    if shard_bytes <= 0:
        raise ConversionError(f"shard_bytes must be positive, got {shard_bytes}")
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory")
    if out.resolve() == src.resolve():
        raise ConversionError(f"out_dir is the source directory {src}; write the conversion somewhere else")
    _remove_dead_stagings(out)  # first: a killed overwrite may put the old out_dir back
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    if not (src / "config.json").is_file():
        raise ConversionError(f"no config.json in {src}; the model's config.json must sit beside its weights")
    raw_config = read_json(src / "config.json", ConversionError, GET_AGAIN)

    # ---- plan from the headers: every check happens here, before any data is copied
    headers = read_headers(source_files(src))
    if (qc is not None or out_dtype is not None) and is_llava_next_dir(src):  # a quantized or cast copy
        fmt, config = "llava_next", read_config(src)
        if (src / QUANT_FILE).is_file():
            raise ConversionError(f"{src} is already quantized ({src / QUANT_FILE}); "
                                  f"{'quantize' if qc is not None else 'cast'} its float source")
        pieces = plan_identity({k: shape for k, (_, shape, _) in headers.items()}, config)
    else:
        try:
            fmt = fmt or detect_format(raw_config, list(headers))
        except ConversionError as e:
            raise ConversionError(f"{src}: {e}") from None
        config = read_source_config(raw_config, fmt, src / "config.json")
        try:
            pieces = plan(fmt, {k: shape for k, (_, shape, _) in headers.items()}, config)
        except ConversionError as e:  # name the directory: the problems below name only keys
            raise ConversionError(f"{src}: {e}") from None

    integer = [f"{p.source} ({_ST_NAMES[headers[p.source][2]]}, in {headers[p.source][0].name})" for p in pieces
               if not headers[p.source][2].is_floating_point]
    if integer:  # every LLaVA-NeXT weight is floating point (found by fuzzing: a flipped dtype loaded as U32)
        raise ConversionError(f"{src}: {len(integer)} weight(s) are stored as integers: {', '.join(integer[:5])}; "
                              f"LLaVA-NeXT weights are floating point, so the file is damaged: get it again")

    def out_dtype_of(p: Piece) -> torch.dtype:
        src_dtype = headers[p.source][2]
        return out_dtype if out_dtype is not None and src_dtype.is_floating_point else src_dtype

    by_target = {p.target: p for p in pieces}
    entries = [(p.target, p.shape, out_dtype_of(p)) for p in pieces]
    if qc is not None:  # each quantized weight becomes its integer weight + scales (+ zeros)
        entries = quantized_entries(entries, config, qc)
    shards = _shards(entries, shard_bytes)
    total = sum(torch.Size(s).numel() * d.itemsize for shard in shards for _, s, d in shard)

    # ---- write into a staging directory next to out_dir, then rename it into place
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    new = stage / "out"
    try:
        with open(stage / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held until this process ends, however it ends
            new.mkdir()
            with ExitStack() as stack, _progress(total, progress) as bar:
                handles: dict[Path, object] = {}

                def read(target: str) -> torch.Tensor:
                    p = by_target[target]
                    path = headers[p.source][0]
                    with safetensors_errors(path, ConversionError):
                        if path not in handles:
                            handles[path] = stack.enter_context(safe_open(path, framework="pt"))
                        t = handles[path].get_tensor(p.source)  # backed by the mmapped file, no copy
                    if p.parts > 1:
                        t = t.chunk(p.parts, dim=0)[p.part]
                    return t.to(out_dtype_of(p))  # a no-op unless casting

                if qc is not None:
                    read = quantizing_reader(read, config, qc)
                weight_map = {}
                for i, shard in enumerate(shards, 1):
                    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    _write_shard(new / name, shard, read, bar.update)
                    weight_map.update({key: name for key, _, _ in shard})
            index = {"metadata": {"total_size": total},
                     "weight_map": {key: weight_map[key] for key, _, _ in entries}}
            (new / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            (new / "conversion.json").write_text(json.dumps(
                {"source": str(src.resolve()), "source_format": fmt,
                 "dtype": None if out_dtype is None else str(out_dtype).removeprefix("torch."),
                 "tensors": len(entries), "bytes": total,
                 "quantization": None if qc is None else qc.to_dict()}, indent=2) + "\n")
            if qc is not None:
                write_quant_file(new, qc)
            for side in (*SIDE_FILES, *MARKER_FILES):
                if (src / side).is_file():
                    shutil.copyfile(src / side, new / side)
            (new / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")  # last
            _move_into_place(new, out, stage, overwrite)
    finally:  # also on KeyboardInterrupt: never leave a half-written directory behind
        shutil.rmtree(stage, ignore_errors=True)
    return out


def _move_into_place(new: Path, out: Path, stage: Path, overwrite: bool) -> None:
    if not out.exists():
        try:
            os.rename(new, out)
            return
        except OSError:
            if not out.exists():
                raise
    if not overwrite:  # another process finished the same conversion meanwhile
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    os.rename(out, stage / "old")  # killed right after this: the next run puts it back
    os.rename(new, out)


def _remove_dead_stagings(out: Path, min_age_s: float = 10.0) -> None:
    """Remove staging directories of ``out`` left by conversions that were killed.

    A staging directory is dead when its lock can be taken (its process is gone) and its lock file is
    older than ``min_age_s`` (so a run that has just created it, and not yet locked it, is left alone).
    An ``old`` directory inside (killed between the two renames of an overwrite) goes back to ``out``.
    """
    for stage in map(Path, glob.glob(os.path.join(glob.escape(str(out.parent)), f".{glob.escape(out.name)}.*.partial"))):
        lock_file = stage / ".lock"
        try:
            if time.time() - (lock_file if lock_file.exists() else stage).stat().st_mtime < min_age_s:
                continue
            if not lock_file.exists():  # killed before it took its lock
                shutil.rmtree(stage, ignore_errors=True)
                continue
            with open(lock_file, "r+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if its process is alive
                if (stage / "old").is_dir() and not out.exists():
                    os.rename(stage / "old", out)
                shutil.rmtree(stage, ignore_errors=True)
        except OSError:  # locked (alive), or already removed by another run
            continue
