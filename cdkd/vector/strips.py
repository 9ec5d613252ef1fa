"""Planning the horizontal strips that ``cdkd vectorize`` reads a class raster in.

Pure functions of the raster size, as ``cdkd.inference.tiler`` plans tiles: nothing here reads pixels. A strip is a
band of whole rows: its *core* rows are the ones it polygonises, and the rows it *reads* add a halo above and
below for the sieve (``cdkd.vector.sieve``), which must see every small region whole. Rows are 0-based pixel
rows from the top; ``row1``/``read1`` are exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdkd.errors import CdkdValueError

# default strip size: ~2 M pixels (256 rows of an 8192 px wide scene). The raster costs a few bytes a pixel; the
# strip's polygons (held by GDAL, then as arrays, then as shapely geometries) cost more, so smaller strips save
# memory, while each border adds merging work. bench/vectorize.py's 8192 x 8192 scene: peak RSS 496 / 544 / 602
# MB and CPU 38 / 35 / 30 s at 256 / 512 / 1024 rows; 256 keeps the peak under gdal_polygonize's.
STRIP_PIXELS = 1 << 21
MIN_STRIP_ROWS = 16


@dataclass(frozen=True)
class Strip:
    """Rows ``[row0, row1)`` are polygonised; rows ``[read0, read1)`` (the core plus the halo) are read."""

    index: int
    row0: int
    row1: int
    read0: int
    read1: int

    @property
    def core(self) -> slice:
        """The core rows within an array of the rows read: ``read_array[strip.core]``."""
        return slice(self.row0 - self.read0, self.row1 - self.read0)

    @property
    def rows(self) -> int:
        return self.row1 - self.row0


def default_window_rows(width: int) -> int:
    """Rows per strip so that one strip holds about ``STRIP_PIXELS`` pixels (at least ``MIN_STRIP_ROWS`` rows)."""
    return max(MIN_STRIP_ROWS, STRIP_PIXELS // max(width, 1))


def plan_strips(height: int, window_rows: int, halo: int = 0) -> list[Strip]:
    """Strips of ``window_rows`` core rows covering ``height`` rows top to bottom (the last may be shorter).

    ``halo`` extra rows are read above and below each core, clipped at the raster's top and bottom.
    """
    if height <= 0:
        raise CdkdValueError(f"raster height must be > 0 rows, got {height}")
    if isinstance(window_rows, bool) or not isinstance(window_rows, int) or window_rows <= 0:
        raise CdkdValueError(f"window_rows must be a positive integer, got {window_rows!r}")
    if halo < 0:
        raise CdkdValueError(f"halo must be >= 0 rows, got {halo}")
    strips = []
    for index, row0 in enumerate(range(0, height, window_rows)):
        row1 = min(row0 + window_rows, height)
        strips.append(Strip(index, row0, row1, max(0, row0 - halo), min(height, row1 + halo)))
    return strips
