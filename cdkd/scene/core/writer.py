"""Writing class rasters: finished rows -> row-chunk GeoTIFFs (+ overviews streamed alongside) -> one COG.

Each band of finished rows becomes a small closed GeoTIFF (``OUT.partial/<layer>/L0_<top>.tif``, ZSTD: cheap to
write, decoded once), and its 2 x 2 overviews are reduced as it arrives (``pyramid.Pyramid``) and written the same
way per level. A finished chunk never changes, so a checkpoint needs no flush of a half-written file and a cluster
worker can write its own chunks. At the end a VRT stitches the chunks (its ``<Overview>`` elements point at the
levels' VRTs) and GDAL's COG driver writes the final file in one multi-threaded pass (``NUM_THREADS``), keeping
those overviews (``OVERVIEWS=FORCE_USE_EXISTING``) instead of resampling the whole raster again. The colour table,
class tags and nodata travel in the VRT; the GIS legend sidecar (``classraster.write_gis_legend``) is written
beside the final file.

``SceneWriter`` runs all of this in a background thread fed by a bounded queue, so compression and overviews
overlap the model; checkpoints pass through the same queue, so a saved state never runs ahead of the rows on disk.
"""

from __future__ import annotations

import queue
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import RasterioError
from rasterio.transform import Affine

from cdkd.data.classes import ClassSchema
from cdkd.data.classraster import NODATA, class_tags, colormap, write_gis_legend
from cdkd.errors import CdkdIOError
from cdkd.inference.rowblend import CONFIDENCE_NODATA, FinishedRows
from cdkd.scene.core.pyramid import Pyramid
from cdkd.scene.core.source import SceneInfo
from cdkd.utils.atomic import atomic_path

BLOCK = 512
OVERVIEW_CHUNK_ROWS = BLOCK  # overview rows are gathered into chunks of at least this many rows
VRT_OPEN_SOURCES = 8  # chunk files a VRT keeps open while the COG is written
QUEUE_ITEMS = 4  # finished bands waiting for the writer: bounds memory when writing falls behind
CHUNK_PROFILE = dict(
    driver="GTiff",
    count=1,
    dtype="uint8",
    tiled=True,
    blockxsize=BLOCK,
    blockysize=BLOCK,
    compress="zstd",
    zstd_level=1,
)
COG_OPTIONS = dict(
    driver="COG",
    COMPRESS="DEFLATE",
    PREDICTOR="YES",
    BLOCKSIZE=BLOCK,
    BIGTIFF="IF_SAFER",
    OVERVIEWS="FORCE_USE_EXISTING",
    NUM_THREADS="ALL_CPUS",
)


def overview_factors(width: int, height: int, smallest: int = BLOCK) -> list[int]:
    """2, 4, 8, ... until the overview fits in one ``smallest`` px block (none for a scene that already does)."""
    factors, f = [], 2
    while max(width, height) / (f // 2) > smallest:
        factors.append(f)
        f *= 2
    return factors


@dataclass(frozen=True)
class Layer:
    """One output raster: ``classes`` (mode overviews, colour table and class tags) or ``confidence`` (means)."""

    name: str
    nodata: int
    schema: ClassSchema | None = None

    @property
    def overview_kind(self) -> str:
        return "mode" if self.schema is not None else "mean"


def class_layers(schema: ClassSchema, probs: bool) -> list[Layer]:
    layers = [Layer("classes", NODATA, schema)]
    if probs:
        layers.append(Layer("confidence", CONFIDENCE_NODATA))
    return layers


def chunk_transform(transform: Affine, level: int, top: int) -> Affine:
    """The georeferencing of a chunk whose first row is row ``top`` of overview ``level`` (0: full resolution).

    The VRT places chunks by pixel rectangles and ignores it; it is written so that a chunk file is a correct
    GeoTIFF (and GDAL has no "no geotransform" warning to print while a scene runs)."""
    return transform @ Affine.scale(2**level) @ Affine.translation(0, top)


def write_chunk(path: Path, rows: np.ndarray, transform: Affine) -> None:
    """(n, W) uint8 ``rows`` as a closed GeoTIFF at ``path`` (temporary name, then rename); ``transform``: see
    ``chunk_transform``."""
    try:
        with (
            atomic_path(path) as tmp,
            rasterio.open(
                tmp, "w", width=rows.shape[1], height=rows.shape[0], transform=transform, **CHUNK_PROFILE
            ) as dst,
        ):
            dst.write(rows, 1)
    except (RasterioError, OSError) as e:
        raise CdkdIOError(f"{path}: cannot write ({e})") from None


def read_chunk(path: Path) -> np.ndarray:
    try:
        with rasterio.open(path) as src:
            return src.read(1)
    except (RasterioError, OSError) as e:
        raise CdkdIOError(f"{path}: cannot read a finished chunk ({e}); run again with --overwrite") from None


def chunk_name(level: int, top: int) -> str:
    return f"L{level}_{top:09d}.tif"


class LayerChunks:
    """One layer's chunk files: full-resolution bands as they come, overview rows gathered per level."""

    def __init__(self, folder: Path, info: SceneInfo, layer: Layer) -> None:
        self.folder, self.info, self.layer = folder, info, layer
        self.levels = len(overview_factors(info.width, info.height))
        self.pyramid = Pyramid(info.width, info.height, self.levels, layer.overview_kind, layer.nodata)
        self.chunks: list[list[tuple[int, int]]] = [[] for _ in range(self.levels + 1)]  # per level: (top, rows)
        self.pending: list[list[np.ndarray]] = [[] for _ in range(self.levels + 1)]  # overview rows not yet written
        self.pending_top = [0] * (self.levels + 1)
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, top: int, rows: np.ndarray, on_disk: bool = False) -> None:
        """Full-resolution rows ``[top, top + n)``, in order; ``on_disk``: their chunk file exists already."""
        if not on_disk:
            write_chunk(self.folder / chunk_name(0, top), rows, chunk_transform(self.info.transform, 0, top))
        self.chunks[0].append((top, rows.shape[0]))
        for level, level_top, reduced in self.pyramid.push(rows):
            self._gather(level, level_top, reduced)

    def _gather(self, level: int, top: int, rows: np.ndarray, flush: bool = False) -> None:
        if not self.pending[level]:
            self.pending_top[level] = top
        self.pending[level].append(rows)
        if flush or sum(r.shape[0] for r in self.pending[level]) >= OVERVIEW_CHUNK_ROWS:
            self._flush(level)

    def _flush(self, level: int) -> None:
        if not self.pending[level]:
            return
        rows = np.concatenate(self.pending[level])
        top = self.pending_top[level]
        write_chunk(self.folder / chunk_name(level, top), rows, chunk_transform(self.info.transform, level, top))
        self.chunks[level].append((self.pending_top[level], rows.shape[0]))
        self.pending[level] = []

    def close_levels(self) -> None:
        """The scene's last rows are in: write every level's remainder."""
        for level, top, reduced in self.pyramid.finish():
            self._gather(level, top, reduced)
        for level in range(1, self.levels + 1):
            self._flush(level)

    # ------------------------------------------------------------------------------------------------ state

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON part, arrays) that ``restore`` turns back into this writer."""
        pyramid = self.pyramid.state()
        arrays = {f"{self.layer.name}.{k}": v for k, v in pyramid.items() if k != "next_top"}
        for level, rows in enumerate(self.pending):
            if rows:
                arrays[f"{self.layer.name}.pending_{level}"] = np.concatenate(rows)
        return {"chunks": self.chunks, "pending_top": self.pending_top, "next_top": pyramid["next_top"]}, arrays

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        prefix = f"{self.layer.name}."
        mine = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        self.pyramid.restore({"next_top": meta["next_top"], **mine})
        self.chunks = [[tuple(c) for c in level] for level in meta["chunks"]]
        self.pending_top = list(meta["pending_top"])
        self.pending = [
            [mine[f"pending_{level}"]] if f"pending_{level}" in mine else [] for level in range(self.levels + 1)
        ]
        self._remove_stale()

    def _remove_stale(self) -> None:
        """Chunks written after the checkpoint: the resumed run writes them again."""
        keep = {chunk_name(level, top) for level, chunks in enumerate(self.chunks) for top, _ in chunks}
        for f in self.folder.glob("L*_*.tif"):
            if f.name not in keep:
                f.unlink()

    # ------------------------------------------------------------------------------------------------ output

    def _vrt(self, level: int) -> Path:
        factor = 2**level
        width, height = -(-self.info.width // factor), -(-self.info.height // factor)
        root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
        if level == 0:
            ET.SubElement(root, "SRS").text = self.info.crs.to_wkt()
            ET.SubElement(root, "GeoTransform").text = ", ".join(repr(v) for v in self.info.transform.to_gdal())
        band = ET.SubElement(root, "VRTRasterBand", dataType="Byte", band="1")
        ET.SubElement(band, "NoDataValue").text = str(self.layer.nodata)
        if self.layer.schema is not None and level == 0:
            _label(root, band, self.layer.schema)
        elif level == 0:
            ET.SubElement(band, "Description").text = "confidence (255 x max softmax)"
        for top, rows in self.chunks[level]:
            src = ET.SubElement(band, "SimpleSource")
            ET.SubElement(
                src, "SourceFilename", relativeToVRT="1"
            ).text = f"{self.folder.name}/{chunk_name(level, top)}"
            ET.SubElement(src, "SourceBand").text = "1"
            rect = dict(xOff="0", xSize=str(width), ySize=str(rows))
            ET.SubElement(src, "SrcRect", {"yOff": "0", **rect})
            ET.SubElement(src, "DstRect", {"yOff": str(top), **rect})
        if level == 0:
            for sub in range(1, self.levels + 1):
                ov = ET.SubElement(band, "Overview")
                ET.SubElement(ov, "SourceFilename", relativeToVRT="1").text = self._vrt(sub).name
                ET.SubElement(ov, "SourceBand").text = "1"
        path = self.folder.parent / f"{self.layer.name}_L{level}.vrt"
        path.write_text(ET.tostring(root, encoding="unicode"))
        return path

    def write_cog(self, out: Path) -> None:
        """The final COG at ``out`` (temporary name, then rename), and the legend sidecar for class rasters."""
        vrt = self._vrt(0)
        try:
            # GDAL keeps up to 100 of a VRT's sources open by default, one chunk file each, and memory grew with
            # the scene's height (~130 MB more at 67 Mpx); the copy reads rows in order, so a few suffice
            with atomic_path(out) as tmp, rasterio.Env(GDAL_MAX_DATASET_POOL_SIZE=VRT_OPEN_SOURCES):
                rasterio.shutil.copy(vrt, tmp, **COG_OPTIONS)
        except (RasterioError, OSError) as e:
            raise CdkdIOError(f"{out}: cannot write the Cloud-Optimized GeoTIFF ({e})") from None
        if self.layer.schema is not None:
            write_gis_legend(out, self.layer.schema)


def _label(root: ET.Element, band: ET.Element, schema: ClassSchema) -> None:
    """The class raster's legend, in VRT form: the COG driver copies it into the final file."""
    dataset_tags, band_tags = class_tags(schema)
    md = ET.SubElement(root, "Metadata")
    for k, v in dataset_tags.items():
        ET.SubElement(md, "MDI", key=k).text = v
    ET.SubElement(band, "Description").text = "land-cover class"
    ET.SubElement(band, "ColorInterp").text = "Palette"
    table = ET.SubElement(band, "ColorTable")
    cmap = colormap(schema)
    for value in range(max(cmap) + 1):
        r, g, b, a = cmap.get(value, (0, 0, 0, 0))
        ET.SubElement(table, "Entry", c1=str(r), c2=str(g), c3=str(b), c4=str(a))
    bmd = ET.SubElement(band, "Metadata")
    for k, v in band_tags.items():
        ET.SubElement(bmd, "MDI", key=k).text = v


class SceneWriter:
    """Finished rows of every layer -> chunks, overviews and (``finish``) the COGs, in a background thread.

    ``put`` hands over a band of finished rows, ``checkpoint`` a state to save once every earlier band is on
    disk, ``close`` waits for the queue to empty. An error in the thread is raised again by the next call.
    ``on_rows(finished)`` runs in the writer thread for every band (the engine's area tally).
    """

    def __init__(
        self,
        partial: Path,
        info: SceneInfo,
        layers: list[Layer],
        times: Any,
        on_rows: Callable[[FinishedRows], None],
        threaded: bool = True,
    ) -> None:
        self.partial, self.info, self.times, self.on_rows = partial, info, times, on_rows
        self.layers = {layer.name: LayerChunks(partial / layer.name, info, layer) for layer in layers}
        self._queue: queue.Queue = queue.Queue(QUEUE_ITEMS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="cdkd-write", daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    # ------------------------------------------------------------------------------------------------ main side

    def put(self, rows: FinishedRows, on_disk: bool = False) -> None:
        self._submit(("rows", rows, on_disk))

    def checkpoint(self, save: Callable[[dict[str, Any], dict[str, np.ndarray]], None]) -> None:
        """Call ``save(writer json state, writer arrays)`` in the writer thread after the rows queued so far."""
        self._submit(("checkpoint", save))

    def close(self) -> None:
        """Wait for every queued item; re-raise the writer's error, if any."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(("stop",))
            self._thread.join()
        self._raise()

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        for name, layer in self.layers.items():
            layer.restore(meta[name], arrays)

    def finish(self, outputs: dict[str, Path]) -> None:
        """After ``close``: the last overview rows, then each layer's COG at ``outputs[layer name]``."""
        start = time.perf_counter()
        for name, layer in self.layers.items():
            layer.close_levels()
            layer.write_cog(outputs[name])
        self.times.add("finish", time.perf_counter() - start)

    def _submit(self, item: tuple) -> None:
        self._raise()
        if self._thread is None:
            self._handle(item)
        else:
            while True:  # a bounded put that notices a writer that died meanwhile
                try:
                    self._queue.put(item, timeout=0.5)
                    return
                except queue.Full:
                    self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # ------------------------------------------------------------------------------------------------ thread

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item[0] == "stop":
                return
            if self._error is not None:
                continue  # drain: the main thread will raise the first error
            try:
                self._handle(item)
            except BaseException as e:  # handed to the main thread, which raises it
                self._error = e

    def _handle(self, item: tuple) -> None:
        start = time.perf_counter()
        if item[0] == "rows":
            rows, on_disk = item[1], item[2]
            self.layers["classes"].add(rows.top, rows.classes, on_disk)
            if rows.confidence is not None:
                self.layers["confidence"].add(rows.top, rows.confidence, on_disk)
            self.on_rows(rows)
        elif item[0] == "checkpoint":
            meta, arrays = {}, {}
            for name, layer in self.layers.items():
                meta[name], a = layer.state()
                arrays.update(a)
            item[1](meta, arrays)
        self.times.add("write", time.perf_counter() - start)


__all__ = [
    "BLOCK",
    "Layer",
    "LayerChunks",
    "SceneWriter",
    "chunk_transform",
    "class_layers",
    "overview_factors",
    "read_chunk",
    "write_chunk",
]
