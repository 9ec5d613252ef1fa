"""cdkd's outputs as QGIS shows them: class colours and class names, read from what cdkd writes beside them.

- A class raster (``cdkd segment``) carries a GDAL colour table and, in its PAM sidecar ``OUT.tif.aux.xml``, a
  raster attribute table (Value, Class_Name, Red, Green, Blue, Alpha; ``cdkd.data.classraster``). QGIS 3.22
  draws the colour table but labels the legend with bare numbers, so ``style_class_raster`` builds a paletted
  renderer with the class names from that table.
- Polygons (``cdkd vectorize``, ``cdkd segment`` with a detector) carry a QGIS style: in a GeoPackage's
  ``layer_styles`` table, or as ``<name>.qml`` beside FlatGeobuf and GeoParquet files (``cdkd.vector.style``).
  ``style_polygons`` loads it (QGIS does too when it opens the file itself; a layer opened another way may not).

Standard library and QGIS only (this runs inside QGIS); ``docs/scripts/render_qgis.py`` uses it as well.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

RAT_COLUMNS = ("Value", "Class_Name", "Red", "Green", "Blue", "Alpha")


@dataclass(frozen=True)
class ClassEntry:
    value: int
    name: str
    rgba: tuple[int, int, int, int]


def raster_classes(raster: str | Path) -> list[ClassEntry]:
    """The classes of a cdkd class raster, from the attribute table in ``raster.aux.xml`` ([] when there is
    none: the raster is not a cdkd class raster, or it lost its sidecar)."""
    raster = Path(raster)
    sidecar = raster.with_name(raster.name + ".aux.xml")
    try:
        root = ET.parse(sidecar).getroot()
    except (OSError, ET.ParseError):
        return []
    table = root.find("./PAMRasterBand[@band='1']/GDALRasterAttributeTable")
    if table is None:
        return []
    names = [(f.findtext("Name") or "") for f in table.findall("FieldDefn")]
    if any(c not in names for c in RAT_COLUMNS):
        return []
    at = {c: names.index(c) for c in RAT_COLUMNS}
    classes = []
    for row in table.findall("Row"):
        cells = [(f.text or "") for f in row.findall("F")]
        try:
            rgba = tuple(int(cells[at[c]]) for c in ("Red", "Green", "Blue", "Alpha"))
            classes.append(ClassEntry(int(cells[at["Value"]]), cells[at["Class_Name"]], rgba))  # type: ignore[arg-type]
        except (ValueError, IndexError):
            return []
    return classes


def style_class_raster(layer) -> bool:  # noqa: ANN001 (QgsRasterLayer)
    """Give a class raster layer a paletted renderer with its class colours and names; False when the raster
    carries no cdkd legend (the layer keeps QGIS's own rendering)."""
    from qgis.core import QgsPalettedRasterRenderer
    from qgis.PyQt.QtGui import QColor

    classes = raster_classes(layer.source())
    if not classes:
        return False
    entries = [QgsPalettedRasterRenderer.Class(c.value, QColor(*c.rgba), c.name) for c in classes]
    layer.setRenderer(QgsPalettedRasterRenderer(layer.dataProvider(), 1, entries))
    layer.triggerRepaint()
    return True


def polygon_style(path: str | Path) -> Path | None:
    """The ``.qml`` cdkd writes beside a FlatGeobuf or GeoParquet file, if there is one."""
    qml = Path(path).with_suffix(".qml")
    return qml if qml.is_file() else None


def style_polygons(layer) -> bool:  # noqa: ANN001 (QgsVectorLayer)
    """Apply cdkd's class style to a polygon layer: the ``.qml`` beside the file, else the default style stored
    in the GeoPackage. False when neither is there."""
    path = layer.source().split("|")[0]
    qml = polygon_style(path)
    if qml is not None:
        _, ok = layer.loadNamedStyle(str(qml))
    else:
        _, ok = layer.loadDefaultStyle()
    if ok:
        layer.triggerRepaint()
    return bool(ok)
