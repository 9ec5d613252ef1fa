"""Per-class ground areas of a class raster, tallied band of rows by band of rows (``ClassAreaTally``).

A scene's class pixels are counted as the engine finishes them, and each pixel counts with its own ground area
(``cdkd.geodesy.PixelAreas``: exact per row, by column block where areas also vary across a row), not with the
scene's mean pixel area: in a geographic or Web Mercator scene pixels shrink towards the poles (a 50 km tall
EPSG:3857 scene at 47° N: +-0.8 % from top to bottom; a continental one: tens of %).

Bands of rows may arrive in any order, from several workers (``merge`` two tallies over disjoint rows), and
across an interruption (``state`` / ``from_state``, JSON for a resume checkpoint). Rows already tallied are
refused, so a band replayed after a resume is never counted twice.

Cost per band of ``n`` rows: one ``np.bincount`` over its pixels (rows x blocks x classes bins) and an
(n x blocks) interpolation of pixel areas; building ``PixelAreas`` once costs at most ~2049 x blocks geodesic
areas (~15 µs each: 30 ms for a north-up scene, which has one block).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from cdkd.data.classraster import NODATA
from cdkd.errors import CdkdValueError, CheckpointError
from cdkd.geodesy import PixelAreas

STATE_FORMAT = "cdkd-class-area-tally/1"
CHUNK_PIXELS = 1 << 20  # pixels per bincount: bounds the int64 keys' transient memory to 8 MB


def _grid_key(crs: Any, transform: Any, width: int, height: int) -> dict[str, Any]:
    """What the pixel areas depend on, for checking that a state belongs to this raster."""
    wkt = crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs)
    return {
        "crs_sha1": hashlib.sha1(wkt.encode()).hexdigest(),
        "transform": [float(v) for v in tuple(transform)[:6]],
        "width": int(width),
        "height": int(height),
    }


class ClassAreaTally:
    """Pixels and ground area (m²) per class of a ``width`` x ``height`` class raster in ``crs``/``transform``.

    Attributes:
        pixels: (K,) int64 pixel count per class.
        area_m2: (K,) float64 ground area per class (sums of per-pixel geodesic areas).
        rows_done: sorted, disjoint [start, stop) row ranges tallied so far.
    """

    def __init__(
        self, num_classes: int, crs: Any, transform: Any, width: int, height: int, *, areas: PixelAreas | None = None
    ) -> None:
        if not 0 < num_classes <= NODATA:
            raise CdkdValueError(f"num_classes must be 1..{NODATA}, got {num_classes}")
        self.num_classes = int(num_classes)
        self.grid = _grid_key(crs, transform, width, height)
        self.width, self.height = int(width), int(height)
        self.areas = areas if areas is not None else PixelAreas(crs, transform, width, height)
        self.pixels = np.zeros(self.num_classes, dtype=np.int64)
        self.area_m2 = np.zeros(self.num_classes, dtype=np.float64)
        self.rows_done: list[list[int]] = []

    # ----------------------------------------------------------------------------------------------------------
    # tallying

    def add(self, top: int, classes: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Tally image rows ``[top, top + n)``: ``classes`` (n, W) integer class ids (``NODATA`` = 255: no class);
        ``valid`` (n, W) bool, optional: False marks more pixels as no class.

        Raises:
            CdkdValueError: a band outside the raster, of the wrong width, overlapping rows already tallied, or
                holding an id that is neither a class nor ``NODATA``.
        """
        classes = np.asarray(classes)
        if classes.ndim != 2 or classes.shape[1] != self.width:
            raise CdkdValueError(f"classes must be (rows, {self.width}), got {classes.shape}")
        n = classes.shape[0]
        if top < 0 or top + n > self.height:
            raise CdkdValueError(f"rows {top}..{top + n - 1} lie outside the raster's {self.height} rows")
        if n == 0:
            return
        k = self.num_classes
        ids = classes if valid is None else np.where(valid, classes, NODATA)
        bad = (ids >= k) & (ids != NODATA) | (ids < 0)
        if bad.any():
            raise CdkdValueError(
                f"rows {top}..{top + n - 1}: class id {int(ids[bad][0])} is neither 0..{k - 1} nor nodata ({NODATA})"
            )
        self._claim(top, top + n)
        blocks, block_of_column = self.areas.blocks, self.areas.block_of_column
        area = self.areas.rows(top, n)  # (n, blocks) m² per pixel
        step = max(1, CHUNK_PIXELS // self.width)
        for r0 in range(0, n, step):
            chunk = np.minimum(ids[r0 : r0 + step], k).astype(np.int64)  # nodata -> bin k, dropped below
            m = chunk.shape[0]
            cell = np.arange(m)[:, None] * blocks + (block_of_column if blocks > 1 else 0)  # (row, block) index
            counts = np.bincount((cell * (k + 1) + chunk).ravel(), minlength=m * blocks * (k + 1))
            counts = counts.reshape(m * blocks, k + 1)[:, :k]
            self.pixels += counts.sum(0)
            self.area_m2 += area[r0 : r0 + m].reshape(-1) @ counts

    def _claim(self, start: int, stop: int) -> None:
        """Record rows [start, stop) as tallied; refuse any overlap with rows already tallied."""
        for a, b in self.rows_done:
            if start < b and a < stop:
                raise CdkdValueError(f"rows {max(a, start)}..{min(b, stop) - 1} are already tallied")
        self.rows_done = _merged(self.rows_done + [[start, stop]])

    def merge(self, other: ClassAreaTally) -> None:
        """Add ``other``, a tally of the same raster over rows disjoint from this one's (a dask block's)."""
        if other.grid != self.grid or other.num_classes != self.num_classes:
            raise CdkdValueError("cannot merge tallies of different rasters or class counts")
        for start, stop in other.rows_done:
            self._claim(start, stop)
        self.pixels += other.pixels
        self.area_m2 += other.area_m2

    @property
    def complete(self) -> bool:
        """True once every row of the raster has been tallied."""
        return self.rows_done == [[0, self.height]]

    # ----------------------------------------------------------------------------------------------------------
    # resume state

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (floats round-trip exactly through ``json``)."""
        return {
            "format": STATE_FORMAT,
            "grid": self.grid,
            "num_classes": self.num_classes,
            "pixels": self.pixels.tolist(),
            "area_m2": self.area_m2.tolist(),
            "rows_done": [list(r) for r in self.rows_done],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], crs: Any, transform: Any, width: int, height: int) -> ClassAreaTally:
        """The tally ``state()`` saved, for the same raster; a mismatch is a ``CheckpointError``."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError("not a cdkd class-area tally state")
        if state["grid"] != _grid_key(crs, transform, width, height):
            raise CheckpointError(
                "the class-area tally state belongs to another raster (CRS, transform or size changed)"
            )
        tally = cls(int(state["num_classes"]), crs, transform, width, height)
        tally.pixels = np.asarray(state["pixels"], dtype=np.int64)
        tally.area_m2 = np.asarray(state["area_m2"], dtype=np.float64)
        tally.rows_done = _merged([[int(a), int(b)] for a, b in state["rows_done"]])
        if tally.pixels.shape != (tally.num_classes,) or tally.area_m2.shape != (tally.num_classes,):
            raise CheckpointError("the class-area tally state has the wrong number of classes")
        return tally


def _merged(ranges: list[list[int]]) -> list[list[int]]:
    """Sorted [start, stop) ranges with touching ones joined."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out
