"""Failures while running, through ``Pipeline.stream`` and ``llava-next run``: float16 overflow is caught
before a garbage token is produced; a request too large for memory is refused with its numbers (from
the estimate, and when an allocation really fails); exit codes and ``--json`` errors tell user errors
(2) from bugs (3) and interruptions (130)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import llava_next.runtime.memory as memory_mod
from checkpoints import make_runnable_checkpoint
from llava_next.cli.main import main
from llava_next.runtime.memory import MemoryBudgetError
from llava_next.runtime.pipeline import NonFiniteError, Pipeline
from llava_next_weights.convert import convert
from media import cached_video, real_photo

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(converted tiny video checkpoint dir, fp32 Pipeline)."""
    root = tmp_path_factory.mktemp("runtime")
    hf_dir, _ = make_runnable_checkpoint(root / "tiny-hf", kind="video")
    directory = convert(hf_dir, root / "tiny", progress=False)
    return directory, Pipeline.from_pretrained(directory, dtype=torch.float32, progress=False)


def scaled(directory, dest, key: str, factor: float):
    """A copy of a converted checkpoint with one tensor multiplied by ``factor``."""
    shutil.copytree(directory, dest)
    for shard in dest.glob("*.safetensors"):
        tensors = load_file(shard)
        if key in tensors:
            tensors[key] = tensors[key] * factor
            save_file(tensors, shard, metadata={"format": "pt"})
    return dest


# ---- numerics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, where", [
    ("language_model.layers.0.mlp.down_proj.weight", "the logits of the prompt (prefill)"),  # residual stream
    ("projector.linear_2.weight", "the visual features of image 0"),  # image features
])
def test_float16_overflow_is_reported_not_generated(tiny, tmp_path, key, where):
    """Weights x 1e6 keep every value inside float32's and bfloat16's range but push activations past
    float16's 65504: fp16 must stop with the fix, the same weights in fp32/bf16 must run."""
    directory, _ = tiny
    loud = scaled(directory, tmp_path / "loud", key, 1e6)
    pipe = Pipeline.from_pretrained(loud, dtype=torch.float16, progress=False)
    req = pipe.prepare("Describe it.", images=[real_photo("chelsea")])
    pieces = []
    with pytest.raises(NonFiniteError) as e:
        for piece in pipe.stream(req, max_new_tokens=5):
            pieces.append(piece)
    assert pieces == [] and getattr(req, "tokens", []) == []  # not one garbage token
    msg = str(e.value)
    assert msg.startswith(f"{where} are not finite (inf/NaN), so generation stopped before producing garbage")
    assert "float16 overflowed" in msg and "--dtype bf16" in msg and "--dtype fp32" in msg
    for dtype in (torch.bfloat16, torch.float32):
        ok = Pipeline.from_pretrained(loud, dtype=dtype, progress=False)
        assert len(ok.generate_batch([ok.prepare("Describe it.", images=[real_photo("chelsea")])],
                                     max_new_tokens=2)[0]) >= 1


def test_float16_overflow_through_the_cli(tiny, tmp_path, capsys):
    directory, _ = tiny
    loud = scaled(directory, tmp_path / "loud", "language_model.layers.0.mlp.down_proj.weight", 1e6)
    assert main(["run", "--model", str(loud), "--dtype", "fp16", "--json", "Hi"]) == 2
    err = json.loads(capsys.readouterr().out)
    assert (err["kind"], err["type"]) == ("user", "NonFiniteError") and "--dtype bf16" in err["error"]


# ---- memory -----------------------------------------------------------------------------------------
def test_request_too_large_for_memory_is_refused_with_the_numbers(tiny):
    _, pipe = tiny
    # 2**30 new tokens fit a RoPE factor of 2**30, but their KV cache (2 x 2 layers x 4 heads x 16 x 4 bytes
    # = 1 KiB per position) is 1 TiB: refused before encoding anything
    req = pipe.prepare("Hi", rope_scale=2.0**30, max_new_tokens=2**30)
    with pytest.raises(MemoryBudgetError) as e:
        pipe.generate(req, max_new_tokens=2**30)
    n = len(req.input_ids)
    msg = str(e.value)
    assert msg.startswith(f"not enough memory for this request (estimated before allocating): 1 x {n + 2**30} "
                          f"positions ({n} prompt + {2**30} new tokens) need a KV cache of 1024.00 GiB in float32")
    assert "available on cpu: " in msg and "Lower --max-new-tokens" in msg and "--dtype bf16" in msg
    assert "encode_s" not in req.timings  # the vision tower never ran


def test_small_memory_budget_counts_the_video(tiny, monkeypatch):
    _, pipe = tiny
    video = cached_video("model_parity", frames=24, size_hw=(90, 160), fps=12, photo="coffee")
    req = pipe.prepare("What happens?", video=video, frames=24)
    budget = memory_mod.memory_budget(pipe.config.text, 1, len(req.input_ids), 8, torch.float32,
                                        torch.device("cpu"))
    assert budget.kv_cache_bytes == 2 * 2 * 4 * (len(req.input_ids) + 8) * 16 * 4
    monkeypatch.setattr(memory_mod, "available_memory", lambda device: budget.needed_bytes - 1)
    with pytest.raises(MemoryBudgetError, match=f"{len(req.input_ids)} prompt \\+ 8 new tokens"):
        pipe.generate(req, max_new_tokens=8)
    monkeypatch.setattr(memory_mod, "available_memory", lambda device: budget.needed_bytes)
    assert pipe.generate_batch([req], max_new_tokens=8)


def test_failed_allocation_becomes_the_same_error(tiny, monkeypatch):
    """If the estimate cannot be made (unknown free memory), the allocator's own failure is caught.
    2**40 positions x 256 bytes = 256 TiB per cache tensor: beyond any address space, so malloc fails
    whatever the kernel's overcommit policy."""
    _, pipe = tiny
    monkeypatch.setattr(memory_mod, "available_memory", lambda device: None)
    req = pipe.prepare("Hi", rope_scale=2.0**40, max_new_tokens=2**40)
    with pytest.raises(MemoryBudgetError, match=r"\(the allocation failed: .*can't allocate memory.*\): "
                                                r"1 x \d+ positions .* available on cpu: unknown"):
        pipe.generate(req, max_new_tokens=2**40)
    decoder = pipe.model.language_model
    assert decoder.rope_scaling_factor == 1.0  # restored
    assert pipe.generate_batch([pipe.prepare("Hi")], max_new_tokens=2)  # and the pipeline still works


def test_memory_error_through_the_cli(tiny):
    directory, _ = tiny
    r = subprocess.run([sys.executable, "-m", "llava_next.cli.main", "run", "--model", str(directory), "--json",
                        "--max-new-tokens", "1000000000", "--rope-scale", "10000000", "Hi"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 2, r.stderr
    err = json.loads(r.stdout)
    assert (err["kind"], err["type"]) == ("user", "MemoryBudgetError")
    assert "1000000000 new tokens) need a KV cache of 476.84 GiB in bfloat16" in err["error"]  # 512 B/position
    assert "--dtype bf16" not in err["error"]  # already bf16 (the default)


# ---- exit codes -------------------------------------------------------------------------------------
def test_internal_errors_exit_3_and_interruptions_130(tiny, monkeypatch, capsys):
    directory, _ = tiny

    def bug(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(Pipeline, "prepare", bug)
    assert main(["run", "--model", str(directory), "Hi"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and "ZeroDivisionError" in err and "Traceback" in err
    assert err.strip().endswith("llava-next run: internal error (ZeroDivisionError); this is a bug, please report "
                                "it with the traceback above")
    assert main(["run", "--model", str(directory), "--json", "Hi"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert (report["kind"], report["type"]) == ("internal", "ZeroDivisionError") and "Traceback" in report["traceback"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "prepare", interrupted)
    assert main(["run", "--model", str(directory), "--json", "Hi"]) == 130
    assert json.loads(capsys.readouterr().out) == {"error": "interrupted", "kind": "interrupted",
                                                   "type": "KeyboardInterrupt"}
