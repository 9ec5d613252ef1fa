"""From pixel polygons to CRS polygons, and their areas (m²) and perimeters (m).

Polygons are built in pixel coordinates (``x`` = column, ``y`` = row, integer corners), where unions are
exact, and moved into the raster's CRS with its affine transform as the last geometric step.

Measures (``AREA_MODES``), as QGIS offers them:

- ``planar``: area and length in the CRS times the CRS linear unit's size in metres (squared for areas), so
  feet-based CRSs also give m². Right for equal-area and conformal local CRSs (UTM: within 0.1 % of the
  ground), wrong for Web Mercator, whose planar areas overstate the ground by 1/cos²(latitude) (1.6x at 38°).
- ``ellipsoidal``: geodesic area and perimeter on the CRS's own ellipsoid (WGS84 for EPSG:4326 and 3857),
  ``cdkd.geodesy.geodesic_area_perimeter``: the ground measures the scene engine reports.
- ``auto`` (default): ellipsoidal in a geographic CRS (planar measures in degrees mean nothing), planar
  otherwise.

Perimeters include the rings of holes in every mode.
"""

from __future__ import annotations

import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.transform import Affine

from cdkd.errors import CdkdValueError, DataError
from cdkd.geodesy import (
    geodesic_area_perimeter,
    is_geographic,
    metres_per_unit,
    pyproj_crs,
)

AREA_MODES = ("auto", "planar", "ellipsoidal")


def to_crs(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Polygons in pixel coordinates (col, row) -> the same polygons in the raster's CRS (vectorised)."""
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f

    def affine(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack((a * x + b * y + c, d * x + e * y + f))

    return shapely.transform(geoms, affine)


def area_mode(mode: str, crs: CRS) -> str:
    """``mode`` (one of ``AREA_MODES``) resolved for ``crs``: ``"planar"`` or ``"ellipsoidal"``."""
    if mode not in AREA_MODES:
        raise CdkdValueError(f"--area {mode!r}: choose one of {', '.join(AREA_MODES)}")
    if mode == "auto":
        return "ellipsoidal" if is_geographic(crs) else "planar"
    if mode == "planar" and is_geographic(crs):
        raise DataError(f"CRS {crs.to_string()!r} is in degrees: planar areas would be in square degrees; "
                        "use --area ellipsoidal (or auto)")
    return mode


def mercator_note(crs: CRS, mode: str) -> str | None:
    """A warning when planar measures in ``crs`` are far from the ground: the (pseudo-)Mercator family."""
    operation = pyproj_crs(crs.to_wkt()).coordinate_operation
    method = operation.method_name if operation is not None else ""
    if mode != "planar" or "Mercator" not in method or "Transverse" in method:
        return None
    return (f"areas are planar in {crs.to_string()} ({method}), which overstates ground areas by "
            "1/cos²(latitude); pass --area ellipsoidal for ground areas")


def area_perimeter(geoms: np.ndarray, crs: CRS, mode: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Area (m²) and perimeter (m) of each polygon (in ``crs`` coordinates); see the module docstring."""
    if area_mode(mode, crs) == "ellipsoidal":
        return geodesic_area_perimeter(geoms, crs)
    k = metres_per_unit(crs)
    return shapely.area(geoms) * k * k, shapely.length(geoms) * k
