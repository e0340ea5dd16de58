"""What token reduction did to each pooled cell of a video, as the grids its kept map draws (research/plots.py
``kept_map``, research/vector.py ``kept_map``): ``llava-next trace --reduce ... --png`` and the explore page's
kept view draw from the same grids.

    fates, removed, arrows = fate_grids(prov, m)      # m: one of prov.media_info, a video

- ``fates``: one (h, w) int64 grid per frame, ``plots.FATES``' codes: 0 kept to the last layer, 1 merged into
  another token, 2 pruned, 3 no token in the decoder (dropped before it, or a cell the request has no token for);
- ``removed``: one (h, w) float64 grid per frame, the first decoder layer without the cell's token (-1: none);
- ``arrows``: ((frame, row, col), (frame, row, col)) per merged token of this video, from it to the token it was
  averaged into (FrameFusion), both within the video.

A provenance without fates (an unreduced request, or a reducer that works before the decoder only) gives every
cell with a token code 0.
"""

from __future__ import annotations

import numpy as np
import torch


def fate_grids(prov, m):
    """The video ``m`` (one of ``prov.media_info``) as (fates, removed, arrows): the module docstring."""
    T = prov.prompt_len
    removed_at = torch.full((len(prov),), -1.0, dtype=torch.float64)  # (positions,)
    merged_into = torch.full((len(prov),), -1, dtype=torch.long)  # (positions,)
    if prov.fates is not None:
        removed_at[:T], merged_into[:T] = prov.fates.removed_at.double(), prov.fates.merged_into
    code = torch.where(removed_at < 0, 0.0, torch.where(merged_into >= 0, 1.0, 2.0))  # (positions,)
    fates, removed = [], []
    for f in range(m.plan.num_frames):
        g = prov.to_grid(code, m.index, frame=f).numpy()  # (h, w), NaN: no token
        fates.append(np.where(np.isnan(g), 3, g).astype(np.int64))
        removed.append(np.nan_to_num(prov.to_grid(removed_at, m.index, frame=f).numpy(), nan=-1.0))
    video = set(prov.where(media=m.index, kind="video").tolist())

    def at(p: int) -> tuple[int, int, int]:
        return int(prov.frame[p]), int(prov.row[p]), int(prov.col[p])

    arrows = [(at(p), at(q)) for p, q in enumerate(merged_into.tolist()) if q >= 0 and p in video and q in video]
    return fates, removed, arrows
