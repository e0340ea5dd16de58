"""Token provenance: for every position of a prepared request, where it came from.

    prov = Provenance.from_request(request, pipe.config, tokenizer=pipe.tokenizer, question="What happens?")
    prov.kind_name(i), prov.media[i], prov.frame[i], prov.tile_of(i), prov.row[i], prov.col[i], prov.box[i]
    prov.where(kind="video", frame=3)           -> LongTensor of positions (selectors: research/select.py)
    prov.to_grid(values, media=0, frame=3)      -> (h, w) map of per-position values (NaN: no token)
    prov.to_pixels(values, media=0, part="grid") -> (H, W) map on the ORIGINAL image / frame pixels
    prov.sums(values)                           -> per-segment, per-frame and per-tile sums
    prov.with_generated(ids)                    -> the same map with generated positions appended
    prov.take(kept)                             -> the map of a pruned / merged sequence
    prov.with_fates(tr.fates)                   -> + what token reduction did to each position (pruned at
                                                   which layer, merged into which position, read by DyCoke)

What every position records (struct of arrays, one (T,) tensor per field, -1 / NaN where n/a):
- ``kind``: text, image_base, image_grid, image_newline, video, video_newline, generated (``KINDS``).
- ``segment``: system, question, template (other prompt text: role markers, separators, BOS, earlier
  turns), the visual kinds, generated (``SEGMENTS``). system/question are found by decoding the text
  positions with the tokenizer and locating the strings given (``question=``, ``system=``).
- ``media``: index into ``prov.media_info`` (media in sequence order; each says image/video, which
  image or video it is, its source size and its token plan from tokens.py).
- ``tile_row``/``tile_col``: the 336 px crop an AnyRes grid token comes from (base tokens: "base").
- ``frame``/``time``: the sampled frame's index in the clip (0..F-1) and its timestamp in seconds.
- ``row``/``col`` in the feature grid the token belongs to, ``grid_h``/``grid_w`` its size: 24x24 for
  the base image, the unpadded stitched map (h', w') for the AnyRes grid, the pooled grid (12x12 at
  stride 2) for a video frame. Newline tokens carry the row they end (col -1).
- ``box`` (x0, y0, x1, y1): the source pixels of the token's patch (or pooled cell) in the ORIGINAL
  image or frame, undoing resize, padding, centre crop and unpadding; ``coverage``: the fraction of
  that patch's canvas area that is image (< 1 where a kept feature overlaps the black padding). The
  box is the geometric footprint (patches the pooling reads; a ViT mixes information globally).

How it is built (never reverse-engineered from counts): the token order comes from running the
model's own packing code on index tensors — ``model.anyres.pack_image_features`` on per-tile (tile,
patch row, patch col) channels, ``model.pooling.pool_frames`` on an identity matrix (so each pooled
cell's weights over patches are exactly what the pooling reads: its footprint for average, max and
bilinear alike), ``model.pooling.add_video_newlines`` on (frame, cell) channels — and the geometry
from the functions the pixel pipeline uses (``inputs.tokens.image_plan``, ``model.anyres.paste_offset``,
``inputs.video.shortest_edge_size`` / ``center_crop_offset``). Visual placeholders are assigned to
media the way ``LlavaNextModel.embed`` splices features: the image placeholder positions in order
to images 0, 1, ..., the video ones to videos 0, 1, ... (equal ids: images first, as
``expand_placeholders``). A medium whose packed length differs from its placeholder count is an error.

Sizes are (height, width); boxes are (x0, y0, x1, y1) in pixels with x to the right, y down. The per-medium
fields (one image, one video) are built in geometry.py; this module places them in the sequence.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch

from ..config import LlavaNextConfig
from ..inputs.tokens import ImagePlan, VideoPlan, image_aspect
from ..reduce.engine import Fates
from .geometry import (KINDS, K, Size, empty_fields, frame_image_fields, image_fields, reduced_video_fields,
                       video_fields)

SEGMENTS = ("system", "question", "template", "image_base", "image_grid", "image_newline", "video", "video_newline",
            "generated")
S = {name: i for i, name in enumerate(SEGMENTS)}


@dataclass(frozen=True)
class Media:
    """One image or video of the request, in sequence order."""

    index: int  # position in Provenance.media_info
    kind: Literal["image", "video"]
    kind_index: int  # the k-th image (video) given: the order features are spliced in
    start: int  # its first sequence position
    end: int  # one past its last
    source_hw: Size  # the original image's / video frame's (height, width) px
    plan: ImagePlan | VideoPlan  # tokens.py's accounting for it
    name: str = ""
    frame_indices: tuple[int, ...] = ()  # video: sampled frames' indices in the decoded stream
    timestamps: tuple[float, ...] = ()  # video: their times in seconds
    as_images: bool = False  # video: its frames sent as images, one run each (Interleave; start..end may hold text)

    def to_dict(self) -> dict:
        d = {"index": self.index, "kind": self.kind, "kind_index": self.kind_index, "start": self.start,
             "end": self.end, "source_hw": list(self.source_hw), "name": self.name}
        p = self.plan
        if self.kind == "image":
            d.update(aspect=p.aspect, canvas_hw=list(p.canvas_hw), grid_hw=list(p.grid_hw),
                     resized_hw=list(p.resized_hw), unpadded_hw=list(p.unpadded_hw))
        else:
            d.update(frame_indices=list(self.frame_indices), timestamps=list(self.timestamps),
                     pooled_hw=list(p.pooled_hw), pool_stride=p.stride, pool_mode=p.mode, newline=p.newline,
                     sent_as="images" if self.as_images else "video")
        return d


# --------------------------------------------------------------------------------------------------
# The whole sequence
# ---- Provenance.build's steps -----------------------------------------------------------------------
def _media_parts(config: LlavaNextConfig, image_sizes: Sequence[Size], image_aspects: Sequence[str],
                 image_names: Sequence[str], videos: Sequence[dict]) -> list:
    """Per medium: (placeholder kind, kind, kind index, [per-run fields], plan, Media extras); a frame sent
    as an image is a run of its own."""
    parts = []
    for k, hw in enumerate(image_sizes):
        fk, plan = image_fields(tuple(hw), config, image_aspects[k])
        parts.append(("image", "image", k, [fk], plan, {"source_hw": tuple(hw),
                                                        "name": image_names[k] if k < len(image_names) else ""}))
    for k, v in enumerate(videos):
        ts = v.get("timestamps")
        runs_of = "video"
        if config.video_as_images:  # Interleave: the frames are images
            if v.get("tokens") is not None:
                raise ValueError("a video sent as frames (config.video_as_images) has no pooled cells a token "
                                 "reducer could choose")
            runs, plan = frame_image_fields(v["num_frames"], tuple(v["frame_hw"]), config, ts)
            runs_of = "image"
        elif v.get("tokens") is not None:  # a token reducer chose these pooled cells (e.g. DyCoke's TTM)
            fk, plan = reduced_video_fields(v["num_frames"], tuple(v["frame_hw"]), config, *v["tokens"], ts)
            runs = [fk]
        else:
            fk, plan = video_fields(v["num_frames"], tuple(v["frame_hw"]), config, ts)
            runs = [fk]
        extra = {"source_hw": tuple(v["frame_hw"]), "name": v.get("name", ""),
                 "frame_indices": tuple(v.get("frame_indices", ())), "timestamps": tuple(ts or ()),
                 "as_images": runs_of == "image"}
        parts.append((runs_of, "video", k, runs, plan, extra))
    return parts


def _locate_runs(ids: np.ndarray, config: LlavaNextConfig, parts: list) -> list:
    """Where each part's runs sit in ``ids``: (run starts, kind, kind index, runs, plan, extras), in prompt
    order. The placeholder counts must match the parts' tokens, and each run's positions be contiguous."""
    img_id, vid_id = config.image_token_id, config.video_token_id
    image_slots = np.flatnonzero(ids == img_id)
    video_slots = np.flatnonzero(ids == vid_id) if vid_id is not None and vid_id != img_id else np.array([], int)
    count = lambda slot: sum(len(r["kind"]) for p in parts if p[0] == slot for r in p[3])
    n_img, n_vid = count("image"), count("video")
    if vid_id == img_id and vid_id is not None:  # original-format ids: images first, then videos
        image_slots, video_slots = image_slots[:n_img], image_slots[n_img:]
    for what, slots, want in (("image", image_slots, n_img), ("video", video_slots, n_vid)):
        if len(slots) != want:
            raise ValueError(f"the ids hold {len(slots)} {what} placeholder positions but the {what}(s) given "
                             f"make {want} tokens; pass the expanded ids of the same request")
    cursor = {"image": 0, "video": 0}
    located = []
    for slot, what, k, runs, plan, extra in parts:
        slots = image_slots if slot == "image" else video_slots
        starts = []
        for fk in runs:
            n = len(fk["kind"])
            pos = slots[cursor[slot]:cursor[slot] + n]
            cursor[slot] += n
            if pos[-1] - pos[0] != n - 1:
                raise ValueError(f"{what} {k}'s {n} placeholder positions are not contiguous; expand each "
                                 f"placeholder into one run (inputs.prompt.expand_placeholders)")
            starts.append(int(pos[0]))
        located.append((starts, what, k, runs, plan, extra))
    located.sort(key=lambda x: x[0][0])
    return located


def _segments(ids: np.ndarray, kind: np.ndarray, tokenizer, system: str | None, question: str | None) -> np.ndarray:
    """(T,) int8 segment of each position: the visual kinds' own, the system prompt and the question's text
    when a tokenizer can find them, "template" for the rest."""
    segment = np.full(len(ids), S["template"], np.int8)
    for kname in KINDS[1:6]:
        segment[kind == K[kname]] = S[kname]
    if tokenizer is not None:
        spans = _text_char_spans(ids, kind == K["text"], tokenizer)
        if system:
            segment[_locate(spans, system, last=False)] = S["system"]
        if question:
            segment[_locate(spans, question, last=True)] = S["question"]
    return segment


# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Provenance:
    """Where each of the T positions came from; every field a (T,) tensor ((T, 4) for ``box``)."""

    kind: torch.Tensor  # int8, index into KINDS
    segment: torch.Tensor  # int8, index into SEGMENTS
    media: torch.Tensor  # int32, index into media_info, -1 for text
    tile_row: torch.Tensor  # int32, AnyRes grid tokens only
    tile_col: torch.Tensor
    frame: torch.Tensor  # int32, video tokens (and their newlines)
    time: torch.Tensor  # float64 seconds, NaN
    row: torch.Tensor  # int32 cell in the feature grid
    col: torch.Tensor
    grid_h: torch.Tensor  # int32 size of that grid
    grid_w: torch.Tensor
    box: torch.Tensor  # (T, 4) float64 source pixels (x0, y0, x1, y1) in the original image / frame
    coverage: torch.Tensor  # float64 fraction of the patch that is image (not padding)
    token_id: torch.Tensor  # int64 the id in the sequence (placeholder id for visual tokens)
    media_info: tuple[Media, ...] = ()
    prompt_len: int = 0  # positions before the first generated one
    question: str | None = None
    fates: Fates | None = None  # a reduced request: what the in-decoder stages did to each position (with_fates)

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, input_ids: Sequence[int], config: LlavaNextConfig, *, image_sizes: Sequence[Size] = (),
              videos: Sequence[dict] = (), tokenizer=None, question: str | None = None,
              system: str | None = None, image_names: Sequence[str] = (),
              image_aspects: Sequence[str] | None = None) -> "Provenance":
        """From expanded ids (one placeholder id per visual token) and the media's geometry.

        ``image_aspects``: how each image was preprocessed ("anyres", "resize", "pad"); default the prompt's
        (``inputs.tokens.image_aspect``: OneVision pads each of several images), as ``Pipeline.prepare``.
        ``videos``: one dict per video with ``num_frames``, ``frame_hw`` and optionally ``timestamps``,
        ``frame_indices``, ``name``, and ``tokens`` = (frame, cell) of each token when a token reducer chose
        them among the pooled cells (``reduced_video_fields``). A video of a ``config.video_as_images`` model
        (Interleave) is its frames sent as images: their placeholders are image ones, after the images'
        (as ``Pipeline.prepare`` appends them), one run per frame. ``tokenizer`` (inputs.prompt.Tokenizer) +
        ``question`` / ``system`` label those text positions; without them every text position is segment "template"."""
        ids = np.asarray(list(input_ids), dtype=np.int64)
        T = len(ids)
        f = empty_fields(T)
        f["kind"][:] = K["text"]
        media = np.full(T, -1, np.int32)
        if image_aspects is None:
            image_aspects = [image_aspect(config, len(image_sizes))] * len(image_sizes)
        if len(image_aspects) != len(image_sizes):
            raise ValueError(f"{len(image_aspects)} image_aspects for {len(image_sizes)} images")
        parts = _media_parts(config, image_sizes, image_aspects, image_names, videos)
        infos = []
        for m, (starts, what, k, runs, plan, extra) in enumerate(_locate_runs(ids, config, parts)):
            for start, fk in zip(starts, runs):
                n = len(fk["kind"])
                for name, arr in fk.items():
                    f[name][start:start + n] = arr
                media[start:start + n] = m
            end = starts[-1] + len(runs[-1]["kind"])
            infos.append(Media(index=m, kind=what, kind_index=k, start=starts[0], end=end, plan=plan, **extra))
        segment = _segments(ids, f["kind"], tokenizer, system, question)
        t = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in f.items()}
        return cls(kind=t["kind"], segment=torch.from_numpy(segment), media=torch.from_numpy(media),
                   tile_row=t["tile_row"], tile_col=t["tile_col"], frame=t["frame"], time=t["time"], row=t["row"],
                   col=t["col"], grid_h=t["grid_h"], grid_w=t["grid_w"], box=t["box"], coverage=t["coverage"],
                   token_id=torch.from_numpy(ids), media_info=tuple(infos), prompt_len=T, question=question)

    @classmethod
    def from_request(cls, request, config: LlavaNextConfig, *, tokenizer=None, question: str | None = None,
                     system: str | None = None, template: str | None = None,
                     video_tokens: Sequence[tuple[Any, Any] | None] = (),
                     image_names: Sequence[str] = ()) -> "Provenance":
        """From a ``Pipeline.prepare`` request (its expanded ids, images and video clips; a video whose frames
        were sent as images, ``request.frame_clips``, is one video medium). ``system`` defaults to the system
        prompt of ``template`` (the one given to ``prepare``; default the config's) when a tokenizer is given.
        ``video_tokens``: per video, the (frame, cell) of each token a token reducer kept
        (``ReducedVideo.frame`` / ``.patch``), or None for the model's own tokens. ``image_names``: the
        images' names (e.g. file names) for ``media_info``; default the base name of the path each image
        was given as, when the request kept it."""
        if tokenizer is not None and system is None:
            from ..inputs.prompt import TEMPLATES
            spec = TEMPLATES.get(template or config.template)  # "none": no system prompt
            system = spec.system if spec is not None else None
        clips = list(request.videos) + list(getattr(request, "frame_clips", ()))
        videos = [{"num_frames": c.num_frames, "frame_hw": c.size_hw, "timestamps": c.timestamps,
                   "frame_indices": c.frame_indices, "name": os.path.basename(c.path),
                   "tokens": video_tokens[i] if i < len(video_tokens) else None} for i, c in enumerate(clips)]
        n_frames = sum(c.num_frames for c in getattr(request, "frame_clips", ()))
        images = list(request.images)[:len(request.images) - n_frames]  # the frames sent as images come last
        if not image_names:
            image_names = [os.path.basename(os.fspath(p)) if isinstance(p, (str, os.PathLike)) else ""
                           for p in (getattr(im, "path", None) for im in images)]
        aspect = image_aspect(config, len(images))  # as Pipeline.prepare: OneVision pads each of several images
        return cls.build(request.input_ids, config, image_sizes=[im.image_size for im in images],
                         videos=videos, tokenizer=tokenizer, question=question, system=system,
                         image_names=list(image_names), image_aspects=[aspect] * len(images))

    def with_generated(self, token_ids: Iterable[int]) -> "Provenance":
        """The same map with generated positions appended (kind and segment "generated")."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.int64)
        n = len(ids)
        if n == 0:
            return self

        def ext(t: torch.Tensor, fill) -> torch.Tensor:
            return torch.cat([t, torch.full((n, *t.shape[1:]), fill, dtype=t.dtype)])

        return Provenance(kind=ext(self.kind, K["generated"]), segment=ext(self.segment, S["generated"]),
                          media=ext(self.media, -1), tile_row=ext(self.tile_row, -1), tile_col=ext(self.tile_col, -1),
                          frame=ext(self.frame, -1), time=ext(self.time, math.nan), row=ext(self.row, -1),
                          col=ext(self.col, -1), grid_h=ext(self.grid_h, -1), grid_w=ext(self.grid_w, -1),
                          box=ext(self.box, math.nan), coverage=ext(self.coverage, math.nan),
                          token_id=torch.cat([self.token_id, ids]), media_info=self.media_info,
                          prompt_len=self.prompt_len, question=self.question, fates=self.fates)

    def with_fates(self, fates: Any, row: int = 0) -> "Provenance":
        """The same map with what a token-reduction run did to each prompt position: ``fates`` is the
        engine's (``tr.fates`` of a reduced trace, ``ReducedEngine.fates``; llava_next/reduce/engine.py),
        ``row`` the batch row of this request. ``removed_at(i)``, ``merged_into(i)``, ``alive(layer)`` and
        ``to_records()`` then say, per ORIGINAL position, which layer removed it (pruned or merged, and into
        which position) and which decode steps read it (DyCoke)."""
        T = fates.removed_at.shape[1]
        if T != self.prompt_len:
            raise ValueError(f"the fates cover {T} prompt positions, this provenance {self.prompt_len}: "
                             "pass the fates of the same request")
        read = [None if r is None else r[row].cpu() for r in fates.decode_read]
        return dataclasses.replace(self, fates=Fates(fates.removed_at[row].cpu(), fates.merged_into[row].cpu(),
                                                     fates.num_layers, fates.decode_layer, read))

    def removed_at(self, i: int) -> int | None:
        """The first decoder layer without position ``i`` (None: every layer has it, or no fates)."""
        if self.fates is None or i >= self.prompt_len or int(self.fates.removed_at[i]) < 0:
            return None
        return int(self.fates.removed_at[i])

    def merged_into(self, i: int) -> int | None:
        """The position ``i`` was averaged into (FrameFusion), or None."""
        if self.fates is None or i >= self.prompt_len or int(self.fates.merged_into[i]) < 0:
            return None
        return int(self.fates.merged_into[i])

    def alive(self, layer: int) -> torch.Tensor:
        """Positions (ascending) present in decoder layer ``layer``'s attention (every position without fates)."""
        keep = torch.ones(len(self), dtype=torch.bool)
        if self.fates is not None:
            r = self.fates.removed_at
            keep[:self.prompt_len] = (r < 0) | (r > layer)
        return torch.nonzero(keep).flatten()

    def layers_reached(self, num_layers: int | None = None) -> torch.Tensor:
        """(T,) float: how many decoder layers had each position (every layer where never removed; give
        ``num_layers`` without fates)."""
        n = self.fates.num_layers if self.fates is not None else num_layers
        out = torch.full((len(self),), float(n))
        if self.fates is not None:
            r = self.fates.removed_at.double()
            out[:self.prompt_len] = torch.where(r < 0, float(n), r)
        return out

    def decode_reads(self) -> torch.Tensor | None:
        """(T,) float: the fraction of decode steps whose layers >= L read each prompt position (DyCoke; 0 for a
        position layer L no longer has), or None."""
        if self.fates is None or self.fates.decode_layer is None or not self.fates.decode_read:
            return None
        n = torch.zeros(len(self), dtype=torch.float64)
        for r in self.fates.decode_read:
            n[:self.prompt_len] += 1.0 if r is None else r[:self.prompt_len].double()
        r = self.fates.removed_at  # a position no longer in layer L's cache is read by no step
        n[:self.prompt_len] *= ((r < 0) | (r > self.fates.decode_layer)).double()
        return n / len(self.fates.decode_read)

    def take(self, positions) -> "Provenance":
        """The provenance of a shortened sequence that keeps ``positions`` (ascending), e.g. after token
        pruning or merging (FastV drops visual tokens after layer K): every kept position keeps its origin;
        ``media_info`` start/end become the first and one-past-last kept position of each medium."""
        idx = torch.as_tensor(positions, dtype=torch.long).flatten()
        if idx.numel() and (bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0 or int(idx[-1]) >= len(self)):
            raise ValueError(f"take() needs ascending, unique positions in 0..{len(self) - 1}")
        fields = {name: getattr(self, name)[idx] for name in ("kind", "segment", "media", "tile_row", "tile_col",
                                                               "frame", "time", "row", "col", "grid_h", "grid_w",
                                                               "box", "coverage", "token_id")}
        infos = []
        for m in self.media_info:
            kept = torch.nonzero(fields["media"] == m.index).flatten()
            start, end = (int(kept[0]), int(kept[-1]) + 1) if len(kept) else (0, 0)
            infos.append(dataclasses.replace(m, start=start, end=end))
        return Provenance(**fields, media_info=tuple(infos), prompt_len=int((idx < self.prompt_len).sum()),
                          question=self.question)

    # ---- reading ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.kind)

    def kind_name(self, i: int) -> str:
        return KINDS[int(self.kind[i])]

    def segment_name(self, i: int) -> str:
        return SEGMENTS[int(self.segment[i])]

    def tile_boxes(self, media: int) -> list[tuple[float, float, float, float]]:
        """The original-pixel box (x0, y0, x1, y1) each AnyRes tile of image ``media`` covers, row by row (the
        union of its tokens' source boxes; tiles with no token left out)."""
        rows, cols = self.media_info[media].plan.grid_hw
        out = []
        for ty in range(rows):
            for tx in range(cols):
                b = self.box[self.where(media=media, tile=(ty, tx))]
                if len(b):
                    out.append((float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())))
        return out

    def tile_of(self, i: int) -> str | tuple[int, int] | None:
        """"base", (tile row, tile col) of an AnyRes grid token, or None."""
        k = int(self.kind[i])
        if k == K["image_base"]:
            return "base"
        if k == K["image_grid"]:
            return int(self.tile_row[i]), int(self.tile_col[i])
        return None

    def where(self, *, kind: str | Sequence[str] | None = None, segment: str | Sequence[str] | None = None,
              media: int | Sequence[int] | None = None, frame=None, tile=None, row=None, col=None) -> torch.Tensor:
        """Positions (LongTensor, ascending) matching every given field. ``frame``/``row``/``col``: an int,
        a range, a slice or a list; ``tile``: "base", (ty, tx) or a list of those."""
        keep = torch.ones(len(self), dtype=torch.bool)
        if kind is not None:
            keep &= _isin(self.kind, [K[_check(k, KINDS, "kind")] for k in _as_list(kind)])
        if segment is not None:
            keep &= _isin(self.segment, [S[_check(s, SEGMENTS, "segment")] for s in _as_list(segment)])
        for name, value in (("media", media), ("frame", frame), ("row", row), ("col", col)):
            if value is not None:
                keep &= _isin(getattr(self, name), _indices(value, name, self._extent(name)))
        if tile is not None:
            tiles = [tile] if tile == "base" or (isinstance(tile, tuple) and len(tile) == 2
                                                   and all(isinstance(v, int) for v in tile)) else list(tile)
            match = torch.zeros(len(self), dtype=torch.bool)
            for t in tiles:
                if t == "base":
                    match |= self.kind == K["image_base"]
                else:
                    ty, tx = t
                    match |= (self.kind == K["image_grid"]) & (self.tile_row == ty) & (self.tile_col == tx)
            keep &= match
        return torch.nonzero(keep).flatten()

    def _extent(self, name: str) -> int:
        t = {"media": self.media, "frame": self.frame, "row": self.row, "col": self.col}[name]
        return int(t.max()) + 1 if len(t) else 0

    def segments(self) -> dict[str, torch.Tensor]:
        """{segment name: positions} for the segments present."""
        return {name: torch.nonzero(self.segment == i).flatten() for i, name in enumerate(SEGMENTS)
                if bool((self.segment == i).any())}

    def to_records(self) -> list[dict[str, Any]]:
        """One plain dict per position (JSON): kind, segment, media, frame, time, tile, row, col, grid,
        box, token_id; None where a field does not apply."""
        out = []
        kind, seg, media, frame = self.kind.tolist(), self.segment.tolist(), self.media.tolist(), self.frame.tolist()
        time, row, col = self.time.tolist(), self.row.tolist(), self.col.tolist()
        gh, gw, box, ids = self.grid_h.tolist(), self.grid_w.tolist(), self.box.tolist(), self.token_id.tolist()
        ty, tx = self.tile_row.tolist(), self.tile_col.tolist()
        base, grid = K["image_base"], K["image_grid"]
        for i in range(len(self)):
            visual = media[i] >= 0
            tile = "base" if kind[i] == base else [ty[i], tx[i]] if kind[i] == grid else None
            out.append({
                "kind": KINDS[kind[i]], "segment": SEGMENTS[seg[i]], "media": media[i] if visual else None,
                "frame": frame[i] if frame[i] >= 0 else None,
                "time": round(time[i], 6) if not math.isnan(time[i]) else None,
                "tile": tile,
                "row": row[i] if row[i] >= 0 else None, "col": col[i] if col[i] >= 0 else None,
                "grid": [gh[i], gw[i]] if visual else None,
                "box": [round(v, 3) for v in box[i]] if not math.isnan(box[i][0]) else None,
                "token_id": None if visual else ids[i]})
        if self.fates is not None:  # a reduced request (with_fates): what happened to each prompt position
            f = self.fates
            removed, into = f.removed_at.tolist(), f.merged_into.tolist()
            reads = [None if r is None else r.tolist() for r in f.decode_read]
            for i in range(self.prompt_len):
                fate = "kept" if removed[i] < 0 else "merged" if into[i] >= 0 else "pruned"
                entry = {"fate": fate, "removed_at_layer": removed[i] if removed[i] >= 0 else None,
                         "merged_into": into[i] if into[i] >= 0 else None}
                if f.decode_layer is not None and media[i] >= 0:  # steps whose layers >= L read it (in their cache)
                    present = removed[i] < 0 or removed[i] > f.decode_layer
                    entry["decode_steps_read"] = [s for s, r in enumerate(reads) if present and (r is None or r[i])]
                out[i]["reduction"] = entry
        return out

    def to_dataframe(self) -> Any:
        """``to_records`` as a pandas DataFrame (research/notebook.py; needs pandas)."""
        from .notebook import provenance_dataframe

        return provenance_dataframe(self)

    def _repr_html_(self) -> str:  # Jupyter
        from .notebook import provenance_html

        return provenance_html(self)

    def summary(self) -> str:
        """The token budget: positions per segment and per medium."""
        lines = [f"{len(self)} positions"]
        for name, pos in self.segments().items():
            lines.append(f"  {name:<14}{len(pos):>7}")
        for m in self.media_info:
            p = m.plan
            head = f"  media {m.index}: {m.kind} {m.kind_index}{f' ({m.name})' if m.name else ''}"
            if m.kind == "image" and p.aspect != "anyres":
                lines.append(f"{head} {m.source_hw[0]}x{m.source_hw[1]} px, positions {m.start}-{m.end - 1}: one "
                             f"{'padded' if p.aspect == 'pad' else 'squashed'} tile of {p.base_tokens} + "
                             f"{p.newline_tokens} newline")
            elif m.kind == "image":
                lines.append(f"{head} {m.source_hw[0]}x{m.source_hw[1]} px, "
                             f"positions {m.start}-{m.end - 1}: base {p.base_tokens} + grid {p.unpadded_hw[0]}x"
                             f"{p.unpadded_hw[1]} from {p.grid_hw[0]}x{p.grid_hw[1]} tiles + {p.newline_tokens} newline")
            elif m.as_images:
                lines.append(f"{head} {p.num_frames} frames of {m.source_hw[0]}x{m.source_hw[1]} px sent as images, "
                             f"positions {m.start}-{m.end - 1}: {p.tokens_per_frame} per frame")
            else:
                lines.append(f"{head} {p.num_frames} frames of "
                             f"{m.source_hw[0]}x{m.source_hw[1]} px, positions {m.start}-{m.end - 1}: "
                             f"{p.pooled_hw[0]}x{p.pooled_hw[1]} per frame + {p.newline_tokens} newline")
        return "\n".join(lines)

    # ---- values per position -> pictures and sums -------------------------------------------------
    def _part(self, media: int, frame: int | None, part: str) -> torch.Tensor:
        info = self.media_info[media]
        if info.kind == "video":
            if frame is None:
                raise ValueError(f"media {media} is a video: give frame= (0..{info.plan.num_frames - 1})")
            return self.where(media=media, frame=frame, kind="video")
        if part not in ("grid", "base"):
            raise ValueError(f"part must be 'grid' (the AnyRes tiles) or 'base' (the squashed image), got {part!r}")
        return self.where(media=media, kind="image_grid" if part == "grid" else "image_base")

    def to_grid(self, values, media: int, frame: int | None = None, part: str = "grid") -> torch.Tensor:
        """(grid_h, grid_w) float64 map of ``values`` (T,) over one image part or video frame; NaN where
        no token sits (only where a token reducer dropped cells: otherwise every cell is a token)."""
        values = torch.as_tensor(values, dtype=torch.float64)
        pos = self._part(media, frame, part)
        if len(pos) == 0:  # a frame a token reducer dropped whole
            return torch.full(tuple(self.media_info[media].plan.pooled_hw), math.nan, dtype=torch.float64)
        h, w = int(self.grid_h[pos[0]]), int(self.grid_w[pos[0]])
        out = torch.full((h, w), math.nan, dtype=torch.float64)
        out[self.row[pos].long(), self.col[pos].long()] = values[pos]
        return out

    def to_pixels(self, values, media: int, frame: int | None = None, part: str = "grid") -> np.ndarray:
        """(H, W) float64 map of ``values`` (T,) on the original image's (frame's) pixels: each pixel gets
        the mean value of the tokens whose box holds its centre; NaN where none does (e.g. a pixel strip
        the unpadding dropped)."""
        values = torch.as_tensor(values, dtype=torch.float64)
        pos = self._part(media, frame, part)
        h, w = self.media_info[media].source_hw
        boxes, vals = self.box[pos].numpy(), values[pos].numpy()
        # pixel i (centre i + 0.5) is in [x0, x1) when ceil(x0 - 0.5) <= i < ceil(x1 - 0.5)
        x0, y0, x1, y1 = np.clip(np.ceil(boxes - 0.5).astype(np.int64), 0, [w, h, w, h]).T
        # every box added at once: +v at its top-left corner, -v right and below, cumulative sums spread it
        corners = [(y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)]
        flat = np.concatenate([ys * (w + 1) + xs for ys, xs, _ in corners])
        signs = np.concatenate([np.full(len(vals), sign, np.float64) for _, _, sign in corners])
        total = np.bincount(flat, signs * np.tile(vals, 4), (h + 1) * (w + 1)).reshape(h + 1, w + 1)
        count = np.bincount(flat, signs, (h + 1) * (w + 1)).reshape(h + 1, w + 1)
        total, count = total.cumsum(0).cumsum(1)[:h, :w], count.cumsum(0).cumsum(1)[:h, :w]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0.5, total / np.maximum(count, 1), np.nan)

    def sums(self, values) -> dict[str, Any]:
        """Sums of ``values`` (T,) per segment, per video frame (its tokens and newlines) and per image tile
        (grid tiles and the base); the JSON layout of ``llava-next trace``."""
        values = torch.as_tensor(values, dtype=torch.float64)
        out: dict[str, Any] = {"segments": {name: float(values[pos].sum()) for name, pos in self.segments().items()},
                               "frames": [], "tiles": []}
        for m in self.media_info:
            if m.kind == "video":
                for fr in range(m.plan.num_frames):
                    pos = self.where(media=m.index, frame=fr)
                    out["frames"].append({"media": m.index, "frame": fr,
                                          "time": m.timestamps[fr] if m.timestamps else None,
                                          "sum": float(values[pos].sum())})
            else:
                out["tiles"].append({"media": m.index, "tile": "base",
                                     "sum": float(values[self.where(media=m.index, tile="base")].sum())})
                rows, cols = m.plan.grid_hw
                for ty in range(rows):
                    for tx in range(cols):
                        pos = self.where(media=m.index, tile=(ty, tx))
                        out["tiles"].append({"media": m.index, "tile": [ty, tx], "sum": float(values[pos].sum())})
        return out


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _check(name: str, allowed: Sequence[str], what: str) -> str:
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; choose one of {list(allowed)}")
    return name


def _as_list(v) -> list:
    return [v] if isinstance(v, (str, int)) else list(v)


def _indices(value, name: str, extent: int) -> list[int]:
    if isinstance(value, slice):
        return list(range(extent))[value]
    if isinstance(value, bool) or not isinstance(value, (int, range, list, tuple, torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be an int, a range, a slice or a list of ints, got {type(value).__name__}")
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _isin(t: torch.Tensor, values: list[int]) -> torch.Tensor:
    return torch.isin(t.long(), torch.tensor(values, dtype=torch.long))


def _text_char_spans(ids: np.ndarray, is_text: np.ndarray, tokenizer) -> tuple[str, np.ndarray]:
    """Decode the text positions run by run (a "\\0" between runs): (text, (T, 2) char span per position,
    -1 for visual positions). Streaming decode attributes each emitted piece to the ids that produced it."""
    spans = np.full((len(ids), 2), -1, np.int64)
    text: list[str] = []
    length = 0
    pos = 0
    while pos < len(ids):
        if not is_text[pos]:
            pos += 1
            continue
        end = pos
        while end < len(ids) and is_text[end]:
            end += 1
        dec = tokenizer.stream(skip_special_tokens=True)
        pending = []
        for i in range(pos, end):
            pending.append(i)
            piece = dec.step(int(ids[i]))
            if piece:
                spans[pending] = [length, length + len(piece)]
                text.append(piece)
                length += len(piece)
                pending = []
        tail = dec.finish()
        spans[pending] = [length, length + len(tail)]
        text.append(tail + "\0")
        length += len(tail) + 1
        pos = end
    return "".join(text), spans


def _locate(spans: tuple[str, np.ndarray], needle: str, last: bool) -> np.ndarray:
    """Positions whose decoded characters overlap ``needle`` (placeholders removed; each piece between
    placeholders located on its own, the last (or first) occurrence)."""
    import re

    text, span = spans
    hit = np.zeros(len(span), dtype=bool)
    for piece in re.split(r"<image>|<video>", needle):
        piece = piece.strip()
        if not piece:
            continue
        at = text.rfind(piece) if last else text.find(piece)
        if at < 0:
            continue
        hit |= (span[:, 0] < at + len(piece)) & (span[:, 1] > at) & (span[:, 1] > span[:, 0])
    return hit
