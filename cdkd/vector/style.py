"""A QGIS style for land-cover polygons: every class in its colour, so an output opens styled in QGIS.

``qml`` writes a QGIS layer style (QML) with a *categorized* renderer on ``class_id``: one category per class,
labelled with the class name and filled with the class colour (``ClassSchema``). QGIS reads it from two places:

- a GeoPackage's ``layer_styles`` table (``write_layer_styles``), the table QGIS itself writes with "Save as
  default" in the database: one row per layer, ``useAsDefault`` set, so the layer opens styled;
- a ``<name>.qml`` file beside a single-file dataset (FlatGeobuf, GeoParquet), which QGIS loads as the default
  style of ``<name>.fgb`` / ``<name>.parquet``.

Symbol layers use the ``<prop k= v=/>`` form, which every QGIS 3 release reads.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from cdkd.data.classes import ClassSchema

QGIS_VERSION = "3.28.0"  # the oldest long-term release whose QML this follows; later releases read it as is
CLASS_FIELD = "class_id"
OUTLINE = "35,35,35,255"  # a thin dark outline, as QGIS's default fill symbol has
STYLE_NAME = "cdkd classes"


def _symbol(index: int, rgb: tuple[int, int, int]) -> str:
    fill = ",".join(str(v) for v in rgb) + ",255"
    props = {
        "color": fill,
        "style": "solid",
        "outline_color": OUTLINE,
        "outline_style": "solid",
        "outline_width": "0.1",
        "outline_width_unit": "MM",
        "joinstyle": "bevel",
    }
    lines = [
        f'      <symbol type="fill" name="{index}" alpha="1" clip_to_extent="1" force_rhr="0">',
        '        <layer class="SimpleFill" enabled="1" locked="0" pass="0">',
        *(f"          <prop k={quoteattr(k)} v={quoteattr(v)}/>" for k, v in props.items()),
        "        </layer>",
        "      </symbol>",
    ]
    return "\n".join(lines)


def qml(schema: ClassSchema, field: str = CLASS_FIELD) -> str:
    """QML text (UTF-8 XML) of a categorized renderer on ``field`` with one category per class of ``schema``."""
    categories = "\n".join(
        f'      <category value="{c.id}" label={quoteattr(c.name)} symbol="{i}" render="true"/>'
        for i, c in enumerate(schema.classes)
    )
    symbols = "\n".join(_symbol(i, c.color) for i, c in enumerate(schema.classes))
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        f'<qgis version="{QGIS_VERSION}" styleCategories="Symbology">\n'
        f'  <renderer-v2 type="categorizedSymbol" attr={quoteattr(field)} symbollevels="0" forceraster="0" '
        'enableorderby="0">\n'
        f"    <categories>\n{categories}\n    </categories>\n"
        f"    <symbols>\n{symbols}\n    </symbols>\n"
        "  </renderer-v2>\n"
        "  <layerGeometryType>2</layerGeometryType>\n"
        "</qgis>\n"
    )


def write_layer_styles(path: str | Path, layers: list[str], schema: ClassSchema, geometry_column: str = "geom") -> None:
    """Add a ``layer_styles`` table to the GeoPackage at ``path`` with the class style as the default of each of
    ``layers``. Written through GDAL as an attribute table (registered in ``gpkg_contents``), as QGIS does."""
    import pyogrio

    n = len(layers)

    def text(value: str) -> np.ndarray:
        return np.full(n, value, dtype=object)

    # the columns and their order as QGIS creates the table when it saves a style into a GeoPackage
    fields = {
        "f_table_catalog": text(""),
        "f_table_schema": text(""),
        "f_table_name": np.asarray(layers, dtype=object),
        "f_geometry_column": text(geometry_column),
        "styleName": text(STYLE_NAME),
        "styleQML": text(qml(schema)),
        "styleSLD": text(""),
        "useAsDefault": np.ones(n, dtype=bool),
        "description": text(f"{schema.num_classes} land-cover classes in their colours (cdkd)"),
        "owner": text(""),
        "ui": text(""),
        "update_time": np.full(n, np.datetime64(datetime.now(timezone.utc).replace(tzinfo=None), "ms")),
    }
    pyogrio.raw.write(path, None, list(fields.values()), list(fields), layer="layer_styles", driver="GPKG", append=True)
