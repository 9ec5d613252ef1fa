"""``cdkd.predict``: land-cover classes for an ``xarray.DataArray``, lazily, chunk by chunk with dask.

For users of the Pangeo stack: open a scene with ``rioxarray.open_rasterio(path, chunks=...)`` (or build any
(band, y, x) DataArray), call ``predict(data, "segmenter.pt")`` and get a lazy uint8 DataArray of class ids with
the same ``y``/``x`` coordinates and CRS, to chain with your own xarray code and compute when you like.

Each output chunk is computed from the input chunk plus a halo of one tile on each side (``dask.array.overlap``,
``boundary="none"``): every window of the scene's plan that touches the chunk is run and blended with the same
weights and in the same canonical order as the scene engine (``rowblend``), so the result equals
``segment_scene``'s on the same pixels, bitwise, with no seam at chunk edges. The price of halos: windows that
straddle a chunk edge run once for each chunk they touch (about ``((c + t) / c)**2`` the windows for chunks of
``c`` px and tiles of ``t``), so prefer chunks several tiles wide; ``segment_scene_on_cluster`` runs every window
once.

Validity is the DataArray's own: a pixel is nodata where every band equals its nodata value (``rio.nodata``,
``_FillValue`` or ``nodata`` attribute) or any band is not finite. (Alpha bands and GDAL masks, which
``segment_scene`` honours, are not part of a DataArray.)
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np

from cdkd.artifacts import InferenceMeta
from cdkd.data.classraster import NODATA
from cdkd.errors import CdkdValueError, DataError
from cdkd.inference.rowblend import PlanBlender
from cdkd.inference.runtimes import Runtime, RuntimeSpec
from cdkd.inference.tiler import TileWindow, edge_margin, inside, plan_rows, reflect_outside
from cdkd.scene.core.pipeline import (
    RowCounts,
    StageTimes,
    TilePrefetcher,
    WeightCache,
    blend_rows,
)


@functools.lru_cache(maxsize=4)
def _opened(spec: RuntimeSpec) -> Runtime:
    """One runtime per process and model: dask workers open a model given by path once, not once per chunk."""
    return spec.open()


class _Model:
    """The model as the chunk tasks see it: the runtime object in this process; on dask.distributed workers the
    spec travels and each worker process opens it once (a runtime may not pickle)."""

    def __init__(self, model: str | Path | Runtime) -> None:
        if isinstance(model, (str, Path)):
            self.spec: RuntimeSpec | None = RuntimeSpec(str(model))
            self._runtime: Runtime | None = _opened(self.spec)
        else:
            self.spec, self._runtime = None, model

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = _opened(self.spec)
        return self._runtime

    def __getstate__(self) -> dict[str, Any]:
        if self.spec is None:
            return {"spec": None, "_runtime": self._runtime}  # an object given by the caller must pickle itself
        return {"spec": self.spec, "_runtime": None}


def _nodata(data: Any) -> float | None:
    rio = getattr(data, "rio", None)
    value = getattr(rio, "nodata", None) if rio is not None else None
    if value is None:
        value = data.attrs.get("_FillValue", data.attrs.get("nodata"))
    return None if value is None else float(value)


def _validity(pixels: np.ndarray, nodata: float | None) -> np.ndarray:
    """(C, h, w) -> (h, w) bool: not every band at nodata, every band finite (as GDAL's per-dataset mask)."""
    valid = np.ones(pixels.shape[1:], dtype=bool)
    if nodata is not None:
        valid &= ~(pixels == nodata).all(axis=0)
    if pixels.dtype.kind == "f":
        valid &= np.isfinite(pixels).all(axis=0)
    return valid


def _chunk_classes(
    block: np.ndarray,
    *,
    model: _Model,
    model_meta: InferenceMeta,
    nodata: float | None,
    shape: tuple[int, int],
    tile: int,
    overlap: int,
    margin: int,
    batch_size: int,
    pad_mode: str,
    depth: int,
    out_chunks: tuple[tuple[int, ...], tuple[int, ...]],
    block_info: Any = None,
) -> np.ndarray:
    """The (h, w) uint8 classes of one output chunk from its (C, h + halo, w + halo) input block."""
    meta = model_meta
    i, j = block_info[None]["chunk-location"]
    y0, x0 = sum(out_chunks[0][:i]), sum(out_chunks[1][:j])
    y1, x1 = y0 + out_chunks[0][i], x0 + out_chunks[1][j]
    by0, bx0 = y0 - min(depth, y0), x0 - min(depth, x0)  # boundary="none": no halo beyond the scene's edge
    height, width = shape
    rows = plan_rows(height, width, tile, overlap, margin)
    tops, cols = [r[0].row for r in rows], [w.col for w in rows[0]]
    win_h, win_w = rows[0][0].shape
    ra = next(k for k, t in enumerate(tops) if t + win_h > y0)
    rb = next((k for k, t in enumerate(tops) if t >= y1), len(tops))
    keep = [[w for w in row if w.col < x1 and w.col + w.width > x0] for row in rows]

    def read(w: TileWindow) -> tuple[np.ndarray, np.ndarray]:
        part, pads = inside(w, height, width)  # past the scene's edge: reflected, as SceneSource.read
        pixels = block[:, part.row - by0 : part.row - by0 + part.height, part.col - bx0 : part.col - bx0 + part.width]
        valid = _validity(pixels, nodata)
        return reflect_outside(meta.norm.normalize(pixels, valid), pads), reflect_outside(valid, pads)

    runtime = model.runtime
    blender = PlanBlender(meta.num_classes, tops, cols, (win_h, win_w), shape, runtime.blend_device, x_range=(x0, x1))
    times, counts = StageTimes(), RowCounts()
    prefetcher = TilePrefetcher(read, tile, pad_mode, threads=0, depth=1, times=times)
    out = np.full((y1 - y0, x1 - x0), NODATA, dtype=np.uint8)
    weights = WeightCache(height, width, overlap, blender.device, margin)
    for _, _, finished in blend_rows(
        keep, ra, rb, prefetcher, runtime.forward, blender, weights, batch_size, times, counts
    ):
        if finished is None:
            continue
        a, b = max(finished.top, y0), min(finished.top + finished.rows, y1)
        if a < b:
            out[a - y0 : b - y0] = cast(np.ndarray, finished.classes)[a - finished.top : b - finished.top]
    return out


def predict(
    data: Any,
    model: str | Path | Runtime,
    *,
    bands: Sequence[int] | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    pad_mode: str = "reflect",
    edge_context: int | None = None,
) -> Any:
    """Lazy land-cover classes of a (band, y, x) ``xarray.DataArray``: a (y, x) uint8 DataArray, dask-backed.

    Args:
        data: pixels in the units the model's normalisation expects (a dask-backed DataArray computes lazily; a
            numpy-backed one is chunked first). Chunks are widened to at least two tiles.
        model: a ``segmenter.pt``/``.onnx``/``.engine`` path (each dask worker opens it once) or an opened runtime.
        bands: 1-based positions along ``band`` fed to the model, in order (default: the model's ``norm.bands``).
        overlap: window overlap in px (default: the model's); the tile size is the model's.
        edge_context: px of reflected context past the scene's edge (``tiler.edge_margin``; default 64, at most
            half a tile), as ``SegmentOptions.edge_context``.

    The result carries ``data``'s ``y``/``x`` coordinates and CRS (``spatial_ref``), ``_FillValue`` 255 (nodata),
    and CF ``flag_values``/``flag_meanings`` plus ``cdkd_classes`` (names and colours) as attributes.
    """
    import dask.array as da
    import xarray as xr

    if not isinstance(data, xr.DataArray) or data.ndim != 3:
        raise CdkdValueError(
            "predict needs a (band, y, x) xarray.DataArray, e.g. rioxarray.open_rasterio(path, "
            f"chunks=...); got {type(data).__name__} with {getattr(data, 'ndim', '?')} dimensions"
        )
    handle = _Model(model)
    meta = handle.runtime.meta
    tile = meta.tile_size
    overlap = meta.overlap if overlap is None else int(overlap)
    if not 0 <= overlap < tile:
        raise CdkdValueError(f"overlap {overlap} must be >= 0 and smaller than the tile size {tile}")
    margin = edge_margin(tile, edge_context)
    chosen = tuple(bands) if bands is not None else meta.norm.bands
    count = data.shape[0]
    if len(chosen) != meta.in_chans:
        raise DataError(
            f"bands {','.join(map(str, chosen))} give {len(chosen)} band(s), but the model takes {meta.in_chans}"
        )
    if min(chosen) < 1 or max(chosen) > count:
        raise DataError(
            f"the DataArray has {count} band(s), but band {max(chosen)} is needed (bands are 1-based "
            "positions along its first dimension)"
        )
    y_dim, x_dim = data.dims[1], data.dims[2]
    arr = data.data if isinstance(data.data, da.Array) else da.from_array(data.data, chunks=(-1, 2 * tile, 2 * tile))
    arr = arr[[b - 1 for b in chosen]]
    height, width = arr.shape[1:]
    arr = arr.rechunk({0: -1, 1: _widen(arr.chunks[1], 2 * tile), 2: _widen(arr.chunks[2], 2 * tile)})
    depth = tile  # a window that touches a chunk lies within one tile of it
    halo = da.overlap.overlap(
        arr, depth={0: 0, 1: min(depth, height), 2: min(depth, width)}, boundary={0: "none", 1: "none", 2: "none"}
    )
    out_chunks = (arr.chunks[1], arr.chunks[2])
    classes = da.map_blocks(
        _chunk_classes,
        halo,
        dtype=np.uint8,
        chunks=out_chunks,
        drop_axis=0,
        model=handle,
        model_meta=meta,
        nodata=_nodata(data),
        shape=(height, width),
        tile=tile,
        overlap=overlap,
        margin=margin,
        batch_size=batch_size,
        pad_mode=pad_mode,
        depth=depth,
        out_chunks=out_chunks,
    )
    coords = {k: v for k, v in data.coords.items() if set(v.dims) <= {y_dim, x_dim}}
    schema = meta.classes
    attrs = {
        "long_name": "land-cover class",
        "_FillValue": NODATA,
        "flag_values": list(range(schema.num_classes)),
        "flag_meanings": " ".join(c.name.replace(" ", "_") for c in schema.classes),
        "cdkd_classes": json.dumps(schema.to_dict()["classes"]),
    }
    if "grid_mapping" in data.attrs:
        attrs["grid_mapping"] = data.attrs["grid_mapping"]
    return xr.DataArray(classes, dims=(y_dim, x_dim), coords=coords, attrs=attrs, name="classes")


def _widen(chunks: tuple[int, ...], least: int) -> tuple[int, ...]:
    """Chunk sizes merged until each is at least ``least`` (the last may merge into its neighbour)."""
    out: list[int] = []
    for c in chunks:
        if out and out[-1] < least:
            out[-1] += c
        else:
            out.append(c)
    if len(out) > 1 and out[-1] < least:
        last = out.pop()
        out[-1] += last
    return tuple(out)
