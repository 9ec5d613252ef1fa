"""Input tiles for checking and calibrating exported models: real ones from a folder of images, or synthetic.

Both give what every runtime takes: (N, C, T, T) float32, normalised with the model's ``NormStats``. Real tiles
are cut the way the scene engine sees imagery: pixels normalised, invalid pixels (nodata, alpha, mask) and the
padding of images smaller than a tile set to 0 after normalising, i.e. to the band mean.
``calibration_split`` divides a folder's images into tiles to calibrate an INT8 model on and tiles held out to
check it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdkd.artifacts import InferenceMeta
from cdkd.data.files import RasterInfo, find_rasters, read_window
from cdkd.errors import CdkdIOError, CdkdValueError, DataError
from cdkd.inference.tiler import pad_to_tile

MIN_VALID = 0.5  # a window with fewer valid pixels is redrawn (up to POSITION_TRIES times): nodata says nothing
POSITION_TRIES = 4


def synthetic_tiles(meta: InferenceMeta, n: int, seed: int = 0) -> np.ndarray:
    """``n`` smooth seeded tiles (n, in_chans, T, T) float32 in normalised units (about zero mean, unit std).

    Per band: a few low-frequency plane waves plus Gaussian blobs, i.e. image-like structure with large uniform
    regions and soft edges. Used when no real imagery is given; real tiles are the better check.
    """
    if n < 1:
        raise CdkdValueError(f"number of tiles must be >= 1, got {n}")
    t, c = meta.tile_size, meta.in_chans
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:t, 0:t].astype(np.float32) / t
    out = np.empty((n, c, t, t), dtype=np.float32)
    for i in range(n):
        for b in range(c):
            band = np.zeros((t, t), dtype=np.float32)
            for _ in range(3):
                fy, fx = rng.uniform(-3, 3, size=2)
                band += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
            for _ in range(3):
                cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
                band += rng.uniform(-2, 2) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            out[i, b] = (band - band.mean()) / max(float(band.std()), 1e-6)
    return out


def _usable(folder: Path, meta: InferenceMeta) -> list[RasterInfo]:
    """Files with the model's bands and pixel type: statistics of uint8 imagery mis-scale uint16 by ~100x."""
    rasters = find_rasters(folder, bands=meta.norm.bands)
    same = [r for r in rasters if r.dtype == meta.norm.dtype]
    if not same:
        found = ", ".join(sorted({r.dtype for r in rasters}))
        raise DataError(
            f"{folder}: no image of the model's pixel type {meta.norm.dtype} (found {found}); its "
            f"normalisation was computed on {meta.norm.dtype} imagery"
        )
    return same


def _tile(raster: RasterInfo, meta: InferenceMeta, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """One normalised (C, T, T) tile at a random position of ``raster`` and its fraction of valid pixels."""
    t = meta.tile_size
    h, w = min(t, raster.height), min(t, raster.width)
    best: tuple[np.ndarray, float] | None = None
    for _ in range(POSITION_TRIES):
        row = int(rng.integers(0, raster.height - h + 1))
        col = int(rng.integers(0, raster.width - w + 1))
        pixels, valid = read_window(raster.path, meta.norm.bands, row, col, h, w)
        x = meta.norm.normalize(pixels, valid)
        frac = float(valid.mean())
        if best is None or frac > best[1]:
            best = (x, frac)
        if frac >= MIN_VALID:
            break
    x, frac = best  # type: ignore[misc]
    padded, _ = pad_to_tile(x, t, mode="constant", value=0)
    return padded, frac


def _draw(
    rasters: list[RasterInfo], meta: InferenceMeta, n: int, rng: np.random.Generator, folder: Path
) -> tuple[np.ndarray, list[str]]:
    """``n`` tiles from ``rasters``, visited in a seeded random order, one tile each, cycling when ``n`` exceeds
    their number; an unreadable file is dropped with one warning."""
    order = [rasters[i] for i in rng.permutation(len(rasters))]
    tiles: list[np.ndarray] = []
    used: list[str] = []
    broken: list[str] = []
    i = 0
    while len(tiles) < n and order:
        raster = order[i % len(order)]
        try:
            tile, _ = _tile(raster, meta, rng)
        except CdkdIOError as e:  # the probe in find_rasters reads only two corners; the rest may be broken
            broken.append(f"{e}")
            order.remove(raster)
            continue
        tiles.append(tile)
        if raster.path not in used:
            used.append(raster.path)
        i += 1
    if broken:
        warnings.warn(
            f"skipped {len(broken)} unreadable file(s) in {folder} (first: {broken[0]})", UserWarning, stacklevel=3
        )
    if not tiles:
        raise DataError(f"{folder}: no readable image to cut tiles from ({broken[0] if broken else 'none found'})")
    return np.stack(tiles).astype(np.float32, copy=False), used


def real_tiles(folder: str | Path, meta: InferenceMeta, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` normalised tiles (n, in_chans, T, T) float32 from the images under ``folder``, and the files used.

    Files (those with the model's bands and pixel type) are visited in a seeded random order, one tile each,
    cycling when ``n`` exceeds their number; each tile comes from a random position with at least half its
    pixels valid where one is found. A file whose pixels cannot be read is skipped with one warning.

    Raises:
        DataError: no usable image under ``folder``. CdkdValueError: ``n`` < 1.
    """
    if n < 1:
        raise CdkdValueError(f"number of tiles must be >= 1, got {n}")
    folder = Path(folder)
    return _draw(_usable(folder, meta), meta, n, np.random.default_rng(seed), folder)


@dataclass(frozen=True)
class CalibrationSplit:
    """Tiles to calibrate a quantized model on and tiles held out to check it, all (N, C, T, T) float32, normalised.

    ``disjoint``: the held tiles come from other files than the calibration tiles (False only when ``folder``
    holds a single usable image: then they are other positions of it).
    """

    calib: np.ndarray
    held: np.ndarray
    calib_files: tuple[str, ...]
    held_files: tuple[str, ...]
    disjoint: bool


def calibration_split(
    folder: str | Path, meta: InferenceMeta, n_calib: int, n_held: int, seed: int = 0
) -> CalibrationSplit:
    """``n_calib`` calibration tiles and ``n_held`` held-out check tiles from the images under ``folder``.

    The usable files are shuffled (seeded) and split in proportion to ``n_calib`` : ``n_held`` (at least one
    file on each side), so no held tile shares a file with a calibration tile: a check on them says how the
    quantized model does on imagery its ranges were not fitted to. Tiles are cut and normalised as by
    ``real_tiles``.

    Raises:
        DataError: no usable image under ``folder``. CdkdValueError: a count < 1.
    """
    for name, value in (("calibration tiles", n_calib), ("held-out check tiles", n_held)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CdkdValueError(f"number of {name} must be an integer >= 1, got {value!r}")
    folder = Path(folder)
    rasters = _usable(folder, meta)
    rng = np.random.default_rng(seed)
    if len(rasters) == 1:
        calib, calib_files = _draw(rasters, meta, n_calib, rng, folder)
        held, held_files = _draw(rasters, meta, n_held, rng, folder)
        return CalibrationSplit(calib, held, tuple(calib_files), tuple(held_files), disjoint=False)
    order = [rasters[i] for i in rng.permutation(len(rasters))]
    n_files = min(len(order) - 1, max(1, round(len(order) * n_held / (n_calib + n_held))))
    held, held_files = _draw(order[:n_files], meta, n_held, rng, folder)
    calib, calib_files = _draw(order[n_files:], meta, n_calib, rng, folder)
    return CalibrationSplit(calib, held, tuple(calib_files), tuple(held_files), disjoint=True)
