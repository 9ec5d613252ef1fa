"""``cdkd vectorize``: land-cover polygons from a class raster (GeoPackage, FlatGeobuf or GeoParquet), strip by
strip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cdkd.vector.choices import AreaMode
from cli import options as o
from cli.errors import cli_errors

# options used by this command only (shared ones live in cli/options.py)
raster_arg = typer.Argument(
    ..., help="Class raster GeoTIFF: cdkd segment output, or any single-band integer raster with --classes."
)
out_opt = typer.Option(
    ...,
    "--out",
    help="File to write, its format by extension: .gpkg (GeoPackage, styled for "
    "QGIS), .fgb (FlatGeobuf) or .parquet (GeoParquet), these two with a QGIS style <name>.qml "
    "beside them. The JSON report <out>.json goes beside it too.",
)
min_area_opt = typer.Option(
    None, "--min-area", help="Merge regions smaller than this into their largest neighbour, e.g. 100m2 or 25px."
)
simplify_opt = typer.Option(
    None, "--simplify", help="Simplify as one coverage (neighbours keep sharing their edges), tolerance in CRS units."
)
layer_opt = typer.Option(None, "--layer", help="Layer name (default: the raster's file stem).")
layer_per_class_opt = typer.Option(
    None, "--layer-per-class/--one-layer", help="One layer per class, named after the class (GeoPackage only)."
)
classes_opt = typer.Option(None, "--classes", help="Class file (YAML) for rasters without cdkd class metadata.")
area_opt = typer.Option(
    None,
    "--area",
    case_sensitive=False,
    help="How area_m2, perimeter_m and --min-area in m2 "
    "are measured: auto (default: planar where planar areas are within 0.1 % of the ground over "
    "the raster, e.g. UTM; on the ellipsoid elsewhere, e.g. geographic CRSs and Web Mercator), "
    "planar (CRS units in metres), or ellipsoidal (ground measures on the CRS's ellipsoid).",
)
window_rows_opt = typer.Option(
    None, "--window-rows", min=1, help="Rows per strip (default ~2 M pixels a strip); smaller strips use less memory."
)
overwrite_opt = typer.Option(False, "--overwrite", help="Replace an existing output, its report and its style.")


def vectorize_command(
    raster: Path = raster_arg,
    out: Path = out_opt,
    config: Path | None = o.config_opt,
    min_area: str | None = min_area_opt,
    simplify: float | None = simplify_opt,
    layer: str | None = layer_opt,
    layer_per_class: bool | None = layer_per_class_opt,
    classes: Path | None = classes_opt,
    area: AreaMode | None = area_opt,
    window_rows: int | None = window_rows_opt,
    overwrite: bool = overwrite_opt,
    progress: bool = o.progress_opt,
) -> None:
    """Polygonise a class raster into land-cover polygons with class_id, class_name, area_m2 and perimeter_m.

    Example: cdkd vectorize scene_classes.tif --out scene.gpkg --min-area 500m2 --simplify 5
    """
    flags: dict[str, Any] = {
        "min_area": min_area,
        "simplify": simplify,
        "layer": layer,
        "layer_per_class": layer_per_class,
        "classes": str(classes) if classes is not None else None,
        "area": area.value if area is not None else None,
        "window_rows": window_rows,
    }
    with cli_errors():
        from cdkd.config import apply_overrides
        from cdkd.progress import finish
        from cdkd.vector.config import VectorizeConfig
        from cdkd.vector.vectorize import vectorize

        cfg = VectorizeConfig.load(config) if config is not None else VectorizeConfig()
        cfg = apply_overrides(cfg, o.given(flags)).check()
        report = vectorize(raster, out, **cfg.kwargs(), overwrite=overwrite, progress=progress)
        typer.echo(report.table())
        for warning in report.warnings:
            typer.echo(f"Warning: {warning}", err=True)
        style = f", {report.style_path}" if report.style_path else ""
        typer.echo(
            f"\nwrote {report.output} (layers: {', '.join(report.layers)}) and {report.json_path}{style} "
            f"in {report.seconds:.1f} s"
        )
        finish([report.output, report.json_path, report.style_path])
