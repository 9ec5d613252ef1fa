"""``--min-area``: regions smaller than a threshold are merged into a neighbouring class, strip by strip.

GDAL's sieve (``rasterio.features.sieve``) replaces every 4-connected region of fewer than ``size`` pixels by
the value of its largest neighbouring region, so small islands vanish into the class around them instead of
leaving holes. Nodata is passed as the sieve's mask: nodata pixels are never changed and never absorb a region.
A small region with no large neighbour (only nodata, or other small regions, around it) can stay: GDAL merges
into regions that are themselves large enough.

Halo rule. Each strip is sieved on its core rows plus ``halo = size - 1`` rows above and below (clipped at the
raster's edges), and only the core is kept. A region of fewer than ``size`` pixels spans at most ``size - 1``
rows, so every small region that reaches the core lies wholly inside the rows read and is found; conversely, a
region cut by the edge of the rows read spans at least ``halo + 1 = size`` rows inside them and is never taken
for small; the same holds for the neighbours of small regions, so whether a region has a large neighbour to go
to is decided exactly too. Which regions are removed is therefore what a whole-raster sieve removes (checked in
``tests/test_vectorize.py``). Limits: (1) the
*target* of a merge is the largest neighbour as seen in the rows read, so when two large neighbours compete and
one of them leaves the window, the choice can differ from a whole-raster sieve (and a small region crossing a
strip border may go to different neighbours on either side); (2) memory grows with the halo: a strip reads
``window_rows + 2 * (size - 1)`` rows, so a threshold of 10 000 px on a 10 m raster (1 km²) reads up to ~20 000
extra rows per strip. Thresholds of a few hundred pixels, the usual case, cost little.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from rasterio.crs import CRS
from rasterio.features import sieve
from rasterio.transform import Affine

from cdkd.errors import CdkdValueError
from cdkd.geodesy import metres_per_unit, pixel_quad_areas
from cdkd.vector.measure import choose_area

_MIN_AREA = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*(m2|m²|px)\s*$")

MIN_AREA_HELP = "write it as a number and a unit, e.g. 100m2 (square metres) or 25px (pixels)"


@dataclass(frozen=True)
class MinArea:
    """A minimum region area: ``value`` square metres (``unit="m2"``) or pixels (``unit="px"``)."""

    value: float
    unit: str

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}"


def parse_min_area(text: str | MinArea) -> MinArea:
    """``"100m2"`` / ``"100 m²"`` -> ``MinArea(100, "m2")``; ``"25px"`` -> ``MinArea(25, "px")``."""
    if isinstance(text, MinArea):
        return text
    m = _MIN_AREA.match(str(text))
    if not m:
        raise CdkdValueError(f"--min-area {text!r} is not an area: {MIN_AREA_HELP}")
    value = float(m.group(1) + (f"e{m.group(2)}" if m.group(2) else ""))
    if not math.isfinite(value) or value <= 0:
        raise CdkdValueError(f"--min-area {text!r} must be greater than 0: {MIN_AREA_HELP}")
    return MinArea(value, "px" if m.group(3) == "px" else "m2")


def pixel_area_m2(transform: Affine, crs: CRS, width: int, height: int, area: str = "auto") -> float:
    """Area of one pixel in m², measured as ``area`` (``measure.AreaMode``, resolved for this raster by
    ``measure.choose_area``) measures polygons.

    Planar: ``|det(transform)|`` times the square of the CRS unit's size in metres (exact for every pixel).
    Ellipsoidal: the geodesic area of the raster's *centre* pixel; pixels nearer the poles are smaller (by the
    cosine of the latitude in a geographic CRS), so a threshold in m² is converted once, at the centre, and
    applied in pixels everywhere.
    """
    if choose_area(area, crs, transform, width, height).mode == "planar":
        return abs(transform.determinant) * metres_per_unit(crs) ** 2
    return float(pixel_quad_areas(crs, transform, np.array([width // 2]), np.array([height // 2]))[0])


def sieve_size(min_area: MinArea, transform: Affine, crs: CRS, width: int, height: int, area: str = "auto") -> int:
    """GDAL's sieve threshold for ``min_area``: regions of fewer pixels than this are merged away.

    A region of ``n`` pixels is smaller than ``A`` when ``n * pixel_area < A``, i.e. ``n < ceil(A / pixel_area)``.
    """
    pixels = (
        min_area.value if min_area.unit == "px" else min_area.value / pixel_area_m2(transform, crs, width, height, area)
    )
    return max(1, math.ceil(pixels - 1e-9))  # 1e-9: 100 m2 at exactly 100 m2 a pixel is 1 px, not 2


def sieve_halo(size: int) -> int:
    """Rows read above and below a strip core so that the sieve sees every small region whole (module doc)."""
    return max(0, size - 1)


def sieve_ids(ids: np.ndarray, valid: np.ndarray, size: int) -> np.ndarray:
    """Class ids (h, W) with every 4-connected region of fewer than ``size`` valid pixels merged into its
    largest neighbour; invalid pixels are left as they are. ``size <= 1`` returns ``ids`` unchanged."""
    if size <= 1:
        return ids
    return sieve(ids, size, mask=valid, connectivity=4)
