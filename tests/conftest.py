"""Test setup shared by every test module.

Order matters here:
1. TRITON_INTERPRET=1 before any @triton.jit decorator runs, so kernels execute on CPU tensors.
2. HF_HUB_OFFLINE=1 before any Hugging Face import: there is no hub access here, and a missed file
   would otherwise cost ~46 s of retries. USE_HUB_KERNELS=NO likewise: transformers' reference stays
   its own torch code (no kernel-hub replacement of its layers).
3. The torchvision operator schemas. CI installs torch 2.13.0 (CPU) with torchvision 0.28.0, its
   matching release; PyPI's 0.28.0 wheel is a CUDA build whose C++ ops do not register beside CPU
   torch, so `import torchvision` dies on `torchvision::nms does not exist`. transformers' image and
   video processors and open_clip (our test references) import torchvision but never call nms, so
   declaring the two schemas that torchvision's fake-tensor registrations look up lets it import.
   Runtime code (llava_next, llava_next_kernels, llava_next_weights) never imports torchvision.
"""

import os
import sys

# Bytecode: a machine that sets PYTHONDONTWRITEBYTECODE (these do) makes every process the suite starts (the
# command line, torchrun ranks, recipes: well over a hundred) compile the package's modules from source again,
# ~0.2 s a start; here they are written once into the git-ignored __pycache__ folders and loaded after that
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# transformers >= 5.25 kernelizes models on from_pretrained through its kernel hub (the PyPI package
# `kernels`) unless told not to: the reference must be its own torch code, as in transformers' own tests
os.environ.setdefault("USE_HUB_KERNELS", "NO")
# numpy's OpenBLAS threads spin against torch's on 2 cores (the Triton interpreter runs tl.dot in numpy)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# LLAVA_NEXT_COMPILE stays a user's default ("auto", llava_next/model/policy.py): for the suite's short answers
# the eager decode step. The compiled step and the compiled one-query attention are checked against it where they
# are the subject (test_engines.py, test_compile_step_reaches_stream); forcing "1" everywhere compiled them again
# in most processes the suite starts (~20% of the suite's time in the files that decode most)

import torch  # noqa: E402


def _declare_torchvision_ops() -> None:
    try:
        import torchvision  # noqa: F401  (a build that matches torch imports cleanly)
        return
    except ImportError:
        return  # not installed: the tests that need it skip
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _declare_torchvision_ops.lib = lib  # keep the library object alive
    import torchvision  # noqa: F401,F811  (now imports)


_declare_torchvision_ops()
# Threads: the test command (README.md) runs two pytest-xdist workers, so each takes its share of the cores for
# torch's pool (one each on 2 cores); a worker with both cores' threads spins against the other's. Most of the
# suite is small models, Python dispatch and subprocesses, which one thread runs as fast as two: two workers of
# one thread took 552 s here where one process of two took 827 (docs/testing.md). The C loops, whose split across
# threads is ours, are tested with 2 threads explicitly (test_cpu_gemv.py); subprocesses keep torch's default.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))
