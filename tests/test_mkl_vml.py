"""model/mkl_vml.py: a fresh process that imports ``llava_next.model`` has called every MKL vector-math op, in
float32 and float64, on one element (one thread) before anything else computes a float unary op.

The race itself (pytorch/pytorch#188792) strikes only some fresh processes, so a test of its outcome that
could fail reliably would need dozens of them (benchmarks/vml_first_call.py is that count, with and without
the calls); this checks, in one fresh process, that the one-element calls that resolve the dispatch
happen, for every op, first.
"""

from __future__ import annotations

import json
import subprocess
import sys

from llava_next.model.mkl_vml import VML_DTYPES, VML_OPS

PROBE = """
import json, torch
from torch.utils._python_dispatch import TorchDispatchMode

calls = []  # (op name, dtype, numel) of every float unary op, in order

class Record(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_floating_point() and len(args) == 1:
            calls.append((func.overloadpacket.__name__, str(x.dtype), x.numel()))
        return func(*args, **(kwargs or {}))

with Record():
    import llava_next.model.decoder
    from llava_next.model.decoder import rope_cos_sin, rope_inv_freq
    rope_cos_sin(torch.arange(300)[None], rope_inv_freq(16, 10000.0), torch.float32)  # the model's first cos
print(json.dumps(calls))
"""


def test_importing_the_model_resolves_every_vml_op_on_one_element_first():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    calls = [tuple(c) for c in json.loads(out.stdout.splitlines()[-1])]
    for dtype in VML_DTYPES:
        for op in VML_OPS:
            first = next((i for i, (name, dt, _) in enumerate(calls) if name == op and dt == str(dtype)), None)
            assert first is not None, f"{op} in {dtype} is never called on import"
            assert calls[first][2] == 1, f"the first {op} in {dtype} has {calls[first][2]} elements, not one"
    cos = [n for name, dt, n in calls if name == "cos" and dt == "torch.float32"]
    assert cos[0] == 1 and cos[-1] == 300 * 16  # the warm-up, then RoPE's table, which is the model's
