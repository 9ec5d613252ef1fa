"""The class raster's contract: how ``cdkd segment`` labels its output and how ``cdkd vectorize`` reads it back.

A class raster is a single-band uint8 GeoTIFF of class ids ``0..K-1`` with ``NODATA`` (255) where the input
had no valid data. It carries its own legend, so nothing downstream needs the model:

- a GDAL colour table on band 1 (class colours; the nodata entry transparent), which QGIS and GDAL show as-is;
- the dataset tag ``CDKD_CLASSES``: the ``ClassSchema`` as JSON (ids, names, colours);
- band-1 tags ``CLASS_<id>=<name>``, readable with ``gdalinfo`` or ``rio info --tags --bidx 1``;
- beside the file, GDAL's PAM sidecar ``OUT.tif.aux.xml`` (``write_gis_legend``): category names and a raster
  attribute table (value, class name, colour), which GDAL and QGIS read by themselves and which turn the legend
  from bare numbers into class names. (GeoTIFF has no place for either inside the file, and rasterio has no
  API for them, so the sidecar is written here in the XML that GDAL's own ``GDALRasterAttributeTable::
  Serialize`` produces.)
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from cdkd.data.classes import ClassSchema
from cdkd.errors import CdkdIOError, CdkdValueError
from cdkd.utils.atomic import atomic_write_text

NODATA = 255
CONFIDENCE_NODATA = 0  # confidence is round(255 * max softmax) >= 255 / K >= 1 wherever a pixel is valid
CLASSES_TAG = "CDKD_CLASSES"
MAX_CLASSES = NODATA  # ids 0..254; 255 is nodata

# GDAL's enums as written in PAM XML (gdal.h: GDALRATFieldType, GDALRATFieldUsage)
_GFT_INTEGER, _GFT_STRING = 0, 2
_GFU_NAME, _GFU_MINMAX, _GFU_RED, _GFU_GREEN, _GFU_BLUE, _GFU_ALPHA = 2, 5, 6, 7, 8, 9
# The raster attribute table's columns: (name, GDAL type, GDAL usage); names as QGIS and ArcGIS expect them.
RAT_COLUMNS = (
    ("Value", _GFT_INTEGER, _GFU_MINMAX),
    ("Class_Name", _GFT_STRING, _GFU_NAME),
    ("Red", _GFT_INTEGER, _GFU_RED),
    ("Green", _GFT_INTEGER, _GFU_GREEN),
    ("Blue", _GFT_INTEGER, _GFU_BLUE),
    ("Alpha", _GFT_INTEGER, _GFU_ALPHA),
)


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
        return ClassSchema.from_dict(
            {"classes": legend["classes"], "ignore_index": legend.get("ignore_index", NODATA)}, CLASSES_TAG
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CdkdValueError(f"{getattr(src, 'name', 'raster')}: unreadable {CLASSES_TAG} tag ({e})") from None


def legend_sidecar(raster: str | Path) -> Path:
    """Where GDAL looks for a raster's PAM sidecar: ``OUT.tif`` -> ``OUT.tif.aux.xml``."""
    raster = Path(raster)
    return raster.with_name(raster.name + ".aux.xml")


def gis_legend_xml(schema: ClassSchema) -> str:
    """The PAM XML (``<PAMDataset>``) that gives band 1 category names and a thematic raster attribute table.

    Category ``i`` names pixel value ``i`` (GDAL's convention: the list is indexed by value; a schema's ids are
    ``0..K-1`` in order); nodata (255) gets neither a name nor a row. Each RAT row is one class: Value (usage
    MinMax), Class_Name (Name), Red, Green, Blue, Alpha (the colour usages), so a GIS can colour and label the
    raster from the table alone.
    """
    check_num_classes(schema)
    root = ET.Element("PAMDataset")
    band = ET.SubElement(root, "PAMRasterBand", band="1")
    names = ET.SubElement(band, "CategoryNames")
    for c in schema.classes:
        ET.SubElement(names, "Category").text = c.name
    rat = ET.SubElement(band, "GDALRasterAttributeTable", tableType="thematic")
    for index, (name, kind, usage) in enumerate(RAT_COLUMNS):
        field = ET.SubElement(rat, "FieldDefn", index=str(index))
        ET.SubElement(field, "Name").text = name
        ET.SubElement(field, "Type").text = str(kind)
        ET.SubElement(field, "Usage").text = str(usage)
    for row_index, c in enumerate(schema.classes):
        row = ET.SubElement(rat, "Row", index=str(row_index))
        for value in (c.id, c.name, *c.color, 255):
            ET.SubElement(row, "F").text = str(value)
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def write_gis_legend(raster: str | Path, schema: ClassSchema) -> Path:
    """Write ``raster``'s PAM sidecar (``raster.aux.xml``, atomically) with ``schema``'s category names and RAT.

    Call it once the class raster is final: the sidecar describes that file, so it replaces any earlier one
    (which would describe an earlier output). The colour table and tags inside the GeoTIFF are untouched, so
    ``read_class_schema`` (and ``cdkd vectorize``) read the legend exactly as before. Returns the sidecar's path.
    """
    raster = Path(raster)
    if not raster.is_file():
        raise CdkdIOError(f"{raster}: class raster not found; cannot write its legend")
    sidecar = legend_sidecar(raster)
    atomic_write_text(sidecar, gis_legend_xml(schema))
    return sidecar


def to_class_raster(class_ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W) integer class ids and (H, W) bool validity -> uint8 ids with ``NODATA`` where invalid."""
    out = class_ids.astype(np.uint8)
    out[~valid] = NODATA
    return out
