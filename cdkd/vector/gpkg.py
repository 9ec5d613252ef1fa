"""Writing land-cover polygons to a GeoPackage through pyogrio, in batches.

Features are buffered per layer and appended ``batch`` at a time (``pyogrio.raw.write(..., append=True)`` with
WKB geometries and numpy fields: no GeoDataFrame, whose reference cycles kept every written batch alive until
Python's cyclic garbage collector ran), so memory holds one batch, not the whole layer. Layers are created on
their first batch with an R-tree spatial index (``SPATIAL_INDEX=YES``), which GDAL keeps up to date while
appending. Fields: ``class_id`` (int), ``class_name`` (str), ``area_m2`` and ``perimeter_m`` (float; see
``cdkd.vector.measure``); the geometry column is ``geom``, GDAL's default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import shapely

from cdkd.errors import CdkdValueError
from cdkd.vector.memory import BATCH_VERTICES

BATCH = 10_000  # features per append, or fewer when they hold memory.BATCH_VERTICES vertices
# GeoPackage 1.2: what GDAL before 3.7 (Debian 12's 3.6, the QGIS 3.22-3.28 era) reads without a warning; newer
# GDAL writes 1.4 by default, which those versions say they may only partly support. Nothing here needs 1.3/1.4.
DATASET_OPTIONS = {"VERSION": "1.2"}


def batches(polygons: np.ndarray, size: int = BATCH, vertices: int = BATCH_VERTICES) -> list[slice]:
    """Consecutive slices of ``polygons`` with at most ``size`` polygons and ``vertices`` vertices each (a
    polygon with more vertices than that gets a slice of its own). Every stage that follows (move to the CRS,
    measure, WKB) copies its batch's vertices; a strip can close polygons of millions of vertices."""
    cum = np.cumsum(shapely.get_num_coordinates(polygons))
    out, start = [], 0
    while start < len(polygons):
        before = cum[start - 1] if start else 0
        stop = min(start + size, int(np.searchsorted(cum, before + vertices, side="right")))
        stop = max(stop, start + 1)
        out.append(slice(start, stop))
        start = stop
    return out


def check_layer_names(names: list[str]) -> None:
    """GeoPackage layers are SQLite tables, whose names ignore case: names must differ in more than case."""
    seen: dict[str, str] = {}
    for name in names:
        if not name.strip():
            raise CdkdValueError("a GeoPackage layer name must not be empty")
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise CdkdValueError(
                f"layer names {other!r} and {name!r} differ only in case, which a GeoPackage "
                "cannot hold; rename one of the classes"
            )


class GpkgWriter:
    """Appends polygons (already in ``crs`` coordinates) to layers of a new GeoPackage at ``path``.

    ``path`` must not hold anything worth keeping: an existing file (e.g. the empty temporary that
    ``atomic_path`` creates) is removed first, because GDAL cannot open an empty file as a GeoPackage.
    """

    def __init__(self, path: str | Path, crs_wkt: str, batch: int = BATCH) -> None:
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        self.crs_wkt = crs_wkt
        self.batch = batch
        self._buffers: dict[str, list[dict[str, np.ndarray]]] = {}
        self._buffered: dict[str, tuple[int, int]] = {}  # features and vertices buffered per layer
        self.counts: dict[str, int] = {}  # features written per layer

    def add(
        self,
        layer: str,
        polygons: np.ndarray,
        class_ids: np.ndarray,
        class_names: np.ndarray,
        area_m2: np.ndarray,
        perimeter_m: np.ndarray,
    ) -> None:
        """Queue (n,) polygons and their fields for ``layer``; full batches (``BATCH`` features or
        ``BATCH_VERTICES`` vertices) are written at once."""
        if not len(polygons):
            return
        chunk = {
            "class_id": np.asarray(class_ids, dtype=np.int32),
            "class_name": np.asarray(class_names, dtype=object),
            "area_m2": np.asarray(area_m2, dtype=np.float64),
            "perimeter_m": np.asarray(perimeter_m, dtype=np.float64),
            "geometry": polygons,
        }
        self._buffers.setdefault(layer, []).append(chunk)
        features, vertices = self._buffered.get(layer, (0, 0))
        features, vertices = features + len(polygons), vertices + int(shapely.get_num_coordinates(polygons).sum())
        self._buffered[layer] = (features, vertices)
        if features >= self.batch or vertices >= BATCH_VERTICES:
            self._flush(layer)

    def _flush(self, layer: str) -> None:
        chunks = self._buffers.pop(layer, [])
        self._buffered.pop(layer, None)
        if not chunks:
            return
        import pyogrio

        columns = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        del chunks
        geometry = shapely.to_wkb(columns.pop("geometry"))
        new = layer not in self.counts
        # append=True also creates the file and new layers; index options only matter when a layer is created,
        # the version only when the file is
        pyogrio.raw.write(
            self.path,
            geometry,
            list(columns.values()),
            list(columns),
            layer=layer,
            driver="GPKG",
            geometry_type="Polygon",
            crs=self.crs_wkt,
            append=True,
            promote_to_multi=False,
            layer_options={"SPATIAL_INDEX": "YES"} if new else None,
            dataset_options=None if self.path.exists() else DATASET_OPTIONS,
        )
        self.counts[layer] = self.counts.get(layer, 0) + len(geometry)

    def close(self) -> dict[str, int]:
        """Write what is still buffered; features written per layer."""
        for layer in list(self._buffers):
            self._flush(layer)
        return dict(self.counts)
