"""Ground measures in any CRS: the one place where cdkd turns CRS coordinates into metres and square metres.

A CRS's planar units can be far from the ground (Web Mercator overstates areas by 1/cos²(latitude)), so ground
areas are geodesic: vertices are moved to the CRS's own geographic CRS and measured on its ellipsoid with
``pyproj.Geod`` (WGS84 when the CRS names none). The scene engine's per-class km² and the vectorizer's
``area_m2`` with ``--area ellipsoidal`` both come from here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pyproj
import shapely

from cdkd.errors import DataError


@lru_cache(maxsize=8)
def pyproj_crs(wkt: str) -> pyproj.CRS:
    return pyproj.CRS.from_wkt(wkt)


def _wkt(crs: Any) -> str:
    """WKT of a rasterio CRS, a pyproj CRS or any string pyproj understands ("EPSG:3857")."""
    return crs.to_wkt() if hasattr(crs, "to_wkt") else pyproj.CRS.from_user_input(crs).to_wkt()


def is_geographic(crs: Any) -> bool:
    """True for a CRS in degrees (longitude, latitude)."""
    return pyproj_crs(_wkt(crs)).is_geographic


def metres_per_unit(crs: Any) -> float:
    """Metres per linear unit of a projected CRS's x axis (1.0 for metres, 0.3048 for feet)."""
    parsed = pyproj_crs(_wkt(crs))
    axis = parsed.axis_info
    factor = axis[0].unit_conversion_factor if axis else None
    if not factor or axis[0].unit_name in ("degree", "radian", "unknown"):
        raise DataError(f"CRS {parsed.to_string()!r} has no linear unit: cannot measure areas in m²")
    return float(factor)


@lru_cache(maxsize=8)
def _to_lonlat(wkt: str) -> pyproj.Transformer | None:
    """CRS -> its own geographic CRS (longitude, latitude), or None when it is geographic already."""
    crs = pyproj_crs(wkt)
    if crs.is_geographic:
        return None
    return pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)


def _geod(wkt: str) -> pyproj.Geod:
    return pyproj_crs(wkt).get_geod() or pyproj.Geod(ellps="WGS84")


def geodesic_area_perimeter(geoms: np.ndarray, crs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Geodesic area (m², positive) and perimeter (m) of polygons in ``crs`` (any CRS), on its ellipsoid.

    Edges join vertices by geodesics: right for pixel polygons, whose edges are short next to the Earth.
    """
    wkt = _wkt(crs)
    geod, to_lonlat = _geod(wkt), _to_lonlat(wkt)
    if to_lonlat is not None:
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))
    area = np.empty(len(geoms))
    perimeter = np.empty(len(geoms))
    for i, g in enumerate(geoms):
        # the sign follows ring orientation, which depends on the transform's signs: only the magnitude counts
        a, p = geod.geometry_area_perimeter(g)
        area[i], perimeter[i] = abs(a), p
    return area, perimeter


def footprint_area_m2(crs: Any, transform: Any, width: int, height: int, points_per_side: int = 64) -> float:
    """Geodesic area (m²) of a raster's footprint on its CRS's ellipsoid.

    The edges are densified to ``points_per_side`` vertices first: a long straight edge in the CRS is a curve
    on the ellipsoid (a Web Mercator scene's top and bottom edges follow parallels, not geodesics).
    """
    t = np.linspace(0.0, 1.0, points_per_side, endpoint=False)
    cols = np.concatenate([t * width, np.full_like(t, width), (1 - t) * width, np.zeros_like(t)])
    rows = np.concatenate([np.zeros_like(t), t * height, np.full_like(t, height), (1 - t) * height])
    xs, ys = transform @ (cols, rows)
    ring = shapely.Polygon(np.column_stack([xs, ys]))
    area, _ = geodesic_area_perimeter(np.array([ring]), crs)
    return float(area[0])
