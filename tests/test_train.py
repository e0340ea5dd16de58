"""Supervised fine-tuning (llava_next/train/sft.py) on the built-in tiny model with Korean captions of real video
clips: a run killed between checkpoints resumes to the same weights as an uninterrupted one, and another run's
directory is never written over; ``llava-next train`` writes an adapter that ``apply_lora`` + PEFT's loader read.
(The issue's learning test, captions reproduced exactly after training, is not here yet: docs/training.md.)"""

from __future__ import annotations

import json
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
                 "--frames", "2", "--lora-rank", "4", "--cache-dir", str(cache), "--quiet",
                 *(["--quantize", quantize] if quantize else [])])
    assert code in (0, None)
    adapter = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert adapter == out / "adapter" and {p.name for p in adapter.iterdir()} == {"adapter_config.json",
                                                                                 "adapter_model.safetensors"}
    assert len((out / "steps.jsonl").read_text().splitlines()) == 2
    base = json.loads((out / "run.json").read_text())["quantized_base"]
    assert base == (["NF4Linear"] if quantize == "nf4" else [])  # --quantize nf4 really trained on an NF4 base
    fresh = tiny(cache, lora=False)
    load_adapter(fresh.model, adapter)
    trained = {n: p for n, p in fresh.model.named_parameters() if "lora_B" in n}
    assert trained and any(p.abs().max() > 0 for p in trained.values())  # B starts at zero: it trained
