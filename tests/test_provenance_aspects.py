"""Provenance for every way the SigLIP + Qwen models pack an image (issue 22 item 5), checked against the
model's OWN packing: tiny llava-hf Interleave and OneVision checkpoints (tests/checkpoints_qwen.py),
converted and loaded by ``Pipeline``, prepare a real request (ramp images / a ramp video through the real
pixel pipeline), and the model's ``image_features`` / ``video_features`` turn it into tokens with the vision
tower swapped for a "tower" that returns each 14 px patch's mean colour and a projector that keeps it (newline
rows NaN). Spliced at the placeholders as ``embed`` does, every visual position then carries the colour of the
pixels it came from: red = x, green = y of the ORIGINAL image, blue = 40 x the frame index. Provenance must
put each colour inside its position's source box, newlines where the model put them, frames where they are.

Cases: OneVision one image (anyres_max_9, and downscaled under anyres_max_1), OneVision several images
("pad": each padded to a square, one tile + newline), OneVision video (pooled, frames squashed), Interleave
images ("resize") and Interleave video (frames sent as images, one <image> each). Then ``trace --json``
on both checkpoints (images named, frames as a video medium).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from checkpoints_qwen import make_interleave_checkpoint, make_onevision_checkpoint  # noqa: E402
from llava_next.research import Provenance  # noqa: E402
from llava_next.research.geometry import K  # noqa: E402
from llava_next.runtime.pipeline import Pipeline  # noqa: E402


def _ramp(h: int, w: int, blue: int = 0) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.round((np.arange(w) + 0.5) / w * 255)[None, :]
    img[..., 1] = np.round((np.arange(h) + 0.5) / h * 255)[:, None]
    img[..., 2] = blue
    return img


def _ramp_video(path, frames: int, hw) -> str:
    """A lossless (FFV1) video whose frame k is the ramp with blue = 40 k."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = hw[1], hw[0], "bgr0"
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(_ramp(*hw, blue=40 * k), format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


class _PatchColour(torch.nn.Module):
    """(N, 3, S, S) SigLIP-normalized tiles -> (N, (S/patch)^2, 3) mean 0..255 colour of each patch."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(pixels.double(), self.patch)  # (N, 3, P, P)
        return ((pooled * 0.5 + 0.5) * 255).flatten(2).transpose(1, 2)


class _Keep(torch.nn.Module):
    """(..., 3) -> (..., D): the colour in the first three channels, zeros after."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, self.width - x.shape[-1]))


def _colour_pipe(directory) -> Pipeline:
    pipe = Pipeline.from_pretrained(directory, progress=False)
    model = pipe.model
    model.vision_tower = _PatchColour(model.config.vision.patch_size)
    model.projector = _Keep(model.config.text.hidden_size)
    if model.image_newline is not None:
        model.image_newline.data.fill_(float("nan"))
    return pipe


def _position_colours(pipe: Pipeline, request) -> np.ndarray:
    """(T, 3) the colour the model's own features put at each position (NaN: a newline; text: NaN)."""
    model, cfg = pipe.model, pipe.config
    ids = torch.tensor(request.input_ids)
    out = torch.full((len(ids), 3), float("nan"), dtype=torch.float64)
    images = model.image_features(request.images)
    videos = [model.video_features(c.pixel_values) for c in request.videos]
    for feats, token in ((images, cfg.image_token_id), (videos, cfg.video_token_id)):
        if feats:
            out[ids == token] = torch.cat(feats)[:, :3].double()
    return out.numpy()


def _check(prov: Provenance, colours: np.ndarray, source_hw: dict[int, tuple[int, int]]) -> None:
    """Every visual position: NaN colour <=> a newline kind; its colour inside its box (coverage 1 cells)."""
    kind = prov.kind.numpy()
    visual = prov.media.numpy() >= 0
    newline = np.isin(kind, [K["image_newline"], K["video_newline"]])
    assert (np.isnan(colours[visual, 0]) == newline[visual]).all()
    for m in prov.media_info:
        pos = np.flatnonzero((prov.media.numpy() == m.index) & ~newline)
        assert len(pos)
        h, w = m.source_hw
        box, cov = prov.box.numpy()[pos], prov.coverage.numpy()[pos]
        x, y = colours[pos, 0] / 255 * w, colours[pos, 1] / 255 * h
        full = cov == 1  # a cell partly on "pad" padding mixes in the mean colour
        assert full.any(), (m.kind, m.index)
        bw, bh = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
        ok_x = np.abs(x - (box[:, 0] + box[:, 2]) / 2) <= 0.25 * bw + w / 255 + 1.5
        ok_y = np.abs(y - (box[:, 1] + box[:, 3]) / 2) <= 0.25 * bh + h / 255 + 1.5
        assert (ok_x | ~full).all() and (ok_y | ~full).all(), (m.kind, m.index, np.flatnonzero(~(ok_x & ok_y))[:5])
        if m.kind == "video":
            assert (np.round(colours[pos, 2] / 40) == prov.frame.numpy()[pos]).all()
        assert m.source_hw == source_hw[m.index]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("aspects")
    ov, _ = make_onevision_checkpoint(root / "ov-hf", "anyres_max_9")
    il, _ = make_interleave_checkpoint(root / "il-hf")
    media = root / "media"
    media.mkdir()
    paths = {}
    for hw in ((300, 451), (451, 300), (200, 613)):
        paths[hw] = str(media / f"ramp_{hw[0]}x{hw[1]}.png")
        Image.fromarray(_ramp(*hw)).save(paths[hw])
    video = _ramp_video(media / "ramp.mkv", 4, (90, 160))
    return root, ov, il, paths, video


@pytest.fixture(scope="module")
def onevision(checkpoints):
    return _colour_pipe(checkpoints[1])


@pytest.fixture(scope="module")
def interleave(checkpoints):
    return _colour_pipe(checkpoints[2])


def _prov(pipe, request, question, images=()):
    return Provenance.from_request(request, pipe.config, tokenizer=pipe.tokenizer, question=question,
                                   image_names=[p.rsplit("/", 1)[-1] for p in images])


def test_onevision_one_image_anyres_max(onevision, checkpoints):
    paths = checkpoints[3]
    for max_patches in (9, 1):  # 1: the unpadded map is downscaled (bilinear) before the newlines
        onevision.model.config = onevision.model.config.replace(anyres_max_patches=max_patches)
        try:
            req = onevision.prepare("What is it?", images=[paths[(300, 451)]])
            prov = _prov(onevision, req, "What is it?", [paths[(300, 451)]])
            m = prov.media_info[0]
            assert m.plan.aspect == "anyres" and m.end - m.start == req.image_token_counts[0]
            _check(prov, _position_colours(onevision, req), {0: (300, 451)})
            assert m.name == "ramp_300x451.png"
            if max_patches == 1:
                assert m.plan.unpadded_hw != m.plan.feature_map_hw
                assert (prov.kind == K["image_grid"]).sum() == m.plan.unpadded_hw[0] * m.plan.unpadded_hw[1]
        finally:
            onevision.model.config = onevision.model.config.replace(anyres_max_patches=9)


def test_onevision_several_images_padded(onevision, checkpoints):
    paths = checkpoints[3]
    sizes = [(300, 451), (451, 300), (200, 613)]
    req = onevision.prepare("Compare them.", images=[paths[hw] for hw in sizes])
    prov = _prov(onevision, req, "Compare them.")
    assert [m.plan.aspect for m in prov.media_info] == ["pad"] * 3
    _check(prov, _position_colours(onevision, req), dict(enumerate(sizes)))
    side = onevision.config.vision.grid_size
    for m in prov.media_info:  # one tile's patches, then one newline
        assert m.end - m.start == side * side + 1
        assert prov.kind_name(m.end - 1) == "image_newline" and prov.tile_of(m.start) == "base"
    assert (prov.coverage.numpy()[prov.media.numpy() == 2] < 1).any()  # 200x613: rows of padding


def test_onevision_video_frames_squashed(onevision, checkpoints):
    video = checkpoints[4]
    req = onevision.prepare("What happens?", video=video, frames=4)
    prov = _prov(onevision, req, "What happens?")
    assert [m.kind for m in prov.media_info] == ["video"] and prov.media_info[0].name == "ramp.mkv"
    _check(prov, _position_colours(onevision, req), {0: (90, 160)})


def test_interleave_images_and_video_frames(interleave, checkpoints):
    paths, video = checkpoints[3], checkpoints[4]
    req = interleave.prepare("<image> then <video> and?", images=[paths[(451, 300)]], video=video, frames=4)
    assert req.frame_clips and not req.videos
    prov = _prov(interleave, req, "<image> then <video> and?", [paths[(451, 300)]])
    kinds = [(m.kind, m.kind_index) for m in prov.media_info]
    assert sorted(kinds) == [("image", 0), ("video", 0)]
    v = next(m for m in prov.media_info if m.kind == "video")
    assert v.as_images and v.plan.num_frames == 4 and v.to_dict()["sent_as"] == "images"
    side = interleave.config.vision.grid_size
    for f in range(4):
        assert len(prov.where(media=v.index, frame=f)) == side * side
        assert prov.to_grid(torch.ones(len(prov)), v.index, frame=f).shape == (side, side)
    _check(prov, _position_colours(interleave, req), {m.index: m.source_hw for m in prov.media_info})
    im = next(m for m in prov.media_info if m.kind == "image")
    assert im.plan.aspect == "resize" and im.source_hw == (451, 300) and im.name == "ramp_451x300.png"


@pytest.mark.parametrize("which", ["ov", "il"])
def test_trace_json_untiled_images_and_frames(checkpoints, which, capsys, monkeypatch, tmp_path):
    from llava_next.cli.main import main

    root, ov, il, paths, video = checkpoints
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(root / "cache"))
    args = ["trace", "--model", str(ov if which == "ov" else il), "--json", "--png", str(tmp_path / "png"),
            "--image", paths[(300, 451)], "--image", paths[(200, 613)], "--video", video, "--frames", "3",
            "--layers", "0", "What is shown?"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    names = sorted(m["name"] for m in out["media"])
    assert names == ["ramp.mkv", "ramp_200x613.png", "ramp_300x451.png"]
    images = [m for m in out["media"] if m["kind"] == "image"]
    assert [m["aspect"] for m in images] == (["pad", "pad"] if which == "ov" else ["resize", "resize"])
    frames = out["attention"]["0"]["last"]["sums"]["frames"]
    assert len(frames) == 3 and all(isinstance(f["sum"], float) for f in frames)
    assert any(p.endswith("video0_frames.png") for p in out["png"])
    assert sum(p.endswith("_anyres.png") for p in out["png"]) == 2
