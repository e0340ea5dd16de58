"""The decoder split over 2 real processes (torchrun, gloo on 127.0.0.1) against the same checkpoint in one.

One torchrun launch (tests/tp_worker.py) covers the parity cases on two tiny checkpoints — llama (4 heads,
4 kv heads) and mistral (GQA: 4 heads, 2 kv heads): full-sequence fp32 logits of an image prompt (its
AnyRes tiles split across the ranks), a video prompt (its frames split) and a left-padded batch of both,
within the project's tolerance of one process; greedy tokens identical; both ranks agree; each rank
holds half of the decoder's sharded weights and a KV cache with half of the kv heads; ``llava-next
run --json`` under torchrun prints the single-process answer from rank 0 only. A second launch, two
"machines" (two torchrun agents, --nnodes 2) of which one has a cut-off copy of the checkpoint,
must end both with one message, without waiting out the process group's timeout (set beyond the test's
own wait, so an exit can only come from the ranks agreeing on the failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import make_runnable_checkpoint
from media import cached_video

pytest.importorskip("transformers")
pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TIMEOUT_S = 600  # a hang guard for the launches, not a speed limit: on a busy 2-core machine they take minutes
NEVER_S = 3600  # LLAVA_NEXT_DIST_TIMEOUT of the failing launch: longer than the test ever waits


def child_env(**extra) -> dict:
    """One thread per process (2 cores, 2 ranks), no decode-attention compile (~10 s per process; SDPA
    instead, the same numbers to ~1e-7), the repository first on the path."""
    paths = [str(REPO), str(REPO / "kernels"), str(REPO / "weights")]
    env = dict(os.environ, OMP_NUM_THREADS="1", LLAVA_NEXT_COMPILE="0", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]), **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Two tiny runnable checkpoints converted into llava-next's layout: {"llama": dir, "gqa": dir}."""
    from llava_next_weights.hub import resolve

    root = tmp_path_factory.mktemp("tp")
    out = {}
    for name, text in (("llama", "llama"), ("gqa", "mistral")):
        directory, _ = make_runnable_checkpoint(root / f"hf-{name}", kind="video", text=text)
        out[name] = resolve(directory, cache_dir=root / "cache", progress=False)
    return root, out


@pytest.fixture(scope="module")
def video():
    return cached_video("model_parity", frames=24, size_hw=(90, 160), fps=12, photo="coffee")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launches(converted, video):
    """Both launches at once (they share the machine; waiting for one then the other doubled the time):
    the parity worker on 2 ranks, and the two "machines" of which the second has a cut-off checkpoint.
    Returns the worker's results per checkpoint and rank, the CLI's stdout per rank, and for the failing
    run each agent's (returncode, stderr), or (None, stderr) if it had not exited within TIMEOUT_S."""
    root, dirs = converted
    out = root / "out"
    out.mkdir()
    bad = root / "copy-on-machine-2"
    shutil.copytree(dirs["llama"], bad)
    shard = next(bad.glob("*.safetensors"))
    with open(shard, "r+b") as f:  # an interrupted copy
        f.truncate(shard.stat().st_size // 2)
    worker = subprocess.Popen(torchrun("--standalone", "--nproc-per-node", "2", str(HERE / "tp_worker.py"), str(out),
                                       str(video), *(f"{k}={v}" for k, v in dirs.items())),
                              env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = free_port()
    errs = [root / f"node{node}.err" for node in (0, 1)]  # files, not pipes: a worker left behind cannot block reading
    handles = [open(e, "w") for e in errs]
    nodes = [subprocess.Popen(
        torchrun("--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                 "--master-port", str(port), "-m", "llava_next.cli.main", "run", "--model", str(model),
                 "--video", str(video), "--frames", "2", "--max-new-tokens", "2", "What is happening?"),
        env=child_env(LLAVA_NEXT_DIST_TIMEOUT=str(NEVER_S)), stdout=subprocess.DEVNULL, stderr=handles[node])
        for node, model in ((0, dirs["llama"]), (1, bad))]
    for h in handles:
        h.close()
    failing = []
    for p, err_file in zip(nodes, errs):
        try:
            code = p.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:  # waiting in a collective for the failed rank: stop it, report it
            p.terminate()  # torchrun stops its workers on SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=60)
            p.kill()
            p.wait()
            code = None
        failing.append((err_file.read_text(), code))
    _, err = worker.communicate(timeout=TIMEOUT_S)
    assert worker.returncode == 0, err[-4000:]
    results = {name: [torch.load(out / f"{name}-rank{rank}.pt") for rank in (0, 1)] for name in dirs}
    cli = [((out / f"cli-rank{rank}.txt").read_text(), (out / f"cli-rank{rank}.code").read_text()) for rank in (0, 1)]
    return {"results": results, "cli": cli, "failing": failing}


@contextlib.contextmanager
def like_a_rank():
    """The single-process reference computed as the ranks compute: SDPA decode attention (no compile) and
    one thread (two spinning oneDNN threads on a busy 2-core machine made this ~40x slower)."""
    threads = torch.get_num_threads()
    os.environ["LLAVA_NEXT_COMPILE"] = "0"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.environ.pop("LLAVA_NEXT_COMPILE")
        torch.set_num_threads(threads)


def single_process(directory, video) -> dict:
    """The same prompts as tp_worker.run_prompts, in this process (no tensor parallelism)."""
    import tp_worker
    from llava_next.runtime.pipeline import Pipeline

    with like_a_rank():
        pipe = Pipeline.from_pretrained(directory, dtype=torch.float32, progress=False)
        return tp_worker.run_prompts(pipe, str(video))


@pytest.mark.parametrize("name", ["llama", "gqa"])
def test_two_ranks_match_one_process(launches, converted, video, name):
    results = launches["results"]
    ref = single_process(converted[1][name], video)
    for rank, got in enumerate(results[name]):
        for case in ("image", "video", "batch"):
            want, have = ref[f"{case}_logits"], got[f"{case}_logits"]
            assert have.shape == want.shape
            err = (have - want).abs().max().item() / want.abs().max().item()
            assert err <= 1e-5, f"{name} {case} rank {rank}: relative logit error {err:.2e}"
            assert got[f"{case}_tokens"] == ref[f"{case}_tokens"], f"{name} {case} rank {rank}"
    assert torch.equal(results[name][0]["batch_logits"], results[name][1]["batch_logits"])  # ranks agree exactly


@pytest.mark.parametrize("name", ["llama", "gqa"])
def test_each_rank_holds_half_the_decoder(launches, converted, video, name):
    """Measured from the tensors each rank's modules hold after loading: the split weights halve, the
    norms (replicated) stay; the KV cache has half of the kv heads."""
    from llava_next_weights.load import read_config

    results = launches["results"]
    cfg = read_config(converted[1][name]).text
    full = 4 * sum(n for n in (
        cfg.vocab_size * cfg.hidden_size * 2,  # embed_tokens + lm_head
        cfg.num_layers * cfg.hidden_size * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
        cfg.num_layers * 3 * cfg.hidden_size * cfg.intermediate_size))
    norms = 4 * cfg.hidden_size * (2 * cfg.num_layers + 1)
    for got in results[name]:
        assert got["decoder_bytes"] == full // 2 + norms
        assert got["kv_cache_shape"][1] == cfg.num_kv_heads // 2


def test_run_under_torchrun_prints_once_the_single_process_answer(launches, converted, video):
    from llava_next.runtime.pipeline import Pipeline

    (out0, code0), (out1, code1) = launches["cli"]
    assert (code0, code1) == ("0", "0")
    assert out1 == ""  # rank 1 prints nothing
    answer = json.loads(out0)
    import tp_worker

    with like_a_rank():
        pipe = Pipeline.from_pretrained(converted[1]["llama"], dtype=torch.float32, progress=False)
        req = pipe.prepare(tp_worker.PROMPTS["video"]["prompt"], video=video, frames=4,
                           max_new_tokens=tp_worker.NEW_TOKENS)
        ref = pipe.generate_batch([req], max_new_tokens=tp_worker.NEW_TOKENS)[0]
    assert answer["tokens"] == ref


def test_a_rank_failing_at_load_ends_every_rank_with_one_message(launches):
    """Two machines (torchrun agents with --nnodes 2 on 127.0.0.1), the second with a cut-off copy of
    the checkpoint: both exit non-zero, and rank 0 says once which rank failed and why. No collective waits
    for the failed rank: their timeout (NEVER_S) is longer than the fixture waits, so only agreeing ends them."""
    (err0, code0), (err1, code1) = launches["failing"]
    assert code0 is not None and code1 is not None, \
        (f"still running after {TIMEOUT_S} s (waiting for the failed rank?)", err0[-2000:], err1[-2000:])
    assert code0 != 0 and code1 != 0, (err0[-2000:], err1[-2000:])
    assert "llava-next run: error: rank 1 of 2 failed loading the checkpoint" in err0 and "cut off" in err0, err0[-3000:]
    assert err0.count("failed loading the checkpoint") == 1
    assert "failed loading the checkpoint" not in err1  # rank 1 leaves the message to rank 0


def test_which_numbers_of_processes_work_is_said():
    from llava_next.config import LlavaNextConfig
    from llava_next.parallel.tensor_parallel import TensorParallelError, check_tp_size, working_tp_sizes

    yi = LlavaNextConfig.from_name("LLaVA-NeXT-Video-34B").text  # 56 heads, 8 kv heads (GQA), vocab 64064
    assert working_tp_sizes(yi) == [1, 2, 4, 8]
    with pytest.raises(TensorParallelError, match=r"num_heads 56, num_kv_heads \(GQA\) 8, .* not divisible by 3.*"
                                                  r"works for this model: 1, 2, 4, 8"):
        check_tp_size(yi, 3)
    mistral = LlavaNextConfig.from_name("llava-v1.6-mistral-7b").text  # 32 heads, 8 kv heads
    with pytest.raises(TensorParallelError, match=r"split over 16 processes: num_kv_heads \(GQA\) 8 is not divisible"):
        check_tp_size(mistral, 16)


def test_memory_per_rank_is_the_run_check_with_one_ranks_share():
    """N = 1 is exactly the single-process numbers (all weights; memory_budget of the full config); at
    N = 2 the decoder weights, the KV cache and the head/MLP activations halve, the vision tower does not."""
    from llava_next.config import LlavaNextConfig
    from llava_next.model.llava import LlavaNextModel
    from llava_next.parallel.tensor_parallel import memory_per_rank
    from llava_next.runtime.memory import memory_budget

    config = LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")
    with torch.device("meta"):
        model = LlavaNextModel(config)
    weights = sum(p.numel() for p in model.parameters()) * 2
    budget = memory_budget(config.text, 1, 1200, 256, torch.bfloat16, torch.device("cpu"))
    one, two = (memory_per_rank(config, n, torch.bfloat16, 1200, 256) for n in (1, 2))
    assert one["total"] == weights + budget.needed_bytes
    norms = 2 * config.text.hidden_size * (2 * config.text.num_layers + 1)
    assert two["decoder"] == (one["decoder"] - norms) // 2 + norms and two["vision"] == one["vision"]
    assert two["kv_cache"] * 2 == one["kv_cache"] and two["activations"] < one["activations"]
