"""``llava-next explore`` in a real browser: Debian's chromium driven by Playwright against the page served on a
free local port with the built-in tiny model (docs/explore.md).

One browser walk (the page loads, a sample is chosen, a question is asked, the answer streams in before the
heatmap appears, the layer slider changes the picture's bytes, the relevancy map differs from the attention
one, a frame's positions are listed, a reduced request draws its kept map, bad input (an adapter folder
too) shows the command line's message and the next question is answered, a LoRA adapter changes the answer,
a figure is exported as JSON and as a real SVG), saving a screenshot of each view (to docs/explore/ with LLAVA_NEXT_SCREENSHOTS=1). It prints
the time from Ask to the first heatmap and per slider move. Skipped only when chromium (apt-get install chromium) or Playwright is missing.
Cheaper checks without a browser: the per-head rows' mean is the trace's head mean; the page's messages.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the screenshots docs/explore.md shows: written there only when asked (LLAVA_NEXT_SCREENSHOTS=1 python -m pytest
# tests/test_explore.py), so a plain test run leaves the repository as it found it; elsewhere a temporary folder
SHOTS = REPO / "docs" / "explore" if os.environ.get("LLAVA_NEXT_SCREENSHOTS") == "1" else \
    Path(tempfile.mkdtemp(prefix="explore-shots-"))


@pytest.fixture(scope="module", autouse=True)
def _default_compile_policy():
    """The page runs without compiling (LLAVA_NEXT_COMPILE=0), not under "1" (which compiles the decode attention
    for every new shape: tens of seconds per question here) nor the suite's "auto" (whose choice depends on what
    earlier tests of the same process compiled: in the full suite the first question then took over a minute)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAVA_NEXT_COMPILE", "0")
        yield


@pytest.fixture(scope="module")
def pipe():
    from llava_next.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained("tiny-random", progress=False)


def test_head_rows_average_to_the_traced_head_mean(pipe):
    """The page's per-head rows (heads="all") of the query that produced token k average to what
    ``Pipeline.trace`` reports with head-mean rows."""
    from llava_next.explore.session import Question, Session

    a = Session(pipe).ask(Question("sample:bunny", "What happens?", frames=4, max_new_tokens=3))
    req = pipe.prepare("What happens?", video=a.path, frames=4, max_new_tokens=3)
    res = pipe.trace(req, queries=["last", "generated"], max_new_tokens=3, compile_step=False)
    assert res.generated == a.result.generated
    for layer in (0, res.layers[-1]):
        assert torch.allclose(a.weights(0, layer, -1), res.attention[layer]["last"], atol=1e-6)
        assert a.rows[layer].shape == (3, pipe.config.text.num_heads, len(res.provenance))
        assert not torch.allclose(a.weights(1, layer, 0), a.weights(1, layer, 1))  # heads differ


def test_a_click_on_an_image_heatmap_finds_the_tokens_of_that_pixel(pipe):
    """The heatmap of an image: a pixel of the base panel -> the base token whose source box holds it, of the
    grid panel -> the grid token; the title -> nothing. A request with two videos: a click on the second one's
    picture (below the first's) -> that medium's cell."""
    from llava_next.explore import views
    from llava_next.explore.session import Question, Session
    from llava_next.research.plots import PAD

    a = Session(pipe).ask(Question("sample:cat", "What is it?", max_new_tokens=1))
    m = a.provenance.media_info[0]
    H, W = m.source_hw
    s = min(1.0, 480 / max(H, W))
    top = PAD + 40
    picture = views.heatmap(a, 0, 0, -1)
    for panel, (px, py) in ((0, (W * 0.7, H * 0.2)), (1, (W * 0.3, H * 0.6))):
        x, y = PAD + panel * (round(W * s) + PAD) + px * s, top + py * s
        assert x < picture.width and y < picture.height
        _part, hit = views.at_pixel(a, x, y)
        assert len(hit) == 1, (panel, hit)
        box = a.provenance.box[hit[0]].tolist()
        assert box[0] <= px < box[2] and box[1] <= py < box[3]
        assert a.provenance.tile_of(hit[0]) == "base" if panel == 0 else a.provenance.tile_of(hit[0]) != "base"
    assert views.at_pixel(a, 5, 5) == (None, [])
    two = Session(pipe).ask(Question(("sample:bunny", "sample:bunny"), "What is it?", frames=2, max_new_tokens=1))
    below = views.heatmap(two, 0, 0, -1).height - two.heatmap_rows[1][1]  # a click on the second video, drawn
    part, hit = views.at_pixel(two, PAD + 224 + PAD + 5, below + top + 5)  # below the first: frame 1's top-left cell
    assert part.startswith("m1 frame 1") and hit == two.provenance.where(media=1, frame=1, kind="video")[:1].tolist()


def test_kept_map_draws_each_cells_fate_and_every_merge(pipe):
    """A FrameFusion question: the kept view is the categorical figure of ``trace --reduce --png`` (all four fate
    colours in its legend, not the old layers-reached heatmap); its JSON holds one merge arrow per video token
    merged into another and a code grid whose merged / pruned cells are the provenance's; no reduction, no map."""
    import xml.etree.ElementTree as ET

    from llava_next.explore import views
    from llava_next.explore.exporting import export
    from llava_next.explore.session import Question, Session
    from llava_next.research import plots

    a = Session(pipe).ask(Question("sample:bunny", "What happens?", frames=4, max_new_tokens=2, reduce="framefusion"))
    prov, m = a.provenance, a.provenance.media_info[0]
    video = prov.where(media=0, kind="video").tolist()
    merged = [p for p in video if prov.merged_into(p) is not None]
    pruned = [p for p in video if prov.removed_at(p) is not None and prov.merged_into(p) is None]
    assert merged
    data = views.figure_data(a, "kept", 0, 0, -1)["fates"][m.name]
    codes = np.array(data["fates"])  # (frames, h, w)
    assert len(data["merges"]) == len(merged) == int((codes == 1).sum()) and int((codes == 2).sum()) == len(pruned)
    p = merged[0]
    assert data["merges"][0][0] == [int(prov.frame[p]), int(prov.row[p]), int(prov.col[p])]
    picture = np.asarray(views.kept_map(a))
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert all(colour in colours for _, colour in plots.FATES)
    svg = export("svg", "kept", lambda: views.kept_map(a), None, lambda: views.kept_map(a, views.vector))
    ids = [e.get("id") for e in ET.parse(svg[0]).iter() if e.get("id")]  # the SVG export: one arc per merge
    assert len([i for i in ids if i.startswith("merge-")]) == len(merged)
    assert views.kept_map(Session(pipe).ask(Question("sample:bunny", "What happens?", frames=2, max_new_tokens=1))) \
        is None


def test_missing_gradio_names_the_extra(monkeypatch):
    import sys

    from llava_next.explore.server import require_gradio
    from llava_next.explore.session import ExploreError

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(ExploreError, match=r"pip install 'llava-next\[explore\]'"):
        require_gradio()


def test_another_host_is_warned_about(pipe, monkeypatch, capsys):
    """--host other than 127.0.0.1 is served with a warning on stderr (serve and loading replaced)."""
    from llava_next.cli import main as cli
    from llava_next.explore import server
    from llava_next.runtime.pipeline import Pipeline

    seen = {}

    class Fake:
        url = "http://0.0.0.0:7860/"
        blocks = type("B", (), {"block_thread": lambda self: None})()

    monkeypatch.setattr(server, "serve", lambda session, **kw: seen.update(kw) or Fake())
    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(lambda cls, *a, **kw: pipe))
    assert cli.main(["explore", "--model", "tiny-random", "--host", "0.0.0.0", "--dtype", "fp32"]) == 0
    assert seen["host"] == "0.0.0.0"
    assert "warning: --host 0.0.0.0: the page is reachable from the network" in capsys.readouterr().err
    assert server.is_local("127.0.0.1") and not server.is_local("0.0.0.0")


def _cli_error(argv: list[str]) -> str:
    """The message ``llava-next`` prints for a user error (after "llava-next CMD: error: ")."""
    from llava_next.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 2
    line = err.getvalue().strip().splitlines()[-1]
    return line.split(": error: ", 1)[1]


@pytest.fixture(scope="module")
def served(pipe):
    from llava_next.cli.explore import plan_picture
    from llava_next.explore.models import ModelSource
    from llava_next.explore.server import serve
    from llava_next.explore.session import Session

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    session = Session(pipe, max_new_tokens=6, source=ModelSource("tiny-random", pipe.model.dtype))
    server = serve(session, port=port, plan_picture=plan_picture, block=False)
    yield server.url, session
    server.close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH: the explore page's browser test needs Debian's chromium "
                    "(apt-get install chromium; CI's .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the test extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


def _choose(page, elem: str, option: str) -> None:
    """Pick ``option`` in a Gradio dropdown."""
    page.click(f"#{elem} input")
    page.locator("ul[role=listbox] li", has_text=option).first.click()


def _src(page, elem: str) -> str:
    return page.locator(f"#{elem} img").first.get_attribute("src") or ""


def _bytes(page, src: str) -> bytes:
    return page.request.get(src).body()


def _heat(page) -> bytes:
    """The heatmap's pixels below its two-line title (which names the layer and head: the picture itself must
    change)."""
    from PIL import Image

    img = Image.open(io.BytesIO(_bytes(page, _src(page, "heatmap")))).convert("RGB")
    return img.crop((0, 60, img.width, img.height)).tobytes()


def _ask(page, question: str) -> float:
    """Ask; the seconds until the answer's heatmap or a new error shows (each ask of the walk ends differently
    from the one before)."""
    before = [_src(page, "heatmap") if page.locator("#heatmap img").count() else "", _error(page)]
    t0 = time.perf_counter()
    page.fill("#question textarea", question)
    page.click("#ask")
    page.wait_for_function("""([img0, err0]) => {
        const img = document.querySelector('#heatmap img');
        const err = document.querySelector('#error .prose');
        const said = err ? err.innerText.trim() : '';
        return (img && img.src && img.src !== img0) || (said.length > 0 && said !== err0);
    }""", arg=before, timeout=60000)
    return time.perf_counter() - t0


RECORD = """() => {
    const src = () => (document.querySelector('#heatmap img') || {}).src || '';
    const img0 = src();
    window.__seen = [];
    window.__poll = setInterval(() => {
        const said = document.querySelector('#answer textarea').value, drawn = src() !== img0;
        const doing = document.querySelector('#timing').innerText.includes('generating');
        const last = window.__seen[window.__seen.length - 1];
        if (!last || last[0] !== said || last[1] !== drawn || last[2] !== doing) {
            window.__seen.push([said, drawn, doing]);
        }
    }, 5);
}"""


def _streamed(page) -> list[str]:
    """The answer texts the page showed while it said "generating", before the question's heatmap arrived
    (``RECORD`` started before Ask)."""
    seen = page.evaluate("() => { clearInterval(window.__poll); return window.__seen; }")
    return list(dict.fromkeys(said for said, drawn, doing in seen if said.strip() and doing and not drawn))


def _set_slider(page, elem: str, value: int) -> float:
    """Move a slider; the seconds until the heatmap's picture is replaced."""
    before, t0 = _src(page, "heatmap"), time.perf_counter()
    page.locator(f"#{elem} input[type=range]").fill(str(value))
    page.wait_for_function("(b) => document.querySelector('#heatmap img').src !== b", arg=before, timeout=30000)
    return time.perf_counter() - t0


def _error(page) -> str:
    """The error line's text (its Markdown, not Gradio's progress timer beside it)."""
    return page.evaluate("() => (document.querySelector('#error .prose') || {innerText: ''}).innerText").strip()


def test_explore_page_in_chromium(served, browser, pipe, tmp_path, capsys):
    url, session = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(url)
    page.wait_for_selector("#question textarea", timeout=30000)
    first, moves = _walk_question_and_sliders(page)
    _walk_positions_plan_export(page, url, session)
    image_s = _walk_reduction_and_any_file(page, tmp_path)
    _walk_bad_input(page, tmp_path)
    _walk_adapter(page, pipe, tmp_path)
    with capsys.disabled():
        print(f"\n[explore timings, tiny-random, this machine] Ask -> first heatmap: video {first:.2f} s, "
              f"image {image_s:.2f} s; slider moves: {', '.join(f'{m:.3f}' for m in moves)} s")


def _walk_question_and_sliders(page) -> tuple[float, list[float]]:
    """A sample, a question: the answer and a heatmap appear; the layer and head sliders redraw from the cache
    (other bytes). (seconds to the first heatmap, seconds per slider move)"""
    _choose(page, "sample", "sample:bunny")
    page.fill("#frames input", "8")
    page.evaluate(RECORD)
    first = _ask(page, "What happens in the video?")
    assert _error(page) == ""
    final = page.input_value("#answer textarea")
    partial = _streamed(page)  # streamed: the answer's pieces shown as they came, before the trace's heatmap
    assert partial and all(final.startswith(p) for p in partial), (partial, final)
    print(f"\n[explore] streamed states seen before the heatmap: {len(partial)} ({partial[0]!r} first)")
    page.screenshot(path=str(SHOTS / "page.png"))
    page.locator("#heatmap").screenshot(path=str(SHOTS / "heatmap.png"))
    page.locator("#chart").screenshot(path=str(SHOTS / "layer_frame_chart.png"))
    page.locator("#lens").screenshot(path=str(SHOTS / "logit_lens.png"))
    pictures = [_heat(page)]
    moves = []
    for slider, value in (("layer", 0), ("head", 1), ("layer", 1)):
        moves.append(_set_slider(page, slider, value))
        pictures.append(_heat(page))
    assert all(a != b for a, b in itertools.pairwise(pictures)), "a slider move left the heatmap's pixels as they were"
    assert "redrawn from the cache" in page.inner_text("#redraw")
    _choose(page, "map", "relevancy")  # a gradient map of the same token: computed once, another picture
    page.wait_for_function("() => document.querySelector('#redraw').innerText.includes('relevancy of token 0')",
                           timeout=60000)  # (not the heatmap's src: a slider's late duplicate redraw changes it)
    assert _error(page) == ""
    assert _heat(page) != pictures[-1]
    page.wait_for_function("() => !document.querySelector('#heatmap').innerText.includes('processing') && "
                           "document.querySelector('#heatmap img').complete", timeout=30000)  # (a late echo)
    page.locator("#heatmap").screenshot(path=str(SHOTS / "relevancy.png"))
    return first, moves


def _walk_positions_plan_export(page, url: str, session) -> None:
    """A frame: the positions it became (exactly frame 3's), with their attention; the token plan; the
    heatmap's numbers exported as JSON at the slider's layer and head."""
    answer = session.get(max(session._answers))
    frame3 = answer.provenance.where(media=0, frame=3).tolist()
    _choose(page, "part", "m0 frame 3")
    page.wait_for_function("(ps) => { const t = document.querySelector('#positions').innerText.split(/\\s+/);"
                           " return ps.every(p => t.includes(p)); }", arg=[str(p) for p in frame3], timeout=30000)
    listed = page.inner_text("#positions").split()
    assert str(frame3[0] - 1) not in listed
    page.locator("#positions").screenshot(path=str(SHOTS / "positions.png"))
    _click_frame_cell(page, answer, frame=5)
    page.click("text=token plan")
    page.locator("#plan img").wait_for()
    page.locator("#plan").screenshot(path=str(SHOTS / "plan.png"))
    page.click("#export_json")
    page.locator("#export_file a").first.wait_for(timeout=30000)
    href = page.locator("#export_file a").first.get_attribute("href")
    data = json.loads(_bytes(page, href if href.startswith("http") else url.rstrip("/") + "/" + href.lstrip("/")))
    assert data["view"] == "heatmap" and data["layer"] == 1 and data["head"] == 1
    assert len(data["weights"]) == len(data["positions"]) == len(data["gradient_maps"]["relevancy"])
    page.click("#export_svg")  # the relevancy map drawn by research/vector.py: text and outlines, not one picture
    page.wait_for_function("() => [...document.querySelectorAll('#export_file a')].some(a => a.href.endsWith('.svg'))",
                           timeout=30000)
    href = page.locator("#export_file a").first.get_attribute("href")
    svg = _bytes(page, href if href.startswith("http") else url.rstrip("/") + "/" + href.lstrip("/")).decode()
    assert svg.lstrip().startswith("<?xml") and 'id="frame-7"' in svg and "relevancy of token 0" in svg


def _click_frame_cell(page, answer, frame: int) -> None:
    """A click on the first pooled cell of a frame in the heatmap lists that one position."""
    from llava_next.explore.views import THUMB
    from llava_next.research.plots import PAD

    img = page.locator("#heatmap img").first
    img.scroll_into_view_if_needed()
    natural = page.evaluate("() => document.querySelector('#heatmap img').naturalWidth")
    box = img.bounding_box()
    scale = box["width"] / natural
    x, y = PAD + frame * (THUMB + PAD) + 5, PAD + 40 + 5  # a few px into the frame's top-left cell
    img.click(position={"x": x * scale, "y": y * scale})
    want = answer.provenance.where(media=0, frame=frame, kind="video")[0].item()
    page.wait_for_function("(p) => { const t = document.querySelector('#positions').innerText.split(/\\s+/);"
                           " return t.includes(p) && !t.includes(String(Number(p) + 1)); }", arg=str(want),
                           timeout=30000)
    page.locator("#positions").screenshot(path=str(SHOTS / "clicked_cell.png"))


def _walk_reduction_and_any_file(page, tmp_path) -> float:
    """FastV: the kept map; then any file (the cat photo uploaded): AnyRes base and grid. (seconds to its
    heatmap)"""
    _choose(page, "reduce", "fastv")
    _ask(page, "What happens in the video?")
    page.locator("#kept img").wait_for(state="attached", timeout=30000)
    page.locator("#kept").scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    page.locator("#kept").screenshot(path=str(SHOTS / "kept_map.png"))
    _choose(page, "reduce", "none")
    cat = tmp_path / "cat.jpg"
    shutil.copy(REPO / "llava_next" / "samples" / "chelsea.jpg", cat)
    page.set_input_files("#upload input[type=file]", str(cat))
    page.wait_for_timeout(500)
    seconds = _ask(page, "What is in the picture?")
    assert _error(page) == "" and page.input_value("#answer textarea").strip()
    page.locator("#heatmap").screenshot(path=str(SHOTS / "anyres_heatmap.png"))
    return seconds


def _walk_bad_input(page, tmp_path) -> None:
    """An empty question, a huge frame count, an unreadable file: the command line's message each time; the
    server keeps serving and answers the next question."""
    _choose(page, "sample", "sample:bunny")  # (replaces the uploaded file)
    _ask(page, "   ")
    assert _error(page).startswith("error: no question given")
    page.fill("#frames input", "100000")
    _ask(page, "What happens?")
    assert _error(page) == "error: " + _cli_error(["run", "--model", "tiny-random", "--dtype", "fp32", "--video",
                                                   "sample:bunny", "--frames", "100000", "--max-new-tokens", "6",
                                                   "What happens?"])
    page.fill("#frames input", "8")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a picture")
    page.set_input_files("#upload input[type=file]", str(bad))
    page.wait_for_timeout(500)
    _ask(page, "What is this?")
    said = _error(page)
    assert "broken.jpg: not an image file PIL can read" in said
    uploaded = said.removeprefix("error: ").split(": not an image")[0]
    assert said == "error: " + _cli_error(["run", "--model", "tiny-random", "--image", uploaded, "What is this?"])
    page.screenshot(path=str(SHOTS / "error.png"))
    _choose(page, "sample", "sample:cat")
    _ask(page, "What is in the picture?")
    assert _error(page) == "" and page.input_value("#answer textarea").strip()


def _walk_adapter(page, pipe, tmp_path) -> None:
    """A folder that is no adapter: the message of ``run --adapter``; a tiny LoRA adapter (made here, random):
    the same question answered by the adapted model, differently."""
    page.fill("#adapter textarea", str(tmp_path / "no-adapter"))
    _ask(page, "What is in the picture?")
    assert _error(page) == "error: " + _cli_error(["run", "--model", "tiny-random", "--adapter",
                                                   str(tmp_path / "no-adapter"), "--image", "sample:cat", "?"])
    base = page.input_value("#answer textarea")
    page.fill("#adapter textarea", str(_tiny_adapter(pipe, tmp_path / "adapter")))
    _ask(page, "What is in the picture?")
    assert _error(page) == "" and page.input_value("#answer textarea") != base
    page.fill("#adapter textarea", "")


def _tiny_adapter(pipe, directory: Path) -> Path:
    """A rank-2 LoRA adapter in PEFT's format for tiny-random, strong enough to change its answer."""
    from llava_next.model.llava import LlavaNextModel
    from llava_next.model.lora import LoraConfig, apply_lora, lora_state_dict
    from llava_next_weights.adapters import save_adapter

    model = LlavaNextModel(pipe.config)
    apply_lora(model, LoraConfig(r=2, alpha=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in lora_state_dict(model).values():
            v.copy_(0.5 * torch.randn(v.shape, generator=g))
    save_adapter(model, directory)
    return directory
