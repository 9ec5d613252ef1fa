"""Writing the class raster (and optional confidence raster) row band by row band, then as a Cloud-Optimized GeoTIFF.

Rows stream into a tiled, DEFLATE-compressed working GeoTIFF as soon as they are final, so nothing scene-sized is
held in memory. The working file is closed at every checkpoint, so an interrupted job leaves a consistent file
that ``--resume`` reopens. When the scene is done, overviews are built (mode resampling: an overview pixel shows
the most frequent class beneath it, not an average of class ids) and GDAL's COG driver lays the file out as a
COG (512-px blocks, DEFLATE with predictor, overviews) under a temporary name renamed into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from cdkd.data.classes import ClassSchema
from cdkd.errors import CdkdIOError
from cdkd.scene.classraster import NODATA, write_class_metadata
from cdkd.scene.source import SceneInfo
from cdkd.utils.atomic import atomic_path

BLOCK = 512
CONFIDENCE_NODATA = 0  # confidence is round(255 * max softmax) >= 255 / K >= 1 wherever a pixel is valid


def _profile(info: SceneInfo, nodata: int) -> dict[str, Any]:
    return dict(driver="GTiff", width=info.width, height=info.height, count=1, dtype="uint8", crs=info.crs,
                transform=info.transform, nodata=nodata, tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
                compress="deflate", predictor=2, BIGTIFF="IF_SAFER")


def overview_factors(width: int, height: int, smallest: int = BLOCK) -> list[int]:
    """2, 4, 8, ... until the overview fits in one ``smallest`` px block (none for a scene that already does)."""
    factors, f = [], 2
    while max(width, height) / (f // 2) > smallest:
        factors.append(f)
        f *= 2
    return factors


class RasterWriter:
    """One uint8 output band written by row bands into a working GeoTIFF, finished as a COG."""

    def __init__(self, work: Path, info: SceneInfo, nodata: int, schema: ClassSchema | None, resume: bool) -> None:
        self.work, self.info, self.schema = work, info, schema
        try:
            if resume:
                self._dst = rasterio.open(work, "r+")
            else:
                self._dst = rasterio.open(work, "w", **_profile(info, nodata))
                if schema is not None:
                    write_class_metadata(self._dst, schema)
        except (RasterioError, OSError) as e:
            raise CdkdIOError(f"{work}: cannot open the working output ({e})") from None

    def write(self, row: int, values: np.ndarray) -> None:
        """Write (n, W) uint8 ``values`` at image rows ``[row, row + n)``."""
        self._dst.write(values, 1, window=Window(0, row, self.info.width, values.shape[0]))

    def checkpoint(self) -> None:
        """Flush everything to disk: closing is the only way rasterio guarantees it; reopen for update."""
        self._dst.close()
        self._dst = rasterio.open(self.work, "r+")

    def finish(self, out: Path) -> None:
        """Build mode overviews and write ``out`` as a COG (temporary name, then rename)."""
        self._dst.close()
        with rasterio.open(self.work, "r+") as dst:
            factors = overview_factors(dst.width, dst.height)
            if factors:
                dst.build_overviews(factors, Resampling.mode if self.schema is not None else Resampling.average)
        with atomic_path(out) as tmp:
            # FORCE_USE_EXISTING keeps our mode overviews; the COG driver would otherwise resample its own
            rasterio.shutil.copy(self.work, tmp, driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES",
                                 BLOCKSIZE=BLOCK, OVERVIEWS="FORCE_USE_EXISTING", BIGTIFF="IF_SAFER")

    def close(self) -> None:
        if not self._dst.closed:
            self._dst.close()


def confidence_raster(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(K, n, W) blended logits -> (n, W) uint8 ``round(255 * max softmax)``, ``CONFIDENCE_NODATA`` if invalid."""
    z = logits - logits.max(axis=0, keepdims=True)
    p = 1.0 / np.exp(z).sum(axis=0)  # the max class's softmax: exp(0) / sum exp
    conf = np.clip(np.rint(255.0 * p), 1, 255).astype(np.uint8)
    conf[~valid] = CONFIDENCE_NODATA
    return conf


__all__ = ["NODATA", "CONFIDENCE_NODATA", "RasterWriter", "confidence_raster", "overview_factors"]
