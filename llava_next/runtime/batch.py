"""The batch job: many requests from a JSONL file, one answer line per request appended to a JSONL file;
interrupted runs resume; several processes (torchrun) share the work.

    llava-next batch --inputs jobs.jsonl --out results.jsonl
    torchrun --nproc-per-node 4 --no-python llava-next batch --inputs jobs.jsonl --out results.jsonl

Input, one JSON object per line (only ``id`` and ``prompt`` are required; the rest default to the
command's options):

    {"id": "clip-0001", "prompt": "What happens?", "video": "a.mp4", "frames": 8, "images": ["b.jpg"],
     "max_new_tokens": 64, "temperature": 0, "top_p": 1, "seed": null, "rope_scale": "config", "template": null}

("video" is one file or a list; "sampling" is "uniform", "fps" or "scene" (the cut detector's options are
the command's ``--scene-threshold`` / ``--scene-min-len``); without "prompt" the command's ``--prompt`` is
used.) Or no file at all: ``video_items(["clips/", "more/*.mp4"], defaults)`` makes one item per video file
of a folder or a glob pattern, each asking the command's ``--prompt``, its id the path
(``llava-next batch --videos clips/ --prompt ...``).

Output, one JSON object per finished id, in the order they finish:

    {"id": "clip-0001", "status": "ok", "text": "...", "prompt": "What happens?", "video": "a.mp4",
     "tokens": [...], "input_tokens": 1187, "seconds": 3.1}
    {"id": "clip-0002", "status": "error", "error": "b.mp4: no such file", "kind": "user", "type": "FileNotFoundError"}

Guarantees and how:
- An interrupted run (Ctrl-C, kill -9, a lost machine) loses at most the items in flight: each line is
  written whole with one ``write`` on a file opened O_APPEND, then flushed to disk (``os.fsync``). A
  line cut off by a kill in the middle of that write has no newline; the next run drops it before
  appending (under the lock below), so the file stays one JSON object per line.
- A rerun skips every id already in the output (ok or error: an id is written once, ever; to retry
  failed items, delete their lines) and never writes an id twice. Duplicate ids in the input are
  refused before anything runs.
- A bad item (missing or unreadable file, corrupt video, a prompt that overflows the context, a bad
  option) becomes an error line for that id and the job goes on. Only a broken input file (a line that
  is not a JSON object with a string id) stops the job before it starts.
- Several processes: under torchrun (RANK / WORLD_SIZE) rank r takes the ids with crc32(id) % WORLD_SIZE
  == r, a split that does not depend on the order of the input or on what is already done; all ranks
  append to the same file under an exclusive ``flock`` of that file (output and checkpoint conversion
  alike; no lock file is left behind), so the output needs a file system with working locks (local
  disks; NFSv4) when machines share it. No collectives: ranks never wait for each other, and a rerun
  with another number of processes works.
- Batching: pending greedy requests with the same options and the same RoPE factor run as one
  left-padded batch (``Pipeline.generate_batch``, up to ``batch_size``); sampled requests run alone
  (one seeded generator per request). If a batch fails, its requests are retried one by one, so an
  error belongs to the item that caused it.
- Progress on stderr (done / total, items/s, ETA, errors), a summary at the end; ``--quiet`` for none.

An ok line repeats the item's prompt and media paths ("video": a path, or a list for several; "images":
a list), so the results alone become training data (train/captions.py, ``llava-next data captions``).

The per-item work (``BatchJob.answer``) takes parsed items and returns records, so another scheduler
(Ray Data's ``map_batches``, say) can wrap it unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, TextIO

from ..inputs.scenes import SceneOptions
from ..inputs.tokens import RopeScale
from ..inputs.video import SAMPLINGS
from .files import check_media_file
from .pipeline import Pipeline, Request

PathLike = str | os.PathLike
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".gif")
ITEM_KEYS = {"id", "prompt", "video", "images", "frames", "sampling", "max_new_tokens", "temperature", "top_p",
             "seed", "rope_scale", "template", "system"}


class BatchInputError(ValueError):
    """The inputs file itself is unusable (not JSON lines, no ids, duplicate ids): nothing was run."""


class ItemError(ValueError):
    """One item's options are wrong; it becomes an error line."""


@dataclass(frozen=True)
class Defaults:
    """The options an item does not set (the command line's)."""

    prompt: str | None = None
    frames: int = 8
    sampling: str = "uniform"
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    rope_scale: RopeScale = "config"
    template: str | None = None
    scene: SceneOptions = SceneOptions()  # sampling "scene": the cut detector (PySceneDetect's defaults)


@dataclass
class Item:
    """One request of the inputs file, options filled in; ``problem`` set when they are invalid."""

    id: str
    line: int
    prompt: str = ""
    videos: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    frames: int = 8
    sampling: str = "uniform"
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    rope_scale: RopeScale = "config"
    template: str | None = None
    system: str | None = None
    scene: SceneOptions = SceneOptions()
    problem: str | None = None


# ---- input ----------------------------------------------------------------------------------------
def read_items(path: PathLike, defaults: Defaults = Defaults()) -> list[Item]:
    """Every item of the inputs file, in order. Raises BatchInputError for a line that is not a JSON object
    with a non-empty string ``id``, or a repeated id; an item's bad options are kept as its ``problem``."""
    items: list[Item] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BatchInputError(f"{path} line {number}: not UTF-8 text ({e.reason} at byte {e.start}); save the "
                                      f"file as UTF-8 JSON lines") from None
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise BatchInputError(f"{path} line {number}: not JSON ({e}); each line must be one JSON object "
                                      f"with an \"id\" and a \"prompt\"") from None
            except RecursionError:  # json's parser recurses per nesting level (~1,000 levels exhaust the stack)
                raise BatchInputError(f"{path} line {number}: JSON nested too deeply; each line must be one flat JSON "
                                      f"object with an \"id\" and a \"prompt\"") from None
            if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
                raise BatchInputError(f"{path} line {number}: each line must be a JSON object with a non-empty "
                                      f"string \"id\" (got {text.strip()[:80]})")
            try:
                raw["id"].encode("utf-8")
            except UnicodeEncodeError:
                raise BatchInputError(f"{path} line {number}: the id {raw['id']!r} is not valid Unicode (a lone "
                                      f"surrogate escape); ids must be text") from None
            if raw["id"] in seen:
                raise BatchInputError(f"{path} line {number}: id {raw['id']!r} is already used on line "
                                      f"{seen[raw['id']]}; ids must be unique (they key the output)")
            seen[raw["id"]] = number
            items.append(_parse_item(raw, number, defaults))
    return items


def video_items(sources: Sequence[str], defaults: Defaults) -> list[Item]:
    """One item per video file that ``sources`` name, in order: a file, a folder (its files ending in one of
    ``VIDEO_SUFFIXES``, sorted; not its subfolders) or a glob pattern (``clips/*.mp4``, ``**`` recursive),
    each asking ``defaults.prompt``; the id is the path as found. A file named twice is one item. Raises
    BatchInputError when there is no prompt or a source names no video."""
    if not defaults.prompt:
        raise BatchInputError("--videos needs --prompt TEXT: every video is asked the same prompt")
    paths: list[str] = []
    for source in sources:
        if os.path.isdir(source):
            found = sorted(str(p) for p in Path(source).iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            what = f"the folder {source} holds no video file (one ending in {', '.join(VIDEO_SUFFIXES)})"
        elif glob.has_magic(source):
            found = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
            what = f"no file matches {source!r}"
        else:
            found = [source]  # a missing file becomes that item's error line, as in an inputs file
            what = ""
        if not found:
            raise BatchInputError(f"--videos {source}: {what}; give a folder of videos, a file or a quoted glob "
                                  f"pattern such as 'clips/*.mp4'")
        paths += [p for p in found if p not in paths]
    return [_parse_item({"id": p, "video": p}, k, defaults) for k, p in enumerate(paths, 1)]


def _parse_item(raw: dict, line: int, d: Defaults) -> Item:
    item = Item(id=raw["id"], line=line, frames=d.frames, sampling=d.sampling, max_new_tokens=d.max_new_tokens,
                temperature=d.temperature, top_p=d.top_p, seed=d.seed, rope_scale=d.rope_scale, template=d.template,
                scene=d.scene)
    try:
        unknown = sorted(set(raw) - ITEM_KEYS)
        if unknown:
            raise ItemError(f"unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(ITEM_KEYS))}")
        item.prompt = _typed(raw, "prompt", str, required=d.prompt is None) or d.prompt
        item.videos = _paths(raw, "video")
        item.images = _paths(raw, "images")
        item.sampling = raw.get("sampling", item.sampling)
        if item.sampling not in SAMPLINGS:
            raise ItemError(f"\"sampling\" must be one of {', '.join(map(json.dumps, SAMPLINGS))}, "
                            f"got {item.sampling!r}")
        item.frames = _number(raw, "frames", item.frames, int, minimum=1)
        item.max_new_tokens = _number(raw, "max_new_tokens", item.max_new_tokens, int, minimum=1)
        item.temperature = _number(raw, "temperature", item.temperature, float, minimum=0)
        item.top_p = _number(raw, "top_p", item.top_p, float, minimum=0)
        if not 0 < item.top_p <= 1:
            raise ItemError(f"\"top_p\" must be in (0, 1], got {item.top_p}")
        item.seed = raw["seed"] if raw.get("seed") is not None else item.seed
        if item.seed is not None and (not isinstance(item.seed, int) or isinstance(item.seed, bool)):
            raise ItemError(f"\"seed\" must be an integer, got {raw.get('seed')!r}")
        rope = raw.get("rope_scale", item.rope_scale)
        if not (rope in ("config", "auto", "original") or (isinstance(rope, (int, float)) and rope >= 1)):
            raise ItemError(f"\"rope_scale\" must be \"config\", \"auto\", \"original\" or a number >= 1, got {rope!r}")
        item.rope_scale = rope
        item.template = _typed(raw, "template", str) or item.template
        item.system = _typed(raw, "system", str)
    except ItemError as e:
        item.problem = str(e)
    return item


def _paths(raw: dict, key: str) -> tuple[str, ...]:
    value = raw.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ItemError(f"\"{key}\" must be a file path or a list of them, got {value!r}")
    return tuple(value)


def _typed(raw: dict, key: str, kind: type, required: bool = False):
    value = raw.get(key)
    if value is None:
        if required:
            raise ItemError(f"\"{key}\" is missing (or give the command a default: --prompt TEXT)")
        return None
    if not isinstance(value, kind):
        raise ItemError(f"\"{key}\" must be a {kind.__name__}, got {value!r}")
    return value


def _number(raw: dict, key: str, default, kind: type, minimum: float):
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ItemError(f"\"{key}\" must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ItemError(f"\"{key}\" must be a finite number >= {minimum}, got {value}")
    return kind(value)


def owner(item_id: str, world_size: int) -> int:
    """The rank that answers ``item_id``: crc32 of the id modulo the number of processes."""
    return zlib.crc32(item_id.encode("utf-8")) % world_size


# ---- output ---------------------------------------------------------------------------------------
class ResultsFile:
    """The append-only JSONL output. Every access holds an exclusive flock on the output file itself (so no
    lock file is left beside it; opening it to lock creates it, empty, as the job's first act)."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with open(self.path, "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def done_ids(self) -> set[str]:
        """Ids with a complete line; a cut-off last line (a kill in the middle of a write) is removed."""
        with self.locked():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # no newline at the end: the last write was cut off
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            ids = set()
            for line in data[:end].splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # not ours to judge; it does not name a done id
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    ids.add(record["id"])
            return ids

    def remove_if_empty(self) -> None:
        """Remove the output if it holds nothing (a job that failed before its first line created it)."""
        try:
            with self.locked():
                if self.path.stat().st_size == 0:
                    self.path.unlink()
        except OSError:
            pass

    def append(self, record: dict) -> None:
        """One line, whole, then on disk before returning."""
        try:
            data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from the input in a message: escape everything instead
            data = (json.dumps(record) + "\n").encode("utf-8")
        with self.locked():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
                while written < len(data):  # a regular file takes it in one write; be correct anyway
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            finally:
                os.close(fd)


# ---- progress -------------------------------------------------------------------------------------
@dataclass
class Progress:
    total: int  # items this process answers in this run
    skipped: int
    stream: TextIO | None = sys.stderr
    prefix: str = "[llava-next batch]"
    every_s: float = 2.0
    done: int = 0
    errors: int = 0
    start: float = field(default_factory=time.perf_counter)
    last: float = 0.0

    def update(self, errors: int = 0, n: int = 1) -> None:
        self.done += n
        self.errors += errors
        now = time.perf_counter()
        if self.stream is not None and (now - self.last >= self.every_s or self.done == self.total):
            self.last = now
            self.stream.write(f"{self.prefix} {self.line()}\n")
            self.stream.flush()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        return (f"{self.done}/{self.total} items, {self.errors} error(s), {rate:.2f} items/s, "
                f"ETA {'?' if eta is None else _clock(eta)}")

    def summary(self, out: Path) -> str:
        elapsed = time.perf_counter() - self.start
        return (f"{self.prefix} done: {self.done} item(s) answered in {_clock(elapsed)} "
                f"({self.done - self.errors} ok, {self.errors} error lines), {self.skipped} skipped (already in "
                f"{out}); {self.done / elapsed if elapsed > 0 else 0.0:.2f} items/s")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---- the job --------------------------------------------------------------------------------------
@dataclass
class BatchJob:
    pipe: Pipeline
    batch_size: int = 4
    max_image_pixels: int | None = None

    def prepare(self, item: Item) -> Request:
        if item.problem is not None:
            raise ItemError(item.problem)
        for what, paths in (("image", item.images), ("video", item.videos)):
            for path in paths:
                check_media_file(path, what)  # the error run and inspect give for the same path
        return self.pipe.prepare(item.prompt, images=list(item.images), videos=list(item.videos), frames=item.frames,
                                 sampling=item.sampling, template=item.template, rope_scale=item.rope_scale,
                                 max_new_tokens=item.max_new_tokens, system=item.system,
                                 max_image_pixels=self.max_image_pixels, scene=item.scene)

    def answer(self, items: Sequence[Item]) -> Iterator[dict]:
        """Records for ``items`` (ok or error), batch by batch; one record per item."""
        pending: list[tuple[Item, Request, float]] = []
        for item in items:
            t0 = time.perf_counter()
            try:
                request = self.prepare(item)
            except Exception as e:  # noqa: BLE001 — every failure of one item becomes its error line
                yield error_record(item, e)
                continue
            pending.append((item, request, time.perf_counter() - t0))
            if len(pending) >= self.batch_size:
                yield from self._generate(pending)
                pending = []
        yield from self._generate(pending)

    def _generate(self, pending: list[tuple[Item, Request, float]]) -> Iterator[dict]:
        groups: dict[tuple, list[tuple[Item, Request, float]]] = {}
        for entry in pending:
            item, request, _ = entry
            key = (item.max_new_tokens, item.template, request.plan.factor, item.temperature, item.top_p, item.seed)
            if item.temperature > 0:  # sampled: its own generator, alone
                key += (item.id,)
            groups.setdefault(key, []).append(entry)
        for group in groups.values():
            yield from self._run_group(group)

    def _run_group(self, group: list[tuple[Item, Request, float]]) -> Iterator[dict]:
        item = group[0][0]
        options = dict(max_new_tokens=item.max_new_tokens, temperature=item.temperature, top_p=item.top_p,
                       seed=item.seed, template=item.template)
        t0 = time.perf_counter()
        try:
            outputs = self.pipe.generate_batch([r for _, r, _ in group], **options)
        except Exception as e:  # noqa: BLE001
            if len(group) > 1:  # find the item it belongs to
                for entry in group:
                    yield from self._run_group([entry])
                return
            yield error_record(item, e)
            return
        seconds = (time.perf_counter() - t0) / len(group)
        stops = set(_stops(self.pipe, item.template))
        for (it, request, prep_s), tokens in zip(group, outputs):
            text_ids = tokens[:-1] if tokens and tokens[-1] in stops else tokens
            yield {"id": it.id, "status": "ok", "text": self.pipe.tokenizer.decode(text_ids), **_asked(it),
                   "tokens": tokens, "input_tokens": len(request.input_ids),
                   "visual_tokens": sum(request.image_token_counts) + sum(request.video_token_counts),
                   "seconds": round(prep_s + seconds, 3)}


def _asked(item: Item) -> dict:
    """What the item asked: its prompt and media paths as given (a single video as a path, not a list)."""
    out: dict = {"prompt": item.prompt}
    if item.videos:
        out["video"] = item.videos[0] if len(item.videos) == 1 else list(item.videos)
    if item.images:
        out["images"] = list(item.images)
    return out


def _stops(pipe: Pipeline, template: str | None) -> tuple[int, ...]:
    from ..inputs.prompt import stop_token_ids

    return stop_token_ids(pipe.tokenizer, pipe.config.template if template is None else template)


def error_record(item: Item, e: BaseException) -> dict:
    """The error line of ``item``: the fields and values of ``llava-next --json``'s error object (``error``,
    ``kind``: "user" for what the user can fix, "internal" for a bug; ``type``: the exception class)."""
    from llava_next_weights.hub import HubError

    if isinstance(e, OSError) and e.filename is not None:
        message = f"{e.filename}: {e.strerror or e}"
    else:
        message = (str(e).strip() or type(e).__name__)
    kind = "user" if isinstance(e, (ValueError, OSError, HubError)) else "internal"
    return {"id": item.id, "status": "error", "error": message, "kind": kind, "type": type(e).__name__}


def run_batch(pipe_loader, inputs: PathLike | list[Item], out: PathLike, *, defaults: Defaults = Defaults(), batch_size: int = 4,
              rank: int = 0, world_size: int = 1, max_image_pixels: int | None = None,
              progress: TextIO | None = sys.stderr) -> Progress:
    """The whole job for this process: read the inputs, skip what ``out`` already has, answer this rank's
    share, append each record. ``pipe_loader()`` builds the Pipeline (called once, only if there is work,
    under the output's lock so that ranks sharing a machine convert a checkpoint once). ``inputs``: the
    inputs file, or the items themselves (``video_items``). Returns the counts."""
    items = inputs if isinstance(inputs, list) else read_items(inputs, defaults)
    results = ResultsFile(out)
    created = not results.path.exists()
    try:
        return _run(pipe_loader, items, results, inputs, batch_size, rank, world_size, max_image_pixels, progress)
    except BaseException:  # stopped before or while answering (no model, Ctrl-C): leave no empty output behind
        if created:
            results.remove_if_empty()
        raise


def _run(pipe_loader, items: list[Item], results: ResultsFile, inputs: PathLike | list[Item], batch_size: int, rank: int,
         world_size: int, max_image_pixels: int | None, progress: TextIO | None) -> Progress:
    out = results.path
    done = results.done_ids()
    mine = [it for it in items if owner(it.id, world_size) == rank]
    todo = [it for it in mine if it.id not in done]
    prefix = "[llava-next batch]" if world_size == 1 else f"[llava-next batch rank {rank}/{world_size}]"
    tracker = Progress(total=len(todo), skipped=len(mine) - len(todo), stream=progress, prefix=prefix)
    if progress is not None:
        source = "--videos" if isinstance(inputs, list) else inputs
        progress.write(f"{prefix} {len(items)} item(s) in {source}; this process: {len(mine)}, "
                       f"{len(mine) - len(todo)} already in {out}, {len(todo)} to do\n")
    if todo:
        with results.locked():
            pipe = pipe_loader()
        job = BatchJob(pipe, batch_size=batch_size, max_image_pixels=max_image_pixels)
        for record in job.answer(todo):
            results.append(record)
            tracker.update(errors=int(record["status"] == "error"))
    if progress is not None:
        progress.write(tracker.summary(results.path) + "\n")
        progress.flush()
    return tracker


def with_defaults(defaults: Defaults, **changes) -> Defaults:
    return dataclasses.replace(defaults, **{k: v for k, v in changes.items() if v is not None})
