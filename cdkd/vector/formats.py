"""Output formats of ``cdkd vectorize``, chosen by the output's extension: GeoPackage, FlatGeobuf, GeoParquet.

Polygons are always appended to a GeoPackage first (``gpkg.GpkgWriter``: batched appends keep memory at one
batch). A GeoPackage output is that file, with the QGIS style in its ``layer_styles`` table. The single-layer
formats cannot be appended to cheaply (GDAL rewrites a whole FlatGeobuf file on every append), so they are
written in one streaming pass from a staged GeoPackage at the end (``convert``), a batch at a time:

- FlatGeobuf (``.fgb``): GDAL's FlatGeobuf driver through ``pyogrio.write_arrow``, with its packed Hilbert
  R-tree (features come out in the tree's order);
- GeoParquet (``.parquet``): GDAL's (Geo)Parquet driver when pyogrio's GDAL has it, else ``pyarrow``'s Parquet
  writer with the GeoParquet 1.1 ``geo`` metadata (WKB geometry, PROJJSON CRS), which geopandas, GDAL and QGIS
  read. Needs ``pyarrow`` (``pip install 'cdkd[geoparquet]'``) when GDAL lacks the driver.

Both get the QGIS style as a ``<name>.qml`` file beside them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdkd.errors import CdkdIOError, CdkdValueError

READ_BATCH = 65_536  # features per Arrow batch when converting


@dataclass(frozen=True)
class VectorFormat:
    """One output format: its name, GDAL driver and whether it holds several layers."""

    name: str
    driver: str
    multi_layer: bool

    @property
    def style_sidecar(self) -> bool:
        """The QGIS style goes in a ``.qml`` file beside the output (no ``layer_styles`` table to hold it)."""
        return not self.multi_layer


FORMATS = {
    ".gpkg": VectorFormat("GeoPackage", "GPKG", multi_layer=True),
    ".fgb": VectorFormat("FlatGeobuf", "FlatGeobuf", multi_layer=False),
    ".parquet": VectorFormat("GeoParquet", "Parquet", multi_layer=False),
}


def output_format(path: str | Path) -> VectorFormat:
    """The format for ``path``'s extension; an unknown one is a ``CdkdValueError`` naming the known ones."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(f"{ext} ({f.name})" for ext, f in FORMATS.items())
        raise CdkdValueError(f"{path}: unknown output extension {path.suffix or '(none)'!r}; use {known}")
    return fmt


def gdal_writes(driver: str) -> bool:
    """True when pyogrio's GDAL can write ``driver``."""
    import pyogrio

    return "w" in pyogrio.list_drivers().get(driver, "")


def check_writable(fmt: VectorFormat, path: str | Path) -> None:
    """Fail before any work when ``fmt`` cannot be written here (a missing GDAL driver or library)."""
    import pyogrio

    if fmt.driver == "Parquet" and not gdal_writes("Parquet"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise CdkdIOError(
                f"{path}: writing GeoParquet needs GDAL's Parquet driver (pyogrio's GDAL "
                f"{pyogrio.__gdal_version_string__} has none) or pyarrow; install it with "
                "pip install 'cdkd[geoparquet]'"
            ) from None
    elif fmt.driver != "Parquet" and not gdal_writes(fmt.driver):
        raise CdkdIOError(
            f"{path}: pyogrio's GDAL {pyogrio.__gdal_version_string__} has no {fmt.driver} writer; "
            "write a .gpkg instead"
        )


def convert(staged: Path, layer: str, out: Path, fmt: VectorFormat) -> None:
    """Copy ``layer`` of the GeoPackage ``staged`` into ``out`` (a new file; the layer keeps its name, not the
    temporary file's) in ``fmt``, a batch at a time."""
    from pyogrio.raw import open_arrow, write_arrow

    if fmt.driver == "Parquet" and not gdal_writes("Parquet"):
        _to_geoparquet(staged, layer, out)
        return
    out.unlink(missing_ok=True)  # the empty temporary that atomic_path made: GDAL wants to create the file
    options = {"SPATIAL_INDEX": "YES"} if fmt.driver == "FlatGeobuf" else None
    with open_arrow(staged, layer=layer, batch_size=READ_BATCH, use_pyarrow=False) as (meta, stream):
        write_arrow(
            stream,
            out,
            layer=layer,
            driver=fmt.driver,
            geometry_name=meta["geometry_name"],
            geometry_type="Polygon",
            crs=meta["crs"],
            layer_options=options,
        )


def geo_metadata(crs_wkt: str, geometry_column: str = "geometry") -> dict[str, Any]:
    """GeoParquet 1.1 file metadata (the ``geo`` key) for WKB polygons in the CRS ``crs_wkt``."""
    import pyproj

    return {
        "version": "1.1.0",
        "primary_column": geometry_column,
        "columns": {
            geometry_column: {
                "encoding": "WKB",
                "geometry_types": ["Polygon"],
                "crs": pyproj.CRS.from_user_input(crs_wkt).to_json_dict(),
            }
        },
    }


def _to_geoparquet(staged: Path, layer: str, out: Path) -> None:
    """GeoParquet through pyarrow: each Arrow batch GDAL reads becomes a row group (an empty layer, an empty
    file with the schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pyogrio
    from pyogrio.raw import open_arrow

    crs = pyogrio.read_info(staged, layer=layer)["crs"]
    with open_arrow(staged, layer=layer, batch_size=READ_BATCH, use_pyarrow=True) as (meta, reader):
        geometry = meta["geometry_name"] or "wkb_geometry"
        # GDAL's geometry column, renamed "geometry" and as plain binary (without GDAL's extension type)
        fields = [pa.field("geometry", pa.binary()) if f.name == geometry else f for f in reader.schema]
        schema = pa.schema(fields, metadata={b"geo": json.dumps(geo_metadata(crs)).encode()})
        with pq.ParquetWriter(out, schema, compression="zstd") as writer:
            for batch in reader:
                columns = [
                    c.cast(pa.binary()) if n == geometry else c for n, c in zip(batch.schema.names, batch.columns)
                ]
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
