"""Research instruments: token provenance and selectors (provenance.py, select.py), pictures (plots.py).

    from llava_next.research import Provenance, select as sel
"""

from . import select
from .provenance import KINDS, SEGMENTS, Media, Provenance

__all__ = ["KINDS", "SEGMENTS", "Media", "Provenance", "select"]
