"""``cdkd vectorize``: land-cover polygons in a GeoPackage from a class raster, streamed strip by strip."""

from __future__ import annotations

from pathlib import Path

import typer

from cli import options as o
from cli.errors import cli_errors

# options used by this command only (shared ones live in cli/options.py)
raster_arg = typer.Argument(..., help="Class raster GeoTIFF: cdkd segment output, or any single-band integer "
                            "raster with --classes.")
out_opt = typer.Option(..., "--out", help="GeoPackage to write (*.gpkg); the JSON report <out>.json goes beside it.")
min_area_opt = typer.Option(None, "--min-area", help="Merge regions smaller than this into their largest "
                            "neighbour, e.g. 100m2 or 25px.")
simplify_opt = typer.Option(None, "--simplify", help="Simplify as one coverage (neighbours keep sharing their "
                            "edges), tolerance in CRS units.")
layer_opt = typer.Option(None, "--layer", help="Layer name (default: the raster's file stem).")
layer_per_class_opt = typer.Option(False, "--layer-per-class", help="One layer per class, named after the class.")
classes_opt = typer.Option(None, "--classes", help="Class file (YAML) for rasters without cdkd class metadata.")
area_opt = typer.Option("auto", "--area", help="How area_m2, perimeter_m and --min-area in m2 are measured: auto "
                        "(ellipsoidal for a geographic CRS, planar otherwise), planar (CRS metres), or ellipsoidal "
                        "(ground measures on the CRS's ellipsoid; use it for Web Mercator, whose planar areas "
                        "overstate the ground by 1/cos²(latitude)).")
overwrite_opt = typer.Option(False, "--overwrite", help="Replace an existing output and its report.")


def vectorize_command(
    raster: Path = raster_arg,
    out: Path = out_opt,
    min_area: str | None = min_area_opt,
    simplify: float | None = simplify_opt,
    layer: str | None = layer_opt,
    layer_per_class: bool = layer_per_class_opt,
    classes: Path | None = classes_opt,
    area: str = area_opt,
    overwrite: bool = overwrite_opt,
    progress: bool = o.progress_opt,
) -> None:
    """Polygonise a class raster into land-cover polygons with class_id, class_name, area_m2 and perimeter_m.

    Example: cdkd vectorize scene_classes.tif --out scene.gpkg --min-area 500m2 --simplify 5
    """
    with cli_errors():
        from cdkd.vector import vectorize

        report = vectorize(raster, out, min_area=min_area, simplify=simplify, layer=layer,
                           layer_per_class=layer_per_class, classes=classes, area=area, overwrite=overwrite,
                           progress=progress)
        typer.echo(report.table())
        for warning in report.warnings:
            typer.echo(f"Warning: {warning}", err=True)
        typer.echo(f"\nwrote {report.output} (layers: {', '.join(report.layers)}) and {report.json_path} "
                   f"in {report.seconds:.1f} s")
