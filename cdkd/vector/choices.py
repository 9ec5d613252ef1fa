"""The closed choices of ``cdkd vectorize``, as enums (the CLI lists them in ``--help`` and refuses others).

Kept free of heavy imports: the command line reads them when it starts.
"""

from __future__ import annotations

from enum import Enum


class AreaMode(str, Enum):
    """How ``area_m2``, ``perimeter_m`` and an ``m2`` ``--min-area`` are measured (``cdkd.vector.measure``)."""

    auto = "auto"
    planar = "planar"
    ellipsoidal = "ellipsoidal"


AREA_MODES = tuple(m.value for m in AreaMode)
