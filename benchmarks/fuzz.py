"""The long fuzzing run (issue 16): thousands of mutated inputs through every parser, counts per outcome.

    nice python benchmarks/fuzz.py --cases 5000 [--seed 0] [--workers 2] [--cli-every 25] [--targets image video]

Cases are spread round-robin over the targets of ``tests/fuzzing.py`` (images, videos, llava-hf /
original / converted checkpoints — safetensors, config.json, index —, tokenizer.json and
tokenizer_config.json); each runs in-process in a worker with a timeout and a peak-RSS bound, and every
``--cli-every``-th case also runs through ``llava-next`` in a subprocess. Prints the table of outcomes
per target and every failure with the mutation that recreates it (``make_case(TARGETS[t], seed, index)``);
writes ``benchmarks/results/fuzz-seed{SEED}.json``. Exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzzing import CASE_TIMEOUT, FAILURES, RSS_BOUND, TARGETS, run_campaign  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=5000, help="in-process cases (default 5000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first case index (to continue a run)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--cli-every", type=int, default=25, help="every Nth case also through the CLI (0: none)")
    p.add_argument("--cli-workers", type=int, default=1, help="CLI subprocesses at a time (default 1)")
    p.add_argument("--timeout", type=float, default=CASE_TIMEOUT, help="seconds per in-process case")
    p.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=None)
    p.add_argument("--out", default=None, help="JSON report (default benchmarks/results/fuzz-seed{SEED}.json)")
    args = p.parse_args()

    done = [0]
    t0 = time.monotonic()

    def progress(result: dict) -> None:
        done[0] += 1
        bad = result["outcome"].removeprefix("cli-") in FAILURES + ("bad-exit",)
        if bad:
            print(f"FAIL {result['outcome']} {result['target']} #{result['index']}: {result['mutation']}\n"
                  f"     {result['detail'][-600:]}", flush=True)
        if done[0] % 250 == 0:
            print(f"... {done[0]} results in {time.monotonic() - t0:.0f} s", flush=True)

    report = run_campaign(args.cases, args.seed, targets=args.targets, workers=args.workers,
                          cli_every=args.cli_every, cli_workers=args.cli_workers, timeout=args.timeout, progress=progress, start=args.start)
    print(f"\nseed {args.seed}, cases {args.start}..{args.start + args.cases - 1}, {report.cases} results "
          f"({report.seconds:.0f} s); per-case timeout {args.timeout:.0f} s, peak-RSS bound "
          f"{RSS_BOUND / 2**20:.0f} MiB, largest growth {report.max_rss_growth / 2**20:.0f} MiB\n")
    print(report.table())
    for f in report.failures:
        print(f"\n{f['outcome']} {f['target']} #{f['index']}: {f['mutation']}\n{f['detail']}")
    out = Path(args.out or Path(__file__).parent / "results" / f"fuzz-seed{args.seed}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, "start": args.start, "workers": args.workers,
                               "cli_every": args.cli_every, "cli_workers": args.cli_workers, **report.to_dict()}, indent=1) + "\n")
    print(f"\nwritten {out}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
