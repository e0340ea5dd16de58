"""Fused spatial pooling kernel (llava_next_kernels.pooling) under the Triton interpreter vs the PyTorch path.

Max pooling is exact; average pooling follows the flash-attention rule: error against the fp32 result
on the same inputs at most 2x that of torch's own same-dtype avg_pool2d, plus a tiny floor.
"""

import pytest
import torch

from llava_next.model.pooling import pool_frames
from llava_next_kernels import pooling
from llava_next_kernels.pooling import pooled_token_count, spatial_pool, spatial_pool_reference

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _run_both(frames, size, C, stride, mode, dtype, offset=3, spare=5):
    """Kernel and reference into the same kind of pre-filled buffer; returns (kernel buffer, reference buffer, n)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(frames, size[0] * size[1], C, generator=g).to(dtype)
    n = pooled_token_count(frames, size, stride)
    out = torch.full((offset + n + spare, C), 7.0, dtype=dtype)  # rows outside the window must stay 7
    ref = out.clone()
    got = spatial_pool(x, stride, mode, size=size, out=out, offset=offset)
    spatial_pool_reference(x, stride, mode, size=size, out=ref, offset=offset)
    assert got.data_ptr() == out[offset].data_ptr() and got.shape == (n, C)  # a view of the written rows
    fp32 = spatial_pool_reference(x.float(), stride, mode, size=size)
    return x, out, ref, fp32, n


# (frames, (height, width), channels, stride): non-square grids and sizes the stride does not divide
# (floor mode drops the trailing rows/columns), strides 1..4
CASES = [
    pytest.param(2, (24, 24), 64, 2, id="clip336-2x2"),
    pytest.param(3, (7, 5), 48, 2, id="7x5-s2"),
    pytest.param(2, (9, 9), 40, 4, id="9x9-s4"),
    pytest.param(1, (5, 6), 17, 3, id="5x6-s3"),
    pytest.param(2, (4, 3), 8, 1, id="4x3-s1"),
]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("mode", ["average", "max"])
@pytest.mark.parametrize("frames,size,C,stride", CASES)
def test_kernel_matches_reference(frames, size, C, stride, mode, dtype):
    offset = 3
    x, out, ref, fp32, n = _run_both(frames, size, C, stride, mode, dtype, offset)
    outside = torch.cat([out[:offset], out[offset + n:]])
    assert torch.equal(outside, torch.full_like(outside, 7.0)), "kernel wrote outside its rows"
    if mode == "max" or dtype == F32 and stride == 1:
        assert torch.equal(out, ref)
        return
    err = (out[offset:offset + n].float() - fp32).abs().max().item()
    torch_err = (ref[offset:offset + n].float() - fp32).abs().max().item()
    assert err <= 2 * torch_err + 1e-6, f"kernel error {err:.3g} vs torch {dtype} error {torch_err:.3g}"


def test_layout_frame_major_row_major():
    """Independent of both implementations: token (f, r, c) carries its coordinates as channel values."""
    frames, (H, W), s = 2, (5, 7), 2  # pooled 2x3 per frame; row 4 and column 6 are dropped (floor mode)
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(H), torch.arange(W), indexing="ij")
    x = torch.stack([f, r, c], dim=-1).float().reshape(frames, H * W, 3)  # (F, H*W, 3)
    expected = torch.tensor([[fi, 2 * ho + 0.5, 2 * wo + 0.5] for fi in range(frames) for ho in range(2)
                             for wo in range(3)])
    for impl in (spatial_pool, spatial_pool_reference):
        torch.testing.assert_close(impl(x, s, size=(H, W)), expected)
        got_max = impl(x, s, "max", size=(H, W))
        assert got_max[:6, 1:].tolist() == [[1, 1], [1, 3], [1, 5], [3, 1], [3, 3], [3, 5]]


@pytest.mark.parametrize("mode", ["average", "max"])
def test_drop_in_for_the_model_pooling_step(mode):
    """The kernel == the model's torch path (pool_frames), tokens flattened frame-major."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7 * 9, 16, generator=g)
    expected = pool_frames(x, (7, 9), 2, mode).reshape(-1, 16)
    got = spatial_pool(x, 2, mode, size=(7, 9))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_real_shape_video_frames_bf16():
    """Four CLIP-336 frames (576 tokens x 1024 channels), stride 2, into the middle of a sequence buffer."""
    x, out, ref, fp32, n = _run_both(4, (24, 24), 1024, 2, "average", BF16, offset=40, spare=20)
    assert n == 4 * 144
    err = (out[40:40 + n].float() - fp32).abs().max().item()
    assert err <= 2 * (ref[40:40 + n].float() - fp32).abs().max().item() + 1e-6


def test_bad_inputs_have_clear_errors(monkeypatch):
    x = torch.randn(2, 24 * 24, 8)
    with pytest.raises(ValueError, match="not a square; pass size"):
        spatial_pool(torch.randn(2, 35, 8), 2)
    with pytest.raises(ValueError, match=r"size \(5, 6\) \(height, width\) has 30 patches"):
        spatial_pool(x, 2, size=(5, 6))
    with pytest.raises(ValueError, match="stride must be an int in 1..8"):
        spatial_pool(x, 9)
    with pytest.raises(ValueError, match="mode must be 'average' or 'max'"):
        spatial_pool(x, 2, "bilinear")
    with pytest.raises(ValueError, match="288 pooled tokens at offset 10 do not fit out's 290 rows"):
        spatial_pool(x, 2, out=torch.empty(290, 8), offset=10)
    with pytest.raises(ValueError, match="offset needs an out buffer"):
        spatial_pool(x, 2, offset=1)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        spatial_pool(x.double(), 2)
    monkeypatch.setattr(pooling, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        spatial_pool(x, 2)
