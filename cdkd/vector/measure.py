"""From pixel polygons to CRS polygons, and their areas (m²) and perimeters (m).

Polygons are built in pixel coordinates (``x`` = column, ``y`` = row, integer corners), where unions are
exact, and moved into the raster's CRS with its affine transform as the last geometric step.

Measures (``AreaMode``, as QGIS offers them):

- ``planar``: area and length in the CRS times the CRS linear unit's size in metres (squared for areas), so
  feet-based CRSs also give m². Fast, and ground measures only where the projection's areal scale is close to 1.
- ``ellipsoidal``: geodesic area and perimeter on the CRS's own ellipsoid (WGS84 for EPSG:4326 and 3857),
  ``cdkd.geodesy.geodesic_area_perimeter``: ground measures in any CRS, the ones the scene report gives.
- ``auto`` (default): planar where planar areas are ground areas within ``geodesy.AREAL_TOLERANCE`` (0.1 %)
  over the whole raster, ellipsoidal everywhere else. The rule is the projection's areal scale factor
  (``geodesy.planar_scale_error``, from ``pyproj.Proj.get_factors`` on a grid over the raster's extent).
  Equal-area CRSs stay planar, and so does UTM where (longitude from the central meridian) x cos(latitude) is
  under 2.4°: the whole zone beyond ~36° N/S, all but the outer ~0.6° of it near the equator (UTM's areal scale
  is 0.9992 on the central meridian, 1.002 at a zone edge on the equator). Geographic CRSs, Web Mercator (x2.15
  areas at 47° N) and any CRS that stretches areas by more than 0.1 % somewhere over the raster are measured
  on the ellipsoid.

Perimeters include the rings of holes in every mode; areas subtract holes whatever the rings' orientation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.transform import Affine

from cdkd.errors import CdkdValueError, DataError
from cdkd.geodesy import (
    AREAL_TOLERANCE,
    geodesic_area_perimeter,
    metres_per_unit,
    planar_scale_error,
)
from cdkd.vector.choices import AREA_MODES, AreaMode


@dataclass(frozen=True)
class AreaChoice:
    """A resolved measure: ``mode`` is ``"planar"`` or ``"ellipsoidal"``; ``scale_error`` is the largest
    |areal scale - 1| of planar areas over the raster (``inf`` in a geographic CRS)."""

    mode: str
    scale_error: float

    @property
    def scale_error_percent(self) -> float | None:
        """``scale_error`` in %, None where planar areas mean nothing (geographic CRS): for JSON reports."""
        return None if math.isinf(self.scale_error) else 100 * self.scale_error


def to_crs(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Polygons in pixel coordinates (col, row) -> the same polygons in the raster's CRS (vectorised)."""
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f

    def affine(xy: np.ndarray) -> np.ndarray:
        if b == 0 and d == 0:  # north-up: in place (xy is shapely's own copy), no second array of vertices
            xy *= (a, e)
            xy += (c, f)
            return xy
        return xy @ np.array([[a, d], [b, e]]) + (c, f)

    return shapely.transform(geoms, affine)


def check_area_mode(mode: Any) -> str:
    """``mode`` as one of ``AREA_MODES`` (an ``AreaMode`` or its value); anything else is a CdkdValueError."""
    value = mode.value if isinstance(mode, AreaMode) else mode
    if value not in AREA_MODES:
        raise CdkdValueError(f"--area {mode!r}: choose one of {', '.join(AREA_MODES)}")
    return value


def choose_area(mode: Any, crs: CRS, transform: Affine, width: int, height: int) -> AreaChoice:
    """``mode`` (``AreaMode``) resolved for a ``width`` x ``height`` raster in ``crs`` (module docstring).

    Raises:
        CdkdValueError: an unknown mode.
        DataError: ``planar`` in a geographic CRS (its areas would be in square degrees).
    """
    value = check_area_mode(mode)
    error = planar_scale_error(crs, transform, width, height)
    if value == "auto":
        return AreaChoice("planar" if error <= AREAL_TOLERANCE else "ellipsoidal", error)
    if value == "planar" and math.isinf(error) and crs.is_geographic:
        raise DataError(
            f"CRS {crs.to_string()!r} is in degrees: planar areas would be in square degrees; "
            "use --area ellipsoidal (or auto)"
        )
    return AreaChoice(value, error)


def planar_note(crs: CRS, choice: AreaChoice) -> str | None:
    """A warning when planar measures were asked for where they are not ground measures (``AREAL_TOLERANCE``)."""
    if choice.mode != "planar" or choice.scale_error <= AREAL_TOLERANCE:
        return None
    return (
        f"areas are planar in {crs.to_string()}, whose areal scale differs from 1 by up to "
        f"{100 * choice.scale_error:.2g} % over this raster; --area auto or ellipsoidal gives ground areas"
    )


def area_perimeter(geoms: np.ndarray, crs: CRS, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Area (m²) and perimeter (m) of each polygon (in ``crs`` coordinates), ``mode`` = ``AreaChoice.mode``."""
    if mode == "ellipsoidal":
        return geodesic_area_perimeter(geoms, crs)
    if mode != "planar":
        raise CdkdValueError(f"area mode {mode!r}: expected planar or ellipsoidal (resolve it with choose_area)")
    k = metres_per_unit(crs)
    return shapely.area(geoms) * k * k, shapely.length(geoms) * k
