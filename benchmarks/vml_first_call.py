"""How often a fresh process's first MKL vector-math call differs from its second (llava_next/model/mkl_vml.py),
with and without the one-element warm-up that importing ``llava_next.model`` does.

    python benchmarks/vml_first_call.py               # 40 fresh processes each way, one at a time
    python benchmarks/vml_first_call.py --processes 100

Each process computes the decoder's first RoPE table the way ``model/decoder.py`` does ((2, 1, 275, 16)
angles, ``cos`` on two threads) twice and reports whether the two are bitwise equal, and the largest
difference. "bare" does nothing before; "warmed" imports ``llava_next.model`` first. The processes run one
at a time: several at once on a small machine delay the second thread, which hides the race. Prints the
CPU model and the oneMKL build torch carries.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import device_name

# RoPE's formula written out rather than imported from model/decoder.py: importing any of llava_next.model runs the
# warm-up, which "bare" must not
PROBE = """
import json, sys, torch
torch.set_num_threads(2)
if sys.argv[1] == "warmed":
    import llava_next.model  # noqa: F401 (resolves every VML op on one element)
inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
pos = torch.arange(275).repeat(2, 1)
angles = torch.cat((pos[..., None].float() * inv,) * 2, dim=-1)[:, None]
first, second = angles.cos(), angles.cos()
print(json.dumps({"equal": torch.equal(first, second), "max_diff": (first - second).abs().max().item()}))
"""

MKL_VERSION = "import torch; torch.ones(2, 2) @ torch.ones(2, 2)"  # MKL_VERBOSE's first line names the build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=40)
    a = p.parse_args()
    verbose = subprocess.run([sys.executable, "-c", MKL_VERSION], capture_output=True, text=True,
                             env=dict(os.environ, MKL_VERBOSE="1")).stdout.splitlines()
    mkl = verbose[0].removeprefix("MKL_VERBOSE ").split(" for ")[0] if verbose else "none (torch without MKL)"
    print(f"{device_name(__import__('torch').device('cpu'))}; MKL: {mkl}")
    for mode in ("bare", "warmed"):
        results = [json.loads(subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                                             check=True).stdout.splitlines()[-1]) for _ in range(a.processes)]
        bad = [r["max_diff"] for r in results if not r["equal"]]
        print(f"{mode:7s} first cos != second in {len(bad)} of {a.processes} fresh processes"
              + (f" (largest difference {max(bad):.2e})" if bad else ""))


if __name__ == "__main__":
    main()
