"""Publication figures of ``llava-next trace --png`` (cli/trace_draw.py, research/plots.py, research/vector.py) on
the built-in tiny model, through the real entry point: SVG parses as XML with one panel per frame, PDF is a PDF,
every ``--query`` group gets its figures, ``--vmin`` / ``--vmax`` change the colours as the scale says, the
logit-lens grid at 32+ positions holds every token whole as a text element, the kept map has one arrow per
FrameFusion merge, and SVG / PDF without matplotlib is a user error naming the extra."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from llava_next.research import plots, vector

SVG = "{http://www.w3.org/2000/svg}"
# 40+ question tokens: the logit-lens grid at more than 32 positions
LONG = ("What is the large grey rabbit doing in the green meadow near the tree, and why does he look so "
        "surprised when the small flying squirrel and the two chipmunks appear from behind the rock?")


def _main(capsys, *args):
    from llava_next.cli.main import main

    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["trace", "--model", "tiny-random", *args])
    return code, capsys.readouterr().out, err.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAVA_NEXT_CACHE", str(root / "cache"))
    mp.setenv("LLAVA_NEXT_COMPILE", "0")
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def svg_run(env):
    """A video traced with two query groups and a 40+ token question, drawn as SVG, with its JSON."""
    from llava_next.cli.main import main

    out = env / "svg"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = main(["trace", "--model", "tiny-random", "--video", "sample:bunny", "--frames", "4", "--layers", "0,-1",
                     "--query", "last,question", "--lens", "question,last", "--png", str(out), "--format", "svg",
                     "--json", LONG])
    assert code == 0, buf.getvalue()
    return out, json.loads(buf.getvalue())


def _ids(path) -> list[str]:
    return [e.get("id") for e in ET.parse(path).iter() if e.get("id")]


def test_svg_has_one_panel_per_frame_for_every_query_group(svg_run):
    out, report = svg_run
    assert sorted(p.rsplit("/", 1)[1] for p in report["png"]) == sorted(
        [f"video0_{what}{group}.svg" for what in ("frames", "original", "layers") for group in ("", "_question")]
        + ["logit_lens.svg"])
    for name in ("video0_frames.svg", "video0_frames_question.svg", "video0_original.svg"):
        assert sorted(i for i in _ids(out / name) if i.startswith("frame-")) == [f"frame-{k}" for k in range(4)]
    assert sorted(i for i in _ids(out / "video0_original.svg") if i.startswith("crop-")) == [f"crop-{k}" for k in range(4)]
    assert "table" in _ids(out / "video0_layers_question.svg")
    # the reproducibility record rides along as the SVG's description
    desc = next(e for e in ET.parse(out / "video0_frames.svg").iter() if e.tag.endswith("description"))
    assert json.loads(desc.text)["switches"]["query"] == ["last", "question"]


def test_logit_lens_svg_holds_every_token_whole_at_32_plus_positions(svg_run):
    out, report = svg_run
    lens = report["logit_lens"]
    layers = sorted(lens, key=int)
    P = len(lens[layers[0]]["positions"])
    assert P > 32
    root = ET.parse(out / "logit_lens.svg").getroot()
    texts = {g.get("id"): "".join(t.text or "" for t in g.iter(f"{SVG}text")) for g in root.iter(f"{SVG}g")
             if (g.get("id") or "").startswith("lens-")}
    assert len(texts) == len(layers) * P
    for i, layer in enumerate(layers):
        for j in range(P):
            assert texts[f"lens-{i}-{j}"] == plots.visible(lens[layer]["tokens"][j][0]), (layer, j)


def test_pdf_and_png(env, capsys):
    code, _, err = _main(capsys, "--image", "sample:cat", "--png", str(env / "pdf"), "--format", "pdf",
                              "What is this?")
    assert code == 0, err
    assert (env / "pdf" / "image0_anyres.pdf").read_bytes().startswith(b"%PDF")
    assert (env / "pdf" / "logit_lens.pdf").read_bytes().startswith(b"%PDF")


def test_vmin_vmax_set_the_colours(env, capsys):
    """The same trace drawn three times: the default scale (0 .. the largest cell) puts the largest token's cell at
    the brightest colour; --vmax 10x higher darkens every cell; --vmin above every value draws them all at the
    darkest colour. Checked on the image's AnyRes map (black where the pixel colour shows through least)."""
    def brightest(directory):  # the mean brightness of the base map's panel (header 54 px; the 300x451 px cat)
        img = np.asarray(Image.open(env / directory / "image0_anyres.png").convert("RGB")).astype(float)
        return img[54:54 + 300, 14:14 + 451].sum(-1).mean()

    runs = {"auto": [], "vmax": ["--vmax", "1"], "vmin": ["--vmin", "2", "--vmax", "3"]}
    for name, flags in runs.items():
        code, _, err = _main(capsys, "--image", "sample:cat", "--layers", "0", "--png", str(env / name), *flags,
                             "What is this?")
        assert code == 0, err
    assert brightest("vmax") < brightest("auto") - 60
    assert brightest("vmin") <= brightest("vmax") + 1  # everything below vmin: the darkest colour


def test_frame_scale_states_each_range_and_global_scale_is_shared():
    frames = np.zeros((2, 32, 32, 3), np.uint8)  # black frames: a pixel is 0.6 x the colour of its cell
    grids = [np.full((2, 2), 0.05), np.full((2, 2), 0.5)]
    args = {"timestamps": [0.0, 1.0], "frame_indices": [0, 1], "title": "t", "thumb": 32}

    def first_pixel(img, k):
        return np.asarray(img)[2 * 20 + 14 + 16, 14 + k * 46 + 16].astype(int)  # header, then frame k's centre

    glob = plots.frame_heatmaps(frames, grids, norm="global", **args)
    own = plots.frame_heatmaps(frames, grids, norm="frame", **args)
    fixed = plots.frame_heatmaps(frames, grids, norm="global", vmin=0.0, vmax=1.0, **args)
    def expect(v):
        return np.round(0.6 * plots.colormap(v)).astype(int)

    assert np.abs(first_pixel(glob, 0) - expect(0.1)).max() <= 2  # 0.05 of 0..0.5: not full contrast
    assert np.abs(first_pixel(own, 0) - expect(1.0)).max() <= 2  # its own scale 0..0.05
    assert np.abs(first_pixel(fixed, 1) - expect(0.5)).max() <= 2


def test_original_frames_dim_what_the_model_never_sees_and_outline_its_crop():
    """A white 40x60 frame whose middle 20 columns are the crop: outside it the picture dimmed (0.45), inside the
    map's colour blended in, and the crop's outline in cyan."""
    heat = np.full((40, 60), np.nan)
    heat[:, 20:40] = 0.5
    img = np.asarray(plots.original_frames([np.full((40, 60, 3), 255, np.uint8)], [heat], [(20, 0, 40, 40)], [0.0],
                                           [0], title="t", width=60)).astype(int)
    top, left = 54, 14  # the two-line header, the margin
    assert np.array_equal(img[top + 20, left + 5], [115, 115, 115])  # 0.45 x 255: a pixel the model never sees
    assert np.abs(img[top + 20, left + 30] - np.round(0.4 * 255 + 0.6 * plots.colormap(1.0))).max() <= 1
    assert np.array_equal(img[top + 20, left + 20], [0, 220, 255])  # the crop's left edge


def test_original_frames_take_the_frame_scale_too():
    """``--scale frame`` reaches the whole-frame figure: two black frames holding 0.05 and 0.5 are each drawn at
    full colour on their own scale, where the shared scale draws the first at a tenth (PNG and SVG alike)."""
    heats = [np.full((40, 60), 0.05), np.full((40, 60), 0.5)]
    args = ([np.zeros((40, 60, 3), np.uint8)] * 2, heats, [(0, 0, 60, 40)] * 2, [0.0, 1.0], [0, 1])

    def centre(img, k):  # the two-line header, then frame k's middle (each panel 60 px + 14 px gaps)
        return np.asarray(img)[54 + 20, 14 + k * 74 + 30].astype(int)

    glob = plots.original_frames(*args, title="t", width=60)
    own = plots.original_frames(*args, title="t", width=60, norm="frame")
    assert np.abs(centre(glob, 0) - np.round(0.6 * plots.colormap(0.1))).max() <= 1
    assert np.abs(centre(own, 0) - np.round(0.6 * plots.colormap(1.0))).max() <= 1
    assert np.abs(centre(own, 1) - centre(glob, 1)).max() <= 1  # the largest frame: the same either way
    if importlib.util.find_spec("matplotlib"):
        fig = vector.original_frames(*args, title="t", width=60, norm="frame")
        assert [ax.get_images()[1].norm.vmax for ax in fig.axes[:2]] == [0.05, 0.5]


def test_value_range():
    assert plots.value_range([np.array([0.01, 0.05, np.nan])]) == (0.0, 0.05)
    assert plots.value_range([np.array([-2.0, 1.0])]) == (-2.0, 1.0)
    assert plots.value_range([np.array([0.2])], vmin=0.1, vmax=0.3) == (0.1, 0.3)
    assert plots.value_range([np.zeros(3)]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="vmin 1 must be below vmax 0.5"):
        plots.value_range([np.zeros(3)], vmin=1, vmax=0.5)


def test_logit_lens_png_grows_down_with_positions():
    def toks(P):
        return [[f"tok{j}" for j in range(P)] for _ in range(3)]

    small = plots.logit_lens_grid(toks(4), np.full((3, 4), 0.5), [0, 1, 2], [str(j) for j in range(4)], title="t")
    big = plots.logit_lens_grid(toks(48), np.full((3, 48), 0.5), [0, 1, 2], [str(j) for j in range(48)], title="t")
    assert big.width <= small.width + 40 and big.height > small.height + 40 * 20
    assert plots.visible("a\x11b\n\u2581c\u4e2d") == "a\\u0011b\\n_c\\u4e2d"


def test_kept_map_draws_one_arrow_per_merge(env, capsys):
    code, stdout, err = _main(capsys, "--video", "sample:bunny", "--frames", "4", "--reduce", "framefusion",
                              "--png", str(env / "ff"), "--format", "svg", "--json", "What happens?")
    assert code == 0, err
    merged = [p for p in json.loads(stdout)["positions"] if p["kind"] == "video"
              and (p.get("reduction") or {}).get("fate") == "merged"]
    assert merged
    ids = _ids(env / "ff" / "video0_kept.svg")
    assert len([i for i in ids if i.startswith("merge-")]) == len(merged)
    assert len([i for i in ids if i.startswith("frame-")]) == 4


def test_figure_flags_are_checked_before_loading(env, capsys, monkeypatch):
    code, _, err = _main(capsys, "--video", "sample:bunny", "--vmax", "1", "What happens?")
    assert code == 2 and "--vmax: these set how --png draws its figures; add --png DIR" in err
    code, _, err = _main(capsys, "--video", "sample:bunny", "--png", str(env / "x"), "--vmin", "1", "--vmax", "1",
                         "What happens?")
    assert code == 2 and "vmin must be below vmax" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it raises ImportError
    code, _, err = _main(capsys, "--video", "sample:bunny", "--png", str(env / "y"), "--format", "svg", "What?")
    assert code == 2 and "pip install 'llava-next[figures]'" in err, err
    assert not (env / "y").exists()
