"""Overviews built while the rows stream out, so the COG needs no second pass to resample them.

GDAL's ``BuildOverviews(MODE)`` re-reads the whole class raster and was most of the time an engine with a free
model spent writing (about 3 s per 67 Mpx on one core). Here each finished band of rows is reduced 2 x 2 as it
arrives, level by level (factor 2 from the full raster, 4 from level 2, ...), with a leftover row carried to the
next band when a band has an odd number of rows. Overview sizes follow GDAL's: ``ceil(size / factor)``.

- class ids: ``mode`` of the (up to four) valid pixels below, ties to the first in reading order (upper-left,
  upper-right, lower-left, lower-right); nodata only where all four are nodata. A mode of modes, as GDAL's
  iterative overviews are, not the mode over all ``factor**2`` pixels.
- confidence: the rounded mean of the valid pixels below.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cdkd.errors import CdkdValueError

KINDS = ("mode", "mean")


def _quads(rows: np.ndarray, nodata: int) -> np.ndarray:
    """(4, n/2, ceil(W/2)) the upper-left, upper-right, lower-left, lower-right pixel of each 2 x 2 block.

    ``rows`` has an even number of rows; an odd width is padded with ``nodata``."""
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, np.full((rows.shape[0], 1), nodata, rows.dtype)], axis=1)
    return np.stack([rows[0::2, 0::2], rows[0::2, 1::2], rows[1::2, 0::2], rows[1::2, 1::2]])


def reduce_mode(rows: np.ndarray, nodata: int) -> np.ndarray:
    """(n, W) uint8 class ids, n even -> (n/2, ceil(W/2)) 2 x 2 modes (see the module for ties and nodata).

    Most blocks of a class raster hold one class: those are copied, and the counting runs on the rest only.
    """
    q = _quads(rows, nodata)
    out = q[0].copy()
    mixed = (q[0] != q[1]) | (q[0] != q[2]) | (q[0] != q[3])
    if not mixed.any():
        return out
    m = q[:, mixed]  # (4, number of mixed blocks)
    same: dict[tuple[int, ...], Any] = {(i, j): m[i] == m[j] for i in range(4) for j in range(i + 1, 4)}
    counts = np.stack(
        [
            sum((same[tuple(sorted((i, j)))] for j in range(4) if j != i), np.zeros(m.shape[1], np.int8))
            for i in range(4)
        ]
    )
    counts[m == nodata] = -1
    pick = counts.argmax(axis=0)  # first of the most frequent: ties go to the earlier pixel
    out[mixed] = np.take_along_axis(m, pick[None], axis=0)[0]
    return out


def reduce_mean(rows: np.ndarray, nodata: int) -> np.ndarray:
    """(n, W) uint8 values, n even -> (n/2, ceil(W/2)) rounded means of the valid values; ``nodata`` if none."""
    q = _quads(rows, nodata)
    valid = q != nodata
    n = valid.sum(axis=0, dtype=np.uint16)
    total = q.sum(axis=0, dtype=np.uint16) - nodata * (4 - n)  # nodata pixels taken out of the sum
    out = ((2 * total + n) // np.maximum(2 * n, 1)).astype(np.uint8)  # round half up
    out[n == 0] = nodata
    return out


class Pyramid:
    """Overview levels of one uint8 band, fed final rows top to bottom, emitting overview rows as they complete.

    ``push(rows)`` returns ``[(level, top, rows), ...]`` (level 1 = factor 2) ready to be written; ``finish()``
    flushes the leftover rows at the bottom. ``state()``/``from_state`` carry the leftovers across a resume.
    """

    def __init__(self, width: int, height: int, levels: int, kind: str, nodata: int) -> None:
        if kind not in KINDS:
            raise CdkdValueError(f"unknown overview kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.width, self.height, self.levels, self.kind, self.nodata = width, height, levels, kind, nodata
        self._reduce = reduce_mode if kind == "mode" else reduce_mean
        self.leftover: list[np.ndarray | None] = [None] * levels  # per level: one row waiting for its pair
        self.next_top = [0] * (levels + 1)  # per level (0 = full raster): the next row to arrive

    def push(self, rows: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        out: list[tuple[int, int, np.ndarray]] = []
        self._push(0, rows, out)
        return out

    def _push(self, level: int, rows: np.ndarray, out: list) -> None:
        self.next_top[level] += rows.shape[0]
        if level == self.levels or rows.shape[0] == 0:
            return
        if self.leftover[level] is not None:
            rows = np.concatenate([self.leftover[level], rows])
            self.leftover[level] = None
        if rows.shape[0] % 2:
            self.leftover[level] = rows[-1:].copy()
            rows = rows[:-1]
        if rows.shape[0]:
            reduced = self._reduce(rows, self.nodata)
            out.append((level + 1, self.next_top[level + 1], reduced))
            self._push(level + 1, reduced, out)

    def finish(self) -> list[tuple[int, int, np.ndarray]]:
        """Rows still waiting at the bottom (an odd last row pairs with nodata), top level last."""
        out: list[tuple[int, int, np.ndarray]] = []
        for level in range(self.levels):
            if self.leftover[level] is not None:
                row = self.leftover[level]
                self.leftover[level] = None
                reduced = self._reduce(np.concatenate([row, np.full_like(row, self.nodata)]), self.nodata)
                out.append((level + 1, self.next_top[level + 1], reduced))
                self._push(level + 1, reduced, out)
        return out

    def state(self) -> dict[str, Any]:
        arrays = {f"leftover_{i}": row for i, row in enumerate(self.leftover) if row is not None}
        return {"next_top": list(self.next_top), **arrays}

    def restore(self, state: dict[str, Any]) -> None:
        self.next_top = [int(v) for v in state["next_top"]]
        self.leftover = [
            np.asarray(state[f"leftover_{i}"]) if f"leftover_{i}" in state else None for i in range(self.levels)
        ]
