"""``score`` (one prefill per prompt, its candidates a tree over it, items batched) against the way
lmms-eval's LLaVA wrappers compute a loglikelihood request: one whole forward (vision tower included) of
prompt + candidate per candidate, one request at a time.

    python benchmarks/bench_score.py [--model tiny-random] [--items 8] [--frames 8] [--candidates 4]

Providers (the same model, weights and items; results checked equal to 1e-4 before timing):
- "shared":  ``llava_next.eval.score(batch_size=B)``: per batch of B items, one vision pass and one prefill
             (B rows), then all candidates of the batch as one (B, S) forward over the cached prompts;
- "shared1": the same with batch_size 1;
- "each":    per candidate ``LlavaNextModel.forward`` on prompt + candidate ids (vision tower, splice, whole
             decoder), log-softmax gathered at the candidate's positions: lmms-eval's per-request loop.
Rows (ms per item) go to benchmarks/results/score.csv; the device, versions and commit with them.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import Results, Timing, pick_device
from llava_next.eval import ScoreItem, score
from llava_next.eval.score import prepare_item
from llava_next.runtime.pipeline import Pipeline

OPTIONS = ["A rabbit wakes up and stretches.", "A car drives by.", "Two birds fly over a river.",
           "Nothing happens at all.", "A squirrel steals an apple.", "It starts to rain."]


def each(pipe: Pipeline, items: list[ScoreItem]) -> list[list[float]]:
    """lmms-eval's loop: one whole forward per (prompt, candidate)."""
    out = []
    for item in items:
        request, conts = prepare_item(pipe, item)
        sums = []
        for cont in conts:
            ids = torch.tensor([request.input_ids + cont])
            with torch.no_grad():
                logits = pipe.model(ids, images=request.images, videos=[v.pixel_values for v in request.videos])
            T = len(request.input_ids)
            logp = logits[0, T - 1:T - 1 + len(cont)].float().log_softmax(-1)
            sums.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
        out.append(sums)
    return out


def timed(fn, repeats: int) -> tuple[Timing, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    return Timing(pick(0.5), pick(0.2), pick(0.8)), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    device = pick_device("cpu")
    pipe = Pipeline.from_pretrained(args.model, dtype=getattr(torch, args.dtype), progress=False)
    items = [ScoreItem(f"q{i}", f"Question {i}: what happens in the video?", OPTIONS[:args.candidates],
                       videos=["sample:bunny"], frames=args.frames) for i in range(args.items)]
    providers = {"shared": lambda: [[c.logprob for c in r.candidates] for r in score(pipe, items, batch_size=args.batch_size)],
                 "shared1": lambda: [[c.logprob for c in r.candidates] for r in score(pipe, items, batch_size=1)],
                 "each": lambda: each(pipe, items)}
    results = Results("score", device)
    shape = f"items={args.items} frames={args.frames} cands={args.candidates} bs={args.batch_size}"
    reference = None
    for name, fn in providers.items():
        fn()  # warm-up
        timing, out = timed(fn, args.repeats)
        reference = reference or out
        worst = max(abs(a - b) for ra, rb in zip(out, reference) for a, b in zip(ra, rb))
        assert worst <= 1e-4 * max(1.0, max(abs(x) for r in reference for x in r)), (name, worst)
        per_item = Timing(timing.p50 / args.items, timing.p20 / args.items, timing.p80 / args.items)
        results.add("score", name, shape, args.dtype, per_item, {})
        print(f"{name:8} {per_item.p50:9.1f} ms per item (p20 {per_item.p20:.1f}, p80 {per_item.p80:.1f}); "
              f"max |difference| from 'shared' {worst:.2e}")
    print(results.save())


if __name__ == "__main__":
    main()
