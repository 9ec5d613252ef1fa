"""``--simplify``: simplifying all polygons together as one coverage, so that neighbours keep sharing edges.

``shapely.coverage_simplify`` simplifies each edge shared by two polygons once, for both, which keeps the
polygon set free of gaps and overlaps. It needs a *noded* coverage: where polygons meet, both must have the
same vertices. GDAL's polygons are not noded: a long straight edge on one side can face two neighbours on the
other, with the vertex where those two meet only on their side (a T-junction). ``node`` inserts every such
vertex into the edge it lies on, in pixel coordinates, where vertices are integers and "lies on" is exact.

Memory: the whole polygon set is held for this step (the coverage must be simplified at once). Vectors are
far smaller than the raster they came from: a polygon costs its boundary vertices, a raster every pixel.
"""

from __future__ import annotations

import numpy as np
import shapely
from rasterio.transform import Affine

from cdkd.vector.measure import to_crs


def _inserted(keys: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For edges from key ``start`` to key ``end`` on one line (keys sorted along it), the positions in ``keys``
    of the vertices strictly between them, in the edge's direction: (count per edge, flat positions)."""
    lo = np.searchsorted(keys, np.minimum(start, end), side="right")
    hi = np.searchsorted(keys, np.maximum(start, end), side="left")
    count = np.maximum(hi - lo, 0)
    first = np.repeat(np.where(end >= start, lo, hi - 1), count)
    step = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    return count, first + np.repeat(np.where(end >= start, 1, -1), count) * step


def node(polygons: np.ndarray) -> np.ndarray:
    """Polygons in pixel coordinates (axis-parallel edges, integer vertices) with every vertex of any of them
    that lies inside an edge of another inserted into that edge (see the module docstring)."""
    rings, owner = shapely.get_rings(polygons, return_index=True)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    xy = coords.astype(np.int64)
    span = int(xy.max()) + 1
    # each edge runs from vertex i to i + 1 of the same ring; a ring's last vertex starts no edge
    has_edge = np.r_[ring_of[:-1] == ring_of[1:], False]
    nxt = np.minimum(np.arange(len(xy)) + 1, len(xy) - 1)
    horizontal = has_edge & (xy[:, 1] == xy[nxt, 1])
    vertical = has_edge & (xy[:, 0] == xy[nxt, 0]) & ~horizontal

    count = np.zeros(len(xy), dtype=np.int64)
    parts = []
    for mask, major, minor in ((horizontal, 1, 0), (vertical, 0, 1)):  # sort along rows, then along columns
        keys = np.sort(xy[:, major] * span + xy[:, minor])
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]]  # np.unique, without its slower hash path
        i = np.flatnonzero(mask)
        n, pos = _inserted(keys, xy[i, major] * span + xy[i, minor], xy[nxt[i], major] * span + xy[nxt[i], minor])
        count[i] = n
        point = np.empty((len(pos), 2), dtype=np.int64)
        point[:, major], point[:, minor] = keys[pos] // span, keys[pos] % span
        parts.append((i, n, point))
    # lay out each vertex followed by the points inserted into the edge it starts
    slots = count + 1
    offset = np.cumsum(slots) - slots
    out = np.empty((int(slots.sum()), 2), dtype=np.float64)
    out[offset] = coords
    for i, n, point in parts:
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        out[np.repeat(offset[i] + 1, n) + within] = point
    out_ring = np.repeat(ring_of, slots)
    return shapely.polygons(shapely.linearrings(out, indices=out_ring), indices=owner)


def simplify_coverage(polygons: np.ndarray, transform: Affine, tolerance: float) -> np.ndarray:
    """(n,) polygons in pixel coordinates -> the same polygons in CRS coordinates, simplified together with
    ``tolerance`` (CRS units) by ``shapely.coverage_simplify``. The affine transform maps shared vertices to the
    same CRS coordinates, so the coverage stays noded after it."""
    return shapely.coverage_simplify(to_crs(node(polygons), transform), tolerance, simplify_boundary=True)
