"""The whole model with the Triton kernels enabled (attention and pooling), run under the Triton
interpreter on CPU, matches the PyTorch path on the same tiny checkpoint, image and video."""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_llava_hf_checkpoint
from media import cached_video, real_photo
from test_model import load_ours, prompt_ids
from llava_next.model.attention import use_backend
from llava_next.model.generate import generate
from llava_next.inputs.image import preprocess_image
from llava_next.model.pooling import use_pool_backend
from llava_next.inputs.video import load_video
from llava_next_weights.convert import convert

pytest.importorskip("triton")
pytest.importorskip("transformers")


def test_model_with_triton_kernels_matches_reference_path(tmp_path):
    hf_dir, _ = make_llava_hf_checkpoint(tmp_path / "hf", kind="video")
    model = load_ours(convert(hf_dir, tmp_path / "ours", progress=False))
    cfg = model.config
    images = [preprocess_image(real_photo("chelsea"), cfg)]
    clip = load_video(cached_video("model_parity", frames=24, size_hw=(90, 160), fps=12, photo="coffee"), 4,
                      size=cfg.tile_size)
    ids = torch.tensor([prompt_ids(cfg, images, [clip])])

    def run():
        with torch.no_grad():
            logits = model(ids, images=images, videos=[clip.pixel_values])
            embeds = model.embed(ids, model.image_features(images), [model.video_features(clip.pixel_values)])
            tokens = generate(model.language_model, input_embeds=embeds, max_new_tokens=6, eos_token_id=())
        return logits, tokens

    with use_backend("sdpa"), use_pool_backend("torch"):
        ref_logits, ref_tokens = run()
    calls = {}
    import llava_next_kernels.attention as ka
    import llava_next_kernels.pooling as kp

    original_attn, original_pool = ka.flash_attention, kp.spatial_pool

    def spy(fn, name):
        def wrapped(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapped

    import llava_next.model.attention as facade
    try:
        facade._triton_fn = spy(original_attn, "attention")
        kp.spatial_pool = spy(original_pool, "pooling")
        with use_backend("triton"), use_pool_backend("triton"):
            logits, tokens = run()
    finally:
        facade._triton_fn, kp.spatial_pool = None, original_pool
    assert calls.get("attention", 0) > 0 and calls.get("pooling", 0) > 0, calls
    scale = ref_logits.abs().max().item()
    assert (logits - ref_logits).abs().max().item() <= 1e-4 * scale
    assert tokens.tolist() == ref_tokens.tolist()
