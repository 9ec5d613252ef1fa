"""Polygonising a class raster strip by strip, and merging the polygons that strip borders cut.

Each strip is polygonised on its own with ``rasterio.features.shapes`` (GDAL's polygoniser, 4-connectivity) in
*pixel* coordinates: ``x`` is the column, ``y`` the row counted from the raster's top, so every vertex is an
integer and the unions below are exact. A polygon that reaches a strip's bottom border may continue in the next
strip; ``StripMerger`` keeps such "open" pieces and, when the next strip arrives, links each to the pieces of the
same class it shares an edge with across the border. Linked pieces form one component (a union-find), which
stays open while any of its pieces reaches the newest border and is joined into one polygon (``join.join_pieces``)
once none does. A U whose arms meet below a border, or a ring around a hole, is therefore one polygon, exactly
as if the whole raster had been polygonised at once: the same polygons, the same count and the same areas.

Pieces are linked from pixels, not geometry: a run of equal, valid pixels on both sides of a border is a shared
edge, and the pieces it belongs to are found on the border's edges (``_edges_on_row``) by binary search.

Memory: the raster is held one strip at a time; the vector side holds the open components only (a polygon that
spans many strips, such as a class that meanders across the whole scene, is kept as pieces until it closes).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

import numpy as np
import shapely
from rasterio.features import shapes
from rasterio.transform import Affine

from cdkd.vector.join import join_pieces
from cdkd.vector.memory import BATCH_VERTICES, release_freed_memory

EMPTY = np.empty(0, dtype=object)
BIG_JOIN = 100_000  # vertices: joining pieces into a polygon this large frees tens of MB


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
        rings.extend(
            np.fromiter(chain.from_iterable(r), np.float64, 2 * len(r)).reshape(-1, 2) for r in geom["coordinates"]
        )
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
        joined = join_pieces(pieces)
        if len(pieces) > 1 and shapely.get_num_coordinates(joined) > BIG_JOIN:
            del pieces
            release_freed_memory()  # before the next join's peak comes on top of this one's freed pages
        return joined

    def add(
        self, polygons: np.ndarray, classes: np.ndarray, ids: np.ndarray, valid: np.ndarray, row0: int, last: bool
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Add the polygons of strip rows ``[row0, row0 + h)`` (from ``polygonize``) and its ids/validity (h, W).

        Returns an iterator over batches of the polygons that are now final, in pixel coordinates, and their
        class ids: first the strip's own finished polygons, then the components that closed, joined one by one
        (``BATCH_VERTICES`` at most a batch, so that each can be written, and its pieces freed, before the next
        joins). Exhaust it before the next ``add``. After the ``last`` strip nothing stays open.
        """
        row1 = row0 + ids.shape[0]
        ymin, ymax = (shapely.bounds(polygons)[:, k] for k in (1, 3)) if len(polygons) else (EMPTY, EMPTY)
        linked = self._border == row0 and len(self._open) > 0
        top = (ymin == row0) if linked else np.zeros(len(polygons), dtype=bool)
        bottom = (ymax == row1) if not last else np.zeros(len(polygons), dtype=bool)
        done = ~top & ~bottom

        moving = np.flatnonzero(top | bottom)
        comp = np.full(len(polygons), -1, dtype=np.int64)
        comp[moving] = [self._new(polygons[i], int(classes[i])) for i in moving]
        if linked:
            assert self._last_row is not None  # set with the border it links across
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

        self._open, self._open_comp = polygons[bottom], comp[bottom]
        self._border = row1
        self._last_row = (ids[-1].copy(), valid[-1].copy())
        return self._final(polygons[done], classes[done], closing)

    def _final(
        self, polygons: np.ndarray, classes: np.ndarray, closing: list[int]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if len(polygons):
            yield polygons, classes
        joined: list[shapely.Polygon] = []
        joined_classes: list[int] = []
        vertices = 0
        for root in closing:
            joined_classes.append(self._class[root])
            joined.append(self._close(root))
            vertices += int(shapely.get_num_coordinates(joined[-1]))
            if vertices >= BATCH_VERTICES or root == closing[-1]:
                batch = np.empty(len(joined), dtype=object)
                batch[:] = joined
                yield batch, np.asarray(joined_classes, dtype=np.int64)
                joined, joined_classes, vertices = [], [], 0

    @property
    def open_components(self) -> int:
        """Components still waiting for the next strip (0 after the last strip)."""
        return len(self._pieces)
