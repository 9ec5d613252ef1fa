"""Reading a scene: one open GeoTIFF, checked once up front, then read window by window.

``SceneSource`` holds the dataset open for the whole job (re-opening per tile would re-parse the header) and
never reads more than one window: memory does not depend on the scene's size. A GDAL dataset handle must not be
shared between threads, so each thread that reads gets its own handle, opened on its first read (GDAL's block
cache is shared by all of them). The scene may be a local file, a GDAL virtual path (``/vsizip/``, ``/vsis3/``),
a URL, or a STAC item (``cdkd.data.stac``: the assets holding the model's bands, stacked). Every
problem a user can cause is found before any tile runs and named in one line: a file that is not a raster or
whose pixels do not decode, no CRS, too few bands for the model, bands whose wavelengths are not the model's,
a pixel type the model's statistics do not describe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rasterio.errors import RasterioError

from cdkd.data.bandmeta import band_set_of
from cdkd.data.bands import choose_scene_bands
from cdkd.data.files import (
    RasterInfo,
    check_bands,
    open_raster,
    probe_windows,
    read_pixels,
)
from cdkd.data.gdal import gdal_reason, raster_path
from cdkd.data.stac import StacScene, is_stac, stac_scene
from cdkd.data.stats import NormStats, compute_stats
from cdkd.errors import CdkdIOError, CdkdValueError, DataError
from cdkd.inference.tiler import TileWindow, inside, reflect_outside

PROBE = 256  # side of the probe windows read at open: corrupt pixel data fails here, not hours into a job
STATS_MODES = ("model", "scene")


@dataclass(frozen=True)
class SceneInfo:
    """Header facts about a scene, as the report and the writer need them."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: Any  # rasterio CRS
    transform: Any  # affine.Affine
    nodata: float | None


class SceneSource:
    """An open scene, ready to be read one ``TileWindow`` at a time in the model's band order.

    Args:
        path: the GeoTIFF (any GDAL raster with a CRS).
        in_chans: the number of input channels the model takes.
        bands: 1-based scene bands to feed the model, in order (``--bands 3,2,1``); default ``norm.bands``.
            A band may repeat (``1,1,1`` feeds a panchromatic band to an RGB model).
        norm: the model's normalisation statistics; ``stats="scene"`` replaces them by statistics computed once
            from sampled windows of this scene (never per tile: per-tile statistics shift the colours of every
            tile differently and leave seams).
        assets: for a STAC item, the asset keys stacked as its bands (``--assets``); default: the assets that
            hold the model's bands (``cdkd.data.stac.choose_assets``).
    """

    def __init__(
        self,
        path: str | Path,
        in_chans: int,
        norm: NormStats,
        bands: Sequence[int] | None = None,
        stats: str = "model",
        stats_samples: int = 64,
        assets: Sequence[str] | None = None,
    ) -> None:
        self.path = raster_path(path)
        if stats not in STATS_MODES:
            raise CdkdValueError(f"unknown --stats {stats!r}; choose one of {', '.join(STATS_MODES)}")
        self.stac: StacScene | None = None
        if is_stac(path):
            self.stac = stac_scene(path, norm.spectral, in_chans, assets)
        elif assets is not None:
            raise CdkdValueError(f"{self.path}: --assets chooses the assets of a STAC item; this scene is a raster")
        self._src = self._open()
        self._local = threading.local()
        self._local.src = self._src
        self._handles = [self._src]
        self._lock = threading.Lock()
        try:
            self.info = self._check_header()
            self.bands = self._check_bands(in_chans, norm, bands)
            self._probe()
            self.norm = self._norm(norm, stats, stats_samples)
        except BaseException:
            self._src.close()
            raise

    # ---------------------------------------------------------------------------------------------------- checks

    def _check_header(self) -> SceneInfo:
        src = self._src
        if src.crs is None:
            raise DataError(
                f"{self.path}: has no CRS, so its output could not be placed on a map; assign one "
                "(e.g. gdal_edit.py -a_srs EPSG:XXXX) and run again"
            )
        if src.width < 1 or src.height < 1:
            raise DataError(f"{self.path}: has no pixels")
        dtypes = set(src.dtypes)
        if len(dtypes) != 1:
            raise DataError(f"{self.path}: bands of different pixel types {sorted(dtypes)} are not supported")
        if np.dtype(src.dtypes[0]).kind == "c":
            raise DataError(f"{self.path}: complex pixel type {src.dtypes[0]} is not supported")
        return SceneInfo(
            str(self.path), src.width, src.height, src.count, src.dtypes[0], src.crs, src.transform, src.nodata
        )

    def _check_bands(self, in_chans: int, norm: NormStats, bands: Sequence[int] | None) -> tuple[int, ...]:
        mapped = None  # a model that knows its wavelengths reads the scene's bands by wavelength (cdkd.data.bands)
        if norm.spectral is not None:
            mapped = choose_scene_bands(norm.spectral, band_set_of(self._src, self.path), bands, self.path)
        chosen = check_bands(bands) if bands is not None else (mapped or norm.bands)
        if len(chosen) != in_chans:
            raise DataError(
                f"{self.path}: --bands {','.join(map(str, chosen))} gives {len(chosen)} band(s), but "
                f"the model takes {in_chans}"
            )
        if max(chosen) > self.info.count:
            hint = (
                f"; map the scene's bands onto the model's with --bands, e.g. --bands {','.join(['1'] * in_chans)}"
                if bands is None
                else ""
            )
            raise DataError(
                f"{self.path}: has {self.info.count} band(s), but band {max(chosen)} is needed "
                f"(the model reads bands {','.join(map(str, chosen))}){hint}"
            )
        return chosen

    def _probe(self) -> None:
        """Decode the first and last small windows: a header can be intact while the pixel data is broken."""
        for w in probe_windows(self.info.height, self.info.width, PROBE):
            self.read(TileWindow(int(w.row_off), int(w.col_off), int(w.height), int(w.width)))

    def _norm(self, norm: NormStats, stats: str, samples: int) -> NormStats:
        if stats == "scene":
            info = RasterInfo(str(self.path), self.info.width, self.info.height, self.info.count, self.info.dtype)
            try:
                scene = compute_stats([info], self.bands, n_samples=samples, window=512, read=self._read_window)
            except DataError:
                raise DataError(
                    f"{self.path}: no valid pixel in {samples} sampled windows; the scene is empty "
                    "(all nodata) or nearly so"
                ) from None
            return scene
        if norm.dtype != self.info.dtype:
            raise DataError(
                f"{self.path}: pixels are {self.info.dtype} but the model's normalisation statistics "
                f"are for {norm.dtype}; pass --stats scene to normalise with this scene's statistics"
            )
        return NormStats(norm.mean, norm.std, self.bands, norm.dtype, norm.spectral)

    # ---------------------------------------------------------------------------------------------------- reads

    def read(self, window: TileWindow) -> tuple[np.ndarray, np.ndarray]:
        """``(pixels, valid)``: (C, h, w) pixels in the scene's dtype and (h, w) bool validity (GDAL's mask).

        A window reaching past the scene (a plan with an edge margin) reads its part inside the scene, and the
        rest is that part reflected about the scene's edge (``tiler.reflect_outside``), pixels and mask alike."""
        part, pads = inside(window, self.info.height, self.info.width)
        try:
            pixels, valid = read_pixels(self._dataset(), self.bands, part.to_rasterio())
        except (RasterioError, OSError) as e:
            raise CdkdIOError(
                f"{self.path}: cannot read pixels at row {window.row}, col {window.col} ({gdal_reason(e)})"
            ) from None
        return reflect_outside(pixels, pads), reflect_outside(valid, pads)

    def read_normalized(self, window: TileWindow) -> tuple[np.ndarray, np.ndarray]:
        """``(x, valid)``: (C, h, w) float32 normalised pixels, 0 (the mean) where invalid, and validity."""
        pixels, valid = self.read(window)
        return self.norm.normalize(pixels, valid), valid

    def _read_window(
        self, path: str, bands: tuple[int, ...], row: int, col: int, height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``cdkd.data.files.read_window`` on the open scene (a STAC scene has no path that opens alone)."""
        return read_pixels(self._dataset(), bands, TileWindow(row, col, height, width).to_rasterio())

    def _open(self) -> Any:
        return self.stac.open() if self.stac is not None else open_raster(self.path)

    def _dataset(self) -> Any:
        """This thread's handle on the scene."""
        src = getattr(self._local, "src", None)
        if src is None:
            src = self._local.src = self._open()
            with self._lock:
                self._handles.append(src)
        return src

    def close(self) -> None:
        with self._lock:
            for src in self._handles:
                src.close()
            self._handles.clear()

    def __enter__(self) -> SceneSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
