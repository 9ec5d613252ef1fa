"""Polygonising a class raster strip by strip, and merging the polygons that strip borders cut.

Each strip is polygonised on its own with ``rasterio.features.shapes`` (GDAL's polygoniser, 4-connectivity) in
*pixel* coordinates: ``x`` is the column, ``y`` the row counted from the raster's top, so every vertex is an
integer and the unions below are exact. A polygon that reaches a strip's bottom border may continue in the next
strip; ``StripMerger`` keeps such "open" pieces and, when the next strip arrives, links each to the pieces of the
same class it shares an edge with across the border. Linked pieces form one component (a union-find), which
stays open while any of its pieces reaches the newest border and is joined into one polygon (``join_pieces``)
once none does. A U whose arms meet below a border, or a ring around a hole, is therefore one polygon, exactly
as if the whole raster had been polygonised at once: the same polygons, the same count and the same areas.

Pieces are linked from pixels, not geometry: a run of equal, valid pixels on both sides of a border is a shared
edge, and the pieces it belongs to are found on the border's edges (``_edges_on_row``) by binary search.

Memory: the raster is held one strip at a time; the vector side holds the open components only (a polygon that
spans many strips, such as a class that meanders across the whole scene, is kept as pieces until it closes).
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import shapely
from rasterio.features import shapes
from rasterio.transform import Affine

EMPTY = np.empty(0, dtype=object)


def polygonize(ids: np.ndarray, valid: np.ndarray, row0: int) -> tuple[np.ndarray, np.ndarray]:
    """Polygons of the 4-connected regions of equal id among the valid pixels of strip ``ids`` (h, W).

    Returns (n,) shapely polygons in pixel coordinates of the whole raster (the strip starts at row ``row0``)
    and (n,) int64 class ids. Invalid pixels belong to no polygon.
    """
    features = shapes(ids, mask=valid, connectivity=4, transform=Affine.translation(0, row0))
    rings: list[np.ndarray] = []  # (k, 2) arrays: 16 bytes a vertex, where GeoJSON tuples take ~100
    ring_owner: list[int] = []
    values: list[float] = []
    for n, (geom, value) in enumerate(features):
        rings.extend(np.fromiter(chain.from_iterable(r), np.float64, 2 * len(r)).reshape(-1, 2)
                     for r in geom["coordinates"])
        ring_owner.extend([n] * len(geom["coordinates"]))
        values.append(value)
    if not values:
        return EMPTY, np.empty(0, dtype=np.int64)
    # one vectorised build instead of a shapely.geometry.shape() call per feature (3x faster)
    lengths = np.fromiter((len(r) for r in rings), dtype=np.int64, count=len(rings))
    coords = np.concatenate(rings)
    del rings
    linear = shapely.linearrings(coords, indices=np.repeat(np.arange(len(lengths)), lengths))
    del coords
    polygons = shapely.polygons(linear, indices=np.asarray(ring_owner))  # first ring of each owner = shell
    return polygons, np.asarray(values).astype(np.int64)


def _ring_coords(polygons: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices (m, 2) of every ring of ``polygons``, the ring of each vertex (m,) and the polygon of each ring."""
    rings, owner = shapely.get_rings(polygons, return_index=True)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    return coords, ring_of, owner


def _edges_on_row(polygons: np.ndarray, y: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edges of ``polygons`` that lie on the line ``y`` (a strip border): x from (k,), x to (k,), polygon
    (k,); sorted by their left end. They never overlap: each is the border side of pixels of one polygon."""
    coords, ring_of, owner = _ring_coords(polygons)
    on = (ring_of[:-1] == ring_of[1:]) & (coords[:-1, 1] == y) & (coords[1:, 1] == y)
    a, b = coords[:-1, 0][on], coords[1:, 0][on]
    left, right, polygon = np.minimum(a, b), np.maximum(a, b), owner[ring_of[:-1][on]]
    order = np.argsort(left, kind="stable")
    return left[order], right[order], polygon[order]


def _polygon_at(edges: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    """For pixel-centre abscissas ``x`` on a border, the polygon whose border edge spans each."""
    left, right, polygon = edges
    i = np.searchsorted(left, x) - 1
    if (i < 0).any() or (x >= right[np.maximum(i, 0)]).any():
        raise RuntimeError("a border contact lies on no polygon edge of its strip (strip merger bug)")
    return polygon[i]


def contacts(above: np.ndarray, above_valid: np.ndarray, below: np.ndarray, below_valid: np.ndarray) -> np.ndarray:
    """Columns where a run of edge contacts across a border starts: (m,) int64.

    ``above``/``below`` are the class ids (W,) of the rows on either side of the border. A contact is a column
    where both pixels are valid and of the same class; consecutive contacts of one class are one run, and a run
    lies in one piece on each side (its pixels are 4-connected along the row), so one column per run suffices.
    """
    same = above_valid & below_valid & (above == below)
    continues = np.zeros_like(same)
    continues[1:] = same[:-1] & (above[1:] == above[:-1])
    return np.flatnonzero(same & ~continues)


def _densify_rows(polygons: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Hole-free polygons (pixel coordinates) with a vertex at every integer x of their horizontal edges on
    ``rows[i]`` (one or more y values per polygon, given as an (n, k) array)."""
    coords, ring_of, owner = _ring_coords(polygons)
    y = coords[:, 1]
    on = np.zeros(len(coords), dtype=bool)  # the edge from vertex i to vertex i + 1 lies on one of the rows
    on[:-1] = (ring_of[:-1] == ring_of[1:]) & (y[:-1] == y[1:]) & (rows[owner[ring_of[:-1]]] == y[:-1, None]).any(1)
    dx = np.zeros(len(coords))
    dx[:-1] = np.where(on[:-1], coords[1:, 0] - coords[:-1, 0], 0.0)
    repeats = np.abs(dx).astype(np.int64) + (~on)  # an edge of length L on a row becomes L unit edges
    repeats[on & (dx == 0)] = 1
    source = np.repeat(np.arange(len(coords)), repeats)
    step = np.arange(len(source)) - np.repeat(np.cumsum(repeats) - repeats, repeats)  # 0..repeats-1
    dense = coords[source]
    dense[:, 0] += step * np.sign(dx)[source]
    return shapely.polygons(shapely.linearrings(dense, indices=ring_of[source]), indices=owner)


def _drop_collinear(polygon: shapely.Polygon) -> shapely.Polygon:
    """``polygon`` (pixel coordinates: axis-parallel edges only) without the vertices in the middle of a straight
    edge. O(vertices) in numpy; GEOS's ``simplify(0)`` does the same several times slower."""
    rings = shapely.get_rings(polygon)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    closing = np.r_[ring_of[1:] != ring_of[:-1], True]  # each ring's last vertex repeats its first
    c, r = coords[~closing], ring_of[~closing]
    index = np.arange(len(c))
    first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    last = np.r_[first[1:] - 1, len(c) - 1]
    prev = np.where(np.isin(index, first), last[r], index - 1)
    after = np.where(np.isin(index, last), first[r], index + 1)
    x, y = c[:, 0], c[:, 1]
    keep = ~(((x[prev] == x) & (x == x[after])) | ((y[prev] == y) & (y == y[after])))
    c, r = c[keep], r[keep]
    first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    closed = np.insert(c, np.r_[first[1:], len(c)], c[first], axis=0)  # close each ring again
    closed_r = np.insert(r, np.r_[first[1:], len(r)], r[first])
    return shapely.polygons(shapely.linearrings(closed, indices=closed_r), indices=np.zeros(len(first), int))[0]


def join_pieces(pieces: list[shapely.Polygon]) -> shapely.Polygon:
    """One polygon from the pieces of a component (pixel coordinates; they share edges along strip borders).

    A general ``union_all`` of pieces with thousands of holes is slow (seconds for a class that meanders across
    the whole scene). But a hole never touches a strip border (a region there is open to the rows beyond, so
    no piece encloses it), and so every hole of a piece is a hole of the union as it is. Only the hole-free
    shells are unioned, as a coverage: shared border edges are first cut at each pixel corner so that both
    sides have the same vertices (``coverage_union_all`` requires that and is then linear); the vertices this
    adds, and any other vertex in the middle of a straight edge, are dropped again.
    """
    if len(pieces) == 1:
        return pieces[0]
    pieces = np.asarray(pieces, dtype=object)
    bounds = shapely.bounds(pieces)
    shells = _densify_rows(shapely.polygons(shapely.get_exterior_ring(pieces)), bounds[:, [1, 3]])
    merged = shapely.coverage_union_all(shells)
    if merged.geom_type != "Polygon":
        raise RuntimeError(f"pieces of one component joined into a {merged.geom_type} (strip merger bug)")
    merged = _drop_collinear(merged)
    holes = [ring for piece in pieces for ring in piece.interiors]
    return shapely.Polygon(merged.exterior, [*merged.interiors, *holes])


class StripMerger:
    """Joins the pieces of polygons cut by strip borders (module docstring); feed strips top to bottom."""

    def __init__(self) -> None:
        self._parent: list[int] = []  # union-find over component ids
        self._pieces: dict[int, list] = {}  # root id -> its pieces (pixel polygons)
        self._class: dict[int, int] = {}  # root id -> class id
        self._open = EMPTY  # pieces that reach the last border ...
        self._open_comp = np.empty(0, dtype=np.int64)  # ... and their component ids
        self._border: int | None = None  # row index of the last border (the first row below it)
        self._last_row: tuple[np.ndarray, np.ndarray] | None = None  # ids and validity of the row above it

    def _new(self, piece: shapely.Geometry, cls: int) -> int:
        cid = len(self._parent)
        self._parent.append(cid)
        self._pieces[cid] = [piece]
        self._class[cid] = cls
        return cid

    def _find(self, cid: int) -> int:
        root = cid
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[cid] != root:  # path compression
            self._parent[cid], cid = root, self._parent[cid]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if len(self._pieces[ra]) < len(self._pieces[rb]):
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._pieces[ra].extend(self._pieces.pop(rb))
        del self._class[rb]

    def _close(self, root: int) -> shapely.Geometry:
        pieces = self._pieces.pop(root)
        del self._class[root]
        return join_pieces(pieces)

    def add(self, polygons: np.ndarray, classes: np.ndarray, ids: np.ndarray, valid: np.ndarray, row0: int,
            last: bool) -> tuple[np.ndarray, np.ndarray]:
        """Add the polygons of strip rows ``[row0, row0 + h)`` (from ``polygonize``) and its ids/validity (h, W).

        Returns the polygons that are now final, in pixel coordinates, and their class ids. After the ``last``
        strip nothing stays open.
        """
        row1 = row0 + ids.shape[0]
        ymin, ymax = (shapely.bounds(polygons)[:, k] for k in (1, 3)) if len(polygons) else (EMPTY, EMPTY)
        linked = self._border == row0 and len(self._open) > 0
        top = (ymin == row0) if linked else np.zeros(len(polygons), dtype=bool)
        bottom = (ymax == row1) if not last else np.zeros(len(polygons), dtype=bool)
        done = ~top & ~bottom
        out_polygons, out_classes = [polygons[done]], [classes[done]]

        moving = np.flatnonzero(top | bottom)
        comp = np.full(len(polygons), -1, dtype=np.int64)
        comp[moving] = [self._new(polygons[i], int(classes[i])) for i in moving]
        if linked:
            columns = contacts(*self._last_row, ids[0], valid[0])
            if len(columns):
                # a contact run links the piece above whose bottom edge spans it to the piece below whose top
                # edge does: found on the border's edges, not by point-in-polygon tests on huge polygons
                x = columns + 0.5
                in_open = _polygon_at(_edges_on_row(self._open, row0), x)
                top_idx = np.flatnonzero(top)
                in_new = top_idx[_polygon_at(_edges_on_row(polygons[top_idx], row0), x)]
                for a, b in zip(self._open_comp[in_open], comp[in_new]):
                    self._union(int(a), int(b))

        roots = {self._find(int(c)) for c in self._open_comp} | {self._find(int(c)) for c in comp[moving]}
        alive = {self._find(int(c)) for c in comp[bottom]}
        closing = sorted(roots - alive)
        if closing:
            out_classes.append(np.asarray([self._class[r] for r in closing], dtype=np.int64))
            closed = np.empty(len(closing), dtype=object)
            closed[:] = [self._close(r) for r in closing]
            out_polygons.append(closed)

        self._open, self._open_comp = polygons[bottom], comp[bottom]
        self._border = row1
        self._last_row = (ids[-1].copy(), valid[-1].copy())
        return np.concatenate(out_polygons), np.concatenate(out_classes)

    @property
    def open_components(self) -> int:
        """Components still waiting for the next strip (0 after the last strip)."""
        return len(self._pieces)
