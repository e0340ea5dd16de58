"""Supervised fine-tuning (llava_next/train/sft.py) on the built-in tiny model with Korean captions of real video
clips: a run killed between checkpoints resumes to the same weights as an uninterrupted one, and another run's
directory is never written over; ``llava-next train`` writes an adapter that ``apply_lora`` + PEFT's loader read.
(The issue's learning test, captions reproduced exactly after training: tests/test_train_learns.py.)"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import av
import pytest
import torch

from media import real_video
from llava_next.model.lora import LoraConfig, apply_lora
from llava_next.runtime.loading import load
from llava_next.train.data import TrainingData
from llava_next.train.sft import SFTConfig, SFTRun, TrainError, materialize_trainable

CAPTIONS = ["토끼가 풀밭에서 잠을 깬다.", "나비가 꽃 위를 날아다닌다.", "다람쥐 세 마리가 웃는다.", "커다란 토끼가 하품을 한다."]
PROMPT = "<video>\n이 영상을 한국어로 상세히 묘사해주세요."


def clips(root: Path) -> list[Path]:
    """Four clips of bigbuckbunny.mp4 (real frames), one per quarter of the video, re-encoded."""
    with av.open(str(real_video())) as src:
        frames = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
    n = len(frames) // 4
    out = []
    for k in range(4):
        path = root / f"clip{k}.mp4"
        with av.open(str(path), "w") as dst:
            stream = dst.add_stream("libx264", rate=25)
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            for i in range(k * n, k * n + n):
                dst.mux(stream.encode(av.VideoFrame.from_ndarray(frames[i], format="rgb24")))
            dst.mux(stream.encode())
        out.append(path)
    return out


def dataset(root: Path) -> Path:
    lines = [{"id": f"c{k}", "video": p.name, "conversations": [{"from": "human", "value": PROMPT},
                                                                {"from": "gpt", "value": CAPTIONS[k]}]}
             for k, p in enumerate(clips(root))]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return path


def tiny(cache: Path, lora: bool = True):
    pipe = load("tiny-random", cache_dir=cache, progress=False, materialize=materialize_trainable)
    if lora:
        apply_lora(pipe.model, LoraConfig(r=8, alpha=16, projector="full"))
    return pipe


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return dataset(tmp_path_factory.mktemp("sft"))


def test_a_killed_run_resumes_to_the_same_weights(data_file, tmp_path):
    cache = tmp_path / "cache"

    def run(out: Path, steps: int, stop_after: int | None = None):
        torch.manual_seed(0)
        pipe = tiny(cache)
        data = TrainingData(data_file, pipe.tokenizer, pipe.config, media_root=data_file.parent, frames=2, seed=3)
        cfg = SFTConfig(out=str(out), steps=steps, batch_size=1, lr=5e-3, trainable="lora", save_every=2, seed=3)

        def kill(line):
            if stop_after is not None and line["step"] == stop_after:
                raise KeyboardInterrupt  # as kill -9 between two checkpoints: step 3 is done but not saved
        try:
            SFTRun(pipe.model, data, cfg, on_step=kill).train()
        except KeyboardInterrupt:
            pass
        return {n: p.detach().clone() for n, p in pipe.model.named_parameters() if "lora_" in n}

    whole = run(tmp_path / "a", 4)
    run(tmp_path / "b", 4, stop_after=3)
    resumed = run(tmp_path / "b", 4)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[n], resumed[n]) for n in whole)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "steps.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3 ran twice: its first line was dropped on resume
    with pytest.raises(TrainError, match="holds another run"):
        pipe = tiny(cache)
        data = TrainingData(data_file, pipe.tokenizer, pipe.config, media_root=data_file.parent, frames=2, seed=3)
        SFTRun(pipe.model, data, SFTConfig(out=str(tmp_path / "b"), steps=4, lr=1e-3, trainable="lora")).train()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_llava_next_train_writes_a_peft_adapter(data_file, tmp_path, capsys, quantize):
    """The command: two steps of LoRA on the tiny model (nf4: QLoRA, the base in NF4), the adapter in PEFT's two
    files, loadable by ``load_adapter`` into a fresh model with the trained values."""
    from llava_next.cli.main import main
    from llava_next_weights.adapters import load_adapter

    cache, out = tmp_path / "cache", tmp_path / "run"
    code = main(["train", "--data", str(data_file), "--model", "tiny-random", "--out", str(out), "--steps", "2",
                 "--frames", "2", "--lora-rank", "4", "--cache-dir", str(cache),
                 *(["--quantize", quantize, "--dtype", "bf16"] if quantize else [])])
    assert code in (0, None)
    said = capsys.readouterr()
    adapter = Path(said.out.strip().splitlines()[-1])
    assert re.search(r"training: step 2/2 \[#{20}\] loss \d+\.\d{4}  [\d,]+ tokens/s  ETA 0m00s", said.err), said.err
    assert adapter == out / "adapter" and {p.name for p in adapter.iterdir()} == {"adapter_config.json",
                                                                                 "adapter_model.safetensors"}
    assert len((out / "steps.jsonl").read_text().splitlines()) == 2
    run = json.loads((out / "run.json").read_text())
    assert run["quantized_base"] == (["NF4Linear"] if quantize == "nf4" else [])  # really an NF4 base
    assert run["base_dtype"] == ("bfloat16" if quantize else "float32")  # QLoRA: bf16 compute over NF4
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(adapter / "adapter_model.safetensors").values()} == {torch.float32}
    fresh = tiny(cache, lora=False)
    load_adapter(fresh.model, adapter)
    trained = {n: p for n, p in fresh.model.named_parameters() if "lora_B" in n}
    assert trained and any(p.abs().max() > 0 for p in trained.values())  # B starts at zero: it trained


def test_bf16_autocast_trains_float32_adapters(data_file, tmp_path):
    """``autocast="bf16"`` (``--bf16``): the forward in bfloat16, the loss within bfloat16's precision of
    float32's, the adapters and AdamW's moments float32 and changed by the step."""
    losses, weights = {}, {}
    for autocast in (None, "bf16"):
        torch.manual_seed(0)
        pipe = tiny(tmp_path / "cache")
        data = TrainingData(data_file, pipe.tokenizer, pipe.config, media_root=data_file.parent, frames=2, seed=3)
        run = SFTRun(pipe.model, data, SFTConfig(out=str(tmp_path / str(autocast)), steps=1, batch_size=2, lr=1e-3,
                                                 trainable="lora+projector", autocast=autocast),
                     on_step=lambda line, a=autocast: losses.__setitem__(a, line["loss"]))
        run.train()
        weights[autocast] = {n: p.detach().clone() for n, p in pipe.model.named_parameters() if p.requires_grad}
        moments = [s["exp_avg"] for s in run.optimizer.state.values()]
        assert moments and all(m.dtype == torch.float32 for m in moments)
    assert abs(losses["bf16"] - losses[None]) < 2e-2 * losses[None]
    assert losses["bf16"] != losses[None]  # the forward really ran in bfloat16
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights["bf16"].values())
    moved = [n for n in weights[None] if "lora_B" in n and weights["bf16"][n].abs().max() > 0]
    assert len(moved) == sum("lora_B" in n for n in weights[None])  # every adapter got a gradient


def test_two_processes_train_the_weights_of_one(data_file, tmp_path, capsys):
    """``torchrun --nproc-per-node 2 llava-next train --batch-size 1`` reaches the adapter of one process with
    ``--batch-size 2`` (the same global batch): 3 items, so rank 1's part of the second batch is empty. The two
    processes' run stops after one step and is then extended to two (resumed from its checkpoint, the schedule
    recomputed for two steps; its first rate is the same either way), so the same two launches check resuming:
    a resume that lost the optimizer's state, the data order or the schedule would move step 2 by ~lr (Adam's
    first steps move every entry by about lr), a thousand times the tolerance. The one-process run is ``main`` in
    this process, as a rank computes (one thread, no compile): the torchrun launches are the subject, and a
    console process of its own adds only its start. (A single process's resume is bit for bit:
    test_a_killed_run_resumes_to_the_same_weights.)"""
    from safetensors.torch import load_file

    from llava_next.cli.main import main
    from test_tensor_parallel import child_env, like_a_rank, torchrun

    three = tmp_path / "three.jsonl"
    three.write_text("".join(data_file.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")

    def command(out: str, batch: int) -> list[str]:
        return ["-m", "llava_next.cli.main", "train", "--data", str(three), "--media-root", str(data_file.parent),
                "--model", "tiny-random", "--out", str(tmp_path / out), "--batch-size", str(batch), "--frames", "2",
                "--lora-rank", "4", "--lora-dropout", "0", "--lr", "1e-3", "--seed", "1", "--quiet",
                "--cache-dir", str(tmp_path / "cache")]
    env = child_env()
    with like_a_rank():
        assert main(command("one", 2)[2:]) in (0, None)
    for steps in ("1", "2"):
        two = subprocess.run(torchrun("--standalone", "--nproc-per-node", "2", *command("two", 1), "--steps", steps),
                             env=env, capture_output=True, text=True, timeout=600)
        assert two.returncode == 0, two.stderr[-3000:]
    logs = [[json.loads(x) for x in (tmp_path / d / "steps.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [x["tokens"] for x in logs[0]] == [x["tokens"] for x in logs[1]] and len(logs[0]) == 2
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 * a["loss"] for a, b in zip(*logs)), logs
    one, two = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-2 * 1e-3, worst  # Adam moves an entry by ~lr at first: float32 sums differ by far less
    # one process cannot resume two processes' run: the global batch would change
    capsys.readouterr()
    with like_a_rank():
        alone = main(command("two", 1)[2:])
    said = capsys.readouterr().err
    assert alone == 2 and "different world_size" in said, said[-2000:]


def test_two_stages_projector_then_lora(data_file, tmp_path, capsys):
    """Stage 1 (``--trainable projector``) writes OUT/projector.safetensors; stage 2 starts from it with
    ``--projector`` and its adapter carries that projector (frozen in stage 2: PEFT's modules_to_save), so
    ``run --adapter`` gets both. A file that is not this model's projector is refused by name."""
    from safetensors.torch import load_file

    from llava_next.cli.main import main
    from llava_next_weights.adapters import read_adapter

    common = ["--data", str(data_file), "--model", "tiny-random", "--steps", "1", "--frames", "2", "--lora-rank", "4",
              "--cache-dir", str(tmp_path / "cache"), "--quiet", "--lr", "1e-2"]
    assert main(["train", *common, "--out", str(tmp_path / "s1"), "--trainable", "projector"]) in (0, None)
    projector = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert projector == tmp_path / "s1" / "projector.safetensors"
    stage1 = load_file(projector)
    base = {f"projector.{k}": v for k, v in tiny(tmp_path / "cache", lora=False).model.projector.state_dict().items()}
    assert stage1.keys() == base.keys() and any(not torch.equal(stage1[k], base[k]) for k in base)  # it trained
    assert main(["train", *common, "--out", str(tmp_path / "s2"), "--projector", str(projector)]) in (0, None)
    cfg, tensors = read_adapter(Path(capsys.readouterr().out.strip().splitlines()[-1]))
    assert cfg.projector == "full" and all(torch.equal(tensors[k], stage1[k]) for k in stage1)
    assert main(["train", *common, "--out", str(tmp_path / "s3"), "--projector", str(data_file)]) == 2
    assert "--projector" in capsys.readouterr().err and not (tmp_path / "s3").exists()
