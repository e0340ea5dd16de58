"""Export of the page's current figure: PNG, SVG (the PNG inside an SVG wrapper) or its numbers as JSON.

    path = export("png", "heatmap", draw, None)    # draw() -> the PIL picture
    path = export("json", "heatmap", None, data)   # data: views.figure_data(...)

Files go to a fresh temporary directory (the page offers them for download). The SVG holds the raster
picture as a base64 PNG ``<image>`` of the same size: the figures are drawn with Pillow (research/plots.py),
so there are no vector paths to write; it opens in any SVG editor for annotation.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
from typing import Callable

from .session import ExploreError

FORMATS = ("png", "svg", "json")


def export(fmt: str, view: str, draw: Callable | None, data: dict | None) -> str:
    """The file of ``view`` in ``fmt``; an ExploreError when the view has no figure (e.g. no reduction)."""
    if fmt not in FORMATS:
        raise ExploreError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = os.path.join(tempfile.mkdtemp(prefix="llava-next-explore-"), f"{view}.{fmt}")
    if fmt == "json":
        with open(path, "w") as f:
            json.dump(data, f)
        return path
    picture = draw()
    if picture is None:
        raise ExploreError(f"no {view} figure for this answer (the kept map needs a reduced video request, the "
                           f"layer x frame chart a video)")
    if fmt == "png":
        picture.save(path, format="PNG")
        return path
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    w, h = picture.size
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
                f'<image width="{w}" height="{h}" href="data:image/png;base64,'
                f'{base64.b64encode(buf.getvalue()).decode()}"/></svg>\n')
    return path
