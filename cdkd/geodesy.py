"""Ground measures in any CRS: the one place where cdkd turns CRS coordinates into metres and square metres.

A CRS's planar units can be far from the ground (Web Mercator overstates areas by 1/cos²(latitude)), so ground
areas are geodesic: vertices are moved to the CRS's own geographic CRS and measured on its ellipsoid with
``pyproj.Geod`` (WGS84 when the CRS names none). Three users, one rule, so the same pixels give the same area
everywhere:

- ``geodesic_area_perimeter``: polygons (the vectorizer's ``area_m2``/``perimeter_m`` on the ellipsoid), ring by
  ring, so a hole is subtracted and its boundary counted whatever the rings' orientation;
- ``PixelAreas``: the ground area of every pixel of a raster, by row and column block (the scene report's
  per-class areas through ``cdkd.scene.core.areas.ClassAreaTally``, and anything else that counts pixels);
- ``planar_scale_error``: how far a CRS's planar areas are from the ground over a raster's extent, which decides
  whether planar measures may stand for ground ones (``AREAL_TOLERANCE``, ``cdkd.vector.measure``).

Planar or ground? A projection scales areas by its *areal scale factor* (``pyproj.Proj.get_factors``), which
varies over the map. Planar areas are ground areas to within ``AREAL_TOLERANCE`` (0.1 %) when that factor stays
within 0.1 % of 1 over the raster: equal-area CRSs (EPSG:3035, 6933: 1 everywhere) and UTM where (longitude
from the central meridian) x cos(latitude) stays under 2.4° (UTM's linear scale k is 0.9996 on the central
meridian, areas -0.08 %, and 1.001 at a zone edge on the equator, areas +0.2 %), which is the whole zone beyond
~36° N/S. Web Mercator (x2.15 areas at 47° N, x4 at 60°) and every geographic CRS never qualify.

Long straight edges. An edge that is straight in the CRS is not a geodesic on the ellipsoid (in Web Mercator a
horizontal edge follows a parallel; the geodesic between its ends bulges poleward by L² tan(latitude) / 8R, 140 m
for 82 km at 47°), so polygons are densified in the CRS to vertices at most ``SEGMENT_M`` (100 m) apart before
their geodesic measures; at that spacing the difference is ~0.1 m² per km of edge.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import pyproj
import shapely

from cdkd.errors import DataError

AREAL_TOLERANCE = 1e-3  # planar areas count as ground areas when |areal scale - 1| <= 0.1 % over the raster
BLOCK_TOLERANCE = 1e-4  # PixelAreas: pixel areas within one column block differ by at most ~0.01 %
MAX_KNOT_ROWS = 2049  # PixelAreas: rows whose pixel areas are computed; the rows between are interpolated
MAX_BLOCKS = 256  # PixelAreas: column blocks at most
SEGMENT_M = 100.0  # longest edge (ground metres, roughly) measured as one geodesic; longer ones are densified
METRES_PER_DEGREE = 111_320.0  # one degree of latitude (and of longitude on the equator), to size SEGMENT_M


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


def lonlat(crs: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CRS coordinates (x, y), any shape -> (longitude, latitude) in degrees on the CRS's own datum.

    A geographic CRS's coordinates are taken as they are: rasters store longitude as x and latitude as y.
    """
    to_lonlat = _to_lonlat(_wkt(crs))
    if to_lonlat is None:
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return to_lonlat.transform(x, y)


def _geod(wkt: str) -> pyproj.Geod:
    return pyproj_crs(wkt).get_geod() or pyproj.Geod(ellps="WGS84")


def segment_length(crs: Any) -> float:
    """``SEGMENT_M`` in the units of ``crs`` (degrees, metres, feet): the longest edge measured as one geodesic."""
    if is_geographic(crs):
        return SEGMENT_M / METRES_PER_DEGREE
    return SEGMENT_M / metres_per_unit(crs)


def geodesic_area_perimeter(geoms: np.ndarray, crs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Ground area (m², >= 0) and perimeter (m) of (n,) polygons or multipolygons in ``crs``, on its ellipsoid.

    Measured ring by ring with ``pyproj.Geod``: area = |shell| - sum |holes| and perimeter = every ring's length,
    so the result does not depend on ring orientation (``shapely.coverage_simplify`` returns holes turning either
    way, and a CRS with a flipped axis turns every ring). Edges longer than ``SEGMENT_M`` are densified in the
    CRS first, so that the edges measured follow the CRS's straight lines (module docstring).
    """
    geoms = shapely.segmentize(np.asarray(geoms, dtype=object), segment_length(crs))
    area = np.zeros(len(geoms))
    perimeter = np.zeros(len(geoms))
    parts, part_owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    if not len(rings):
        return area, perimeter
    coords, vertex_ring = shapely.get_coordinates(rings, return_index=True)
    lon, lat = lonlat(crs, coords[:, 0], coords[:, 1])
    ends = np.cumsum(np.bincount(vertex_ring, minlength=len(rings)))
    starts = ends - np.bincount(vertex_ring, minlength=len(rings))
    geod = _geod(_wkt(crs))
    ring_area = np.empty(len(rings))
    ring_length = np.empty(len(rings))
    measure = geod.polygon_area_perimeter
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        ring_area[i], ring_length[i] = measure(lon[s:e], lat[s:e])
    shell = np.r_[True, ring_part[1:] != ring_part[:-1]]  # get_rings lists each part's shell first
    signed = np.where(shell, 1.0, -1.0) * np.abs(ring_area)
    owner = part_owner[ring_part]
    np.add.at(area, owner, signed)
    np.add.at(perimeter, owner, ring_length)
    return np.maximum(area, 0.0), perimeter


def footprint_area_m2(crs: Any, transform: Any, width: int, height: int) -> float:
    """Geodesic area (m²) of a raster's footprint on its CRS's ellipsoid (its edges densified like any polygon's:
    a Web Mercator scene's top and bottom edges follow parallels, not geodesics)."""
    corners = np.array([(0, 0), (width, 0), (width, height), (0, height)], dtype=np.float64)
    xs, ys = transform @ (corners[:, 0], corners[:, 1])
    ring = shapely.Polygon(np.column_stack([xs, ys]))
    area, _ = geodesic_area_perimeter(np.array([ring]), crs)
    return float(area[0])


def planar_scale_error(crs: Any, transform: Any, width: int, height: int, samples: int = 17) -> float:
    """The largest |areal scale factor - 1| of ``crs``'s projection over a raster's extent (0.001 = 0.1 %).

    The factor (``pyproj.Proj.get_factors``; it accounts for the CRS's unit, feet included) is sampled on a
    ``samples`` x ``samples`` grid of points spanning the raster, corners included. ``inf`` for a geographic CRS
    (planar measures would be in square degrees) and wherever the factor cannot be computed.
    """
    parsed = pyproj_crs(_wkt(crs))
    if parsed.is_geographic:
        return math.inf
    t = np.linspace(0.0, 1.0, samples)
    cols, rows = np.meshgrid(t * width, t * height)
    x, y = transform @ (cols.ravel(), rows.ravel())
    lon, lat = lonlat(crs, x, y)
    try:
        scale = np.asarray(pyproj.Proj(parsed).get_factors(lon, lat, errcheck=True).areal_scale)
    except (pyproj.exceptions.ProjError, pyproj.exceptions.CRSError, RuntimeError):
        return math.inf
    if not np.isfinite(scale).all():
        return math.inf
    return float(np.abs(scale - 1.0).max())


def pixel_quad_areas(crs: Any, transform: Any, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Geodesic areas (m²) of single pixels: the quadrilaterals whose corners are pixel (col, row), (col + 1,
    row), (col + 1, row + 1), (col, row + 1) under ``transform``. ``cols``/``rows``: same-shape float arrays
    (fractional positions allowed: the local pixel area there); returns that shape."""
    cols, rows = np.broadcast_arrays(np.asarray(cols, dtype=np.float64), np.asarray(rows, dtype=np.float64))
    c, r = cols.ravel(), rows.ravel()
    corner_cols = np.stack([c, c + 1, c + 1, c], axis=1)
    corner_rows = np.stack([r, r, r + 1, r + 1], axis=1)
    x, y = transform @ (corner_cols.ravel(), corner_rows.ravel())
    lon, lat = lonlat(crs, x, y)
    lon, lat = np.asarray(lon).reshape(-1, 4), np.asarray(lat).reshape(-1, 4)
    measure = _geod(_wkt(crs)).polygon_area_perimeter
    out = np.fromiter((abs(measure(lo, la)[0]) for lo, la in zip(lon, lat)), dtype=np.float64, count=len(lon))
    return out.reshape(cols.shape)


class PixelAreas:
    """The ground area (m²) of every pixel of a ``width`` x ``height`` raster in ``crs`` with ``transform``.

    Pixel areas are geodesic areas of the pixels' corner quadrilaterals (``pixel_quad_areas``), the truth a
    per-pixel sum of ``pyproj.Geod`` areas gives, held compactly as a grid of rows x column blocks:

    - rows: every row's areas are computed when the raster has at most ``MAX_KNOT_ROWS`` rows; taller rasters
      get them at that many evenly spaced *knot* rows and linearly interpolated between (pixel areas change
      smoothly with the row: the error is second order in the knot spacing, ~1e-9 relative for a 2000 km tall
      scene);
    - column blocks: one block when a row's pixels all have the same area (north-up geographic, Mercator and
      other cylindrical CRSs), otherwise as many equal blocks as keep the spread of pixel areas within a block
      under ``BLOCK_TOLERANCE`` (0.01 %; e.g. UTM far from its central meridian, or a rotated transform), up to
      ``MAX_BLOCKS``; each block's area is the pixel area at its middle column.

    Rotated and sheared transforms are handled like any other: each quadrilateral follows the full affine
    transform; rows and columns are the raster's, not north-south and east-west.

    Attributes:
        blocks: number of column blocks.
        block_of_column: (width,) int64 block index of each column.
    """

    def __init__(
        self,
        crs: Any,
        transform: Any,
        width: int,
        height: int,
        *,
        max_knot_rows: int = MAX_KNOT_ROWS,
        block_tolerance: float = BLOCK_TOLERANCE,
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"raster size must be positive, got {width} x {height}")
        self.crs, self.transform, self.width, self.height = crs, transform, int(width), int(height)
        self.blocks = self._count_blocks(block_tolerance)
        edges = np.linspace(0, self.width, self.blocks + 1)
        self.block_of_column = np.searchsorted(edges[1:], np.arange(self.width) + 0.5).astype(np.int64)
        bounds = np.searchsorted(self.block_of_column, np.arange(self.blocks + 1))  # first column of each block
        middle = (bounds[:-1] + bounds[1:] - 1) / 2.0
        if self.height <= max_knot_rows:
            self.knot_rows = np.arange(self.height, dtype=np.float64)
        else:
            self.knot_rows = np.linspace(0, self.height - 1, max(2, max_knot_rows))
        cols, rows = np.meshgrid(middle, self.knot_rows)
        self.knot_areas = pixel_quad_areas(crs, transform, cols, rows)  # (knots, blocks)

    def _count_blocks(self, tolerance: float) -> int:
        """Blocks needed so that pixel areas within one block differ by at most ``tolerance`` (relative)."""
        if self.width == 1:
            return 1
        cols = np.linspace(0, self.width - 1, min(self.width, 33))
        rows = np.unique(np.round(np.linspace(0, self.height - 1, 3)))
        grid = pixel_quad_areas(self.crs, self.transform, cols[None, :], rows[:, None])
        if not (np.isfinite(grid).all() and (grid > 0).all()):
            raise DataError(
                f"{self.width} x {self.height} px raster at {tuple(self.transform)[:6]}: pixel areas "
                "cannot be computed (does it reach beyond the CRS's valid area, e.g. past a pole?)"
            )
        spread = float(((grid.max(1) - grid.min(1)) / grid.mean(1)).max())
        if spread <= 1e-9:  # the same area along every row (up to rounding)
            return 1
        return int(min(MAX_BLOCKS, self.width, max(1, math.ceil(spread / tolerance))))

    def rows(self, top: int, n: int) -> np.ndarray:
        """(n, blocks) float64: the pixel area (m²) of rows ``[top, top + n)`` in each column block."""
        r = np.arange(top, top + n, dtype=np.float64)
        if len(self.knot_rows) == self.height:
            return self.knot_areas[top : top + n]
        i = np.clip(np.searchsorted(self.knot_rows, r, side="right") - 1, 0, len(self.knot_rows) - 2)
        r0, r1 = self.knot_rows[i], self.knot_rows[i + 1]
        w = ((r - r0) / (r1 - r0))[:, None]
        return self.knot_areas[i] * (1 - w) + self.knot_areas[i + 1] * w

    def pixels(self, top: int, n: int) -> np.ndarray:
        """(n, width) float64: every pixel's area (m²) in rows ``[top, top + n)``."""
        return self.rows(top, n)[:, self.block_of_column]

    def total(self) -> float:
        """Ground area (m²) of the whole raster, as the sum of its pixel areas."""
        per_block = np.bincount(self.block_of_column, minlength=self.blocks)
        return float(
            sum(self.rows(t, min(4096, self.height - t)).sum(0) @ per_block for t in range(0, self.height, 4096))
        )
