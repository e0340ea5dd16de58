"""Selectors: name sets of sequence positions by what they are, never by raw integers.

    from llava_next.research import select as sel
    sel.frame(3)                    # every token of video frame 3 (and its newlines, if any)
    sel.tile((0, 1), media=0)       # AnyRes grid tokens cut from tile row 0, column 1 of image 0
    sel.tile("base")                # the squashed whole-image tokens
    sel.box(100, 50, 200, 120)      # visual tokens whose source pixels overlap this box (original px)
    sel.last_text()                 # the last prompt position: FastV's query, the next-token predictor
    sel.question()                  # the user's question (located when the provenance was built)
    sel.newlines(), sel.generated(), sel.visual(), sel.text(), sel.system(), sel.segment("template")
    sel.frame(range(4)) | sel.question()      # union; & intersection; ~ complement; a - b difference
    sel.where(kind="video", frame=0, row=slice(0, 6))   # any Provenance.where filter

A selector is any object with ``resolve(provenance) -> LongTensor`` (ascending, unique positions); the
trace API (research/trace.py) and the CLI accept them wherever they take positions. Resolving against the
provenance of the actual request is what makes them right for AnyRes (base + unpadded grid + newlines),
pooled video grids, any prompt template and any number of generated tokens. An empty result is an
error (``EmptySelection``): a typo must not silently select nothing; ``sel.maybe(s)`` allows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .attention import ResearchError
from .provenance import K, Provenance


class EmptySelection(ResearchError):
    """A selector matched no position of this request; the message says which and what exists."""


class Selector:
    """Base class: subclasses implement ``_positions``; ``resolve`` checks emptiness."""

    allow_empty = False  # sel.maybe(...) sets it

    def _positions(self, prov: Provenance) -> torch.Tensor:
        raise NotImplementedError

    def resolve(self, prov: Provenance) -> torch.Tensor:
        pos = self._positions(prov).long().unique(sorted=True)
        if len(pos) == 0 and not self.allow_empty:
            hint = ""
            if "question" in repr(self) or "system" in repr(self):
                hint = ("; question and system positions are found by decoding the prompt: build the provenance "
                        "with tokenizer= and question= / system=, and give a question with some text")
            raise EmptySelection(f"{self!r} selects no position of this request ({len(prov)} positions: "
                                 f"{', '.join(f'{k} {len(v)}' for k, v in prov.segments().items())}){hint}")
        return pos

    def __or__(self, other: "Selector") -> "Selector":
        return _Combine("|", self, other, lambda a, b: a | b)

    def __and__(self, other: "Selector") -> "Selector":
        return _Combine("&", self, other, lambda a, b: a & b)

    def __sub__(self, other: "Selector") -> "Selector":
        return _Combine("-", self, other, lambda a, b: a & ~b)

    def __invert__(self) -> "Selector":
        return _Invert(self)


def _mask(prov: Provenance, sel: Selector) -> torch.Tensor:
    m = torch.zeros(len(prov), dtype=torch.bool)
    m[sel._positions(prov).long()] = True
    return m


@dataclass(frozen=True, repr=False)
class _Combine(Selector):
    op: str
    a: Selector
    b: Selector
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def _positions(self, prov):
        return torch.nonzero(self.fn(_mask(prov, self.a), _mask(prov, self.b))).flatten()

    def __repr__(self) -> str:
        return f"({self.a!r} {self.op} {self.b!r})"


@dataclass(frozen=True, repr=False)
class _Invert(Selector):
    a: Selector

    def _positions(self, prov):
        return torch.nonzero(~_mask(prov, self.a)).flatten()

    def __repr__(self) -> str:
        return f"~{self.a!r}"


@dataclass(frozen=True, repr=False)
class maybe(Selector):  # noqa: N801
    """``s`` but resolving to an empty tensor instead of raising when nothing matches."""

    a: Selector
    allow_empty = True

    def _positions(self, prov):
        return self.a._positions(prov)

    def __repr__(self) -> str:
        return f"sel.maybe({self.a!r})"


@dataclass(frozen=True)
class where(Selector):  # noqa: N801  (reads as a function: sel.where(kind="video"))
    """Every position matching all the given ``Provenance.where`` filters."""

    filters: dict
    label: str | None = None

    def __init__(self, _label: str | None = None, **filters: Any) -> None:
        object.__setattr__(self, "filters", filters)
        object.__setattr__(self, "label", _label)

    def _positions(self, prov):
        return prov.where(**self.filters)

    def __repr__(self) -> str:
        return self.label or f"sel.where({', '.join(f'{k}={v!r}' for k, v in self.filters.items())})"


def _call(name: str, *args: Any, **kwargs: Any) -> str:
    """How the user wrote it: 'sel.frame(3, media=1)' (None keywords left out)."""
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items() if v is not None]
    return f"sel.{name}({', '.join(parts)})"


@dataclass(frozen=True)
class positions(Selector):  # noqa: N801
    """Explicit positions (negative ones count from the end, like Python indices)."""

    index: tuple[int, ...]

    def __init__(self, *index: int) -> None:
        object.__setattr__(self, "index", tuple(int(i) for i in index))

    def _positions(self, prov):
        T = len(prov)
        bad = [i for i in self.index if not -T <= i < T]
        if bad:
            raise IndexError(f"positions {bad} are outside this request's {T} positions")
        return torch.tensor([i % T for i in self.index], dtype=torch.long)


def frame(f: int | range | slice | Sequence[int], media: int | None = None, newlines: bool = True) -> Selector:
    """Video frame(s) ``f`` (0-based among the sampled frames); with ``newlines`` their newline tokens too."""
    kinds = ["video", "video_newline"] if newlines else ["video"]
    return where(_call("frame", f, media=media), kind=kinds, frame=f, **({} if media is None else {"media": media}))


def tile(t: str | tuple[int, int] | Sequence, media: int | None = None) -> Selector:
    """AnyRes tile(s): "base" or (tile row, tile col) of the 336 px crop, or a list of those."""
    return where(_call("tile", t, media=media), tile=t, **({} if media is None else {"media": media}))


def media(m: int | Sequence[int]) -> Selector:
    """Every position of image/video ``m`` (index in sequence order, ``Provenance.media_info``)."""
    return where(_call("media", m), media=m)


def kind(*kinds: str) -> Selector:
    return where(_call("kind", *kinds), kind=list(kinds))


def segment(*names: str) -> Selector:
    return where(_call("segment", *names), segment=list(names))


def visual() -> Selector:
    return where("sel.visual()", kind=["image_base", "image_grid", "image_newline", "video", "video_newline"])


def text() -> Selector:
    """Prompt text positions (not generated)."""
    return where("sel.text()", kind=["text"])


def newlines() -> Selector:
    return where("sel.newlines()", kind=["image_newline", "video_newline"])


def generated() -> Selector:
    return where("sel.generated()", kind=["generated"])


def question() -> Selector:
    """The question's text positions (located when the provenance was built with ``question=``)."""
    return where("sel.question()", segment=["question"])


def system() -> Selector:
    return where("sel.system()", segment=["system"])


@dataclass(frozen=True)
class last_text(Selector):  # noqa: N801
    """The last prompt position (the one that predicts the first answer token: FastV's query)."""

    def _positions(self, prov):
        pos = torch.nonzero(prov.kind[:prov.prompt_len] == K["text"]).flatten()
        return pos[-1:]

    def __repr__(self) -> str:
        return "sel.last_text()"


@dataclass(frozen=True)
class box(Selector):  # noqa: N801
    """Visual tokens whose source box overlaps (x0, y0, x1, y1) in the original pixels of ``media``
    (default: every medium; for videos optionally one ``frame``) by at least ``min_overlap`` of the
    token's box area (0: any overlap). ``part``: "grid", "base" or "any" for images."""

    x0: float
    y0: float
    x1: float
    y1: float
    media: int | None = None
    frame: int | None = None
    min_overlap: float = 0.0
    part: str = "any"

    def _positions(self, prov):
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"a box needs x1 > x0 and y1 > y0, got {(self.x0, self.y0, self.x1, self.y1)}")
        kinds = {"any": ["image_base", "image_grid", "video"], "grid": ["image_grid", "video"],
                 "base": ["image_base"]}[self.part]
        filters: dict[str, Any] = {"kind": kinds}
        if self.media is not None:
            filters["media"] = self.media
        if self.frame is not None:
            filters["frame"] = self.frame
        pos = prov.where(**filters)
        b = prov.box[pos]
        w = (torch.minimum(b[:, 2], torch.tensor(self.x1)) - torch.maximum(b[:, 0], torch.tensor(self.x0))).clamp(min=0)
        h = (torch.minimum(b[:, 3], torch.tensor(self.y1)) - torch.maximum(b[:, 1], torch.tensor(self.y0))).clamp(min=0)
        area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).clamp(min=1e-12)
        inter = w * h
        keep = inter > 0 if self.min_overlap <= 0 else inter / area >= self.min_overlap
        return pos[keep]

    def __repr__(self) -> str:
        extra = {k: getattr(self, k) for k in ("media", "frame") if getattr(self, k) is not None}
        extra |= {"min_overlap": self.min_overlap} if self.min_overlap else {}
        extra |= {"part": self.part} if self.part != "any" else {}
        return _call("box", self.x0, self.y0, self.x1, self.y1, **extra)


def resolve(selector: "Selector | torch.Tensor | Sequence[int]", prov: Provenance) -> torch.Tensor:
    """Positions of a selector, an index tensor or a list of ints (checked against the request)."""
    if hasattr(selector, "resolve"):
        return selector.resolve(prov)
    idx = torch.as_tensor(selector, dtype=torch.long).flatten()
    return positions(*idx.tolist()).resolve(prov)
