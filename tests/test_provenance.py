"""Token provenance (research/provenance.py) and selectors (research/select.py).

- counts: every image size and video setting tokens.py is tested on gives the same number of positions;
- order: AnyRes grid tokens across tiles come in the order transformers' LlavaNextModel.pack_image_features
  puts them, checked on index tensors (tile, patch row, patch col) pushed through transformers' code;
- geometry: a coordinate ramp image (red = x, green = y) pushed through the real pixel pipeline
  (image.preprocess_image / video.preprocess_frame), averaged per 14 px patch and packed / pooled by the
  model's code, lands in each token at the centre of that token's provenance box — for 44 image sizes
  (both AnyRes compat modes) and 4 video settings; ``to_pixels`` maps the tokens back onto the ramp;
- a real request (real photo + real video + tokenizer): media order, question / system / last-text
  positions, selectors and their errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llava_next.config import LlavaNextConfig
from llava_next.inputs.image import CLIP_MEAN, CLIP_STD, preprocess_image
from llava_next.inputs.tokens import image_tokens, video_plan
from llava_next.inputs.video import preprocess_frame
from llava_next.model.anyres import pack_image_features
from llava_next.model.pooling import add_video_newlines, pool_frames
from llava_next.research import Provenance
from llava_next.research import select as sel
from llava_next.research.geometry import K, image_fields, video_fields
from test_anyres import SIZES, TINY, hf_model  # noqa: F401  (fixture)
from test_tokens import IMAGE_SIZES

CONFIG = LlavaNextConfig.from_name("llava-v1.6-vicuna-7b")
VIDEO = LlavaNextConfig.from_name("LLaVA-NeXT-Video-7B")


# ---- counts -------------------------------------------------------------------------------------------
def test_image_counts_equal_tokens_py():
    sizes = list(dict.fromkeys([tuple(s) for s in SIZES + IMAGE_SIZES]))
    for cfg in (CONFIG, CONFIG.replace(anyres_compat="original"), TINY):
        for hw in sizes:
            f, plan = image_fields(hw, cfg)
            assert len(f["kind"]) == image_tokens(hw, cfg) == plan.total, hw
            kh, kw = plan.unpadded_hw
            assert (f["kind"] == K["image_base"]).sum() == plan.base_tokens
            assert (f["kind"] == K["image_newline"]).sum() == plan.newline_tokens == kh
            assert (f["kind"] == K["image_grid"]).sum() == kh * kw


@pytest.mark.parametrize("mode", ["average", "max", "bilinear"])
def test_video_counts_equal_tokens_py(mode):
    for stride in (1, 2, 3, 4, 5):
        for newline in ("none", "grid", "frame", "one_token"):
            cfg = VIDEO.replace(spatial_pool_stride=stride, spatial_pool_mode=mode, video_newline=newline)
            for frames in (1, 3):
                f, plan = video_fields(frames, (720, 1280), cfg)
                assert len(f["kind"]) == plan.total == video_plan(frames, cfg).total
                assert (f["kind"] == K["video_newline"]).sum() == plan.newline_tokens
                for fr in range(frames):  # every pooled cell of every frame exactly once
                    cells = f["row"][(f["frame"] == fr) & (f["kind"] == K["video"])] * plan.pooled_hw[1] + \
                        f["col"][(f["frame"] == fr) & (f["kind"] == K["video"])]
                    assert sorted(cells.tolist()) == list(range(plan.tokens_per_frame))


# ---- order vs transformers ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(480, 640), (640, 480), (300, 1000), (1000, 300), (748, 352), (200, 300),
                                  (100, 60), (57, 113), (1, 1), (900, 40), (500, 337), (168, 56)])
def test_grid_order_matches_transformers_pack_image_features(hf_model, size):  # noqa: F811
    f, plan = image_fields(size, TINY)
    side = TINY.vision.grid_size
    rows, cols = plan.grid_hw
    n = 1 + rows * cols
    t = torch.arange(n).repeat_interleave(side * side)
    pr = torch.arange(side).repeat_interleave(side).repeat(n)
    pc = torch.arange(side).repeat(side * n)
    feats = torch.stack([t, pr, pc], -1).float().view(n, side * side, 3)
    (ref,), _ = hf_model.pack_image_features([feats], torch.tensor([size]), "default",
                                             image_newline=torch.full((3,), -1.0))
    ref = ref.long().numpy()
    assert len(ref) == len(f["kind"])
    base = f["kind"] == K["image_base"]
    assert (ref[base, 0] == 0).all() and (ref[base, 1] == f["row"][base]).all() and (ref[base, 2] == f["col"][base]).all()
    nl = f["kind"] == K["image_newline"]
    assert (ref[nl] == -1).all() and (ref[~nl, 0] >= 0).all()
    grid = f["kind"] == K["image_grid"]
    assert (ref[grid, 0] == 1 + f["tile_row"][grid] * cols + f["tile_col"][grid]).all()
    # (row, col) in the unpadded grid = stitched-map cell minus one fixed offset
    map_r, map_c = f["tile_row"][grid] * side + ref[grid, 1], f["tile_col"][grid] * side + ref[grid, 2]
    blocks = 1 if grid.any() else 0  # (900x40 keeps no grid column at all: only newlines)
    assert len(set((map_r - f["row"][grid]).tolist())) == blocks == len(set((map_c - f["col"][grid]).tolist()))
    assert (f["row"][grid] < plan.unpadded_hw[0]).all() and (f["col"][grid] < plan.unpadded_hw[1]).all()


# ---- geometry: a coordinate ramp through the real pixel pipeline -------------------------------------------
def _ramp(h: int, w: int, blue: int = 0) -> np.ndarray:
    x = (np.arange(w) + 0.5) / w * 255
    y = (np.arange(h) + 0.5) / h * 255
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.round(x)[None, :]
    img[..., 1] = np.round(y)[:, None]
    img[..., 2] = blue
    return img


def _patch_means(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, 3, S, S) CLIP-normalized -> (N, (S/patch)^2, 3) mean 0..255 colour per patch (a "vision tower"
    that keeps exactly where each patch is)."""
    pooled = F.avg_pool2d(pixels, patch).double()  # (N, 3, P, P); un-normalizing is affine: after the mean
    rgb = pooled * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    return (rgb * 255).flatten(2).transpose(1, 2)


RAMP_SIZES = [(480, 640), (640, 480), (899, 1024), (300, 1000), (1000, 300), (720, 1280), (540, 960),
              (500, 500), (748, 352), (352, 748), (427, 640), (300, 451), (400, 600), (500, 741), (600, 512),
              (512, 512), (750, 1000), (500, 337), (337, 500), (336, 336), (200, 300), (224, 224), (130, 542),
              (3000, 400), (400, 3000), (999, 1001), (1411, 1411), (872, 1000), (768, 767), (1999, 1998),
              (100, 1500), (2000, 337), (50, 700), (700, 50), (673, 671), (1008, 336), (336, 1008), (339, 1000),
              (1000, 339), (613, 97), (97, 613), (1234, 567), (567, 1234), (801, 799)]


def _check_ramp(est: np.ndarray, box: np.ndarray, hw, what) -> None:
    h, w = hw
    cx, cy = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
    bw, bh = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    # a quarter of a patch (an off-by-one-patch mistake is a whole one), + uint8 rounding, + bicubic edges
    ex = np.abs(est[:, 0] / 255 * w - cx) <= 0.25 * bw + w / 255 + 1.5
    ey = np.abs(est[:, 1] / 255 * h - cy) <= 0.25 * bh + h / 255 + 1.5
    assert ex.all() and ey.all(), (what, hw, np.flatnonzero(~(ex & ey))[:5])


def test_ramp_image_lands_on_provenance_boxes():
    assert len(RAMP_SIZES) >= 40
    for i, hw in enumerate(RAMP_SIZES):
        cfg = CONFIG if i % 4 else CONFIG.replace(anyres_compat="original")
        im = preprocess_image(_ramp(*hw), cfg)
        feats = _patch_means(im.pixel_values, cfg.vision.patch_size)
        tokens = pack_image_features(feats, hw, im.grid, torch.full((3,), float("nan"), dtype=torch.float64),
                                     cfg.anyres_compat).numpy()
        f, plan = image_fields(hw, cfg)
        assert (plan.grid_hw, plan.canvas_hw) == (im.grid, im.best_resolution)
        inside = (f["coverage"] == 1) & (f["kind"] != K["image_newline"])  # patches with no black padding in them
        assert inside.sum() > 0.8 * (f["kind"] != K["image_newline"]).sum()
        _check_ramp(tokens[inside], f["box"][inside], hw, "image")
        if i % 3:
            continue
        # to_pixels puts the per-token values back on the original pixels: the ramp again
        prov = Provenance.build([CONFIG.image_token_id] * plan.total, cfg, image_sizes=[hw])
        for part in ("grid", "base"):
            back = prov.to_pixels(torch.from_numpy(tokens[:, 0]), media=0, part=part)
            ok = ~np.isnan(back)  # the grid misses the strips unpadding drops (100x1500: 18% of the rows)
            assert ok.mean() == 1 if part == "base" else ok.mean() > 0.75, (hw, part, ok.mean())
            err = np.abs(back[ok] / 255 * hw[1] - (np.nonzero(ok)[1] + 0.5))
            patch_px = hw[1] / (plan.resized_hw[1] if part == "grid" else cfg.tile_size) * cfg.vision.patch_size
            assert np.median(err) <= 0.3 * patch_px + hw[1] / 255 + 1.5, (hw, part)


VIDEO_SETTINGS = [((720, 1280), 2, "average", "none"), ((480, 360), 3, "bilinear", "grid"),
                  ((300, 451), 4, "max", "frame"), ((90, 160), 5, "average", "one_token")]


@pytest.mark.parametrize("frame_hw,stride,mode,newline", VIDEO_SETTINGS)
def test_ramp_video_lands_on_provenance_boxes(frame_hw, stride, mode, newline):
    cfg = VIDEO.replace(spatial_pool_stride=stride, spatial_pool_mode=mode, video_newline=newline)
    frames = np.stack([preprocess_frame(_ramp(*frame_hw, blue=40 * k), cfg.tile_size) for k in range(3)])
    feats = _patch_means(torch.from_numpy(frames).permute(0, 3, 1, 2).double().sub(
        torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255).div(torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255),
        cfg.vision.patch_size)
    plan = video_plan(3, cfg)
    pooled = pool_frames(feats, (24, 24), stride, mode)
    tokens = add_video_newlines(pooled, plan.pooled_hw, torch.full((3,), float("nan"), dtype=torch.float64),
                                newline).numpy()
    f, _ = video_fields(3, frame_hw, cfg, timestamps=[0.0, 0.5, 1.0])
    vid = f["kind"] == K["video"]
    assert np.isnan(tokens[~vid]).all() and not np.isnan(tokens[vid]).any()
    assert (np.round(tokens[vid, 2] / 40) == f["frame"][vid]).all()  # blue = 40 x frame
    assert (f["time"][vid] == f["frame"][vid] * 0.5).all()
    box = f["box"][vid]
    x, y = tokens[vid, 0] / 255 * frame_hw[1], tokens[vid, 1] / 255 * frame_hw[0]
    slack = frame_hw[1] / 255 + 1.5
    assert ((x >= box[:, 0] - slack) & (x <= box[:, 2] + slack)).all()  # inside the cell's footprint
    assert ((y >= box[:, 1] - frame_hw[0] / 255 - 1.5) & (y <= box[:, 3] + frame_hw[0] / 255 + 1.5)).all()
    if mode != "max":  # symmetric weights: the value sits at the footprint's centre
        _check_ramp(tokens[vid], box, frame_hw, (stride, mode))
    prov = Provenance.build([VIDEO.video_token_id] * plan.total, cfg,
                            videos=[{"num_frames": 3, "frame_hw": frame_hw, "timestamps": [0.0, 0.5, 1.0]}])
    grid = prov.to_grid(torch.from_numpy(tokens[:, 2]), media=0, frame=2)
    assert grid.shape == plan.pooled_hw and torch.allclose(grid, torch.full(plan.pooled_hw, 80.0, dtype=grid.dtype), atol=1)


# ---- a real request ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def request_and_pipe(tmp_path_factory):
    from checkpoints import RUNNABLE_VOCAB, tiny_config
    from llava_next.inputs.prompt import Tokenizer
    from llava_next.model.llava import LlavaNextModel
    from llava_next.runtime.pipeline import Pipeline
    from media import real_photo, real_video
    from tokenizers_fixture import make_tokenizer_json

    cfg = tiny_config("video", base_vocab=RUNNABLE_VOCAB).replace(template="vicuna_v1")
    tok = Tokenizer.load(make_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json", cfg))
    pipe = Pipeline(LlavaNextModel(cfg), tok)
    question = "What is the rabbit doing?"
    req = pipe.prepare(question, images=[real_photo("chelsea"), real_photo("rocket")], video=real_video(), frames=4)
    return pipe, req, question


def test_request_provenance(request_and_pipe):
    pipe, req, question = request_and_pipe
    cfg = pipe.config
    prov = Provenance.from_request(req, cfg, tokenizer=pipe.tokenizer, question=question)
    assert len(prov) == len(req.input_ids)
    kinds = [m.kind for m in prov.media_info]
    assert kinds == ["image", "image", "video"]  # the template puts images, then the video, first
    for m, n in zip(prov.media_info, req.image_token_counts + req.video_token_counts):
        assert m.end - m.start == n
        assert (prov.media[m.start:m.end] == m.index).all()
    assert prov.media_info[0].source_hw == (300, 451) and prov.media_info[1].source_hw == (427, 640)
    v = prov.media_info[2]
    assert list(v.timestamps) == req.videos[0].timestamps and v.source_hw == (720, 1280)
    # visual kinds exactly where the placeholders are
    ids = torch.tensor(req.input_ids)
    assert torch.equal(prov.media >= 0, (ids == cfg.image_token_id) | (ids == cfg.video_token_id))
    # the question, the system prompt, the last text token
    q = sel.question().resolve(prov)
    assert pipe.tokenizer.decode(ids[q].tolist()).strip() == question
    s = sel.system().resolve(prov)
    assert pipe.tokenizer.decode(ids[s].tolist()).strip().startswith("A chat between")
    assert sel.last_text().resolve(prov).tolist() == [len(prov) - 1]
    assert q.max() < len(prov) - 1  # "ASSISTANT:" follows the question
    # records (the CLI's JSON)
    rec = prov.to_records()
    assert rec[0]["kind"] == "text" and rec[0]["media"] is None and rec[0]["tile"] is None
    first_video = rec[v.start]
    assert (first_video["kind"], first_video["media"], first_video["frame"], first_video["row"], first_video["col"]) == \
        ("video", 2, 0, 0, 0)
    assert rec[prov.media_info[0].start]["tile"] == "base"
    assert any(r["tile"] == [0, 1] for r in rec[prov.media_info[0].start:prov.media_info[0].end])
    assert "positions" in prov.summary()


def test_selectors(request_and_pipe):
    pipe, req, question = request_and_pipe
    prov = Provenance.from_request(req, pipe.config, tokenizer=pipe.tokenizer, question=question)
    v = prov.media_info[2]
    per_frame = v.plan.tokens_per_frame
    f1 = sel.frame(1).resolve(prov)
    assert f1.tolist() == list(range(v.start + per_frame, v.start + 2 * per_frame))
    assert len(sel.frame(range(4)).resolve(prov)) == v.end - v.start
    assert len(sel.frame(slice(0, 2)).resolve(prov)) == 2 * per_frame
    base = sel.tile("base", media=0).resolve(prov)
    assert len(base) == prov.media_info[0].plan.base_tokens
    t01 = sel.tile((0, 1), media=1).resolve(prov)
    assert all(prov.tile_of(int(i)) == (0, 1) for i in t01)
    assert len(sel.newlines().resolve(prov)) == sum(m.plan.newline_tokens for m in prov.media_info)
    # a pixel box in the top-left quarter of the photo selects grid tokens from tile (0, 0) and base tokens
    h, w = prov.media_info[1].source_hw
    tl = sel.box(0, 0, w / 4, h / 4, media=1).resolve(prov)
    assert all(prov.kind_name(int(i)) in ("image_base", "image_grid") for i in tl)
    assert all(prov.box[i, 0] < w / 4 and prov.box[i, 1] < h / 4 for i in tl)
    grid_tl = sel.box(0, 0, w / 4, h / 4, media=1, part="grid").resolve(prov)
    assert {prov.tile_of(int(i)) for i in grid_tl} == {(0, 0)}
    # combinators
    both = (sel.frame(0) | sel.question()).resolve(prov)
    assert len(both) == per_frame + len(sel.question().resolve(prov))
    assert len((sel.visual() & sel.frame(0)).resolve(prov)) == per_frame
    assert len((~sel.visual()).resolve(prov)) == len(sel.text().resolve(prov))
    assert len((sel.media(2) - sel.frame(0)).resolve(prov)) == 3 * per_frame
    # generated tokens
    gen = prov.with_generated([5, 6, 7])
    assert sel.generated().resolve(gen).tolist() == [len(prov), len(prov) + 1, len(prov) + 2]
    assert sel.last_text().resolve(gen).tolist() == [len(prov) - 1]
    assert gen.to_records()[-1]["kind"] == "generated"
    # a pruned sequence (every other video token of frame 0 dropped) keeps each position's origin
    drop = sel.frame(0).resolve(prov)[::2]
    keep = torch.tensor([i for i in range(len(prov)) if i not in set(drop.tolist())])
    pruned = prov.take(keep)
    assert len(pruned) == len(prov) - len(drop) and pruned.prompt_len == len(pruned)
    assert torch.equal(pruned.box[sel.frame(1).resolve(pruned)], prov.box[f1])
    assert len(sel.frame(0).resolve(pruned)) == per_frame - len(drop)
    assert sel.last_text().resolve(pruned).tolist() == [len(pruned) - 1]
    # sums per segment / frame / tile add up
    values = torch.rand(len(prov), dtype=torch.float64)
    sums = prov.sums(values)
    assert abs(sum(sums["segments"].values()) - float(values.sum())) < 1e-9
    assert abs(sum(x["sum"] for x in sums["frames"]) - float(values[v.start:v.end].sum())) < 1e-9
    assert len(sums["tiles"]) == sum(1 + m.plan.num_tiles for m in prov.media_info if m.kind == "image")
    # errors are specific
    with pytest.raises(sel.EmptySelection, match="frame"):
        sel.frame(9).resolve(prov)
    assert len(sel.maybe(sel.frame(9)).resolve(prov)) == 0
    with pytest.raises(ValueError, match="unknown kind"):
        sel.kind("pixel").resolve(prov)
    with pytest.raises(IndexError, match="outside"):
        sel.positions(len(prov)).resolve(prov)
    assert sel.positions(-1).resolve(prov).tolist() == [len(prov) - 1]
    with pytest.raises(ValueError, match="give frame="):
        prov.to_grid(values, media=2)


def test_build_rejects_mismatched_media():
    with pytest.raises(ValueError, match="placeholder positions"):
        Provenance.build([CONFIG.image_token_id] * 10, CONFIG, image_sizes=[(480, 640)])
