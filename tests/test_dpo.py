"""DPO (llava_next/train/dpo.py, train/preferences.py) on the built-in tiny model with real video clips and a real
photo: the loss, TRL's logged rewards and the LoRA gradients equal TRL 1.16's ``DPOTrainer._compute_loss`` (called
itself, on the same per-token log-probs); training raises the chosen-minus-rejected margin of every pair; a run
interrupted between checkpoints resumes to the same adapter without recomputing the reference; the command runs
with an NF4 base; bad pairs are errors naming their line."""

from __future__ import annotations

import json
import re
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from media import real_photo
from test_train import clips, tiny
from llava_next.model.lora import adapters_disabled, lora_layers
from llava_next.train.data import IGNORE_INDEX, DataError, read_records
from llava_next.train.dpo import REFERENCE_FILE, DPOConfig, DPORun, dpo_losses, pair_metrics, reference_logps, \
    sequence_logps
from llava_next.train.preferences import PreferenceData, collate_pairs, parse_pair

PROMPT = "이 영상을 한국어로 짧게 묘사해주세요."
PAIRS = [("토끼가 잔다.", "나비가 난다."), ("나비가 난다.", "토끼가 잔다."),
         ("다람쥐가 웃는다.", "토끼가 운다.")]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    """Three video pairs (flat form, Korean) and one image pair (conversations form, two turns). The photo is
    downscaled to one 112 px tile: 136 visual tokens instead of the 512 px photo's 336, which made the image pair
    most of every DPO step here (what is tested is the pair's form and the loss, not the photo's size)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("dpo")
    videos = clips(root)
    with Image.open(real_photo()) as photo:
        photo.convert("RGB").resize((112, 112), Image.Resampling.BICUBIC).save(root / "photo.png")
    items = [{"id": f"v{k}", "video": videos[k].name, "prompt": PROMPT, "chosen": c, "rejected": r}
             for k, (c, r) in enumerate(PAIRS)]
    items.append({"id": "i0", "image": "photo.png", "conversations": [
        {"from": "human", "value": "<image>\nWho is it?"}, {"from": "gpt", "value": "An astronaut."},
        {"from": "human", "value": "Where?"}, {"from": "gpt", "chosen": "In space.", "rejected": "At sea."}]})
    return write_jsonl(root / "prefs.jsonl", items)


def subset(prefs: Path, tmp_path: Path, lines: list[int]) -> Path:
    rows = prefs.read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp_path / "subset.jsonl"
    out.write_text("".join(rows[i] for i in lines), encoding="utf-8")
    return out


def data_of(pipe, path: Path, media_root: Path) -> PreferenceData:
    return PreferenceData(path, pipe.tokenizer, pipe.config, media_root=media_root, frames=1, seed=3)


# ---- (a) parity with TRL --------------------------------------------------------------------------------------
def trl_compute_loss(per_token_logps, completion_mask, ref, loss_type: str, beta: float, label_smoothing: float):
    """TRL 1.16's own ``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py) with ``precompute_ref_log_probs``,
    on a stand-in model whose fused LM head output is ``per_token_logps`` (B, T-1), zero off the completion, as
    transformers' fused head returns them; returns the loss and TRL's logged metrics."""
    from trl import DPOTrainer

    B, T = completion_mask.shape
    outputs = types.SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(B, T - 1),
                                    mean_logits=torch.zeros(B, T - 1), is_top1=torch.zeros(B, T - 1, dtype=torch.bool))
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), beta=beta, label_smoothing=label_smoothing,
        loss_types=[loss_type], loss_weights=[1.0], ld_alpha=None, f_divergence_type="reverse_kl",
        precompute_ref_logps=True, aux_loss_enabled=False, use_weighting=False, _tp_size=1, _total_train_tokens=0,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                          gather_for_metrics=lambda t: t))
    inputs = {"input_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T, dtype=torch.long),
              "completion_mask": completion_mask.long(), "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def test_loss_rewards_and_gradients_equal_trl(prefs, tmp_path):
    torch.manual_seed(0)
    pipe = tiny(tmp_path / "cache")
    with torch.no_grad():  # a trained-looking adapter: the policy differs from the reference
        for layer in lora_layers(pipe.model).values():
            layer.lora_B.weight.normal_(0, 0.02)
    data = data_of(pipe, subset(prefs, tmp_path, [0, 3]), prefs.parent)
    batch = collate_pairs([data[0], data[1]])  # a video pair and an image pair: 4 rows, chosen first
    forward = dict(images=batch.images, videos=[v.pixel_values for v in batch.videos],
                   attention_mask=batch.attention_mask)
    with torch.no_grad(), adapters_disabled(pipe.model):
        ref = torch.stack(sequence_logps(pipe.model(batch.input_ids, **forward), batch.labels)[0].chunk(2), dim=1)
    logits = pipe.model(batch.input_ids, **forward)  # (4, T, V), with the adapter
    params = {n: p for n, p in pipe.model.named_parameters() if p.requires_grad and "lora_" in n}
    # TRL's input: per-token log-probs of the completion, written out here from the logits
    completion = batch.labels != IGNORE_INDEX  # (4, T)
    targets = batch.labels[:, 1:].clamp(min=0)
    per_token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets[..., None])[..., 0]
    per_token = per_token * completion[:, 1:]
    for loss_type, smoothing in [("sigmoid", 0.0), ("robust", 0.1), ("ipo", 0.0)]:
        cfg = DPOConfig(out="-", beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
        logps, counts = sequence_logps(logits, batch.labels)
        (c, r), (nc, nr) = logps.chunk(2), counts.chunk(2)
        ours = dpo_losses(c, r, ref[:, 0], ref[:, 1], cfg, nc, nr).mean()
        mine = torch.autograd.grad(ours, list(params.values()), retain_graph=True)
        theirs, logged = trl_compute_loss(per_token, completion, ref, loss_type, 0.1, smoothing)
        grads = torch.autograd.grad(theirs, list(params.values()), retain_graph=True)
        assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item()), (loss_type, ours, theirs)
        worst = max(((a - b).norm() / b.norm().clamp(min=1e-30)).item() for a, b in zip(mine, grads))
        assert worst < 1e-5, (loss_type, worst)
        metrics = {k: v / 2 for k, v in pair_metrics(c, r, ref[:, 0], ref[:, 1], 0.1).items()}
        # the rewards are beta (logps - ref) with |logps| ~ 100 in float32: the two summation orders of the
        # per-token log-probs (ours, the test's) differ by ~1e-5 relative to the logps, not to their difference
        scale = 1e-5 * logps.abs().max().item()
        for k in ("logps/chosen", "logps/rejected"):
            assert metrics[k] == pytest.approx(logged[k], rel=1e-5), (k, metrics[k], logged[k])
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert metrics[k] == pytest.approx(logged[k], abs=0.1 * scale), (k, metrics[k], logged[k])
        assert metrics["rewards/accuracies"] == logged["rewards/accuracies"]
    assert abs(logged["rewards/margins"]) > 1e-3  # the policy is not the reference


def test_conservative_dpo_is_trls_label_smoothed_sigmoid():
    """``sigmoid`` with label smoothing e: -(1 - e) logsigmoid(beta delta) - e logsigmoid(-beta delta), the form TRL
    1.16 keeps in its "aot" loss (dpo_trainer.py lines 1453-1456; with one pair the sort is the identity)."""
    logps = torch.tensor([-10.0, -12.0, -11.0, -11.5], dtype=torch.float64)
    c, r, rc, rr = logps
    ours = dpo_losses(c[None], r[None], rc[None], rr[None], DPOConfig(out="-", beta=0.3, label_smoothing=0.2))
    theirs, _ = trl_compute_loss(torch.stack([c, r])[:, None].float(), torch.ones(2, 2), torch.stack([rc, rr])[None],
                                 "aot", 0.3, 0.2)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert ours.item() != pytest.approx(dpo_losses(c[None], r[None], rc[None], rr[None],
                                                   DPOConfig(out="-", beta=0.3)).item())


# ---- (b) learning ---------------------------------------------------------------------------------------------
def test_dpo_raises_every_margin(prefs, tmp_path):
    """Three pairs (two Korean video pairs, the image pair): after 3 epochs every pair's margin (policy minus
    reference, chosen minus rejected) is positive and larger than after the first, reward accuracy 100%."""
    torch.manual_seed(0)
    pipe = tiny(tmp_path / "cache")
    data = data_of(pipe, subset(prefs, tmp_path, [0, 2, 3]), prefs.parent)
    lines = []

    def train(steps: int) -> DPORun:  # the second call resumes the first run and extends it (SFT's rule)
        cfg = DPOConfig(out=str(tmp_path / "run"), steps=steps, batch_size=3, lr=5e-3, beta=0.5, save_every=1)
        run = DPORun(pipe.model, data, cfg, on_step=lines.append)
        run.train()
        return run

    def margins(run: DPORun) -> torch.Tensor:
        policy = reference_logps(pipe.model, data, lambda b: run._logits(b, model=pipe.model))
        ratio = policy - run.reference  # (pairs, 2)
        return ratio[:, 0] - ratio[:, 1]
    first = margins(train(1))
    last = margins(train(3))
    print("margins after step 1:", first.tolist(), "after step 3:", last.tolist())
    print("steps:", [{k: round(v, 4) for k, v in x.items() if "/" in k or k == "loss"} for x in lines])
    assert (first > 0).all() and (last > first).all(), (first, last)
    assert lines[-1]["rewards/accuracies"] == 1.0 and lines[-1]["loss"] < lines[0]["loss"]
    assert lines[0]["loss"] == pytest.approx(0.6931472, rel=1e-6)  # a fresh adapter is the reference: log 2


# ---- (c) resume -----------------------------------------------------------------------------------------------
def test_an_interrupted_run_resumes_to_the_same_adapter(prefs, tmp_path, monkeypatch):
    """As SFT's test: 4 steps in one go, or 3 steps (the checkpoint is at 2), interrupted, then resumed: the same
    LoRA weights bit for bit; the resumed run reads the cached reference log-probs instead of computing them."""
    import llava_next.train.dpo as dpo

    path = subset(prefs, tmp_path, [0, 1])

    def run(out: Path, stop_after: int | None = None):
        torch.manual_seed(0)
        pipe = tiny(tmp_path / "cache")
        cfg = DPOConfig(out=str(out), steps=4, lr=5e-3, save_every=2, seed=3)

        def kill(line):
            if stop_after is not None and line["step"] == stop_after:
                raise KeyboardInterrupt  # as kill -9 between two checkpoints: step 3 is done but not saved
        try:
            DPORun(pipe.model, data_of(pipe, path, prefs.parent), cfg, on_step=kill).train()
        except KeyboardInterrupt:
            pass
        return {n: p.detach().clone() for n, p in pipe.model.named_parameters() if "lora_" in n}

    whole = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=3)
    cached = (tmp_path / "b" / REFERENCE_FILE).read_bytes()
    monkeypatch.setattr(dpo, "reference_logps", lambda *a, **k: pytest.fail("the reference was recomputed"))
    resumed = run(tmp_path / "b")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[n], resumed[n]) for n in whole)
    assert (tmp_path / "b" / REFERENCE_FILE).read_bytes() == cached
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "steps.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ---- (d) the command ------------------------------------------------------------------------------------------
def test_llava_next_train_dpo_with_an_nf4_base(prefs, tmp_path, capsys):
    """``llava-next train --method dpo --quantize nf4``: the progress line, TRL's fields in steps.jsonl, the cached
    reference, an NF4 base in run.json and a PEFT adapter."""
    from llava_next.cli.main import main

    out = tmp_path / "run"
    code = main(["train", "--method", "dpo", "--data", str(subset(prefs, tmp_path, [0, 1])), "--media-root",
                 str(prefs.parent), "--model", "tiny-random", "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--frames", "1", "--lora-rank", "4", "--beta", "0.2", "--quantize", "nf4", "--dtype", "bf16",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code in (0, None)
    said = capsys.readouterr()
    assert Path(said.out.strip().splitlines()[-1]) == out / "adapter"
    assert re.search(r"training: step 2/2 \[#{20}\] loss \d+\.\d{4}", said.err), said.err
    assert "2 pairs (0 images, 2 videos)" in said.err
    lines = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["loss"] == pytest.approx(0.6931472, rel=1e-4)  # a fresh adapter: log 2
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert all(isinstance(x[k], float) for x in lines), k
    assert lines[1]["rewards/margins"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["quantized_base"] == ["NF4Linear"] and run["beta"] == 0.2 and run["reference"] == "adapter disabled"
    assert (out / REFERENCE_FILE).exists()
    assert {p.name for p in (out / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def test_dpo_after_sft_against_the_sft_adapter(prefs, tmp_path, capsys):
    """SFT on the chosen answers, then DPO from that adapter (``--adapter``) with it as the reference
    (``--ref-adapter``): the first step's policy is its reference (loss log 2, without dropout: the reference pass
    runs in eval mode); with the default reference (the adapter disabled: the base) it is not."""
    from llava_next.cli.main import main

    root = prefs.parent
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [
        {"id": f"v{k}", "video": f"clip{k}.mp4", "conversations": [{"from": "human", "value": "<video>\n" + PROMPT},
                                                                   {"from": "gpt", "value": c}]}
        for k, (c, _) in enumerate(PAIRS[:2])])
    common = ["--model", "tiny-random", "--frames", "1", "--lora-rank", "4", "--lora-dropout", "0", "--quiet",
              "--media-root", str(root),
              "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--data", str(sft_data), "--out", str(tmp_path / "sft"), "--steps", "2", "--lr", "1e-2",
                 "--batch-size", "2", *common]) in (0, None)
    sft = tmp_path / "sft" / "adapter"
    prefs2 = subset(prefs, tmp_path, [0, 1])
    firsts = {}
    for name, ref in (("same", ["--ref-adapter", str(sft)]), ("base", [])):
        assert main(["train", "--method", "dpo", "--data", str(prefs2), "--out", str(tmp_path / name), "--steps", "1",
                     "--adapter", str(sft), *ref, *common]) in (0, None)
        firsts[name] = json.loads((tmp_path / name / "steps.jsonl").read_text().splitlines()[0])
    capsys.readouterr()
    assert firsts["same"]["loss"] == pytest.approx(0.6931472, rel=1e-6) and firsts["same"]["rewards/margins"] == 0
    assert firsts["base"]["loss"] != pytest.approx(0.6931472, rel=1e-3)
    assert main(["train", "--method", "dpo", "--data", str(prefs2), "--out", str(tmp_path / "same"), "--steps", "1",
                 "--adapter", str(sft), *common]) == 2  # another reference: another run, refused
    assert "different reference" in capsys.readouterr().err


def test_two_processes_train_the_adapter_of_one(prefs, tmp_path):
    """``torchrun --nproc-per-node 2 ... --batch-size 1`` reaches the adapter of one process with ``--batch-size 2``
    (three pairs: rank 1's part of the second step is empty and joins with its loss times zero). The one-process
    run is ``main`` in this process, as a rank computes (one thread, no compile): the torchrun launch is the
    subject, and a console process of its own adds only its start."""
    import subprocess

    from safetensors.torch import load_file

    from llava_next.cli.main import main
    from test_tensor_parallel import child_env, like_a_rank, torchrun

    three = subset(prefs, tmp_path, [0, 1, 2])

    def command(out: str, batch: int) -> list[str]:
        return ["-m", "llava_next.cli.main", "train", "--method", "dpo", "--data", str(three), "--media-root",
                str(prefs.parent), "--model", "tiny-random", "--out", str(tmp_path / out), "--batch-size", str(batch),
                "--frames", "1", "--lora-rank", "4", "--lora-dropout", "0", "--lr", "1e-3", "--seed", "1", "--quiet",
                "--cache-dir", str(tmp_path / "cache")]
    env = child_env()
    with like_a_rank():
        assert main(command("one", 2)[2:]) in (0, None)
    two = subprocess.run(torchrun("--standalone", "--nproc-per-node", "2", *command("two", 1)), env=env,
                         capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    logs = [[json.loads(x) for x in (tmp_path / d / "steps.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [x["pairs"] for x in logs[0]] == [x["pairs"] for x in logs[1]] == [2, 1]
    for a, b in zip(*logs):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a, b)
    one, two = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    # measured 2.4e-5 (SFT's test: < 1e-5): a DPO gradient is the difference of the chosen and the rejected
    # answers' gradients, so float32's different sums over ranks leave relatively more noise in it, and Adam's
    # first steps move every entry by ~lr whatever its gradient's size; a wrong normalisation moves by ~lr
    assert one.keys() == two.keys() and worst < 0.1 * 1e-3, worst

# ---- the data -------------------------------------------------------------------------------------------------
def test_pairs_keep_korean_and_supervise_the_last_answer(prefs, tmp_path):
    pipe = tiny(tmp_path / "cache", lora=False)
    data = data_of(pipe, prefs, prefs.parent)
    assert len(data) == 4
    for k, (chosen, rejected) in enumerate(PAIRS[:1] + [("In space.", "At sea.")]):
        pair = data[[0, 3][k]]
        for example, text in ((pair.chosen, chosen), (pair.rejected, rejected)):
            learned = example.labels[example.labels != IGNORE_INDEX].tolist()
            said = pipe.tokenizer.decode(learned)
            assert said.strip() == text and "\ufffd" not in said  # the last answer only, byte-exact
            assert learned[-1] == pipe.tokenizer.eos_id
        assert pair.chosen.input_ids[:pair.chosen.answer_spans[-1][0]].tolist() == \
            pair.rejected.input_ids[:pair.rejected.answer_spans[-1][0]].tolist()  # the same prompt and media


@pytest.mark.parametrize("item, problem", [
    ({"video": "a.mp4", "prompt": "Q", "chosen": "A"}, '"rejected" must be a non-empty string'),
    ({"video": "a.mp4", "prompt": "Q", "chosen": "A", "rejected": "A"}, "the same text"),
    ({"video": "a.mp4", "chosen": "A", "rejected": "B"}, 'give either "prompt"'),
    ({"video": "a.mp4", "prompt": "Q", "conversations": [], "chosen": "A", "rejected": "B"}, "not both"),
    ({"video": "a.mp4", "conversations": [{"from": "human", "value": "<video>\nQ"}, {"from": "gpt", "value": "A"}]},
     "the last conversation turn is not the pair"),
    ({"video": "a.mp4", "conversations": [{"from": "gpt", "chosen": "A", "rejected": "B"}]}, "turns go gpt"),
    ({"video": ["a.mp4", "b.mp4"], "prompt": "Q", "chosen": "A", "rejected": "B"}, '"video" must be one path'),
])
def test_a_bad_pair_names_its_line(tmp_path, item, problem):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"id": "ok", "video": "a.mp4", "prompt": "Q", "chosen": "A",
                                                   "rejected": "B"}, item])
    with pytest.raises(DataError, match=re.escape(problem)) as e:
        read_records(path, parse=parse_pair)
    assert str(e.value).startswith("prefs.jsonl line 2: ")
