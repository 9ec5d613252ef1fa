"""Blending the predictions of overlapping tiles into one seamless output.

A ViT segmenter sees less context near a tile's border, so its logits there are less reliable and differ from
the neighbouring tile's: averaging with equal weights leaves visible seams. Each tile's logits are instead
weighted by a window that is 1 in the interior and falls off smoothly (raised cosine) across the overlap band,
and the weighted sum is divided by the sum of weights. With the regular stride ``tile - overlap`` the cosine
ramps of two neighbours sum to 1 in their overlap, and the normalisation makes the result exact wherever the
plan is irregular (the last, shifted window) or a pixel is covered by one window only (image borders).
"""

from __future__ import annotations

import numpy as np

from cdkd.errors import CdkdValueError
from cdkd.scene.tiler import TileWindow, _as_int, _check_tiling

BLEND_KINDS = ("cosine", "flat")


def _ramp(tile: int, overlap: int) -> np.ndarray:
    """(tile,) float64 1-D profile: Hann ramp up over the first ``overlap`` pixels, down over the last, 1 between.

    Pixel ``i`` of the rising ramp gets ``0.5 - 0.5 cos(pi (i + 0.5) / overlap)``, sampled at pixel centres so
    that the ramp is symmetric and two neighbours' ramps (one rising, one falling, ``overlap`` pixels) sum to
    exactly 1. When ``overlap > tile / 2`` the two ramps meet; the lower one wins, so the profile stays
    symmetric and peaks in the middle.
    """
    i = np.arange(tile, dtype=np.float64)
    rise = np.clip((i + 0.5) / overlap, 0.0, 1.0)  # 0..1 across the band, 1 beyond it
    up = 0.5 - 0.5 * np.cos(np.pi * rise)
    return np.minimum(up, up[::-1])


def blend_weights(tile: int, overlap: int, kind: str = "cosine", eps: float = 1e-3) -> np.ndarray:
    """(tile, tile) float32 weights for one tile's logits.

    ``"cosine"``: the outer product of a 1-D profile that is exactly 1 in the interior and a raised-cosine
    (Hann) ramp across the ``overlap`` band at each border. The profile is floored at ``sqrt(eps)``, so the
    weights never fall below ``eps`` (reached in the corners): a pixel covered by one window only (at the image
    border) still gets a well-defined normalised value. Flooring the profile rather than the product keeps the
    weights exactly separable, so along an image border two neighbours still blend in the same proportions as
    in the rows further in. ``"flat"``: all ones (plain averaging, for tests and comparison). ``overlap == 0``
    gives all ones for either kind.
    """
    tile, overlap = _check_tiling(tile, overlap)
    if kind not in BLEND_KINDS:
        raise CdkdValueError(f"unknown blend kind {kind!r}; choose one of {', '.join(BLEND_KINDS)}")
    if not 0.0 < eps <= 1.0:
        raise CdkdValueError(f"eps must satisfy 0 < eps <= 1, got eps={eps}")
    if kind == "flat" or overlap == 0:
        return np.ones((tile, tile), dtype=np.float32)
    profile = np.maximum(_ramp(tile, overlap), np.sqrt(eps))
    # sqrt(eps) ** 2 may round a hair below eps; the clip makes the documented bound exact
    return np.maximum(np.outer(profile, profile), eps).astype(np.float32)


class LogitAccumulator:
    """Weighted sum of tile logits over a whole in-memory (K, H, W) output.

    Add every window of ``plan_windows(height, width, ...)`` with its (K, h, w) logits and (h, w) weights, then
    read ``result()`` (the weighted mean, (K, H, W) float32) or ``argmax()`` ((H, W) int64 class indices).
    Sums are kept in float32: the weights are <= 1 and a pixel is covered by at most a handful of windows, so
    float32 keeps ~1e-7 relative precision at the cost of half the memory of float64.
    """

    def __init__(self, num_classes: int, height: int, width: int) -> None:
        num_classes = _as_int("num_classes", num_classes)
        height = _as_int("height", height)
        width = _as_int("width", width)
        if num_classes <= 0 or height <= 0 or width <= 0:
            raise CdkdValueError(
                f"accumulator needs num_classes, height and width > 0, got {num_classes}, {height}, {width}"
            )
        self.num_classes, self.height, self.width = num_classes, height, width
        self.logit_sum = np.zeros((num_classes, height, width), dtype=np.float32)
        self.weight_sum = np.zeros((height, width), dtype=np.float32)

    def add(self, window: TileWindow, logits: np.ndarray, weights: np.ndarray) -> None:
        """Accumulate (K, h, w) ``logits`` weighted by (h, w) ``weights`` at ``window`` (h, w = window size)."""
        if window.row + window.height > self.height or window.col + window.width > self.width:
            raise CdkdValueError(f"{window} runs past the {self.height}x{self.width} output")
        expected = (self.num_classes, window.height, window.width)
        if logits.shape != expected:
            raise CdkdValueError(f"logits for {window} have shape {logits.shape}, expected {expected}")
        if weights.shape != window.shape:
            raise CdkdValueError(f"weights for {window} have shape {weights.shape}, expected {window.shape}")
        rows, cols = window.slices
        weights = np.asarray(weights, dtype=np.float32)
        self.logit_sum[:, rows, cols] += np.asarray(logits, dtype=np.float32) * weights
        self.weight_sum[rows, cols] += weights

    def result(self) -> np.ndarray:
        """(K, H, W) float32 weighted-mean logits; CdkdValueError if some pixel was covered by no window."""
        uncovered = int(np.count_nonzero(self.weight_sum <= 0))
        if uncovered:
            raise CdkdValueError(
                f"{uncovered} of {self.height * self.width} output pixels were covered by no window "
                "(add every window of plan_windows over the same height and width)"
            )
        return self.logit_sum / self.weight_sum

    def argmax(self) -> np.ndarray:
        """(H, W) int64 class index of the largest blended logit per pixel."""
        return self.result().argmax(axis=0)


class RowBandAccumulator:
    """Weighted sum of tile logits over a band of rows that slides down a scene: what keeps memory flat.

    The streaming engine processes one row of windows at a time (``tiler.plan_rows``). Windows of row ``i`` start
    at image row ``top`` and span ``tile`` rows, so the band holds rows ``[top, top + tile)`` only: (K, tile, W)
    float32 sums, whatever the scene's height. Once row ``i`` is added, the rows above the next window row's
    offset are final: ``pop(next_top)`` returns their blended logits and moves the band down, keeping the
    partial sums of the rows that the next windows overlap.
    """

    def __init__(self, num_classes: int, band_height: int, width: int, top: int = 0) -> None:
        self.num_classes, self.band_height, self.width, self.top = num_classes, band_height, width, top
        self.logit_sum = np.zeros((num_classes, band_height, width), dtype=np.float32)
        self.weight_sum = np.zeros((band_height, width), dtype=np.float32)
        self.valid = np.zeros((band_height, width), dtype=bool)

    def _rows(self, window: TileWindow) -> slice:
        r0 = window.row - self.top
        if r0 < 0 or r0 + window.height > self.band_height or window.col + window.width > self.width:
            raise CdkdValueError(f"{window} lies outside the band of rows {self.top}..{self.top + self.band_height}")
        return slice(r0, r0 + window.height)

    def add_valid(self, window: TileWindow, valid: np.ndarray) -> None:
        """Mark the (h, w) ``valid`` pixels of ``window`` (every window's, including those with no valid pixel)."""
        self.valid[self._rows(window), window.col : window.col + window.width] |= valid

    def add(self, window: TileWindow, logits: np.ndarray, weights: np.ndarray) -> None:
        """Accumulate (K, h, w) ``logits`` weighted by (h, w) ``weights`` at ``window``."""
        rows, cols = self._rows(window), slice(window.col, window.col + window.width)
        self.logit_sum[:, rows, cols] += logits * weights
        self.weight_sum[rows, cols] += weights

    def pop(self, next_top: int) -> tuple[np.ndarray, np.ndarray]:
        """Final rows ``[top, next_top)``: ((K, n, W) blended logits, (n, W) validity); the band moves down.

        Pixels no window predicted (only those of skipped, all-invalid windows) get logits 0; they are invalid.
        """
        n = next_top - self.top
        if not 0 < n <= self.band_height:
            raise CdkdValueError(f"cannot pop rows {self.top}..{next_top} from a band of {self.band_height} rows")
        weight = self.weight_sum[:n]
        logits = np.divide(self.logit_sum[:, :n], weight, out=np.zeros_like(self.logit_sum[:, :n]),
                           where=weight > 0)
        valid = self.valid[:n].copy()
        # slide: the rows below next_top move up, the freed rows at the bottom start empty
        for array in (self.logit_sum, self.weight_sum, self.valid):
            array[..., : self.band_height - n, :] = array[..., n:, :]
            array[..., self.band_height - n :, :] = 0
        self.top = next_top
        return logits, valid

    def state(self) -> dict[str, np.ndarray]:
        """The partial sums, for checkpointing (``from_state`` restores them)."""
        return {"logit_sum": self.logit_sum, "weight_sum": self.weight_sum, "valid": self.valid,
                "top": np.asarray(self.top)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> RowBandAccumulator:
        k, h, w = state["logit_sum"].shape
        acc = cls(k, h, w, int(state["top"]))
        acc.logit_sum[:], acc.weight_sum[:], acc.valid[:] = state["logit_sum"], state["weight_sum"], state["valid"]
        return acc
