"""What a notebook shows for the research objects, and their tables as DataFrames.

    prov                      # in Jupyter: the token budget per segment and medium, then the first positions
    tr                        # a Trace: its steps, what each recorded (name, shape, dtype), attention layers
    cache                     # an ActivationCache: its hook names grouped by layer, shapes
    prov.to_dataframe()       # one row per position (kind, segment, media, frame, time, tile, row, col, box...)

``_repr_html_`` (IPython's rich display protocol) of ``Provenance``, ``Trace`` and ``ActivationCache`` calls
the functions here: plain HTML tables, no script, no style sheet, every value escaped. DataFrames need pandas
(not a dependency of llava-next: ``pip install pandas``); it is imported only when one is asked for.
"""

from __future__ import annotations

import html
from typing import Any, Iterable, Sequence

import torch

ROWS_SHOWN = 12  # positions listed under a provenance's summary


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table of escaped cells."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def provenance_html(prov: Any) -> str:
    """The summary (positions per segment and medium) and the first ``ROWS_SHOWN`` positions."""
    cols = ["position", "kind", "segment", "media", "frame", "time", "tile", "row", "col", "token_id"]
    records = prov.take(torch.arange(min(len(prov), ROWS_SHOWN))).to_records() if len(prov) else []
    rows = [[i] + [r[c] for c in cols[1:]] for i, r in enumerate(records)]
    more = f"<p>... {len(prov) - ROWS_SHOWN} more positions (to_dataframe() has all)</p>" if len(prov) > ROWS_SHOWN else ""
    return f"<b>Provenance</b>{_pre(prov.summary())}{table(cols, rows)}{more}"


def trace_html(tr: Any) -> str:
    """One row per step and recorded name (shape, dtype); the attention statistics per layer of step 0."""
    rows = [[s, name, value] for s, step in enumerate(tr.steps) for name, value in step.records.items()]
    out = f"<b>Trace</b>: {len(tr.steps)} decoder call(s) (step 0 = prefill or the one forward)"
    out += table(["step", "name", "shape"], rows) if rows else "<p>nothing recorded</p>"
    if tr.attention:
        fields = ("rows", "key_mass", "entropy", "topk_values", "segment_rows", "segment_map")
        att = [[layer] + [getattr(stats, f) for f in fields] for layer, stats in sorted(tr.attention.items())]
        out += "<b>attention (step 0)</b>" + table(["layer", *fields], att)
    return out


def cache_html(cache: Any) -> str:
    """The cached hook names, one row per layer (``blocks.{l}.``) and one per other name, with shapes."""
    by_layer: dict[str, list[str]] = {}
    other = []
    for name, value in dict.items(cache):
        if name.startswith("blocks."):
            layer, _, rest = name[len("blocks."):].partition(".")
            by_layer.setdefault(layer, []).append(f"{rest} {_cell(value)}")
        else:
            other.append([name, value])
    rows = [[f"blocks.{layer}", "; ".join(names)] for layer, names in by_layer.items()]
    return (f"<b>ActivationCache</b>: {len(cache)} tensors (virtual: attn_scores, pattern, result)"
            + table(["name", "shape"], other) + table(["layer", "hooks"], rows))


def provenance_dataframe(prov: Any) -> Any:
    """``prov.to_records()`` as a pandas DataFrame, one row per position (index = position); the pixel box
    split into x0, y0, x1, y1, the tile and grid kept as given."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("Provenance.to_dataframe needs pandas, which llava-next does not install: "
                          "pip install pandas") from None
    records = prov.to_records()
    for r in records:
        box = r.pop("box")
        r.update(zip(("x0", "y0", "x1", "y1"), box if box is not None else (None,) * 4))
    return pd.DataFrame.from_records(records, index=pd.RangeIndex(len(records), name="position"))
