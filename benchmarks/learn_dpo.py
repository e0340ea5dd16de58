"""DPO after SFT, pair by pair: the figures behind docs/training.md ("DPO after SFT: does the preference win?").

    python benchmarks/learn_dpo.py [--sft RUN_DIR] [--steps 3] [--lr 2e-4] [--beta 1]

The setup of tests/test_train_learns.py: its SFT run (the four photo clips, the coffee clip captioned twice;
trained here unless ``--sft`` names a finished run's directory), then DPO from that adapter against it on four
pairs: the coffee clip's chosen answer is the caption the SFT adapter does not say, every other clip's is its
caption over a word it never learned. Before DPO and after each step, for every pair:
    lead     the greedy lead of the chosen answer under teacher forcing (float32): over its tokens, the least
             log-prob margin of the answer's token over the best other token; > 0: greedy decoding says it
    margin   (chosen - rejected) log-prob, policy minus reference (DPO's delta; beta x margin = TRL's
             rewards/margins)
The test checks the same through ``llava-next run`` (bf16); this script is its diagnosis, one thread, ~1 min on a
2-core CPU once the SFT run exists (the SFT run: ~1-2 min more).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from llava_next.train.data import IGNORE_INDEX, pad_id  # noqa: E402
from llava_next.train.dpo import DPOConfig, DPORun, reference_logps  # noqa: E402
from llava_next.train.preferences import PreferenceData, collate_pairs  # noqa: E402
from test_train_learns import CLIPS, FRAMES, PROMPT, REJECTED, SECOND, SFTProcess  # noqa: E402


@torch.no_grad()
def leads(run: DPORun, data: PreferenceData) -> list[float]:
    """Per pair, the chosen answer's greedy lead (module docstring)."""
    run.model.eval()
    out = []
    for i in range(len(data)):
        batch = collate_pairs([data[i]], pad_id(data.tokenizer))
        logp = run._logits(batch, model=run.model)[:1, :-1].float().log_softmax(-1)  # (1, T-1, V): the chosen row
        targets = batch.labels[:1, 1:]
        mask = targets != IGNORE_INDEX
        target = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        best_other = logp.scatter(-1, targets.clamp(min=0)[..., None], float("-inf")).amax(-1)
        out.append((target - best_other)[mask].min().item())
    return out


def margins(run: DPORun, data: PreferenceData) -> list[float]:
    policy = reference_logps(run.model, data, lambda b: run._logits(b, model=run.model))  # (pairs, 2)
    ratio = policy - run.reference
    return (ratio[:, 0] - ratio[:, 1]).tolist()


def write_pairs(path: Path, videos: list[Path], coffee_chosen: str) -> Path:
    pairs = {photo: (CLIPS[photo], REJECTED[photo]) for photo in REJECTED}
    other = SECOND[1] if coffee_chosen == CLIPS[SECOND[0]] else CLIPS[SECOND[0]]
    pairs[SECOND[0]] = (coffee_chosen, other)
    path.write_text("".join(json.dumps({"id": p, "video": str(v), "prompt": PROMPT, "chosen": pairs[p][0],
                                        "rejected": pairs[p][1]}, ensure_ascii=False) + "\n"
                            for p, v in zip(CLIPS, videos)), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft", type=Path, default=None, help="a finished SFT run of the test's recipe (default: train)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=1.0)
    args = ap.parse_args()
    from llava_next_weights.adapters import load_adapter, read_adapter

    from llava_next.runtime.loading import load
    from llava_next.train.sft import materialize_trainable

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="learn_dpo-"))
    sft = SFTProcess(work)  # its clips (cached), and the training unless --sft
    run_dir = args.sft or sft.wait()
    if args.sft:
        sft.process.kill()
    pipe = load("tiny-random", cache_dir=work / "cache", progress=False, materialize=materialize_trainable)
    load_adapter(pipe.model, run_dir / "adapter", dtype=torch.float32)
    _, reference = read_adapter(run_dir / "adapter")
    # the coffee caption the SFT adapter does not say: the one with the smaller greedy lead
    both = [CLIPS[SECOND[0]], SECOND[1]]
    probe = DPORun(pipe.model, PreferenceData(write_pairs(work / "probe.jsonl", sft.videos, both[0]), pipe.tokenizer,
                                              pipe.config, frames=int(FRAMES), frame_sampling="uniform"),
                   DPOConfig(out=str(work / "probe")))
    coffee = list(CLIPS).index(SECOND[0])
    first = leads(probe, probe.data)[coffee]
    chosen = both[0] if first < 0 else both[1]
    data = PreferenceData(write_pairs(work / "prefs.jsonl", sft.videos, chosen), pipe.tokenizer, pipe.config,
                          frames=int(FRAMES), frame_sampling="uniform")  # as the test runs it
    run = DPORun(pipe.model, data, DPOConfig(out=str(work / "dpo"), steps=args.steps, batch_size=len(data),
                                             lr=args.lr, beta=args.beta, save_every=10**6),
                 reference_adapter=reference)
    run._start()
    print("| after step | " + " | ".join(f"{p}: {CLIPS[p] if p != SECOND[0] else chosen} lead, margin"
                                         for p in CLIPS) + " |")
    for step in range(args.steps + 1):
        if step:
            run.model.train()
            run._optimizer_step()
            run.step += 1
        row = [f"{lead:+.2f}, {m:+.1f}" for lead, m in zip(leads(run, data), margins(run, data))]
        print(f"| {step} | " + " | ".join(row) + " |", flush=True)
    print(f"(SFT run {run_dir}; work files in {work})")


if __name__ == "__main__":
    main()
