"""`llava-next trace` as a user calls it, on a tiny llava-hf checkpoint directory (weights + tokenizer.json), a
real photo and the real test video: the JSON's positions agree with the request, its attention weights equal
transformers' eager ``output_attentions`` on the same weights and ids (head mean, per query group, fp32), its
sums are the weights' sums over the provenance's frames / tiles / segments, and the PNGs are drawn."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from checkpoints import make_runnable_checkpoint
from media import real_photo, real_video
from test_model import hf_image_args

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """One traced run (image + video, 2 generated tokens, every query group), its JSON and the HF model."""
    root = tmp_path_factory.mktemp("trace")
    directory, hf = make_runnable_checkpoint(root / "tiny-video-hf", kind="video")
    hf.set_attn_implementation("eager")
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAVA_NEXT_CACHE", str(root / "cache"))
    mp.setenv("LLAVA_NEXT_COMPILE", "0")  # two generated tokens do not pay for compiling the decode attention
    args = ["trace", "--model", str(directory), "--image", str(real_photo("chelsea")), "--video", str(real_video()),
            "--frames", "4", "--dtype", "fp32", "--layers", "0,-1", "--query", "last,question,generated,all",
            "--max-new-tokens", "2", "--png", str(root / "png"), "--json", "What is the rabbit doing?"]
    out = _main(args)
    mp.undo()
    return root, directory, hf, out, args


def _main(args):
    import contextlib
    import io

    from llava_next.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(args)
    return code, buf.getvalue()


def test_trace_json_positions(traced):
    _, _, _, (code, stdout), _ = traced
    assert code == 0, stdout
    out = json.loads(stdout)
    pos = out["positions"]
    T = out["positions_total"]
    assert len(pos) == T == len(out["input_ids"]) == out["prompt_positions"] + len(out["generated"])
    for p in pos:
        assert {"kind", "media", "frame", "tile", "row", "col"} <= set(p)
    kinds = [p["kind"] for p in pos]
    assert kinds.count("video") == sum(out["plan"]["video_tokens"])
    n_image = sum(kinds.count(k) for k in ("image_base", "image_grid", "image_newline"))
    assert n_image == sum(out["plan"]["image_tokens"])
    assert kinds[-2:] == ["generated", "generated"]
    video = [p for p in pos if p["kind"] == "video"]
    assert [p["frame"] for p in video][::len(video) // 4] == [0, 1, 2, 3]
    assert all(p["tile"] is None and p["row"] is not None for p in video)
    times = out["media"][1]["timestamps"]
    assert video[0]["time"] == times[0] and video[-1]["time"] == times[-1]
    assert {tuple(p["tile"]) for p in pos if p["kind"] == "image_grid"} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    text = [p for p in pos if p["kind"] == "text"]
    assert all(p[k] is None for p in text for k in ("media", "frame", "tile", "row", "col"))
    assert any(p["segment"] == "question" for p in text)


def test_trace_attention_equals_transformers_eager(traced):
    from llava_next.inputs.image import preprocess_image
    from llava_next.inputs.video import load_video
    from llava_next_weights.load import read_config

    root, directory, hf, (code, stdout), _ = traced
    out = json.loads(stdout)
    cfg = read_config(next((root / "cache").rglob("config.json")).parent)
    image, clip = preprocess_image(real_photo("chelsea"), cfg), load_video(real_video(), 4, size=cfg.tile_size)
    ids = torch.tensor([out["input_ids"]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=clip.pixel_values[None], **hf_image_args([image]),
                 output_attentions=True).attentions  # per layer (1, H, T, T), eager softmax in fp32
    T = ids.shape[1]
    layers = out["attention"]
    assert set(layers) == {"0", "1"}  # "-1" is the last of 2 layers
    for layer, groups in layers.items():
        head_mean = ref[int(layer)][0].mean(0).double()  # (T, T)
        assert set(groups) == {"last", "question", "generated", "all"}
        for name, g in groups.items():
            w = torch.tensor(g["weights"], dtype=torch.float64)
            assert w.shape == (T,) and abs(float(w.sum()) - 1) < 1e-5
            queries = list(range(T)) if g["queries"] == "all" else g["queries"]
            expected = head_mean[queries].mean(0)
            assert (w - expected).abs().max() < 1e-5, (layer, name)
        assert groups["last"]["queries"] == [out["prompt_positions"] - 1]
        assert groups["generated"]["queries"] == [T - 2, T - 1]


def test_trace_sums_follow_provenance(traced):
    _, _, _, (code, stdout), _ = traced
    out = json.loads(stdout)
    pos = out["positions"]
    for groups in out["attention"].values():
        for g in groups.values():
            w, sums = g["weights"], g["sums"]
            for fr in sums["frames"]:
                assert abs(fr["sum"] - sum(w[i] for i, p in enumerate(pos) if p["frame"] == fr["frame"]
                                           and p["media"] == fr["media"])) < 1e-9
            for t in sums["tiles"]:
                tile = t["tile"]
                assert abs(t["sum"] - sum(w[i] for i, p in enumerate(pos) if p["tile"] == tile
                                          and p["media"] == t["media"])) < 1e-9
            for seg, s in sums["segments"].items():
                assert abs(s - sum(w[i] for i, p in enumerate(pos) if p["segment"] == seg)) < 1e-9
            assert abs(sum(sums["segments"].values()) - 1) < 1e-5


def test_trace_png_and_logit_lens(traced):
    root, _, _, (code, stdout), _ = traced
    out = json.loads(stdout)
    names = sorted(p.rsplit("/", 1)[-1] for p in out["png"])
    groups = ["", "_question", "_generated", "_all"]  # every --query group drawn; the first one's names are plain
    assert names == sorted(["logit_lens.png"] + [f"{stem}{g}.png" for g in groups
                                                 for stem in ("image0_anyres", "video0_frames", "video0_original",
                                                              "video0_layers")])
    record = out["reproducibility"]  # how it was made: in the JSON and in every picture's text chunk
    assert record["torch"] == torch.__version__ and record["switches"]["max_new_tokens"] == 2
    assert record["switches"]["activations"] == "float"  # the numeric contract a trace was made under
    assert record["checkpoint_sha256"] and record["dtype"] == "float32"
    for path in out["png"]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 100
            assert json.loads(im.text["llava-next"]) == record
    lens = out["logit_lens"]
    assert set(lens) == {"0", "1"}
    last = out["prompt_positions"] - 1
    assert last in lens["1"]["positions"] and out["input_ids"][-2] == out["generated"][0]
    # the last layer's lens at the last prompt position is the model's own prediction: the first generated token
    assert lens["1"]["ids"][lens["1"]["positions"].index(last)][0] == out["generated"][0]


def test_trace_user_errors(traced):
    root, directory, _, _, _ = traced
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAVA_NEXT_CACHE", str(root / "cache"))
    try:
        code, stdout = _main(["trace", "--model", str(directory), "--dtype", "fp32", "--layers", "5", "--json", "Hi"])
        assert code == 2 and "this decoder has 2 layers" in json.loads(stdout)["error"]
        code, stdout = _main(["trace", "--model", str(directory), "--query", "generated", "--json", "Hi"])
        assert code == 2 and "--max-new-tokens" in json.loads(stdout)["error"]
        with pytest.raises(SystemExit):
            _main(["trace", "--model", str(directory), "--query", "first", "Hi"])
    finally:
        mp.undo()
