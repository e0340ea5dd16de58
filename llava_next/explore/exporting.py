"""Export of the page's current figure: PNG, SVG or its numbers as JSON.

    paths = export("png", "heatmap", draw, None)               # draw() -> the PIL picture
    paths = export("svg", "heatmap", draw, None, vector_draw)  # vector_draw() -> matplotlib figure(s)
    paths = export("json", "heatmap", None, data)              # data: views.figure_data(...)

Files go to a fresh temporary directory (the page offers them for download); a list of paths comes back. SVG:
when matplotlib is installed (the ``figures`` extra) and the view has a vector drawing (``vector_draw``:
research/vector.py, the heatmap, the layer x frame chart, the logit lens), a real SVG: text as text, outlines
as lines, only the photos raster; a heatmap of several media gives one file each. Otherwise (no matplotlib, or
the token plan and kept map, which only Pillow draws) the PNG inside an SVG ``<image>`` of the same size, and
the page says so (``svg_note``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
from typing import Callable

from ..research.plots import PNG_LEVEL
from .session import ExploreError

FORMATS = ("png", "svg", "json")


def has_vector() -> bool:
    """True when matplotlib (the ``figures`` extra) is installed: real SVG figures."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def export(fmt: str, view: str, draw: Callable | None, data: dict | None,
           vector_draw: Callable | None = None) -> list[str]:
    """The file(s) of ``view`` in ``fmt``; an ExploreError when the view has no figure (e.g. no reduction)."""
    if fmt not in FORMATS:
        raise ExploreError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    folder = tempfile.mkdtemp(prefix="llava-next-explore-")
    path = os.path.join(folder, f"{view}.{fmt}")
    if fmt == "json":
        with open(path, "w") as f:
            json.dump(data, f)
        return [path]
    if fmt == "svg" and vector_draw is not None and has_vector():
        return _vector_svg(folder, view, vector_draw())
    picture = draw()
    if picture is None:
        raise ExploreError(_no_figure(view))
    if fmt == "png":
        picture.save(path, format="PNG", compress_level=PNG_LEVEL)
        return [path]
    buf = io.BytesIO()
    picture.save(buf, format="PNG", compress_level=PNG_LEVEL)
    w, h = picture.size
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
                f'<image width="{w}" height="{h}" href="data:image/png;base64,'
                f'{base64.b64encode(buf.getvalue()).decode()}"/></svg>\n')
    return [path]


def _vector_svg(folder: str, view: str, figures) -> list[str]:
    """matplotlib figure(s) saved as SVG (research/vector.py ``save``), one file per figure."""
    from ..research import vector

    if figures is None or figures == []:
        raise ExploreError(_no_figure(view))
    figures = figures if isinstance(figures, list) else [figures]
    paths = []
    for k, fig in enumerate(figures):
        path = os.path.join(folder, f"{view}.svg" if len(figures) == 1 else f"{view}-m{k}.svg")
        vector.save(fig, path, json.dumps({"view": view, "source": "llava-next explore"}))
        paths.append(path)
    return paths


def svg_note(view: str, vector_views: tuple[str, ...]) -> str:
    """What the SVG export of ``view`` holds, said on the page."""
    if view in vector_views and has_vector():
        return ""
    why = "matplotlib is not installed (pip install 'llava-next[figures]')" if view in vector_views \
        else f"the {view} is drawn with Pillow only"
    return f"note: this SVG holds the PNG ({why})"


def _no_figure(view: str) -> str:
    return (f"no {view} figure for this answer (the kept map needs a reduced video request, the layer x frame chart "
            f"a video)")
