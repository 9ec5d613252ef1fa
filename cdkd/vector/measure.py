"""From pixel polygons to CRS polygons, and their areas (m²) and perimeters (m).

Polygons are built in pixel coordinates (``x`` = column, ``y`` = row, integer corners), where unions are
exact, and moved into the raster's CRS with its affine transform as the last geometric step.

Measures: in a projected CRS, planar area and length times the CRS linear unit's size in metres (squared for
areas), so feet-based CRSs also give m². In a geographic CRS (degrees) planar measures mean nothing, so areas
and perimeters are geodesic, on the CRS's own ellipsoid (WGS84 for EPSG:4326), with
``pyproj.Geod.geometry_area_perimeter``; perimeters include the rings of holes, as planar lengths do.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyproj
import shapely
from rasterio.crs import CRS
from rasterio.transform import Affine

from cdkd.errors import DataError


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


def geodesic_area_perimeter(geoms: np.ndarray, crs: CRS) -> tuple[np.ndarray, np.ndarray]:
    """Geodesic area (m², positive) and perimeter (m) of lon/lat polygons on ``crs``'s ellipsoid."""
    geod = _pyproj_crs(crs.to_wkt()).get_geod() or pyproj.Geod(ellps="WGS84")
    area = np.empty(len(geoms))
    perimeter = np.empty(len(geoms))
    for i, g in enumerate(geoms):
        # the sign follows ring orientation, which depends on the transform's signs: only the magnitude counts
        a, p = geod.geometry_area_perimeter(g)
        area[i], perimeter[i] = abs(a), p
    return area, perimeter


def area_perimeter(geoms: np.ndarray, crs: CRS) -> tuple[np.ndarray, np.ndarray]:
    """Area (m²) and perimeter (m) of each polygon (in ``crs`` coordinates); see the module docstring."""
    if is_geographic(crs):
        return geodesic_area_perimeter(geoms, crs)
    k = metres_per_unit(crs)
    return shapely.area(geoms) * k * k, shapely.length(geoms) * k
