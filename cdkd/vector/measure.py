"""From pixel polygons to CRS polygons, and their areas (m²) and perimeters (m).

Polygons are built in pixel coordinates (``x`` = column, ``y`` = row, integer corners), where unions are
exact, and moved into the raster's CRS with its affine transform as the last geometric step.

Measures (``AREA_MODES``), as QGIS offers them:

- ``planar``: area and length in the CRS times the CRS linear unit's size in metres (squared for areas), so
  feet-based CRSs also give m². Right for equal-area and conformal local CRSs (UTM: within 0.1 % of the
  ground), wrong for Web Mercator, whose planar areas overstate the ground by 1/cos²(latitude) (1.6x at 38°).
- ``ellipsoidal``: geodesic area and perimeter on the CRS's own ellipsoid (WGS84 for EPSG:4326 and 3857) with
  ``pyproj.Geod.geometry_area_perimeter``, after moving the vertices to the CRS's geographic CRS. Edges join
  vertices by geodesics; pixel polygons have short edges, so this is the ground area to ~1e-6.
- ``auto`` (default): ellipsoidal in a geographic CRS (planar measures in degrees mean nothing), planar
  otherwise.

Perimeters include the rings of holes in every mode.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyproj
import shapely
from rasterio.crs import CRS
from rasterio.transform import Affine

from cdkd.errors import CdkdValueError, DataError

AREA_MODES = ("auto", "planar", "ellipsoidal")


@lru_cache(maxsize=8)
def _pyproj_crs(wkt: str) -> pyproj.CRS:
    return pyproj.CRS.from_wkt(wkt)


def is_geographic(crs: CRS) -> bool:
    """True for a CRS in degrees (longitude, latitude)."""
    return _pyproj_crs(crs.to_wkt()).is_geographic


def metres_per_unit(crs: CRS) -> float:
    """Metres per linear unit of a projected CRS's x axis (1.0 for metres, 0.3048 for feet)."""
    axis = _pyproj_crs(crs.to_wkt()).axis_info
    factor = axis[0].unit_conversion_factor if axis else None
    if not factor or axis[0].unit_name in ("degree", "radian", "unknown"):
        raise DataError(f"CRS {crs.to_string()!r} has no linear unit: cannot measure areas in m²")
    return float(factor)


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
    operation = _pyproj_crs(crs.to_wkt()).coordinate_operation
    method = operation.method_name if operation is not None else ""
    if mode != "planar" or "Mercator" not in method or "Transverse" in method:
        return None
    return (f"areas are planar in {crs.to_string()} ({method}), which overstates ground areas by "
            "1/cos²(latitude); pass --area ellipsoidal for ground areas")


@lru_cache(maxsize=8)
def _to_lonlat(wkt: str) -> pyproj.Transformer | None:
    """CRS -> its own geographic CRS (longitude, latitude), or None when it is geographic already."""
    crs = _pyproj_crs(wkt)
    if crs.is_geographic:
        return None
    return pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)


def geodesic_area_perimeter(geoms: np.ndarray, crs: CRS) -> tuple[np.ndarray, np.ndarray]:
    """Geodesic area (m², positive) and perimeter (m) of polygons in ``crs`` (any CRS), on its ellipsoid."""
    wkt = crs.to_wkt()
    geod = _pyproj_crs(wkt).get_geod() or pyproj.Geod(ellps="WGS84")
    to_lonlat = _to_lonlat(wkt)
    if to_lonlat is not None:
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))
    area = np.empty(len(geoms))
    perimeter = np.empty(len(geoms))
    for i, g in enumerate(geoms):
        # the sign follows ring orientation, which depends on the transform's signs: only the magnitude counts
        a, p = geod.geometry_area_perimeter(g)
        area[i], perimeter[i] = abs(a), p
    return area, perimeter


def area_perimeter(geoms: np.ndarray, crs: CRS, mode: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Area (m²) and perimeter (m) of each polygon (in ``crs`` coordinates); see the module docstring."""
    if area_mode(mode, crs) == "ellipsoidal":
        return geodesic_area_perimeter(geoms, crs)
    k = metres_per_unit(crs)
    return shapely.area(geoms) * k * k, shapely.length(geoms) * k
