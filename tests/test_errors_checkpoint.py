"""Bad checkpoints and interrupted conversions, through ``Pipeline.from_pretrained`` (which converts into
the cache), ``convert`` / ``load_into``, and ``llava-next convert`` / ``run`` (in-process ``main`` and, for
signals, real subprocesses): a pickle is never opened, every key/shape/config/dtype/truncation problem
is an error naming the key or file, and nothing that looks complete is left behind."""

from __future__ import annotations

import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_runnable_checkpoint
from llava_next.cli.main import main
from llava_next.runtime.pipeline import Pipeline
from llava_next_weights.convert import ConversionError, convert
from llava_next_weights.hub import HubError
from llava_next.model.llava import LlavaNextModel
from llava_next_weights.load import LoadError, load_into, load_state_dict_mmap, read_config

pytest.importorskip("transformers")


def tree(path) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), path) for d, dirs, files in os.walk(path) for n in dirs + files}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(llava-hf dir in 3 shards, converted dir) of a tiny video model with a real tokenizer."""
    root = tmp_path_factory.mktemp("bad_ckpt")
    hf_dir, _ = make_runnable_checkpoint(root / "tiny-hf", kind="video", max_shard_size="300KB")
    return hf_dir, convert(hf_dir, root / "tiny", progress=False)


def variant(tmp_path, base, edit=None):
    """A copy of ``base`` changed by ``edit(dir)``."""
    d = tmp_path / f"{base.name}-edited"
    shutil.copytree(base, d)
    if edit:
        edit(d)
    return d


def edit_tensors(fn):
    """An edit that rewrites every shard's {key: tensor} with ``fn`` (index kept in step)."""
    def edit(d):
        for p in sorted(d.glob("*.safetensors")):
            tensors = load_file(p)
            fn(tensors)
            save_file({k: v.contiguous() for k, v in tensors.items()}, p, metadata={"format": "pt"})
        index = next(d.glob("*.index.json"), None)
        if index is not None:
            data = json.loads(index.read_text())
            files = {k: f for f in {*data["weight_map"].values()} for k in load_file(d / f)}
            data["weight_map"] = files
            index.write_text(json.dumps(data))
    return edit


def lm_head(tensors) -> str | None:
    return next((k for k in tensors if "lm_head" in k), None)


def drop_lm_head(t):
    if lm_head(t):
        del t[lm_head(t)]


def add_stray(t):
    if lm_head(t):
        t["stray.weight"] = torch.zeros(3)


def narrow_lm_head(t):
    if lm_head(t):
        t[lm_head(t)] = t[lm_head(t)][:, :-1].clone()


def set_hidden_size(d):
    cfg = json.loads((d / "config.json").read_text())
    (cfg["text_config"] if "text_config" in cfg else cfg["text"])["hidden_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))


def cut_last_shard(d):
    shard = sorted(d.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) * 3 // 5])


class _Trap:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---- pickles: refused, never opened -----------------------------------------------------------------
def test_pickles_are_never_unpickled(ckpt, tmp_path, capsys):
    hf_dir, converted = ckpt
    marker = tmp_path / "code-ran"
    trap = pickle.dumps(_Trap(str(marker)))
    hf_pickled = tmp_path / "hf-pickled"
    hf_pickled.mkdir()
    shutil.copy(hf_dir / "config.json", hf_pickled)
    (hf_pickled / "pytorch_model.bin").write_bytes(trap)
    ours_pickled = variant(tmp_path, converted, lambda d: [p.unlink() for p in [*d.glob("*.safetensors"),
                                                                                 *d.glob("*.index.json")]])
    (ours_pickled / "model.pt").write_bytes(trap)
    cache = tmp_path / "cache"
    for source, error, fragment in [(hf_pickled, ConversionError, "pytorch_model.bin). Loading a pickle can run"),
                                    (ours_pickled, LoadError, "(model.pt); loading a pickle can run"),
                                    (ours_pickled / "model.pt", HubError, "model.pt is a pickle file")]:
        with pytest.raises(error, match="never unpickles") as e:
            Pipeline.from_pretrained(source, cache_dir=cache, progress=False)
        assert fragment in str(e.value)
    assert main(["convert", str(hf_pickled), str(tmp_path / "out")]) == 2
    assert "never unpickles" in capsys.readouterr().err
    assert not marker.exists() and not cache.exists() and not (tmp_path / "out").exists()


# ---- keys, shapes, config, dtype ---------------------------------------------------------------------
BAD_TENSORS = {  # edit -> (what converting says, what loading a converted dir says)
    "missing": (drop_lm_head, "1 llava-next key(s) have no source tensor: language_model.lm_head.weight",
                "missing 1 key(s): language_model.lm_head.weight"),
    "unexpected": (add_stray, "not in the 'llava_hf' key table (refusing to guess what they are): stray.weight",
                   "unexpected 1 key(s): stray.weight"),
    "shape": (narrow_lm_head, "language_model.lm_head.weight: source shape (576, 63), expected (576, 64) from "
                              "config.json", "language_model.lm_head.weight: got (576, 63), expected (576, 64)"),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_missing_unexpected_and_misshaped_tensors_are_named(ckpt, tmp_path, case):
    hf_dir, converted = ckpt
    edit, converting, loading = BAD_TENSORS[case]
    cache = tmp_path / "cache"
    with pytest.raises(ConversionError) as e:
        Pipeline.from_pretrained(variant(tmp_path / "a", hf_dir, edit_tensors(edit)), cache_dir=cache, progress=False)
    assert converting in str(e.value)
    with pytest.raises(LoadError) as e:
        Pipeline.from_pretrained(variant(tmp_path / "b", converted, edit_tensors(edit)), cache_dir=cache,
                                 progress=False)
    assert loading in str(e.value)
    assert not cache.exists()  # nothing converted, nothing cached


def test_config_contradicting_the_tensors(ckpt, tmp_path):
    hf_dir, converted = ckpt
    with pytest.raises(ConversionError) as e:
        Pipeline.from_pretrained(variant(tmp_path / "a", hf_dir, set_hidden_size), cache_dir=tmp_path / "cache",
                                 progress=False)
    msg = str(e.value)
    assert "language_model.lm_head.weight: source shape (576, 64), expected (576, 96) from config.json" in msg
    assert "restore the config.json these weights came with" in msg
    with pytest.raises(LoadError) as e:
        Pipeline.from_pretrained(variant(tmp_path / "b", converted, set_hidden_size), progress=False)
    assert "language_model.embed_tokens.weight: got (576, 64), expected (576, 96)" in str(e.value)
    assert "config and the weights contradict each other" in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_wrong_dtype_request(ckpt, tmp_path, capsys):
    hf_dir, converted = ckpt
    for dtype in ("int8", torch.int8, "float64"):
        with pytest.raises(LoadError, match="must be float32, float16 or bfloat16"):
            Pipeline.from_pretrained(hf_dir, dtype=dtype, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()  # refused before converting
    assert Pipeline.from_pretrained(converted, dtype="bf16", progress=False).model.dtype == torch.bfloat16
    with torch.device("meta"):
        model = LlavaNextModel(read_config(converted))
    with pytest.raises(LoadError, match="torch.int8 is not supported"):
        load_into(model, converted, dtype=torch.int8)
    for json_flag in ([], ["--json"]):
        with pytest.raises(SystemExit) as e:
            main(["run", "--model", str(converted), "--dtype", "int8", *json_flag, "Hi"])
        assert e.value.code == 2
        out, err = capsys.readouterr()
        if json_flag:
            err = json.loads(out)
            assert err["error"].startswith("argument --dtype: invalid choice: 'int8'") and "fp32" in err["error"]
            assert (err["kind"], err["type"]) == ("user", "ArgumentError")
        else:
            assert "invalid choice: 'int8'" in err and out == ""


def test_cut_off_shard_names_the_file(ckpt, tmp_path, capsys):
    hf_dir, converted = ckpt
    bad_hf = variant(tmp_path / "a", hf_dir, cut_last_shard)
    shard = sorted(bad_hf.glob("*.safetensors"))[-1]
    size = shard.stat().st_size
    with pytest.raises(ConversionError) as e:
        Pipeline.from_pretrained(bad_hf, cache_dir=tmp_path / "cache", progress=False)
    assert str(e.value).startswith(f"{shard}: has {size} bytes but its header describes ")
    assert "cut off (an interrupted download or copy?)" in str(e.value)
    assert not (tmp_path / "cache").exists()

    bad = variant(tmp_path / "b", converted, cut_last_shard)
    shard = sorted(bad.glob("*.safetensors"))[-1]
    with pytest.raises(LoadError, match=f"^{shard}: has {shard.stat().st_size} bytes"):
        Pipeline.from_pretrained(bad, progress=False)
    shard.write_bytes(shard.read_bytes()[:20])  # cut inside the header
    assert main(["run", "--model", str(bad), "--json", "Hi"]) == 2
    err = json.loads(capsys.readouterr().out)
    assert err["kind"] == "user" and err["type"] == "LoadError"
    assert err["error"].startswith(f"{shard}: not a safetensors file, or it is cut off")


# ---- interrupted conversions ------------------------------------------------------------------------
# Every wait below ends on an event (the child's "STOPPED" line, its exit); WAIT_S only bounds a wait
# that something broken would make endless. It is no speed limit: on a busy machine these steps take
# seconds, and the child never goes on converting by itself (it waits to be signalled, or gives up).
WAIT_S = 600

SLOW_CONVERT = textwrap.dedent("""
    import os, signal, sys, time
    # Ctrl-C as from a terminal: started in the background by a non-interactive shell (`pytest &`), this
    # process inherits SIGINT ignored, and Python then leaves it ignored (no KeyboardInterrupt at all).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import llava_next_weights.convert as c
    from llava_next.cli.main import main

    real_write, real_rename, written = c._write_tensor, c.os.rename, [0]

    def stop():  # tell the parent where we are, then wait for its signal; never carry on by ourselves
        print("STOPPED", flush=True)
        time.sleep(float(os.environ["WAIT_S"]))
        print(f"SLOW_CONVERT: no signal came within {os.environ['WAIT_S']} s", file=sys.stderr, flush=True)
        os._exit(99)

    def slow_write(f, t):  # stop mid-conversion, some tensors written
        real_write(f, t)
        written[0] += 1
        if written[0] == 10 and os.environ["STOP_AT"] == "write":
            stop()

    def slow_rename(a, b):  # stop between the two renames of an overwrite
        real_rename(a, b)
        if os.path.basename(b) == "old" and os.environ["STOP_AT"] == "swap":
            stop()

    c._write_tensor, c.os.rename = slow_write, slow_rename
    sys.exit(main(sys.argv[1:]))
""")


def start_convert(src, out, stop_at="write", *extra) -> subprocess.Popen:
    """``llava-next convert SRC OUT`` in a subprocess, returned once it is stopped mid-way."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "convert", str(src), str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, STOP_AT=stop_at, WAIT_S=str(WAIT_S), HF_HUB_OFFLINE="1"))
    ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
    line = proc.stdout.readline() if ready else None
    if line is None or line.strip() != "STOPPED":
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"convert never reached its stopping point ({'no line' if line is None else repr(line)} "
                    f"within {WAIT_S} s); stderr:\n{err[-3000:]}")
    return proc


def finish(proc: subprocess.Popen) -> str:
    """Wait for the (signalled) child to exit; its stderr."""
    try:
        _, err = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"convert did not exit within {WAIT_S} s of its signal; stderr:\n{err[-3000:]}")
    return err


def interrupt_convert(src, out, sig, stop_at="write", *extra) -> tuple[int, str]:
    """Run ``llava-next convert SRC OUT`` in a subprocess, send ``sig`` once it is mid-way: (exit status, stderr)."""
    proc = start_convert(src, out, stop_at, *extra)
    proc.send_signal(sig)
    err = finish(proc)
    return proc.returncode, err


def age(path, seconds=60):
    """Make a staging directory look ``seconds`` old (the cleanup leaves newer ones alone)."""
    for p in [path, *path.rglob("*")]:
        t = time.time() - seconds
        os.utime(p, (t, t))


def test_ctrl_c_mid_convert_leaves_nothing(ckpt, tmp_path):
    hf_dir, _ = ckpt
    code, err = interrupt_convert(hf_dir, tmp_path / "out", signal.SIGINT)
    assert code == 130 and "llava-next convert: interrupted" in err, (code, err[-3000:])
    assert os.listdir(tmp_path) == []


def test_kill_mid_convert_leaves_no_complete_looking_output_and_next_run_cleans(ckpt, tmp_path):
    hf_dir, _ = ckpt
    out = tmp_path / "out"
    proc = start_convert(hf_dir, out)
    [stage] = os.listdir(tmp_path)  # a hidden staging directory, no out_dir
    assert stage.startswith(".out.") and stage.endswith(".partial")
    age(tmp_path / stage)
    convert(hf_dir, out, progress=False)  # its process is alive (holds the lock): its staging dir is kept
    assert sorted(os.listdir(tmp_path)) == sorted([stage, "out"])
    shutil.rmtree(out)

    proc.kill()
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(tmp_path) == [stage]
    assert not any(p.name == "config.json" for p in (tmp_path / stage).rglob("*"))  # never looks complete
    assert any(p.suffix == ".safetensors" for p in (tmp_path / stage).rglob("*"))  # it was killed mid-way
    convert(hf_dir, out, progress=False)  # the dead run's staging directory is removed first
    assert os.listdir(tmp_path) == ["out"] and len(load_state_dict_mmap(out)) > 0


def test_kill_during_overwrite_gives_the_old_output_back(ckpt, tmp_path):
    hf_dir, _ = ckpt
    out = convert(hf_dir, tmp_path / "out", progress=False)
    (out / "mine.txt").write_text("keep")
    before = tree(out)
    interrupt_convert(hf_dir, out, signal.SIGKILL, "swap", "--overwrite")
    assert not out.exists()  # killed between "out -> staging/old" and "new -> out"
    [stage] = os.listdir(tmp_path)
    age(tmp_path / stage)
    with pytest.raises(FileExistsError, match="already exists"):  # the old directory is back, not replaced
        convert(hf_dir, out, progress=False)
    assert os.listdir(tmp_path) == ["out"] and tree(out) == before
