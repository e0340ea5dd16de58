"""The explore page's latency without the browser: Ask -> first answer token (streamed), Ask -> first heatmap
(prepare, generate, trace, draw), one slider move (a heatmap redrawn from the cached trace) and a gradient map
(relevancy of token 0: the float model's forward and backward, then cached), per question (docs/explore.md,
"How fast").

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
from llava_next.explore.models import ModelSource
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
    s = Session(pipe, source=ModelSource(args.model, getattr(torch, args.dtype)))
    for q in QUESTIONS:
        for _ in range(args.repeats):
            t, token = time.perf_counter(), None
            for a in s.ask_stream(q):
                token = token or time.perf_counter() - t  # the first piece shown
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
            t = time.perf_counter()
            views.heatmap(a, 0, 0, -1, scores=s.token_map(a.key, 0, "relevancy"), method="relevancy")
            relevancy = time.perf_counter() - t
            parts = ", ".join(f"{k} {v:.2f}" for k, v in a.seconds.items())
            print(f"{q.media}: {len(a.provenance)} positions; Ask -> first token {token:.2f} s, -> first heatmap "
                  f"{first:.2f} s ({parts}); slider moves {', '.join(f'{m:.3f}' for m in moves)} s; layer x frame "
                  f"chart {chart:.3f} s; relevancy map {relevancy:.2f} s (the first also loads the float model)")


if __name__ == "__main__":
    main()
