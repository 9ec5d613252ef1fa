"""The class raster's contract: how ``cdkd segment`` labels its output and how ``cdkd vectorize`` reads it back.

A class raster is a single-band uint8 GeoTIFF of class ids ``0..K-1`` with ``NODATA`` (255) where the input
had no valid data. It carries its own legend, so nothing downstream needs the model:

- a GDAL colour table on band 1 (class colours; the nodata entry transparent), which QGIS and GDAL show as-is;
- the dataset tag ``CDKD_CLASSES``: the ``ClassSchema`` as JSON (ids, names, colours);
- band-1 tags ``CLASS_<id>=<name>``, readable with ``gdalinfo`` or ``rio info --tags --bidx 1``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cdkd.data.classes import ClassSchema
from cdkd.errors import CdkdValueError

NODATA = 255
CLASSES_TAG = "CDKD_CLASSES"
MAX_CLASSES = NODATA  # ids 0..254; 255 is nodata


def check_num_classes(schema: ClassSchema) -> None:
    """A uint8 class raster holds at most 255 classes (255 is nodata)."""
    if schema.num_classes > MAX_CLASSES:
        raise CdkdValueError(f"{schema.num_classes} classes do not fit a uint8 class raster (at most {MAX_CLASSES})")


def colormap(schema: ClassSchema) -> dict[int, tuple[int, int, int, int]]:
    """GDAL colour table: class id -> opaque class colour, ``NODATA`` -> transparent black."""
    cmap = {c.id: (*c.color, 255) for c in schema.classes}
    cmap[NODATA] = (0, 0, 0, 0)
    return cmap


def class_tags(schema: ClassSchema) -> tuple[dict[str, str], dict[str, str]]:
    """(dataset tags, band-1 tags) that label a class raster with ``schema``."""
    legend = {"classes": schema.to_dict()["classes"], "ignore_index": schema.ignore_index}
    return {CLASSES_TAG: json.dumps(legend)}, {f"CLASS_{c.id}": c.name for c in schema.classes}


def write_class_metadata(dst: Any, schema: ClassSchema) -> None:
    """Label an open, writable rasterio dataset ``dst`` (band 1 = class ids) with ``schema``."""
    check_num_classes(schema)
    dataset_tags, band_tags = class_tags(schema)
    dst.write_colormap(1, colormap(schema))
    dst.update_tags(**dataset_tags)
    dst.update_tags(1, **band_tags)
    dst.set_band_description(1, "land-cover class")


def read_class_schema(src: Any) -> ClassSchema | None:
    """The ``ClassSchema`` a class raster was labelled with (``write_class_metadata``), or None if unlabelled."""
    text = src.tags().get(CLASSES_TAG)
    if text is None:
        return None
    try:
        legend = json.loads(text)
        return ClassSchema.from_dict({"classes": legend["classes"],
                                      "ignore_index": legend.get("ignore_index", NODATA)}, CLASSES_TAG)
    except (ValueError, KeyError, TypeError) as e:
        raise CdkdValueError(f"{getattr(src, 'name', 'raster')}: unreadable {CLASSES_TAG} tag ({e})") from None


def to_class_raster(class_ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W) integer class ids and (H, W) bool validity -> uint8 ids with ``NODATA`` where invalid."""
    out = class_ids.astype(np.uint8)
    out[~valid] = NODATA
    return out
