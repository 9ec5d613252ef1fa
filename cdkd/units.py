"""One policy for areas: square metres in data (reports, attribute tables), one readable unit per console table.

Every output file and report stores ground areas in m² (``area_m2``). What a command prints picks one unit for a
whole table from its largest value, so rows stay comparable: m² below a hectare, hectares below 100 km², km²
above, and a non-zero area too small for two decimals shows as ``<0.01`` rather than as zero.
"""

from __future__ import annotations

from typing import Iterable

UNITS = (("m²", 1.0), ("ha", 1e4), ("km²", 1e6))


def area_unit(areas_m2: Iterable[float]) -> tuple[str, float]:
    """(name, m² per unit) for a table whose largest area is ``max(areas_m2)``."""
    largest = max((abs(a) for a in areas_m2), default=0.0)
    if largest < 1e4:
        return UNITS[0]
    if largest < 1e8:
        return UNITS[1]
    return UNITS[2]


def format_area(area_m2: float, unit: tuple[str, float] | None = None, with_unit: bool = True) -> str:
    """``area_m2`` in ``unit`` (default: the one ``area_unit`` picks for it alone): ``1,600 m²``, ``12.34 ha``."""
    name, factor = unit or area_unit([area_m2])
    value = area_m2 / factor
    if factor == 1.0:
        text = f"{value:,.0f}" if abs(value) >= 1 or value == 0 else f"{value:.2f}"
    else:
        text = "<0.01" if 0 < abs(value) < 0.005 else f"{value:,.2f}"
    return f"{text} {name}" if with_unit else text
