"""``vectorize(...)``, what ``cdkd vectorize`` calls: a class raster -> land-cover polygons in a vector file.

Stages, each in its own module:

1. ``source``: check the raster's header and legend, then ``scan`` every value once (unknown values and an
   all-nodata raster are refused before anything is written);
2. ``sieve`` (``--min-area``): merge small regions into their largest neighbour, strip by strip with a halo;
3. ``polygonize``: polygonise each strip in pixel coordinates and merge the pieces cut by strip borders;
4. ``coverage`` (``--simplify``): simplify all polygons together, so neighbours keep sharing their edges;
   ``measure``: move polygons into the CRS and measure them (m², m; planar or on the ellipsoid, ``--area``);
5. ``gpkg``: append them to a temporary GeoPackage in batches, with the QGIS class style (``style``); then,
   by the output's extension (``formats``), rename it to ``out`` or stream it into a FlatGeobuf or GeoParquet
   ``out``; the JSON report ``<out>.json`` goes beside it.

Memory is bounded by the strip size for the raster (see ``strips``): GDAL's block cache is held to the blocks a
strip needs (its default, 5 % of RAM, would keep the whole decoded raster). Without ``--simplify`` polygons are
written as strips complete; with it every polygon is held until the end, because ``shapely.coverage_simplify``
needs the whole coverage to keep neighbours' shared edges identical. Vectors are far smaller than the raster
they came from (a polygon costs its boundary vertices, a raster every pixel), so this is affordable.
Polygons that stay open across many strips are held too (see ``polygonize``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from cdkd.data.files import open_raster
from cdkd.errors import CdkdValueError, DataError, OutputExistsError
from cdkd.progress import track
from cdkd.utils.atomic import atomic_path, atomic_write_text
from cdkd.utils.paths import check_writable as check_folder_writable
from cdkd.vector.coverage import simplify_coverage
from cdkd.vector.formats import VectorFormat, check_writable, convert, output_format
from cdkd.vector.gpkg import GpkgWriter, batches, check_layer_names
from cdkd.vector.measure import AreaMode, area_perimeter, choose_area, planar_note, to_crs
from cdkd.vector.memory import release_freed_memory
from cdkd.vector.polygonize import StripMerger, polygonize
from cdkd.vector.sieve import MinArea, parse_min_area, sieve_halo, sieve_ids, sieve_size
from cdkd.vector.source import (
    ClassRaster,
    inspect,
    read_rows,
    scan,
    to_ids,
)
from cdkd.vector.strips import Strip, default_window_rows, plan_strips
from cdkd.vector.style import qml, write_layer_styles

MIN_CACHE = 16 * 2**20  # bytes of GDAL block cache at least


@dataclass(frozen=True)
class VectorizeSettings:
    """What a run did, as derived once from the arguments (logged in the JSON report)."""

    legend: str  # where the class names came from: "raster metadata" or the class file
    min_area: str | None  # as given, e.g. "100m2"
    min_area_px: int | None  # GDAL sieve threshold: regions of fewer pixels were merged
    sieve_halo_rows: int
    simplify: float | None  # coverage simplification tolerance, CRS units
    layer: str | None
    layer_per_class: bool
    window_rows: int  # core rows per strip
    strips: int
    area: str = "planar"  # how area_m2 and perimeter_m were measured: planar | ellipsoidal
    # largest |areal scale - 1| of planar areas over the raster, in %: what --area auto decided on (None: degrees)
    planar_scale_error_percent: float | None = None
    format: str = "GeoPackage"  # GeoPackage | FlatGeobuf | GeoParquet (from the output's extension)
    connectivity: int = 4


@dataclass(frozen=True)
class ClassResult:
    class_id: int
    name: str
    polygons: int
    area_m2: float


@dataclass(frozen=True)
class VectorizeReport:
    input: Path
    output: Path
    json_path: Path
    style_path: Path | None  # the QGIS style beside a FlatGeobuf or GeoParquet output (a GeoPackage holds its own)
    crs: str
    layers: tuple[str, ...]
    classes: tuple[ClassResult, ...]
    polygons: int
    area_m2: float
    seconds: float
    settings: VectorizeSettings
    warnings: tuple[str, ...] = ()

    def table(self) -> str:
        """Per-class polygons and areas as an aligned text table, in the unit ``cdkd.units`` picks for it."""
        from cdkd.units import area_unit, format_area

        unit = area_unit([self.area_m2])
        width = max([len("class")] + [len(c.name) for c in self.classes])
        lines = [f"{'id':>3}  {'class':<{width}}  {'polygons':>9}  {f'area ({unit[0]})':>12}"]
        for c in self.classes:
            lines.append(
                f"{c.class_id:>3}  {c.name:<{width}}  {c.polygons:>9}  "
                f"{format_area(c.area_m2, unit, with_unit=False):>12}"
            )
        lines.append(
            f"{'':>3}  {'total':<{width}}  {self.polygons:>9}  {format_area(self.area_m2, unit, with_unit=False):>12}"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("input", "output", "json_path", "style_path"):
            d[key] = str(d[key]) if d[key] is not None else None
        return d


def _check_shared_style(path: Path, style: str) -> None:
    """QGIS loads ``<name>.qml`` as the style of every ``<name>.*`` beside it, so ``a.fgb`` and ``a.parquet``
    share ``a.qml``: the same style is no conflict; another one (other classes) would restyle the other file."""
    if path.exists() and path.read_text() != style:
        raise OutputExistsError(
            f"{path}: already holds another style (QGIS gives it to every {path.stem}.* file "
            "beside it); pass --overwrite to replace it, or choose another output name"
        )


def check_simplify(simplify: float | None) -> float | None:
    """``simplify`` as a float > 0 (or None); anything else is a CdkdValueError."""
    if simplify is None:
        return None
    try:
        value = float(simplify)
    except (TypeError, ValueError):
        raise CdkdValueError(f"--simplify {simplify!r} is not a number (a tolerance in CRS units)") from None
    if not np.isfinite(value) or value <= 0:
        raise CdkdValueError(f"--simplify must be a tolerance > 0 in CRS units, got {simplify!r}")
    return value


def _check_outputs(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]}: already exists; pass --overwrite to replace it")


def _cache_bytes(src: Any, rows: int, halo: int) -> int:
    """GDAL block cache for reading strips: the block rows one strip and its halo touch, twice over."""
    block_rows = src.block_shapes[0][0]
    return max(MIN_CACHE, 2 * (rows + 2 * halo + 2 * block_rows) * src.width * np.dtype(src.dtypes[0]).itemsize)


def _bar(strips: list[Strip], desc: str, progress: bool) -> Iterable[Strip]:
    return track(strips, desc=desc, unit="strip", enabled=progress)


def final_polygons(
    src: Any, raster: ClassRaster, strips: Iterable[Strip], sieve_px: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Final polygons in pixel coordinates and their class ids, in batches, strip by strip (top to bottom)."""
    merger = StripMerger()
    for strip in strips:
        raw, valid = read_rows(src, raster, strip.read0, strip.read1)
        ids, valid = to_ids(raster, raw, valid)
        if sieve_px:
            ids = sieve_ids(ids, valid, sieve_px)
        ids, valid = ids[strip.core], valid[strip.core]
        polygons, classes = polygonize(ids, valid, strip.row0)
        yield from merger.add(polygons, classes, ids, valid, strip.row0, last=strip.row1 == raster.height)
    if merger.open_components:
        raise RuntimeError(f"{merger.open_components} polygons left open after the last strip")


def vectorize(
    raster: str | Path,
    out: str | Path,
    *,
    min_area: str | MinArea | None = None,
    simplify: float | None = None,
    layer: str | None = None,
    layer_per_class: bool = False,
    classes: str | Path | None = None,
    area: str | AreaMode = "auto",
    overwrite: bool = False,
    progress: bool = True,
    window_rows: int | None = None,
) -> VectorizeReport:
    """Polygonise the class raster ``raster`` into the vector file ``out`` (see the module docstring).

    Args:
        raster: single-band integer GeoTIFF of class ids (``cdkd segment`` output, or any with ``classes``).
        out: the file to write, its format by extension: ``.gpkg`` (GeoPackage, styled for QGIS in its
            ``layer_styles`` table), ``.fgb`` (FlatGeobuf) or ``.parquet`` (GeoParquet), these two with the QGIS
            style in ``<out stem>.qml`` beside them. The report goes to ``<out>.json``.
        min_area: ``"100m2"`` or ``"25px"``: regions smaller than this join their largest neighbour.
        simplify: coverage simplification tolerance in CRS units (neighbours keep sharing their edges).
        layer: the layer's name (default: the raster's file stem); not with ``layer_per_class``.
        layer_per_class: one layer per class present, named after the class (GeoPackage only).
        classes: YAML class file; needed when the raster carries no cdkd class metadata.
        area: how ``area_m2``, ``perimeter_m`` and an ``m2`` ``min_area`` are measured (``measure.AreaMode``):
            ``"auto"`` (planar where planar areas are ground areas within 0.1 % over the raster, ellipsoidal
            elsewhere), ``"planar"`` or ``"ellipsoidal"`` (ground measures in any CRS; see ``measure``).
        overwrite: replace an existing ``out`` / ``<out>.json``.
        window_rows: core rows per strip (default: ~2 M pixels per strip, ``strips.STRIP_PIXELS``).

    Raises:
        CdkdIOError: unreadable raster, an existing output without ``overwrite`` (``OutputExistsError``), or
            no writer for the format (a GDAL driver or pyarrow missing).
        DataError: wrong band count or type, no CRS, no legend, unknown values, nothing but nodata.
        CdkdValueError: a bad ``min_area``, ``simplify``, ``area``, layer name or output extension.
    """
    start = time.perf_counter()
    raster_path, out = Path(raster), Path(out)
    json_path = out.with_name(out.name + ".json")
    fmt = output_format(out)
    style_path = out.with_suffix(".qml") if fmt.style_sidecar else None
    area_limit = parse_min_area(min_area) if min_area is not None else None
    tolerance = check_simplify(simplify)
    if layer is not None and layer_per_class:
        raise CdkdValueError("give --layer or --layer-per-class, not both")
    if layer_per_class and not fmt.multi_layer:
        raise CdkdValueError(f"{out}: a {fmt.name} file holds one layer; drop --layer-per-class or write a .gpkg")
    _check_outputs([out, json_path], overwrite)
    check_folder_writable(out.parent, f"{out}: cannot write the output")
    check_writable(fmt, out)

    info = inspect(raster_path, classes)
    if style_path is not None and not overwrite:
        _check_shared_style(style_path, qml(info.schema))
    try:
        measure = choose_area(area, info.crs, info.transform, info.width, info.height)
    except DataError as e:
        raise DataError(f"{raster_path}: {e}") from None
    names = info.schema.names
    layer_name = layer if layer is not None else raster_path.stem
    check_layer_names(list(names) if layer_per_class else [layer_name])
    sieve_px = (
        sieve_size(area_limit, info.transform, info.crs, info.width, info.height, measure.mode) if area_limit else None
    )
    halo = sieve_halo(sieve_px) if sieve_px else 0
    rows = window_rows if window_rows is not None else default_window_rows(info.width)
    strips = plan_strips(info.height, rows, halo)
    settings = VectorizeSettings(
        info.legend,
        str(area_limit) if area_limit else None,
        sieve_px,
        halo,
        tolerance,
        None if layer_per_class else layer_name,
        layer_per_class,
        rows,
        len(strips),
        area=measure.mode,
        planar_scale_error_percent=measure.scale_error_percent,
        format=fmt.name,
    )

    with open_raster(raster_path) as src, rasterio.Env(GDAL_CACHEMAX=_cache_bytes(src, rows, halo)):
        scan(info, src, _bar(strips, "scan", progress))
        with atomic_path(out) as tmp, _staged(tmp, fmt) as gpkg:
            writer = GpkgWriter(gpkg, info.crs.to_wkt())
            sink = PolygonSink(writer, info, None if layer_per_class else layer_name, measure.mode)
            _write_polygons(
                sink, final_polygons(src, info, _bar(strips, "vectorize", progress), sieve_px), info, tolerance
            )
            layers = tuple(writer.close())
            if fmt.multi_layer:
                write_layer_styles(gpkg, list(layers), info.schema)
            else:
                convert(gpkg, layers[0], tmp, fmt)
    if style_path is not None:
        atomic_write_text(style_path, qml(info.schema))

    classes_out = sink.results()
    report = VectorizeReport(
        raster_path,
        out,
        json_path,
        style_path,
        info.crs.to_string(),
        layers,
        classes_out,
        sum(c.polygons for c in classes_out),
        sum(c.area_m2 for c in classes_out),
        time.perf_counter() - start,
        settings,
        tuple(w for w in [planar_note(info.crs, measure)] if w),
    )
    atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _write_polygons(
    sink: PolygonSink, strips: Iterable[tuple[np.ndarray, np.ndarray]], raster: ClassRaster, tolerance: float | None
) -> None:
    """Feed each strip's final pixel polygons to ``sink`` in CRS coordinates (simplified together at the end
    with ``tolerance``), in ``gpkg.batches``: bounded in polygons and in vertices."""
    held: list[tuple[np.ndarray, np.ndarray]] = []  # pixel polygons, kept only for --simplify
    for pixel_polygons, class_ids in strips:
        if tolerance is None:
            for part in batches(pixel_polygons):
                sink.add(to_crs(pixel_polygons[part], raster.transform), class_ids[part])
                pixel_polygons[part] = None  # written: let GEOS free them now, not after the whole strip
                release_freed_memory()
        else:
            held.append((pixel_polygons, class_ids))
        del pixel_polygons, class_ids
        release_freed_memory()
    if tolerance is not None:
        polygons = simplify_coverage(np.concatenate([p for p, _ in held]), raster.transform, tolerance)
        class_ids = np.concatenate([c for _, c in held])
        del held
        for part in batches(polygons):
            sink.add(polygons[part], class_ids[part])


@contextmanager
def _staged(tmp: Path, fmt: VectorFormat) -> Iterator[Path]:
    """The GeoPackage the polygons go to: ``tmp`` itself for a GeoPackage output, else a temporary beside it
    (removed on exit) that ``formats.convert`` streams into ``tmp``."""
    if fmt.multi_layer:
        yield tmp
        return
    fd, name = tempfile.mkstemp(prefix=f".{tmp.stem}.", suffix=".stage.gpkg", dir=tmp.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


class PolygonSink:
    """Measures final polygons, tallies them per class and queues them for their layer of ``writer``.

    ``layer`` names the one layer; None writes one layer per class, named after it. ``area``: ``"planar"`` or
    ``"ellipsoidal"`` (``measure.choose_area``).
    """

    def __init__(self, writer: GpkgWriter, raster: ClassRaster, layer: str | None, area: str) -> None:
        self.writer, self.raster, self.layer, self.area = writer, raster, layer, area
        self.names = np.asarray(raster.schema.names, dtype=object)
        self.polygons = np.zeros(len(self.names), dtype=np.int64)
        self.area_m2 = np.zeros(len(self.names))

    def add(self, polygons: np.ndarray, class_ids: np.ndarray) -> None:
        """(n,) polygons in CRS coordinates and their (n,) class ids."""
        if not len(polygons):
            return
        area, perimeter = area_perimeter(polygons, self.raster.crs, self.area)
        np.add.at(self.polygons, class_ids, 1)
        np.add.at(self.area_m2, class_ids, area)
        names = self.names[class_ids]
        if self.layer is not None:
            self.writer.add(self.layer, polygons, class_ids, names, area, perimeter)
            return
        for cid in np.unique(class_ids):
            pick = class_ids == cid
            self.writer.add(self.names[cid], polygons[pick], class_ids[pick], names[pick], area[pick], perimeter[pick])

    def results(self) -> tuple[ClassResult, ...]:
        return tuple(
            ClassResult(i, str(n), int(self.polygons[i]), float(self.area_m2[i])) for i, n in enumerate(self.names)
        )
