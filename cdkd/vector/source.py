"""The class raster that ``cdkd vectorize`` reads: header checks, a validating scan and strip reads of class ids.

A class raster is one band of integer values. Its legend comes from the raster itself (``cdkd segment`` labels
its output with ``cdkd.data.classraster.write_class_metadata``) or from a class file (``--classes``, which
wins when both exist). Raw values become class ids as ``ClassSchema`` decodes index masks: the value itself, or
through the file's ``values`` map; a value that means ``ignore_index`` is treated as nodata, like the raster's
own nodata value and its dataset mask (alpha band, internal mask). Nodata never becomes a polygon.

Every value is checked before anything is written: ``scan`` reads the raster once, strip by strip, and counts
the values of valid pixels, so an unknown value is reported with its pixel count over the whole raster.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.windows import Window

from cdkd.data.classes import ClassSchema
from cdkd.data.classraster import read_class_schema
from cdkd.data.files import open_raster
from cdkd.data.gdal import gdal_reason
from cdkd.errors import CdkdIOError, DataError
from cdkd.geodesy import is_geographic, metres_per_unit

MAX_LISTED = 10  # unknown values named in an error message (most frequent first)


@dataclass(frozen=True)
class ClassRaster:
    """Header facts of a usable class raster and how its raw values map to class ids.

    ``raw_values``/``raw_ids`` list, for a class file with a ``values`` map, each raw value and the class id (or
    ``schema.ignore_index``) it stands for; both are empty when raw values are class ids themselves.
    """

    path: Path
    width: int
    height: int
    dtype: str  # numpy name of the band's type, e.g. "uint8"
    crs: CRS
    transform: Affine  # pixel (col, row) -> CRS (x, y)
    schema: ClassSchema
    legend: str  # where the schema came from: "raster metadata" or the class file's path
    raw_values: tuple[int, ...] = ()
    raw_ids: tuple[int, ...] = ()

    @property
    def id_dtype(self) -> np.dtype:
        """The type ids are polygonised in: uint8 when every id fits, else int32 (both GDAL-native)."""
        return np.dtype(np.uint8) if self.schema.num_classes <= 256 else np.dtype(np.int32)


def inspect(path: str | Path, classes: str | Path | None = None) -> ClassRaster:
    """Check the header of the class raster at ``path`` and find its legend (``classes`` wins over metadata).

    Raises:
        CdkdIOError: not a raster, or unreadable.
        DataError: more than one band, a non-integer type, no CRS, or no legend at all.
    """
    path = Path(path)
    with open_raster(path) as src:
        if src.count != 1:
            raise DataError(f"{path}: has {src.count} bands; a class raster has exactly one (class ids)")
        dtype = np.dtype(src.dtypes[0])
        if dtype.kind not in "ui":
            raise DataError(
                f"{path}: band type {dtype.name} is not an integer type; a class raster holds integer "
                "class ids (e.g. uint8 from cdkd segment)"
            )
        if src.crs is None:
            raise DataError(
                f"{path}: has no CRS, so polygon areas would be meaningless; assign the right one "
                "(e.g. gdal_edit.py -a_srs EPSG:32633) and run again"
            )
        try:
            if not is_geographic(src.crs):
                metres_per_unit(src.crs)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
        schema: ClassSchema | None
        if classes is not None:
            schema, legend = ClassSchema.load(classes), str(classes)
        else:
            schema, legend = read_class_schema(src), "raster metadata"
            if schema is None:
                raise DataError(
                    f"{path}: has no class metadata (it was not written by cdkd segment); pass a class "
                    "file with --classes classes.yaml"
                )
        raw = tuple(schema.value_map) if schema.value_map is not None else ()
        ids = tuple(schema.value_map[v] for v in raw) if schema.value_map is not None else ()
        return ClassRaster(path, src.width, src.height, dtype.name, src.crs, src.transform, schema, legend, raw, ids)


def read_rows(src: Any, raster: ClassRaster, row0: int, row1: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw values (h, W) and validity (h, W) of rows ``[row0, row1)``; validity is GDAL's dataset mask.

    Where that mask is only the nodata value (``cdkd segment`` output) or nothing at all, it is computed from
    the values read, as GDAL would: GDAL's mask band would decode the same blocks a second time.
    """
    window = Window(0, row0, raster.width, row1 - row0)
    flags = src.mask_flag_enums[0]
    try:
        raw = src.read(1, window=window)
        if flags == [MaskFlags.all_valid]:
            valid = np.ones(raw.shape, dtype=bool)
        elif flags == [MaskFlags.nodata]:
            nodata = src.nodata
            valid = raw != nodata if _representable(nodata, raw.dtype) else np.ones(raw.shape, dtype=bool)
        else:
            valid = src.dataset_mask(window=window) > 0
    except (RasterioError, OSError) as e:
        raise CdkdIOError(f"{raster.path}: cannot read rows {row0}..{row1 - 1} ({gdal_reason(e)})") from None
    return raw, valid


def to_ids(raster: ClassRaster, raw: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw values and validity (h, W) -> class ids (h, W, ``raster.id_dtype``, 0 where invalid) and validity.

    Pixels whose value means ``ignore_index`` become invalid. Values are assumed checked by ``scan``.
    """
    ignore = raster.schema.ignore_index
    if not raster.raw_values:  # raw values are ids
        valid = valid & (raw != ignore) if _representable(ignore, raw.dtype) else valid
        ids = raw.astype(raster.id_dtype, copy=False)
        return np.where(valid, ids, 0).astype(raster.id_dtype, copy=False), valid
    keys = np.asarray(raster.raw_values, dtype=np.int64)
    order = np.argsort(keys)
    keys, targets = keys[order], np.asarray(raster.raw_ids, dtype=np.int64)[order]
    pos = np.minimum(np.searchsorted(keys, raw), len(keys) - 1)
    mapped = targets[pos]
    valid = valid & (keys[pos] == raw) & (mapped != ignore)
    return np.where(valid, mapped, 0).astype(raster.id_dtype), valid


def _representable(value: float, dtype: np.dtype) -> bool:
    """Whether integer type ``dtype`` holds ``value`` exactly (a nodata of -1 or 2.5 matches no uint8 pixel)."""
    info = np.iinfo(dtype)
    return float(value).is_integer() and info.min <= value <= info.max


def count_values(raw: np.ndarray, valid: np.ndarray) -> Counter:
    """Pixel count of each raw value among the valid pixels of one strip."""
    values = raw[valid]
    if values.dtype.itemsize <= 2:  # 8- and 16-bit rasters: a histogram, no sort
        offset = int(np.iinfo(values.dtype).min)
        counts = np.bincount((values.astype(np.int64) - offset).ravel(), minlength=1)
        present = np.flatnonzero(counts)
        return Counter({int(v) + offset: int(counts[v]) for v in present})
    uniq, counts = np.unique(values, return_counts=True)
    return Counter({int(v): int(n) for v, n in zip(uniq, counts)})


def class_counts(raster: ClassRaster, value_counts: Counter) -> dict[int, int]:
    """Raw-value pixel counts of the whole raster -> pixel count per class id (ignored values dropped).

    Raises:
        DataError: a value that is neither a class id (after the ``values`` map) nor nodata / ignore, with the
            values and their pixel counts; or no valid pixel at all.
    """
    schema = raster.schema
    lookup = dict(zip(raster.raw_values, raster.raw_ids)) if raster.raw_values else None
    per_class: Counter = Counter()
    bad = []
    for value, n in value_counts.items():
        cid = lookup.get(value) if lookup is not None else (value if 0 <= value < schema.num_classes else None)
        if cid is None and value == schema.ignore_index:
            cid = schema.ignore_index
        if cid is None:
            bad.append((value, n))
        elif cid != schema.ignore_index:
            per_class[cid] += n
    if bad:
        bad.sort(key=lambda vn: -vn[1])
        shown = ", ".join(f"{v} ({n} px)" for v, n in bad[:MAX_LISTED])
        more = f", and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        expected = (
            f"raw values {', '.join(map(str, raster.raw_values))}"
            if lookup is not None
            else f"class ids 0..{schema.num_classes - 1}"
        )
        raise DataError(
            f"{raster.path}: {len(bad)} value{'s' if len(bad) != 1 else ''} that are neither class ids "
            f"nor nodata: {shown}{more} (the legend from {raster.legend} expects {expected}); set the "
            "raster's nodata value or pass a class file whose 'values' / 'ignore' cover them"
        )
    if not per_class:
        raise DataError(f"{raster.path}: every pixel is nodata; there is nothing to vectorize")
    return dict(sorted(per_class.items()))


def scan(raster: ClassRaster, src: Any, strips: Iterable[Any]) -> dict[int, int]:
    """Read every strip core once; pixel count per class id. Raises as ``class_counts`` does."""
    totals: Counter = Counter()
    for strip in strips:
        totals.update(count_values(*read_rows(src, raster, strip.row0, strip.row1)))
    return class_counts(raster, totals)
