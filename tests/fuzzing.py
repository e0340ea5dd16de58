"""Seeded mutation fuzzing of every input parser, through the real entry points (issue 16).

    python benchmarks/fuzz.py --cases 5000            # the long run (counts per outcome per parser)
    tests/test_fuzz.py                                 # a fixed-seed bounded run + the regression tests

What is fuzzed (``TARGETS``; each is one parser, fed a mutated copy of a real seed file)

| target | seed files | mutated | entry point (in-process) | CLI sample |
|---|---|---|---|---|
| image | photos from scikit-image (PNG, JPEG, GIF, TIFF) + WebP/BMP re-saves | the file | ``preprocess_image`` | ``inspect --image F --png OUT`` |
| video | bigbuckbunny.mp4, a short re-encode (MP4/H.264) and an MJPEG AVI | the file | ``load_video`` | ``inspect --video F --png OUT`` |
| hf-safetensors / hf-config | a tiny llava-hf checkpoint (``tests/checkpoints.py``) | model.safetensors / config.json | ``convert`` | ``convert SRC OUT`` |
| orig-safetensors / orig-config | the same weights in the original release format | model.safetensors / config.json | ``convert`` | ``convert SRC OUT`` |
| converted-safetensors / -index / -config | the tiny model converted by llava-next | shard / index / config.json | ``Pipeline.from_pretrained`` + ``prepare`` + 2 tokens | ``run --model DIR`` |
| tokenizer-json / tokenizer-config | its tokenizer.json / tokenizer_config.json | that file | the same | ``run --model DIR`` |
| onevision-safetensors / -config, qwen-tokenizer | a tiny SigLIP + Qwen2 LLaVA-OneVision checkpoint (``tests/checkpoints_qwen.py``) | model.safetensors / config.json / tokenizer.json | the same (converted into the case's cache first) | ``run --model DIR`` |
| quant-safetensors / quant-json (once ``llava_next_weights.quantize`` exists) | int8 / int4 conversions of the tiny model | shard / quantization.json | the same | ``run --model DIR`` |
| batch-jsonl (once ``llava_next.runtime.batch`` exists) | a jobs.jsonl naming the seed media | one line (structure-aware) or bytes | ``run_batch`` (records checked) | ``batch --inputs F --out O`` |

Mutations (all drawn from ``random.Random(f"{seed}:{target}:{index}")``, so a case is recreated from its
three numbers): byte level — bit flips (half of them in the first 4 KiB, where headers are), splices
(a chunk of the file or random bytes inserted or written over), zeroed runs, truncation; JSON — wrong
types, missing and extra fields, misspelt keys, huge / negative / non-finite numbers, 10^5-deep nesting,
huge strings; safetensors headers — the ``dtype`` / ``shape`` / ``data_offsets`` fields misspelt ("Vtype")
or given wrong values, 10^12-element shapes (also with offsets that agree, so only the file size
contradicts them), overlapping / shifted offsets, bad ``__metadata__``, a header length that lies.

Outcomes (``classify``). Acceptable: ``ok`` (success, with complete outputs) or ``error`` (a documented
error: ValueError / OSError / HubError whose message names the file or its directory). Failures:
``internal`` (any other exception: a traceback), ``unnamed`` (a documented class whose message names no
file), ``partial`` (an output directory or file left after an error, or an incomplete one after
success), ``memory`` (peak RSS grew by more than ``RSS_BOUND`` during the case), ``hang`` (no answer
within the timeout), ``signal`` (the process died). The CLI sample adds ``cli-ok`` / ``cli-error``
(exit 2, no traceback, the error line ``llava-next CMD: error: ...`` names the file) and the same
failures prefixed ``cli-``.

How cases run: in-process cases go to worker processes (``python tests/fuzzing.py worker``) that import
everything once and answer one JSON line per case; the parent enforces the per-case timeout (a hang
kills and replaces the worker) and notices a worker that dies (a signal). Each worker resets its peak
RSS (``/proc/self/clear_refs``) before a case and reports the growth; its address space for data is
capped (``RLIMIT_DATA``) so a missed 10^12-element allocation fails instead of taking the machine.

Adding a parser (e.g. batch-input .jsonl lines, quantized checkpoints): build its seed in
``build_seeds``, write ``api_NAME(case) -> None`` (raise on a bad input, check outputs) and
``cli_NAME(case) -> (argv, output path or None)``, and add a ``Target`` to ``TARGETS``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RSS_BOUND = 1 << 30  # bytes of peak-RSS growth one case may cause (tiny inputs need ~100 MB)
DATA_LIMIT = 6 << 30  # RLIMIT_DATA of a worker: a runaway allocation fails instead of swapping the machine
CASE_TIMEOUT = 60.0  # s per in-process case (bigbuckbunny decodes in ~1.5 s on an idle core)
CLI_TIMEOUT = 600.0  # s per CLI case: a hang guard (a cold python + torch import is ~5 s, far more on a busy machine)
SEED_VERSION = "3"  # bump when build_seeds changes
# parsers that other branches add: fuzzed as soon as their code is in this tree
HAS_QUANT = (ROOT / "weights" / "llava_next_weights" / "quantize.py").exists()
HAS_BATCH = (ROOT / "llava_next" / "runtime" / "batch.py").exists()


# ==================================================================================================
# Mutators: (rng, data) -> (data, description)
# ==================================================================================================
def bit_flips(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "bit_flips (empty)"
    out = bytearray(data)
    n = rng.choice((1, 1, 2, 3, 8, 32))
    limit = min(len(out), 4096) if rng.random() < 0.5 else len(out)
    where = sorted(rng.randrange(limit) for _ in range(n))
    for p in where:
        out[p] ^= 1 << rng.randrange(8)
    return bytes(out), f"bit_flips n={n} at {where[:6]}{'...' if n > 6 else ''}"


def splice(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    length = rng.choice((1, 4, 16, 256, 4096))
    if data and rng.random() < 0.6:
        src = rng.randrange(len(data))
        chunk, what = data[src:src + length], f"file[{src}:+{length}]"
    else:
        chunk, what = bytes(rng.randrange(256) for _ in range(length)), f"{length} random bytes"
    dst = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        return data[:dst] + chunk + data[dst:], f"splice insert {what} at {dst}"
    return data[:dst] + chunk + data[dst + len(chunk):], f"splice overwrite {what} at {dst}"


def zero_run(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "zero_run (empty)"
    pos = rng.randrange(min(len(data), 4096)) if rng.random() < 0.4 else rng.randrange(len(data))
    n = rng.choice((1, 8, 64, 512, 4096, 65536))
    return data[:pos] + bytes(min(n, len(data) - pos)) + data[pos + n:], f"zero_run {n} at {pos}"


def truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    cut = rng.randrange(min(len(data), 1024) + 1) if rng.random() < 0.3 else rng.randrange(len(data) + 1)
    return data[:cut], f"truncate to {cut} of {len(data)} bytes"


BYTE_MUTATORS = (bit_flips, splice, zero_run, truncate)


# ---- JSON, structure-aware ----------------------------------------------------------------------
_DEEP = "\u0000DEEP\u0000"  # replaced by a textual nesting after json.dumps (which would recurse)
WRONG_VALUES = (None, True, False, 0, -1, 1.5, "", "x", "1", [], {}, [1, 2], {"a": 1}, "Infinity")
HUGE_NUMBERS = (10**12, 2**31, 2**63, 2**64 + 1, -(2**63), 10**100, 1e308, -1, 0, 1e-300,
                float("inf"), float("-inf"), float("nan"))


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _misspell(rng: random.Random, key: str) -> str:
    if not key:
        return "x"
    i = rng.randrange(len(key))
    op = rng.randrange(3)
    if op == 0:  # replace one letter (dtype -> Vtype)
        c = rng.choice("VxZ_0aeE")
        return key[:i] + (c if c != key[i] else "Q") + key[i + 1:]
    if op == 1:  # drop one
        return key[:i] + key[i + 1:] or "x"
    return key[:i] + key[i].swapcase() + key[i + 1:] if key[i].isalpha() else key + "_"


def mutate_json(rng: random.Random, obj) -> tuple[object, str, int]:
    """One structure-aware change to a parsed JSON value; returns (value, description, nesting depth)."""
    paths = list(_paths(obj))
    inner = [p for p in paths if p] or [()]
    op = rng.choice(("wrong_type", "wrong_type", "drop", "extra", "huge", "huge", "misspell", "deep", "string"))
    numbers = [p for p in inner if p and isinstance(_get(obj, p), (int, float)) and not isinstance(_get(obj, p), bool)]
    if op == "huge" and numbers:
        path = rng.choice(numbers)
    elif op in ("extra",):
        dicts = [p for p in paths if isinstance(_get(obj, p), dict)]
        path = rng.choice(dicts) if dicts else ()
    elif op == "misspell":
        keyed = [p for p in inner if p and isinstance(p[-1], str)]
        path = rng.choice(keyed) if keyed else rng.choice(inner)
    else:
        path = rng.choice(inner)
    depth = 0
    if not path:  # the whole document
        value = copy.deepcopy(rng.choice(([], "x", 1, None, [obj])))
        return value, f"json root -> {json.dumps(value)[:40]}", 0
    parent, key = _get(obj, path[:-1]), path[-1]
    where = "/".join(map(str, path))
    if op == "wrong_type":
        value = copy.deepcopy(rng.choice(WRONG_VALUES))  # a copy: later changes must not reach the constant
        parent[key] = value
        return obj, f"json wrong_type {where} = {json.dumps(value)}", 0
    if op == "drop":
        del parent[key]
        return obj, f"json drop {where}", 0
    if op == "extra":
        target = _get(obj, path)
        name = rng.choice(("extra_field", "", "__metadata__", "model_type", "dtype", "text_config", "0"))
        target[name] = copy.deepcopy(rng.choice(WRONG_VALUES + (10**12,)))
        return obj, f"json extra {where}/{name}", 0
    if op == "huge":
        value = rng.choice(HUGE_NUMBERS)
        parent[key] = value
        return obj, f"json huge {where} = {value!r}", 0
    if op == "misspell" and isinstance(key, str):
        new = _misspell(rng, key)
        items = list(parent.items())
        parent.clear()
        parent.update((new if k == key else k, v) for k, v in items)
        return obj, f"json misspell {where} -> {new!r}", 0
    if op == "deep":
        depth = rng.choice((100, 2000, 100_000))
        parent[key] = _DEEP
        return obj, f"json deep {where} nesting {depth}", depth
    value = rng.choice(("", "\u0000", "é" * 3, "x" * 1_000_000, "<image>" * 1000, "../" * 50))
    parent[key] = value
    return obj, f"json string {where} = {value[:12]!r} ({len(value)} chars)", 0


def dump_json(obj, depth: int = 0) -> bytes:
    text = json.dumps(obj, allow_nan=True)
    if depth:
        text = text.replace(json.dumps(_DEEP), "[" * depth + "]" * depth, 1)
    return text.encode()


def json_file_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Mostly structure-aware JSON changes (1-3), sometimes raw bytes on top or instead."""
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if obj is None or rng.random() < 0.25:
        m = rng.choice(BYTE_MUTATORS)
        return m(rng, data)
    notes, depth = [], 0
    for _ in range(rng.choice((1, 1, 2, 3))):
        obj, note, d = mutate_json(rng, obj)
        notes.append(note)
        depth = depth or d
    return dump_json(obj, depth), "; ".join(notes)


# ---- safetensors headers ------------------------------------------------------------------------
ST_DTYPES = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32",
             "F32", "C64", "F64", "I64", "U64", "F4", "F6_E2M3")


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict, body: bytes, length: int | None = None) -> bytes:
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob) if length is None else length) + blob + body


def mutate_header(rng: random.Random, header: dict) -> tuple[dict, str, int | None]:
    """One change to a parsed safetensors header; returns (header, description, forced length or None)."""
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice(("field_misspell", "dtype", "shape", "huge_shape", "offsets", "metadata", "drop", "duplicate",
                     "rename", "length"))
    if op == "field_misspell":
        fieldname = rng.choice(("dtype", "shape", "data_offsets"))
        new = "Vtype" if fieldname == "dtype" and rng.random() < 0.5 else _misspell(rng, fieldname)
        entry[new] = entry.pop(fieldname)
        return header, f"header {name}: field {fieldname!r} -> {new!r}", None
    if op == "dtype":
        value = rng.choice(ST_DTYPES + ("float32", "", "Vtype", 3, None, ["F32"]))
        entry["dtype"] = value
        return header, f"header {name}: dtype = {value!r}", None
    if op == "shape":
        shape = entry["shape"]
        value = rng.choice(([10**6, 10**6], [10**12], [-1] + shape[1:], [2.5], ["4"], [], [0], [2**64], [1] * 64,
                            shape + [1], shape[:-1], shape[::-1], None, "4x4", [2**63, 2**63]))
        entry["shape"] = value
        return header, f"header {name}: shape = {value!r}", None
    if op == "huge_shape":  # a self-consistent header for a 10^12-element tensor: only the file size contradicts it
        name = max(names, key=lambda k: header[k]["data_offsets"])  # the last tensor: the others stay consistent
        entry = header[name]
        itemsize = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}.get(entry.get("dtype"), 4)
        begin = entry["data_offsets"][0]
        entry["shape"] = [10**6, 10**6]
        entry["data_offsets"] = [begin, begin + 10**12 * itemsize]
        return header, f"header {name}: shape [10**6, 10**6] with matching data_offsets", None
    if op == "offsets":
        b, e = entry["data_offsets"]
        value = rng.choice(([e, b], [b + 1, e + 1], [b, e + 4], [b - 4, e - 4], [b, 2**64], [-8, e], [b], [b, e, e],
                            ["0", e], [b, e * 1000], [0, e - b]))
        entry["data_offsets"] = value
        return header, f"header {name}: data_offsets = {value!r}", None
    if op == "metadata":
        value = rng.choice(({"format": 1}, [], "pt", {"format": {"a": "b"}}, None, {"": ""}))
        header["__metadata__"] = value
        return header, f"header __metadata__ = {value!r}", None
    if op == "drop":
        del header[name]
        return header, f"header drop {name}", None
    if op == "duplicate":
        header[name + ".copy"] = dict(entry)
        return header, f"header duplicate {name} (overlapping offsets)", None
    if op == "rename":
        new = _misspell(rng, name)
        header[new] = header.pop(name)
        return header, f"header rename {name} -> {new}", None
    length = rng.choice((0, 1, 7, 2**63, 2**64 - 1, 100_000_001))
    return header, f"header length field = {length}", length


def safetensors_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Header-aware changes half the time (the header re-serialized consistently unless the length is
    the mutation), otherwise generic JSON changes to the header or raw bytes."""
    r = rng.random()
    if r < 0.5:
        header, body = split_safetensors(data)
        header, note, length = mutate_header(rng, header)
        return join_safetensors(header, body, length), note
    if r < 0.6:
        header, body = split_safetensors(data)
        header, note, depth = mutate_json(rng, header)
        blob = dump_json(header, depth)
        return struct.pack("<Q", len(blob)) + blob + body, "header " + note
    return rng.choice(BYTE_MUTATORS)(rng, data)


def byte_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    out, notes = data, []
    for _ in range(rng.choice((1, 1, 1, 2))):
        out, note = rng.choice(BYTE_MUTATORS)(rng, out)
        notes.append(note)
    return out, "; ".join(notes)


# ==================================================================================================
# Seeds: real files, built once per machine
# ==================================================================================================
def seed_root() -> Path:
    """$LLAVA_NEXT_FUZZ_SEEDS, or a directory in /tmp keyed by the code that builds the seeds (a change to
    the checkpoint builders or the converter builds them anew instead of fuzzing stale files)."""
    import hashlib

    h = hashlib.sha256(SEED_VERSION.encode())
    for f in (TESTS / "checkpoints.py", TESTS / "checkpoints_qwen.py", TESTS / "tokenizers_fixture.py", TESTS / "media.py",
              ROOT / "weights" / "llava_next_weights" / "convert.py", ROOT / "llava_next" / "model" / "keymaps.py",
              ROOT / "weights" / "llava_next_weights" / "quantize.py", ROOT / "llava_next" / "runtime" / "batch.py"):
        h.update(f.read_bytes() if f.exists() else b"")
    return Path(os.environ.get("LLAVA_NEXT_FUZZ_SEEDS") or
                Path(tempfile.gettempdir()) / f"llava_next_fuzz_seeds_{h.hexdigest()[:12]}")


def build_seeds(root: Path | None = None) -> Path:
    """Seed files under ``root`` (default ``seed_root()``): built once (atomically), then reused."""
    root = root or seed_root()
    if (root / "DONE").exists():
        return root
    import conftest  # noqa: F401  (environment for transformers, which builds the checkpoints)
    from PIL import Image

    import media
    from checkpoints import make_original_checkpoint, make_runnable_checkpoint
    from llava_next_weights.convert import convert

    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    images = tmp / "images"
    images.mkdir()
    for name in ("chelsea", "rocket", "hubble_deep_field", "logo", "camera"):
        src = media.real_photo(name)
        shutil.copy(src, images / src.name)
    data = media._skimage_data()
    shutil.copy(data / "no_time_for_that_tiny.gif", images / "no_time_for_that_tiny.gif")  # animated
    with Image.open(media.real_photo("coffee")) as im:
        small = im.convert("RGB").resize((150, 100))
        small.save(images / "coffee.webp", quality=80)
        small.save(images / "coffee.bmp")
        small.save(images / "coffee.tif", compression="tiff_lzw")
    videos = tmp / "videos"
    videos.mkdir()
    shutil.copy(media.real_video(), videos / "bigbuckbunny.mp4")
    _reencode(media.real_video(), videos / "bunny_short.mp4", frames=12, size_hw=(90, 160))
    media.make_video(videos / "pan.avi", frames=10, size_hw=(48, 64), fps=10, codec="mjpeg", photo="chelsea")
    hf, _ = make_runnable_checkpoint(tmp / "ckpt-hf", kind="video")
    make_original_checkpoint(tmp / "ckpt-orig", hf)
    for side in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf / side, tmp / "ckpt-orig" / side)
    convert(hf, tmp / "ckpt-converted", progress=False)
    from checkpoints_qwen import make_onevision_checkpoint  # SigLIP + Qwen2 (LLaVA-OneVision), llava-hf files

    make_onevision_checkpoint(tmp / "ckpt-onevision", "anyres_max_9")
    if HAS_QUANT:  # quantized checkpoints (llava_next_weights.quantize), when this tree has them
        for method in ("int8", "int4"):
            convert(hf, tmp / f"ckpt-{method}", dtype="bf16", quantize=method, group_size=32, progress=False)
    if HAS_BATCH:  # a batch-input file (llava_next.runtime.batch) naming the seed media, read-only
        jobs = [{"id": "image", "prompt": "What is this?", "images": [str(root / "images/chelsea.png")]},
                {"id": "text", "prompt": "Hello", "max_new_tokens": 2},
                {"id": "video", "prompt": "What happens?", "video": str(root / "videos/pan.avi"), "frames": 2},
                {"id": "sampled", "prompt": "Go on", "temperature": 0.5, "seed": 1, "top_p": 0.9}]
        (tmp / "batch").mkdir()
        (tmp / "batch" / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    (tmp / "DONE").write_text("ok\n")
    try:
        os.rename(tmp, root)
    except OSError:  # built concurrently by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _reencode(src: Path, dst: Path, frames: int, size_hw: tuple[int, int]) -> None:
    """The first ``frames`` frames of ``src`` scaled to ``size_hw`` as H.264 MP4 (a short real clip)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.height, stream.width = size_hw
        stream.pix_fmt = "yuv420p"
        for i, frame in enumerate(inp.decode(video=0)):
            if i == frames:
                break
            img = frame.to_image().resize(size_hw[::-1])
            new = av.VideoFrame.from_image(img)
            new.pts = i
            out.mux(stream.encode(new))
        out.mux(stream.encode())


# ==================================================================================================
# Targets: seed -> mutated case -> entry point
# ==================================================================================================
@dataclass
class Case:
    target: str
    index: int
    seed: int
    input: Path  # what the entry point is given (a file or a checkpoint directory)
    mutated: Path  # the file that was mutated
    work: Path  # scratch directory for outputs
    mutation: str


@dataclass(frozen=True)
class Target:
    name: str
    seeds: tuple[str, ...]  # paths under the seed root: a file, or "DIR:FILE" (copy DIR, mutate FILE)
    mutate: Callable[[random.Random, bytes], tuple[bytes, str]]
    api: Callable[[Case], None]
    cli: Callable[[Case], tuple[list[str], Path | None]]
    weights: tuple[float, ...] = ()  # relative frequency of each seed (default equal)


def make_case(target: Target, seed: int, index: int, root: Path, work: Path, *, spec: str | None = None,
              mutate: Callable[[random.Random, bytes], tuple[bytes, str]] | None = None) -> Case:
    """Recreate case ``index`` of ``target`` under ``work`` (deterministic in (seed, target, index)).
    ``spec`` picks the seed file, ``mutate`` replaces the target's mutator (regression tests)."""
    rng = random.Random(f"{seed}:{target.name}:{index}")
    spec = spec or rng.choices(target.seeds, weights=target.weights or None)[0]
    work.mkdir(parents=True, exist_ok=True)
    if ":" in spec:
        directory, name = spec.split(":")
        case_dir = work / f"fz-{directory}"
        shutil.copytree(root / directory, case_dir)
        inp, mutated = case_dir, case_dir / name
    else:
        inp = mutated = work / f"fz-{Path(spec).name}"
        shutil.copy(root / spec, mutated)
    data, note = (mutate or target.mutate)(rng, mutated.read_bytes())
    mutated.write_bytes(data)
    return Case(target.name, index, seed, inp, mutated, work, f"{spec}: {note}")


_TINY = {}


def _tiny_config(kind: str):
    if kind not in _TINY:
        from checkpoints import tiny_config

        _TINY[kind] = tiny_config(kind)
    return _TINY[kind]


def api_image(case: Case) -> None:
    from llava_next.inputs.image import preprocess_image

    preprocess_image(str(case.input), _tiny_config("image"))


def api_video(case: Case) -> None:
    from llava_next.inputs.video import load_video

    rng = random.Random(case.index)
    load_video(str(case.input), rng.choice((1, 4, 8)), sampling=rng.choice(("uniform", "fps")), size=56)


def _no_partial_conversion(out: Path) -> None:
    stagings = list(out.parent.glob(f".{out.name}.*.partial"))
    if stagings:
        raise PartialOutput(f"staging directory left behind: {stagings}")


def api_convert(case: Case) -> None:
    from llava_next_weights.convert import convert
    from llava_next_weights.load import load_state_dict_mmap, read_config

    out = case.work / "out"
    try:
        convert(case.input, out, progress=False)
    except BaseException:
        if out.exists():
            raise PartialOutput(f"{out} exists after a failed conversion") from None
        _no_partial_conversion(out)
        raise
    _no_partial_conversion(out)
    read_config(out)  # complete: its config and every tensor read back
    load_state_dict_mmap(out)


def api_pipeline(case: Case) -> None:
    import torch

    from llava_next.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(case.input, dtype=torch.float32, cache_dir=case.work / "cache", progress=False)
    request = pipe.prepare("What is in this video? Café 猫", max_new_tokens=2)
    pipe.generate(request, max_new_tokens=2)


def cli_inspect_image(case: Case):
    out = case.work / "plan.png"
    return ["inspect", "--image", str(case.input), "--png", str(out)], out


def cli_inspect_video(case: Case):
    out = case.work / "plan.png"
    return ["inspect", "--video", str(case.input), "--frames", "4", "--png", str(out)], out


def cli_convert(case: Case):
    out = case.work / "out"
    return ["convert", str(case.input), str(out)], out


def cli_run(case: Case):
    return ["run", "--model", str(case.input), "--dtype", "fp32", "--max-new-tokens", "2",
            "--cache-dir", str(case.work / "cache"), "What is in this video?"], None


def jsonl_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """A batch-input file: one line changed structure-aware (or replaced, duplicated, dropped), else bytes."""
    lines = data.split(b"\n")
    full = [i for i, line in enumerate(lines) if line.strip()]
    r = rng.random()
    if r < 0.25 or not full:
        return byte_mutation(rng, data)
    i = rng.choice(full)
    if r < 0.35:
        j = rng.choice(full)
        lines.insert(j, lines[i])
        return b"\n".join(lines), f"jsonl line {i + 1} duplicated before line {j + 1}"
    if r < 0.4:
        del lines[i]
        return b"\n".join(lines), f"jsonl drop line {i + 1}"
    new, note = json_file_mutation(rng, lines[i])
    lines[i] = new.replace(b"\n", b" ") if rng.random() < 0.9 else new
    return b"\n".join(lines), f"jsonl line {i + 1}: {note}"


def api_batch(case: Case) -> None:
    """``run_batch`` over the mutated inputs with the seed's converted model; every output line must be a
    JSON record with an id, written once (a bad item is an error record, not an exception)."""
    import torch

    from llava_next.runtime.batch import Defaults, run_batch
    from llava_next.runtime.pipeline import Pipeline

    out = case.work / "results.jsonl"
    model = seed_root() / "ckpt-converted"
    try:
        run_batch(lambda: Pipeline.from_pretrained(model, dtype=torch.float32, progress=False), case.input, out,
                  defaults=Defaults(max_new_tokens=2), progress=None)
    except BaseException:
        if out.exists() and out.stat().st_size:
            raise PartialOutput(f"{out} written by a batch that failed before running") from None
        raise
    ids = []
    for line in out.read_text().splitlines() if out.exists() else []:
        record = json.loads(line)
        if not isinstance(record, dict) or "id" not in record or record.get("status") not in ("ok", "error"):
            raise PartialOutput(f"{out}: a malformed record {line[:120]}")
        ids.append(record["id"])
    if len(ids) != len(set(ids)):
        raise PartialOutput(f"{out}: an id written twice")


def cli_batch(case: Case):
    out = case.work / "results.jsonl"
    return ["batch", "--inputs", str(case.input), "--out", str(out), "--model", str(seed_root() / "ckpt-converted"),
            "--dtype", "fp32", "--max-new-tokens", "2", "--quiet"], None


_IMAGES = ("images/chelsea.png", "images/rocket.jpg", "images/hubble_deep_field.jpg", "images/logo.png",
           "images/camera.png", "images/no_time_for_that_tiny.gif", "images/coffee.tif",
           "images/coffee.webp", "images/coffee.bmp")
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("image", _IMAGES, byte_mutation, api_image, cli_inspect_image),
    Target("video", ("videos/bigbuckbunny.mp4", "videos/bunny_short.mp4", "videos/pan.avi"), byte_mutation,
           api_video, cli_inspect_video, weights=(1, 4, 3)),
    Target("hf-safetensors", ("ckpt-hf:model.safetensors",), safetensors_mutation, api_convert, cli_convert),
    Target("hf-config", ("ckpt-hf:config.json",), json_file_mutation, api_convert, cli_convert),
    Target("orig-safetensors", ("ckpt-orig:model.safetensors",), safetensors_mutation, api_convert, cli_convert),
    Target("orig-config", ("ckpt-orig:config.json",), json_file_mutation, api_convert, cli_convert),
    Target("converted-safetensors", ("ckpt-converted:model-00001-of-00001.safetensors",), safetensors_mutation,
           api_pipeline, cli_run),
    Target("converted-index", ("ckpt-converted:model.safetensors.index.json",), json_file_mutation, api_pipeline,
           cli_run),
    Target("converted-config", ("ckpt-converted:config.json",), json_file_mutation, api_pipeline, cli_run),
    Target("tokenizer-json", ("ckpt-converted:tokenizer.json",), json_file_mutation, api_pipeline, cli_run),
    Target("tokenizer-config", ("ckpt-converted:tokenizer_config.json",), json_file_mutation, api_pipeline, cli_run),
)}
TARGETS.update({t.name: t for t in (  # the SigLIP + Qwen2 family: converted into the case's cache, loaded, run
    Target("onevision-safetensors", ("ckpt-onevision:model.safetensors",), safetensors_mutation, api_pipeline, cli_run),
    Target("onevision-config", ("ckpt-onevision:config.json",), json_file_mutation, api_pipeline, cli_run),
    Target("qwen-tokenizer", ("ckpt-onevision:tokenizer.json",), json_file_mutation, api_pipeline, cli_run),
)})
if HAS_QUANT:
    TARGETS.update({t.name: t for t in (
        Target("quant-safetensors", ("ckpt-int8:model-00001-of-00001.safetensors",
                                     "ckpt-int4:model-00001-of-00001.safetensors"), safetensors_mutation,
               api_pipeline, cli_run),
        Target("quant-json", ("ckpt-int8:quantization.json", "ckpt-int4:quantization.json"), json_file_mutation,
               api_pipeline, cli_run),
    )})
if HAS_BATCH:
    TARGETS["batch-jsonl"] = Target("batch-jsonl", ("batch/jobs.jsonl",), jsonl_mutation, api_batch, cli_batch)


# ==================================================================================================
# Outcomes
# ==================================================================================================
FAILURES = ("internal", "unnamed", "partial", "memory", "hang", "signal", "harness")


# documented errors about a request's numbers rather than a file (docs/errors.md, Runtime): weights that
# hold inf/NaN after a mutation surface as non-finite logits, which is what the user must be told
RUNTIME_ERRORS = ("NonFiniteError", "MemoryBudgetError", "ContextOverflowError")


class PartialOutput(Exception):
    """An output left behind after an error, or an incomplete one after success."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from llava_next_weights.hub import HubError

    return (ValueError, OSError, HubError)


def names_input(message: str, case: Case) -> bool:
    """Whether an error message names the mutated file or the directory given."""
    return any(s in message for s in (case.mutated.name, str(case.input), case.input.name))


def classify(exc: BaseException | None, case: Case) -> tuple[str, str]:
    """(outcome, detail) of an in-process case that raised ``exc`` (None: it succeeded)."""
    if exc is None:
        return "ok", ""
    if isinstance(exc, PartialOutput):
        return "partial", str(exc)
    if isinstance(exc, MemoryError) or not isinstance(exc, _user_errors()):
        frames = "".join(traceback.format_tb(exc.__traceback__)[-5:])
        return "internal", f"{frames}{type(exc).__name__}: {str(exc)[:400]}"
    message = str(exc) if not isinstance(exc, OSError) or exc.filename is None else f"{exc.filename}: {exc}"
    if type(exc).__name__ in RUNTIME_ERRORS:  # about the numbers of a request, not a file: documented as such
        return "error", f"{type(exc).__name__}: {message[:600]}"
    if not names_input(message, case):
        return "unnamed", f"{type(exc).__name__}: {message[:500]}"
    return "error", f"{type(exc).__name__}: {message[:600]}"


# ---- the worker (one process, many cases) -------------------------------------------------------
def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_in_process(target: Target, case: Case) -> dict:
    """Run one case here; the outcome with its peak-RSS growth (``memory`` past ``RSS_BOUND``)."""
    can_measure = _reset_peak_rss()
    before = _status("VmRSS")
    t0 = time.perf_counter()
    try:
        target.api(case)
        exc = None
    except BaseException as e:  # noqa: BLE001  (KeyboardInterrupt too: nothing may escape unclassified)
        if isinstance(e, KeyboardInterrupt):
            raise
        exc = e
    outcome, detail = classify(exc, case)
    growth = _status("VmHWM") - before if can_measure else 0
    if growth > RSS_BOUND and outcome not in FAILURES:
        outcome, detail = "memory", f"peak RSS grew by {growth / 2**20:.0f} MiB (bound {RSS_BOUND / 2**20:.0f} MiB)"
    return {"target": case.target, "index": case.index, "outcome": outcome, "detail": detail,
            "mutation": case.mutation, "seconds": time.perf_counter() - t0, "rss_growth": growth}


def worker_main(root: str) -> None:
    """Answer one JSON line per request line ``{"target", "seed", "index", "work"}`` on the protocol fd."""
    import resource

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the code under test prints goes to stderr, not into the protocol
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = DATA_LIMIT if hard == resource.RLIM_INFINITY else min(DATA_LIMIT, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    import conftest  # noqa: F401  (same environment as the tests)
    import checkpoints  # noqa: F401  (registers the tiny CLIP tower the original-format seed names)
    from llava_next.runtime import pipeline  # noqa: F401  (import once, not inside the first case)

    proto.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        work = Path(req["work"])
        target = TARGETS[req["target"]]
        try:
            try:
                case = make_case(target, req["seed"], req["index"], Path(root), work)
            except Exception as e:  # a bug of the harness, not of llava-next: say so, keep going
                result = {"target": target.name, "index": req["index"], "outcome": "harness",
                          "detail": "".join(traceback.format_exception(e))[-2000:], "mutation": "?"}
            else:
                result = run_in_process(target, case)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        proto.write(json.dumps(result) + "\n")


# ---- the CLI in a subprocess --------------------------------------------------------------------
_CLI_STUB = ("import sys; sys.path.insert(0, {tests!r}); import checkpoints; "
             "from llava_next.cli.main import main; sys.exit(main())")


def child_env(work: Path | None = None) -> dict:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "weights"), str(TESTS)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", LLAVA_NEXT_COMPILE="0", TRITON_INTERPRET="1", OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    if work is not None:
        env["LLAVA_NEXT_CACHE"] = str(work / "cache")
    return env


def run_cli(target: Target, case: Case, timeout: float = CLI_TIMEOUT) -> dict:
    """Run ``llava-next`` on the case in a fresh process; classify exit status, stderr and outputs."""
    argv, out = target.cli(case)
    cmd = argv[0]
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", _CLI_STUB.format(tests=str(TESTS)), *argv], capture_output=True,
                           text=True, errors="replace", timeout=timeout, env=child_env(case.work), cwd=case.work)
        outcome, detail = _classify_cli(p, cmd, case, out)
    except subprocess.TimeoutExpired:
        outcome, detail = "cli-hang", f"no exit within {timeout:.0f} s"
    return {"target": case.target, "index": case.index, "outcome": outcome, "detail": detail,
            "mutation": case.mutation, "seconds": time.perf_counter() - t0, "cli": argv}


_PROGRESS = re.compile(r"^(converting|\[llava-next\]|Writing|\s*$)")


def _classify_cli(p: subprocess.CompletedProcess, cmd: str, case: Case, out: Path | None) -> tuple[str, str]:
    err = p.stderr
    if p.returncode < 0:
        return "cli-signal", f"killed by signal {-p.returncode}: {err[-1500:]}"
    if "Traceback" in err or p.returncode == 3:
        return "cli-internal", err[-3000:]
    staging = list(case.work.glob(".out.*.partial"))
    if p.returncode == 0:
        if staging:
            return "cli-partial", f"staging left: {staging}"
        if out is not None and not out.exists():
            return "cli-partial", f"exit 0 but {out} was not written"
        if out is not None and out.suffix == ".png":
            from PIL import Image

            try:
                with Image.open(out) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001
                return "cli-partial", f"{out} is not a complete PNG: {e}"
        return "cli-ok", ""
    if p.returncode != 2:
        return "cli-bad-exit", f"exit {p.returncode}: {err[-1500:]}"
    if (out is not None and out.exists()) or staging:
        return "cli-partial", f"exit 2 but output left: {out if out and out.exists() else staging}"
    lines = [line for line in err.splitlines() if not _PROGRESS.match(line) or line.startswith("llava-next")]
    prefix = f"llava-next {cmd}: error: "
    starts = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    if len(starts) != 1:
        return "cli-internal", f"not exactly one error line starting {prefix!r}: {err[-1500:]}"
    # lines before it can only be a C library's own warnings written to fd 2 (libtiff: "tempfile.tif: Using
    # code not yet in table."): tolerated, as llava-next cannot silence them; the error is the last paragraph
    message = "\n".join(lines[starts[0]:])
    if not names_input(message, case):
        return "cli-unnamed", message[:500]
    return "cli-error", message[:200]


# ==================================================================================================
# The campaign: many cases over worker processes, a sample through the CLI
# ==================================================================================================
@dataclass
class Report:
    counts: dict = field(default_factory=lambda: defaultdict(Counter))  # {target: Counter(outcome)}
    failures: list = field(default_factory=list)
    seconds: float = 0.0
    max_rss_growth: int = 0
    lock: object = field(default_factory=lambda: __import__("threading").Lock(), repr=False)

    def add(self, result: dict) -> None:
        with self.lock:  # the CLI thread adds too
            self._add(result)

    def _add(self, result: dict) -> None:
        self.counts[result["target"]][result["outcome"]] += 1
        self.max_rss_growth = max(self.max_rss_growth, result.get("rss_growth", 0))
        if result["outcome"].removeprefix("cli-") in FAILURES + ("bad-exit",):
            self.failures.append(result)

    @property
    def cases(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def table(self) -> str:
        outcomes = ["ok", "error", *FAILURES, "cli-ok", "cli-error"]
        outcomes += sorted({o for c in self.counts.values() for o in c} - set(outcomes))
        rows = [["target", *outcomes, "total"]]
        for name in sorted(self.counts):
            c = self.counts[name]
            rows.append([name, *(str(c.get(o, 0)) for o in outcomes), str(sum(c.values()))])
        total = Counter()
        for c in self.counts.values():
            total.update(c)
        rows.append(["ALL", *(str(total.get(o, 0)) for o in outcomes), str(sum(total.values()))])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
                         for r in rows)

    def to_dict(self) -> dict:
        return {"cases": self.cases, "seconds": self.seconds, "max_rss_growth_mib": self.max_rss_growth / 2**20,
                "counts": {k: dict(v) for k, v in sorted(self.counts.items())}, "failures": self.failures}


class _Worker:
    def __init__(self, root: Path, log: Path) -> None:
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__)), "worker", str(root)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=child_env(), text=True, bufsize=1,
                                     start_new_session=True)
        self.job: dict | None = None
        self.deadline = 0.0
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"fuzz worker failed to start; see {log}")

    def send(self, job: dict, timeout: float) -> None:
        self.job, self.deadline = job, time.monotonic() + timeout
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait()
        self.log.close()


def run_campaign(n_cases: int, seed: int = 0, *, targets: list[str] | None = None, workers: int = 1,
                 cli_every: int = 25, cli_workers: int = 1, timeout: float = CASE_TIMEOUT, root: Path | None = None,
                 progress: Callable[[dict], None] | None = None, start: int = 0) -> Report:
    """``n_cases`` in-process cases spread round-robin over ``targets`` (default all) on ``workers``
    processes, plus every ``cli_every``-th case again through the CLI (0: none; ``cli_workers`` at a
    time). Cases ``start .. start + n_cases - 1``."""
    root = build_seeds(root)
    names = targets or list(TARGETS)
    jobs = [(names[i % len(names)], i // len(names)) for i in range(start, start + n_cases)]
    report = Report()
    t0 = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="llava_next_fuzz."))
    pool = [_Worker(root, scratch / f"worker{k}.log") for k in range(max(1, workers))]
    cli_jobs = [j for k, j in enumerate(jobs) if cli_every and k % cli_every == 0]
    cli_threads = _CliRunner(root, scratch, seed, cli_jobs, report, progress, cli_workers)
    pending = list(jobs)
    try:
        cli_threads.start()
        while pending or any(w.job for w in pool):
            for w in pool:
                if w.job is None and pending:
                    name, index = pending.pop(0)
                    w.send({"target": name, "seed": seed, "index": index, "work": str(scratch / f"case-{name}-{index}")},
                           timeout)
            busy = [w for w in pool if w.job]
            wait = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready, _, _ = select.select([w.proc.stdout for w in busy], [], [], wait)
            for i, w in enumerate(pool):
                if w.job is None:
                    continue
                result = None
                if w.proc.stdout in ready:
                    line = w.proc.stdout.readline()
                    if line:
                        result = json.loads(line)
                    else:  # the worker died inside the case
                        w.proc.wait()
                        result = _lost(w.job, seed, "signal", f"worker exited with {w.proc.returncode}", root)
                elif time.monotonic() > w.deadline:
                    result = _lost(w.job, seed, "hang", f"no answer within {timeout:.0f} s", root)
                if result is None:
                    continue
                if result["outcome"] in ("signal", "hang"):
                    w.kill()
                    shutil.rmtree(w.job["work"], ignore_errors=True)
                    pool[i] = _Worker(root, scratch / f"worker{i}.log")
                else:
                    w.job = None
                report.add(result)
                if progress:
                    progress(result)
        cli_threads.join()
    finally:
        for w in pool:
            w.kill()
        cli_threads.stop()
        if not report.failures:
            shutil.rmtree(scratch, ignore_errors=True)
    report.seconds = time.monotonic() - t0
    return report


def _lost(job: dict, seed: int, outcome: str, detail: str, root: Path) -> dict:
    work = Path(tempfile.mkdtemp())
    try:
        mutation = make_case(TARGETS[job["target"]], seed, job["index"], root, work).mutation
    except Exception as e:  # noqa: BLE001
        mutation = f"? (recreating it failed: {type(e).__name__})"
    shutil.rmtree(work, ignore_errors=True)
    return {"target": job["target"], "index": job["index"], "outcome": outcome, "detail": detail,
            "mutation": mutation}


class _CliRunner:
    """The CLI sample: subprocesses from ``threads`` background threads (beside the workers)."""

    def __init__(self, root, scratch, seed, jobs, report, progress, threads: int = 1) -> None:
        import threading

        self.args = (root, scratch, seed, report, progress)
        n = max(1, threads)
        self.threads = [threading.Thread(target=self._run, args=(jobs[k::n],), daemon=True) for k in range(n)]
        self.stopped = False

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def stop(self) -> None:
        self.stopped = True

    def _run(self, jobs) -> None:
        root, scratch, seed, report, progress = self.args
        for name, index in jobs:
            if self.stopped:
                return
            work = scratch / f"cli-{name}-{index}"
            try:
                case = make_case(TARGETS[name], seed, index, root, work)
                result = run_cli(TARGETS[name], case)
            except Exception as e:  # noqa: BLE001  (a bug of the harness: reported, the run goes on)
                result = {"target": name, "index": index, "outcome": "cli-harness", "mutation": "?",
                          "detail": "".join(traceback.format_exception(e))[-2000:]}
            report.add(result)
            if progress:
                progress(result)
            if not result["outcome"].removeprefix("cli-") in FAILURES + ("bad-exit",):
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker_main(sys.argv[2])
    else:
        sys.exit("usage: python tests/fuzzing.py worker SEED_ROOT  (the long run is benchmarks/fuzz.py)")
