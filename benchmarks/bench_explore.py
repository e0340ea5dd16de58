"""The explore page's latency without the browser: Ask -> first heatmap (prepare, generate, trace, draw) and one
slider move (a heatmap redrawn from the cached trace), per question (docs/explore.md, "How fast").

    python benchmarks/bench_explore.py                                  # tiny-random, fp32
    python benchmarks/bench_explore.py --model DIR --dtype bfloat16     # e.g. the 7B-shaped few-layer checkpoint

A 7B-shaped checkpoint with few decoder layers: ``benchmarks/cpu_models.py`` (``make_checkpoints(
bench_config(4))``) plus a tokenizer (``bench_fresh.with_tokenizer``). The browser adds its round trip and the
PNG transfer; tests/test_explore.py prints those figures.
"""

from __future__ import annotations

import argparse
import time

import torch

from llava_next.explore import views
from llava_next.explore.session import Question, Session
from llava_next.runtime.pipeline import Pipeline

QUESTIONS = [Question("sample:bunny", "What happens in the video?", frames=8),
             Question("sample:cat", "What is in the picture?")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=1, help="asks of each question (the first warms up)")
    args = p.parse_args()
    t = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model, progress=False, dtype=getattr(torch, args.dtype))
    print(f"load {time.perf_counter() - t:.2f} s; threads {torch.get_num_threads()}")
    s = Session(pipe)
    for q in QUESTIONS:
        for _ in range(args.repeats):
            t = time.perf_counter()
            a = s.ask(q)
            views.heatmap(a, 0, s.num_layers // 2, -1)
            first = time.perf_counter() - t
            moves = []
            for layer, head in [(0, -1), (1, 1), (s.num_layers - 1, 0)]:
                t = time.perf_counter()
                views.heatmap(a, 0, layer, head)
                moves.append(time.perf_counter() - t)
            t = time.perf_counter()
            views.layer_chart(a, 0, -1)
            chart = time.perf_counter() - t
            parts = ", ".join(f"{k} {v:.2f}" for k, v in a.seconds.items())
            print(f"{q.media}: {len(a.provenance)} positions; Ask -> first heatmap {first:.2f} s ({parts}); "
                  f"slider moves {', '.join(f'{m:.3f}' for m in moves)} s; layer x frame chart {chart:.3f} s")


if __name__ == "__main__":
    main()
