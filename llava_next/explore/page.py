"""The Gradio page: its components, and the callbacks that ask a question once and redraw from the cache.

    page = Page(session, plan_picture)      # plan_picture(request, path, tile) -> PIL image (the command line's inspect --png)
    blocks = page.build()                   # a gradio.Blocks; server.py launches it

Layout, top to bottom: the question (a sample or any uploaded file, the question, frames, answer tokens, frame
selection and token reduction switches, a LoRA adapter folder, Ask); an error line; the answer (streamed as it
is generated) and its timings; the token plan; the map of the chosen generated token (attention at the chosen
layer and head, or a gradient map: relevancy, input x gradient, rollout); the layer x frame chart; a frame or
tile and the positions it became; the kept map of a reduced request; the logit lens; export of a figure (PNG,
SVG) and its numbers (JSON). Ask runs ``Session.ask_stream`` (the model, once: the answer's pieces shown as
they come, then the trace's views); every other control redraws from the cached answer (views.py), never the
model, except a gradient map, computed once per (answer, token, method) and cached. A failing callback shows
``errors.error_message`` in the error line and leaves the rest of the page as it was, so the next question
works.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from . import views
from .errors import error_message
from .exporting import export, svg_note
from .session import Answer, Question, Session

SAMPLES = ["sample:bunny", "sample:cat"]
SELECT_FRAMES = ["none", "maxinfo"]  # the frame selectors (llava_next.reduce)
REDUCE = ["none", "fastv", "framefusion", "dycoke", "dycoke-ttm"]  # what a trace takes (cli/trace.py _check)
VIEWS = ["heatmap", "chart", "plan", "kept", "lens"]
VECTOR_VIEWS = ("heatmap", "chart", "kept", "lens")  # drawn by research/vector.py too: a real SVG with matplotlib
MAPS = ["attention", "relevancy", "input x gradient", "rollout"]  # gradients.METHODS after the attention


@dataclass
class _Controls:
    """The page's components, by role (Gradio objects)."""

    sample: Any = None
    upload: Any = None
    question: Any = None
    frames: Any = None
    new_tokens: Any = None
    select: Any = None
    reduce: Any = None
    adapter: Any = None
    ask: Any = None
    error: Any = None
    answer: Any = None
    timing: Any = None
    plan: Any = None
    token: Any = None
    layer: Any = None
    head: Any = None
    map: Any = None
    heatmap: Any = None
    redraw: Any = None
    chart: Any = None
    part: Any = None
    positions: Any = None
    kept: Any = None
    lens: Any = None
    view: Any = None
    export_buttons: Any = None
    export_file: Any = None
    key: Any = None


class Page:
    def __init__(self, session: Session, plan_picture: Callable[[Any, str, int], Any] | None = None) -> None:
        self.session = session
        self.plan_picture = plan_picture
        self.c = _Controls()

    # ---- layout --------------------------------------------------------------------------------------
    def build(self):
        import gradio as gr

        with gr.Blocks(title="llava-next explore") as blocks:
            gr.Markdown("# llava-next explore\nAsk once; the sliders redraw from the cached trace of that question.")
            self._question_row(gr)
            self._view_rows(gr)
            self._wire(gr)
        return blocks

    def _question_row(self, gr) -> None:
        c = self.c
        with gr.Row():
            c.sample = gr.Dropdown(SAMPLES, value=SAMPLES[0], label="sample media", elem_id="sample")
            c.upload = gr.File(label="or any image / video files (several: one request; they win over the sample "
                                     "until one is chosen)", type="filepath", file_count="multiple",
                               elem_id="upload")
        with gr.Row():
            c.question = gr.Textbox(label="question", elem_id="question", scale=3)
            c.frames = gr.Number(8, precision=0, label="frames (video)", elem_id="frames")
            c.new_tokens = gr.Number(self.session.max_new_tokens, precision=0, label="answer tokens",
                                     elem_id="new_tokens")
        with gr.Row():
            c.select = gr.Dropdown(SELECT_FRAMES, value="none", label="frame selection", elem_id="select")
            c.reduce = gr.Dropdown(REDUCE, value="none", label="token reduction", elem_id="reduce")
            c.adapter = gr.Textbox(label="LoRA adapter folder (PEFT format, what llava-next train writes; empty: "
                                         "none)", elem_id="adapter", scale=2)
            c.ask = gr.Button("Ask", variant="primary", elem_id="ask")
        c.error = gr.Markdown("", elem_id="error")
        with gr.Row():
            c.answer = gr.Textbox(label="answer", elem_id="answer", interactive=False, scale=3)
            c.timing = gr.Markdown("", elem_id="timing")
        c.key = gr.State(None)

    def _view_rows(self, gr) -> None:
        c, s = self.c, self.session
        with gr.Accordion("token plan", open=False):
            c.plan = gr.Image(type="pil", label="token plan", elem_id="plan", interactive=False, format="png")
        with gr.Row():
            c.token = gr.Dropdown([], label="generated token", elem_id="token")
            c.layer = gr.Slider(0, s.num_layers - 1, value=s.num_layers // 2, step=1, label="layer", elem_id="layer")
            c.head = gr.Slider(-1, s.num_heads - 1, value=-1, step=1, label="head (-1: mean of heads)",
                               elem_id="head")
            c.map = gr.Dropdown(MAPS, value="attention", label="map (gradient maps: all layers, computed once per "
                                                               "token)", elem_id="map")
        c.redraw = gr.Markdown("", elem_id="redraw")
        c.heatmap = gr.Image(type="pil", label="the chosen map on the original pixels", elem_id="heatmap",
                             interactive=False, format="png")
        c.chart = gr.Image(type="pil", label="layer x frame", elem_id="chart", interactive=False, format="png")
        with gr.Row():
            c.part = gr.Dropdown([], label="frame / tile: the positions it became", elem_id="part")
        c.positions = gr.Dataframe(headers=views.POSITION_COLUMNS, elem_id="positions", interactive=False)
        c.kept = gr.Image(type="pil", label="kept map (reduced request)", elem_id="kept", interactive=False,
                          format="png")
        c.lens = gr.Image(type="pil", label="logit lens", elem_id="lens", interactive=False, format="png")
        with gr.Row():
            c.view = gr.Dropdown(VIEWS, value="heatmap", label="export which figure", elem_id="view")
            c.export_buttons = [gr.Button(f"export {fmt}", elem_id=f"export_{fmt}") for fmt in ("png", "svg", "json")]
        c.export_file = gr.File(label="exported", elem_id="export_file", interactive=False, file_count="multiple")

    def _wire(self, gr) -> None:
        c = self.c
        ask_out = [c.error, c.answer, c.timing, c.plan, c.token, c.part, c.heatmap, c.chart, c.positions, c.kept,
                   c.lens, c.key, c.map]
        c.ask.click(self.ask, [c.sample, c.upload, c.question, c.frames, c.new_tokens, c.select, c.reduce,
                               c.adapter], ask_out)
        c.sample.input(lambda: None, None, c.upload)  # choosing a sample replaces an uploaded file
        at = [c.key, c.token, c.layer, c.head, c.part, c.map]
        # .input: the user's moves only (not the values Ask sets), so an answer is drawn once
        c.layer.input(self.redraw, at, [c.error, c.heatmap, c.positions, c.redraw])
        c.map.input(self.redraw, at, [c.error, c.heatmap, c.positions, c.redraw])
        for control in (c.token, c.head):
            control.input(self.redraw_all, at, [c.error, c.heatmap, c.positions, c.chart, c.redraw])
        c.part.input(self.positions, at[:5], [c.error, c.positions])

        def on_click(key, token, layer, head, evt):
            return self.clicked(key, token, layer, head, evt)

        on_click.__annotations__ = {"evt": gr.SelectData}  # Gradio passes the click's pixel by this annotation
        c.heatmap.select(on_click, [c.key, c.token, c.layer, c.head], [c.error, c.part, c.positions])
        for fmt, button in zip(("png", "svg", "json"), c.export_buttons):
            button.click(lambda *a, fmt=fmt: self.export(fmt, *a), [c.view, *at], [c.error, c.export_file])

    # ---- callbacks -----------------------------------------------------------------------------------
    def ask(self, sample, upload, text, frames, new_tokens, select, reduce, adapter):
        """Ask (the model runs once): the answer's text as it is generated, then every view of the answer; on an
        error only the error line changes (a generator: Gradio sends each yield to the page)."""
        import gradio as gr

        keep = tuple(gr.skip() for _ in range(10))
        try:
            files = [upload] if isinstance(upload, str) else list(upload or [])
            q = Question(media=tuple(files) or sample or "", text=text or "", frames=int(frames or 0),
                         max_new_tokens=int(new_tokens or 0), select_frames=None if select == "none" else select,
                         reduce=None if reduce == "none" else reduce, adapter=(adapter or "").strip() or None)
            said = ""
            for item in self.session.ask_stream(q):
                if isinstance(item, Answer):
                    yield self._views(item)
                else:
                    said += item
                    yield ("", said, "generating ... (the trace and the maps follow)") + keep
        except Exception as e:  # noqa: BLE001  (shown on the page; the server keeps serving)
            yield (error_message(e),) + tuple(gr.skip() for _ in range(12))

    def _views(self, a: Answer) -> tuple:
        """Every output of Ask for a traced answer (the map back to attention)."""
        import gradio as gr

        tok = self.session.pipe.tokenizer
        labels, parts = views.token_labels(a, tok), views.parts(a)
        token, layer, head, part = 0, self.session.num_layers // 2, -1, parts[0] if parts else None
        t = a.seconds
        timing = (f"prepare {t['prepare_s']:.2f} s, first token {t['first_token_s']:.2f} s, generate "
                  f"{t['generate_s']:.2f} s, trace {t['trace_s']:.2f} s (asked once; {len(a.provenance)} positions, "
                  f"{len(a.producers)} answer tokens)")
        return ("", a.result.text, timing, self._plan(a), gr.Dropdown(choices=list(zip(labels, range(len(labels)))),
                                                                      value=token),
                gr.Dropdown(choices=parts, value=part), views.heatmap(a, token, layer, head),
                views.layer_chart(a, token, head), views.positions(a, part, token, layer, head) if part else [],
                views.kept_map(a), views.logit_lens(a, tok), a.key, "attention")

    def _plan(self, answer):
        if self.plan_picture is None:
            return None
        return self.plan_picture(answer.result.request, answer.path, self.session.pipe.config.tile_size)

    def _map(self, a: Answer, token: int, layer: int, head: int, method: str, lib=views.plots):
        """The heatmap of the chosen map: attention from the cache, a gradient map computed once (then cached)."""
        if (method or "attention") == "attention":
            return views.heatmap(a, token, layer, head, lib=lib)
        return views.heatmap(a, token, layer, head, scores=self.session.token_map(a.key, token, method),
                             method=method, lib=lib)

    def redraw(self, key, token, layer, head, part, method="attention"):
        """A layer move or another map: the heatmap and the positions' attention (a gradient map: computed on
        its first request, Gradio's progress timer on the heatmap meanwhile)."""
        import gradio as gr

        t0 = time.perf_counter()
        try:
            a = self.session.get(key)
            token, layer, head = int(token or 0), int(layer), int(head)
            cached = (method or "attention") == "attention" or (token, method) in a.maps
            pic = self._map(a, token, layer, head, method)
            table = views.positions(a, part, token, layer, head) if part else []
            how = "redrawn from the cache" if cached else f"{method} of token {token} computed (now cached)"
            return "", pic, table, f"{how} in {time.perf_counter() - t0:.3f} s"
        except Exception as e:  # noqa: BLE001
            return error_message(e), gr.skip(), gr.skip(), gr.skip()

    def redraw_all(self, key, token, layer, head, part, method="attention"):
        """A token or head change: the heatmap, the positions and the layer x frame chart."""
        import gradio as gr

        error, pic, table, said = self.redraw(key, token, layer, head, part, method)
        if error:
            return error, pic, table, gr.skip(), said
        return "", pic, table, views.layer_chart(self.session.get(key), int(token or 0), int(head)), said

    def positions(self, key, token, layer, head, part):
        import gradio as gr

        try:
            return "", views.positions(self.session.get(key), part, int(token or 0), int(layer), int(head))
        except Exception as e:  # noqa: BLE001
            return error_message(e), gr.skip()

    def clicked(self, key, token, layer, head, evt=None):
        """A click on the heatmap: the position(s) that pixel became (its frame chosen in the dropdown)."""
        import gradio as gr

        try:
            a = self.session.get(key)
            x, y = evt.index
            part, hit = views.at_pixel(a, float(x), float(y))
            if not hit:
                return "", gr.skip(), gr.skip()
            table = views.rows_of(a, hit, int(token or 0), int(layer), int(head))
            return "", gr.Dropdown(value=part) if part else gr.skip(), table
        except Exception as e:  # noqa: BLE001
            return error_message(e), gr.skip(), gr.skip()

    def export(self, fmt, view, key, token, layer, head, part, method="attention"):
        """The chosen figure as PNG / SVG (real vectors where research/vector.py draws it and matplotlib is
        installed) or its numbers as JSON; the error line says when an SVG holds the PNG."""
        import gradio as gr

        try:
            a = self.session.get(key)
            token, layer, head = int(token or 0), int(layer), int(head)
            tok = self.session.pipe.tokenizer

            def drawn(lib=views.plots):
                return {"heatmap": lambda: self._map(a, token, layer, head, method, lib),
                        "chart": lambda: views.layer_chart(a, token, head, lib), "plan": lambda: self._plan(a),
                        "kept": lambda: views.kept_map(a, lib), "lens": lambda: views.logit_lens(a, tok, lib)}[view]

            data = views.figure_data(a, view, token, layer, head) if fmt == "json" else None
            vector = drawn(views.vector) if fmt == "svg" and view in VECTOR_VIEWS else None
            files = export(fmt, view, drawn() if fmt != "json" else None, data, vector)
            return (svg_note(view, VECTOR_VIEWS) if fmt == "svg" else ""), files
        except Exception as e:  # noqa: BLE001
            return error_message(e), gr.skip()
