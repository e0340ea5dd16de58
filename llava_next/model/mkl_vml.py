"""One call per MKL vector-math function, on one element, before any real use: the workaround for a race in
oneMKL's first call that makes a fresh process sometimes compute part of one tensor at low accuracy.

torch sends contiguous float unary ops (``cos``, ``sin``, ``exp``, ``log``, ``sqrt``, ...) on CPU to MKL's
vector-math library (VML), each intra-op thread on its own chunk (aten/src/ATen/cpu/vml.h, ``VML_HA``
requested on every call). oneMKL picks each function's kernel lazily, at that function's first call. When
that first call runs on several threads at once, one thread can run a low-accuracy kernel over its whole
chunk, once: the next call is right, so an identical rerun in the same process is clean.

Where it showed here: the decoder's first RoPE table (``rope_cos_sin``: (B, 1, T, head_dim) ``cos`` on
two threads) in a fresh process. In some processes (benchmarks/vml_first_call.py counts how many, on this
machine) the second thread's half of that ``cos`` was off by far more than rounding, while float64 agrees
with every later call, so the same evaluation gave other log-probabilities depending on which batch came
first in the process: a resumed run no longer matched an uninterrupted one.

Reported upstream as pytorch/pytorch#188792 (open); the fix proposed there (pytorch/pytorch#188791) is
this one, inside ATen: a one-element call per VML function and precision, so the dispatch is resolved on
one thread before any concurrent use. oneMKL 2025.0 and later do not race. A one-element op runs on the
calling thread (below every parallel grain size), so this starts no threads and leaves fork-safety as it
was; it costs well under a millisecond, once per process, when ``llava_next.model`` is imported.
"""

from __future__ import annotations

import torch

# every op ATen may route to VML (the IMPLEMENT_VML_MKL list of vml.h, all its torch versions): warming one
# that a build computes with SLEEF instead is a harmless one-element op
VML_OPS = ("abs", "acos", "asin", "atan", "cos", "erf", "erfc", "exp", "expm1", "log", "log10", "log1p",
           "log2", "sin", "sqrt", "tan", "tanh", "trunc")
VML_DTYPES = (torch.float32, torch.float64)  # VML's s and d functions; bf16 / fp16 never reach it


def resolve_vml_dispatch() -> None:
    """Each of VML_OPS once on a one-element tensor of each of VML_DTYPES (module docstring)."""
    for dtype in VML_DTYPES:
        one = torch.full((1,), 0.5, dtype=dtype)  # in every op's domain
        for op in VML_OPS:
            getattr(torch, op)(one)
