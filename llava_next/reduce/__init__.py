"""Visual-token reduction and frame selection as plug-ins (stages.py), one module per method.

    from llava_next.reduce import parse_reduction
    reduction = parse_reduction(select_frames="maxinfo:frames=16", reduce=["fastv:layer=2,keep=0.5"])
    req = pipe.prepare("What happens?", video="clip.mp4", frames=16, reduction=reduction)

``METHODS`` maps each CLI name to its class; ``parse_method("fastv:layer=2,keep=0.5")`` builds one, with
errors that list what exists. docs/reduction.md describes every method, its knobs and its source.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Sequence, get_args, get_origin

from .dycoke import DyCokeDecode, DyCokeMerge
from .fastv import FastV
from .framefusion import FrameFusion
from .maxinfo import MaxInfo
from .pllava import PLLaVAPool
from .scene import SceneFrames
from .slowfast import SlowFast
from .visionzip import VisionZip
from .stages import (DecodeSelector, FrameSelector, PrefillPruner, Reduction, ReductionError, TokenReducer,
                     VisualLayout)

METHODS: dict[str, type] = {m.name: m for m in (MaxInfo, SceneFrames, PLLaVAPool, SlowFast, DyCokeMerge, VisionZip, FastV,
                                                 FrameFusion, DyCokeDecode)}

__all__ = ["METHODS", "Reduction", "ReductionError", "VisualLayout", "parse_method", "parse_reduction",
           "FrameSelector", "TokenReducer", "PrefillPruner", "DecodeSelector", *[m.__name__ for m in METHODS.values()]]


def _convert(cls: type, name: str, value: str, hint) -> object:
    origin = get_origin(hint)
    what = f"{cls.name}: {name}={value!r}"
    if origin is typing.Literal:
        if value not in get_args(hint):
            raise ReductionError(f"{what} is not one of {', '.join(get_args(hint))}")
        return value
    if origin is tuple:
        try:
            return tuple(int(v) for v in value.split("x"))
        except ValueError:
            raise ReductionError(f"{what}: expected integers joined by 'x', e.g. 16x12x12") from None
    if hint is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ReductionError(f"{what}: expected true or false")
        return value.lower() in ("true", "1")
    for t in (int, float):
        if hint is t:
            try:
                return t(value)
            except ValueError:
                raise ReductionError(f"{what}: expected {'an integer' if t is int else 'a number'}") from None
    return value


def parse_method(spec: str):
    """'name' or 'name:knob=value,knob=value' -> the method object (clear errors listing what exists)."""
    name, _, args = spec.strip().partition(":")
    cls = METHODS.get(name.strip().lower())
    if cls is None:
        raise ReductionError(f"unknown reduction method {name!r}; the methods are: {', '.join(METHODS)}")
    hints = typing.get_type_hints(cls)
    knobs = {f.name: hints[f.name] for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    values = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ReductionError(f"{cls.name}: {item!r} is not knob=value; knobs: {', '.join(knobs)}")
        if key not in knobs:
            raise ReductionError(f"{cls.name} has no knob {key!r}; its knobs: {', '.join(knobs) or 'none'}")
        values[key] = _convert(cls, key, value.strip(), knobs[key])
    return cls(**values)


def parse_reduction(select_frames: str | None = None, reduce: Sequence[str] = ()) -> Reduction:
    """One Reduction from CLI-style specs; each --reduce method goes to its stage (one per stage)."""
    slots: dict[str, object] = {}
    if select_frames:
        m = parse_method(select_frames)
        if not isinstance(m, FrameSelector):
            raise ReductionError(f"{m.name} is not a frame selector; --select-frames takes: "
                                 f"{', '.join(n for n, c in METHODS.items() if issubclass(c, FrameSelector))}")
        slots["select_frames"] = m
    for spec in reduce:
        m = parse_method(spec)
        if isinstance(m, FrameSelector):
            raise ReductionError(f"{m.name} selects frames: pass it as --select-frames {spec}")
        slot = ("reducer" if isinstance(m, TokenReducer) else "pruner" if isinstance(m, PrefillPruner) else "decode")
        if slot in slots:
            raise ReductionError(f"{slots[slot].name} and {m.name} are both {_STAGE[slot]}: use one of them")
        slots[slot] = m
    return Reduction(**slots)


_STAGE = {"reducer": "token reducers between projector and decoder", "pruner": "prefill pruners",
          "decode": "decode-time KV selectors"}
