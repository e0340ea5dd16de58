"""Tracing a dataset: many requests from a JSONL file, each traced (``Pipeline.trace``) into a compact shard;
interrupted runs resume; several processes (torchrun) share the work; one call loads it all as a DataFrame.

    llava-next trace --inputs jobs.jsonl --out traces/ --layers 0,15,31 --query last --query generated
    torchrun --nproc-per-node 4 --no-python llava-next trace --inputs jobs.jsonl --out traces/
    df = load_traces("traces/")                  # one row per (id, layer, query group, position)

Input: the batch job's file (runtime/batch.py: ``id``, ``prompt``, ``video`` / ``images``, ``frames``,
``max_new_tokens`` ...; generation is greedy here). Output, in ``--out``:

    index.jsonl          one line per finished id, written after its shard: {"id", "status": "ok", "shard",
                         "positions", "text", "seconds"} or the batch job's error line (same fields, same values)
    shards/NAME.npz      one per ok id (NAME: the id made file-safe + its crc32): the attention of each
                         query group at each layer, float16 (L, G, T); the token provenance as columns (kind,
                         segment, media, frame, time, row, col, grid_h, grid_w, tile_row, tile_col, token_id);
                         the logit lens' top-1 id and probability per layer and position where asked (-1 / NaN
                         elsewhere); ``meta``: a JSON string with the id, layers, groups, answer, generated ids
                         and the run record (package, commit, torch, dtype, device, checkpoint hash, switches)

Guarantees, as the batch job's (which this reuses: ``ResultsFile``, ``owner``, ``error_record``): a shard is
written to a temporary name and renamed, then its index line is appended with one ``write`` and fsync'd, so a
kill -9 leaves at most an orphan shard that the rerun overwrites; a rerun skips the ids in the index; a bad
item is an error line and the job goes on; ranks take the ids with crc32(id) % WORLD_SIZE == rank and append
to the same index under its flock. Shards are float16 where the values are probabilities (attention rows sum
to 1; 3 significant digits), a fraction of the JSON of ``llava-next trace --json``.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from ..research.provenance import KINDS, SEGMENTS
from .batch import BatchJob, Defaults, Item, Progress, ResultsFile, error_record, owner, read_items
from .pipeline import Pipeline

PathLike = str | os.PathLike
COLUMNS = ("kind", "segment", "media", "frame", "time", "row", "col", "grid_h", "grid_w", "tile_row", "tile_col",
           "token_id")


def shard_name(item_id: str) -> str:
    """A file-safe name for an id (its safe characters, then its crc32 so two ids never share a name)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id)[:80]
    return f"{safe}-{zlib.crc32(item_id.encode('utf-8')):08x}.npz"


def trace_item(pipe: Pipeline, item: Item, *, layers: Sequence[int] | None, queries: Sequence[str],
               lens: Sequence[str], run: dict) -> tuple[dict[str, np.ndarray], dict]:
    """(the arrays of one shard, its meta) for one item traced."""
    req = BatchJob(pipe).prepare(item)  # the batch job's checks and options, the same errors
    res = pipe.trace(req, layers=layers, queries=queries, lens=lens, lens_top_k=1, template=item.template,
                     max_new_tokens=item.max_new_tokens)
    prov, T = res.provenance, len(res.provenance)
    groups = list(queries)
    att = np.stack([np.stack([res.attention[layer][g].float().numpy() for g in groups]) for layer in res.layers])
    arrays = {"attention": att.astype(np.float16)}  # (L, G, T)
    for name in COLUMNS:
        arrays[name] = getattr(prov, name).numpy()
    top_id = np.full((len(res.layers), T), -1, np.int64)
    top_p = np.full((len(res.layers), T), np.nan, np.float16)
    for i, layer in enumerate(res.layers):
        lr = res.logit_lens.get(layer)
        if lr is not None:
            pos = lr.positions.numpy()
            top_id[i, pos] = lr.ids[0, :, 0].numpy()
            top_p[i, pos] = lr.probs[0, :, 0].float().numpy()
    arrays["lens_top_id"], arrays["lens_top_p"] = top_id, top_p
    meta = {"id": item.id, "layers": res.layers, "groups": groups, "text": res.text, "generated": res.generated,
            "prompt": item.prompt, "kinds": list(KINDS), "segments": list(SEGMENTS), "run": run}
    return arrays, meta


def write_shard(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """The shard under a temporary name, on disk, then renamed into place (never half a file)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.array(json.dumps(meta, ensure_ascii=False)), **arrays)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_trace_jobs(pipe_loader, inputs: PathLike, out: PathLike, *, defaults: Defaults = Defaults(),
                   layers: Sequence[int] | None = None, queries: Sequence[str] = ("last",),
                   lens: Sequence[str] = ("none",), run: dict | None = None, rank: int = 0, world_size: int = 1,
                   progress: TextIO | None = sys.stderr) -> Progress:
    """The whole job for this process (module docstring); ``pipe_loader()`` builds the Pipeline once, only
    if there is work. Returns the counts."""
    out = Path(out)
    items = read_items(inputs, defaults)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    index = ResultsFile(out / "index.jsonl")
    done = index.done_ids()
    mine = [it for it in items if owner(it.id, world_size) == rank]
    todo = [it for it in mine if it.id not in done]
    prefix = "[llava-next trace]" if world_size == 1 else f"[llava-next trace rank {rank}/{world_size}]"
    tracker = Progress(total=len(todo), skipped=len(mine) - len(todo), stream=progress, prefix=prefix)
    if todo:
        with index.locked():
            pipe = pipe_loader()
        for item in todo:
            t0 = time.perf_counter()
            try:
                arrays, meta = trace_item(pipe, item, layers=layers, queries=queries, lens=lens, run=run or {})
                name = shard_name(item.id)
                write_shard(out / "shards" / name, arrays, meta)
                record = {"id": item.id, "status": "ok", "shard": f"shards/{name}", "positions": len(arrays["kind"]),
                          "text": meta["text"], "seconds": round(time.perf_counter() - t0, 3)}
            except (ValueError, OSError) as e:  # the item's fault: an error line, the job goes on
                record = error_record(item, e)
            index.append(record)
            tracker.update(errors=int(record["status"] == "error"))
    if progress is not None:
        progress.write(tracker.summary(index.path) + "\n")
        progress.flush()
    return tracker


def read_shard(path: PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of one shard."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(str(z["meta"]))
    return arrays, meta


def load_traces(out: PathLike, *, layers: Sequence[int] | None = None, groups: Sequence[str] | None = None,
                visual_only: bool = False) -> Any:
    """Every ok shard of a trace job as ONE pandas DataFrame, a row per (id, layer, group, position): the
    attention weight (float32), the logit lens' top-1 where recorded, and the provenance columns (kind and
    segment as names). ``layers`` / ``groups`` / ``visual_only`` keep fewer rows. Needs pandas."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("load_traces needs pandas, which llava-next does not install: pip install pandas") from None
    out = Path(out)
    frames = []
    for line in (out / "index.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("status") != "ok":
            continue
        arrays, meta = read_shard(out / rec["shard"])
        frames.append(_shard_frame(pd, arrays, meta, layers, groups, visual_only))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def _shard_frame(pd, arrays: dict, meta: dict, layers, groups, visual_only: bool):
    att = arrays["attention"]  # (L, G, T)
    L, G, T = att.shape
    li = [i for i, layer in enumerate(meta["layers"]) if layers is None or layer in layers]
    gi = [j for j, g in enumerate(meta["groups"]) if groups is None or g in groups]
    keep = np.arange(T) if not visual_only else np.nonzero(arrays["media"] >= 0)[0]
    grid = np.array(np.meshgrid(li, gi, keep, indexing="ij")).reshape(3, -1)  # (3, rows): layer, group, position
    l_idx, g_idx, pos = grid
    cols = {"id": meta["id"], "layer": np.asarray(meta["layers"])[l_idx], "group": np.asarray(meta["groups"])[g_idx],
            "position": pos, "weight": att[l_idx, g_idx, pos].astype(np.float32),
            "lens_top_id": arrays["lens_top_id"][l_idx, pos], "lens_top_p": arrays["lens_top_p"][l_idx, pos]}
    for name in COLUMNS:
        values = arrays[name][pos]
        if name == "kind":
            values = np.asarray(meta["kinds"])[values]
        elif name == "segment":
            values = np.asarray(meta["segments"])[values]
        cols[name] = values
    return pd.DataFrame(cols)
