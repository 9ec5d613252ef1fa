"""Wall time and peak memory of ``cdkd vectorize`` against GDAL's polygoniser, on a synthetic land-cover scene.

Run by hand::

    python bench/vectorize.py [--size 8192] [--workdir DIR] [--json PATH]

Builds a ``size`` x ``size`` uint8 class raster (EPSG:32633, 10 m, tiled DEFLATE GeoTIFF labelled like
``cdkd segment`` output): two smoothed random fields, a coarse one for land-cover blobs and a fine one for ragged
edges and small patches, cut into 6 equal-area classes, with nodata corners like a scene's footprint. Then, each
in its own process, run under GNU ``/usr/bin/time`` so that each peak RSS is that process's own:

(a) ``cdkd.vector.vectorize`` (strips, the library's defaults);
(b) ``gdal_polygonize.py`` (the system GDAL's script) to a GPKG, 4-connectivity, nodata masked;
(c) plain ``rasterio.features.shapes`` over the whole array in memory, written with one pyogrio call;
(d) ``import cdkd.vector`` alone: the baseline that (a) pays before reading a pixel (it loads lazily: what (a)
    pays for GDAL, GEOS and PROJ comes with its first raster);
(e) the cost of measures: ``area_m2``/``perimeter_m`` of a random sample of (a)'s polygons, planar and on the
    ellipsoid (``--area ellipsoidal``: ring-by-ring geodesics with pyproj, long edges densified), as seconds
    per 100 000 polygons of this scene.

(a) and (c) write the same fields (class_id, class_name, area_m2, perimeter_m); gdal_polygonize writes only the
value. Wall time is the whole process (interpreter start and imports included); "work" is the time a Python
worker spends after its imports. Every row runs once, in one invocation, so ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
GDAL_POLYGONIZE = "/usr/bin/gdal_polygonize.py"
TIME = "/usr/bin/time"  # GNU time
GDAL_PYTHON = "/usr/bin/python3"  # the interpreter with the system GDAL's bindings (osgeo), not this venv's
CLASSES = ("water", "forest", "grassland", "cropland", "built_up", "bare")
COLORS = ("#0000FF", "#006400", "#7CFC00", "#FFD700", "#FF0000", "#A0522D")


# --------------------------------------------------------------------------------------------------------------
# the scene


def smooth_field(size: int, sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float32 Gaussian random field, smoothed with a Gaussian of ``sigma_px`` pixels (via FFT)."""
    spectrum = np.fft.rfft2(rng.standard_normal((size, size), dtype=np.float32))
    ky, kx = np.fft.fftfreq(size).astype(np.float32)[:, None], np.fft.rfftfreq(size).astype(np.float32)[None, :]
    spectrum *= np.exp(-2 * (np.pi * sigma_px) ** 2 * (kx**2 + ky**2))
    field = np.fft.irfft2(spectrum, s=(size, size)).astype(np.float32)
    return field / field.std()


def make_scene(path: Path, size: int, seed: int = 0) -> dict:
    """Write the benchmark class raster; returns facts about it (classes, nodata share)."""
    import rasterio
    from rasterio.transform import Affine

    from cdkd.data.classes import ClassSchema
    from cdkd.data.classraster import NODATA, write_class_metadata

    rng = np.random.default_rng(seed)
    field = smooth_field(size, size / 160, rng) + 0.35 * smooth_field(size, 3.0, rng)
    edges = np.quantile(field[:: max(1, size // 1024), :: max(1, size // 1024)], np.linspace(0, 1, 7)[1:-1])
    ids = np.digitize(field, edges).astype(np.uint8)
    del field
    rows, cols = np.ogrid[:size, :size]
    ids[(rows + cols < size // 6) | (size - 1 - rows + cols < size // 10)] = NODATA  # footprint corners
    schema = ClassSchema.from_dict(
        {"classes": [{"id": i, "name": n, "color": c} for i, (n, c) in enumerate(zip(CLASSES, COLORS))]}
    )
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": Affine(10, 0, 400_000, 0, -10, 5_600_000),
        "nodata": NODATA,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(ids, 1)
        write_class_metadata(dst, schema)
    return {
        "size": size,
        "classes": len(CLASSES),
        "nodata_share": float((ids == NODATA).mean()),
        "file_mb": path.stat().st_size / 1e6,
    }


# --------------------------------------------------------------------------------------------------------------
# workers (run in their own process by ``measure``)


def work_cdkd(raster: Path, out: Path) -> int:
    from cdkd.vector import vectorize

    return vectorize(raster, out, overwrite=True, progress=False).polygons


def work_shapes(raster: Path, out: Path) -> int:
    """What one would write without strips: the whole array, GDAL's polygons, one GeoDataFrame, one write."""
    import geopandas as gpd
    import pyogrio
    import rasterio
    import shapely
    from rasterio.features import shapes
    from shapely.geometry import shape

    with rasterio.open(raster) as src:
        ids, valid, transform, crs = src.read(1), src.dataset_mask() > 0, src.transform, src.crs
    features = [(shape(g), int(v)) for g, v in shapes(ids, mask=valid, connectivity=4, transform=transform)]
    polygons = np.array([g for g, _ in features])
    class_ids = np.array([v for _, v in features], dtype=np.int32)
    frame = gpd.GeoDataFrame(
        {
            "class_id": class_ids,
            "class_name": np.asarray(CLASSES, dtype=object)[class_ids],
            "area_m2": shapely.area(polygons),
            "perimeter_m": shapely.length(polygons),
        },
        geometry=polygons,
        crs=crs.to_wkt(),
    )
    pyogrio.write_dataframe(frame, out, layer="scene", driver="GPKG", layer_options={"SPATIAL_INDEX": "YES"})
    return len(frame)


def work_import(raster: Path, out: Path) -> int:
    return 0


MEASURE_SAMPLE = 20_000  # polygons timed per mode


def work_measures(raster: Path, out: Path) -> dict:
    """Seconds per 100 000 polygons for planar and ellipsoidal measures, on a sample of cdkd's polygons."""
    import pyogrio
    import shapely
    from rasterio.crs import CRS

    from cdkd.vector.measure import area_perimeter

    info = pyogrio.read_info(out, layer="scene")
    pick = np.sort(
        np.random.default_rng(0).choice(info["features"], min(MEASURE_SAMPLE, info["features"]), replace=False)
    )
    frame = pyogrio.read_dataframe(out, layer="scene", columns=[])
    polygons = frame.geometry.values[pick]
    crs = CRS.from_wkt(frame.crs.to_wkt())
    result = {"sample": len(polygons), "vertices": int(shapely.get_num_coordinates(polygons).sum())}
    for mode in ("planar", "ellipsoidal"):
        start = time.perf_counter()
        area_perimeter(polygons, crs, mode)
        result[f"{mode}_s_per_100k"] = (time.perf_counter() - start) * 100_000 / len(polygons)
    return result


WORKERS = {"cdkd": work_cdkd, "shapes": work_shapes, "import": work_import, "measures": work_measures}
# imported before the clock starts, so that "work" is the work
IMPORTS = {
    "cdkd": ("cdkd.vector",),
    "shapes": ("geopandas", "pyogrio", "rasterio", "shapely"),
    "import": ("cdkd.vector",),
    "measures": ("cdkd.vector.measure", "pyogrio"),
}


def worker_main(name: str, raster: Path, out: Path) -> None:
    import importlib

    for module in IMPORTS[name]:
        importlib.import_module(module)
    start = time.perf_counter()
    result = WORKERS[name](raster, out)
    extra = result if isinstance(result, dict) else {"polygons": result}
    print(json.dumps({"polygons": extra.pop("polygons", 0), "work_s": time.perf_counter() - start, **extra}))


# --------------------------------------------------------------------------------------------------------------
# measuring


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd`` under GNU time: wall seconds, CPU seconds, peak RSS (MB) of that process alone, stdout.

    GNU time forks the command from its own tiny process. (Spawning from this process and reading ``ru_maxrss``
    from ``os.wait4`` would not do: Linux carries the parent's high-water RSS into a vforked child's
    ``ru_maxrss`` across exec, and ``getrusage(RUSAGE_CHILDREN)`` is a maximum over every child so far.)
    """
    fd, stats = tempfile.mkstemp(suffix=".time")
    os.close(fd)
    try:
        start = time.perf_counter()
        proc = subprocess.run([TIME, "-o", stats, "-f", "%M %U %S", *cmd], capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        peak_kb, user, system = Path(stats).read_text().split()[-3:]
    finally:
        os.unlink(stats)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return {
        "wall_s": wall,
        "cpu_s": float(user) + float(system),
        "peak_rss_mb": int(peak_kb) / 1024,
        "stdout": proc.stdout,
    }


def run(size: int, workdir: Path) -> dict:
    """All measurements in one invocation; returns the JSON-able result."""
    import pyogrio

    raster = workdir / "scene.tif"
    start = time.perf_counter()
    scene = make_scene(raster, size)
    scene["build_s"] = time.perf_counter() - start
    python = sys.executable
    plans = {
        "cdkd.vector.vectorize": [python, __file__, "--worker", "cdkd", str(raster), str(workdir / "cdkd.gpkg")],
        "gdal_polygonize.py": [
            GDAL_PYTHON,
            GDAL_POLYGONIZE,
            str(raster),
            "-q",
            "-f",
            "GPKG",
            str(workdir / "gdal.gpkg"),
            "scene",
            "class_id",
        ],
        "rasterio shapes (whole)": [python, __file__, "--worker", "shapes", str(raster), str(workdir / "shapes.gpkg")],
        "import cdkd.vector only": [python, __file__, "--worker", "import", str(raster), str(workdir / "x")],
        "measures (sample)": [python, __file__, "--worker", "measures", str(raster), str(workdir / "cdkd.gpkg")],
    }
    rows = {}
    for name, cmd in plans.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        r = run_measured(cmd)
        if GDAL_POLYGONIZE in cmd:
            r["polygons"] = int(pyogrio.read_info(workdir / "gdal.gpkg", layer="scene")["features"])
            r["work_s"] = None
        else:
            r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
        del r["stdout"]
        rows[name] = r
    ours, gdal, whole = (rows[k] for k in ("cdkd.vector.vectorize", "gdal_polygonize.py", "rasterio shapes (whole)"))
    measures = rows.pop("measures (sample)")
    return {
        "measures": measures,
        "scene": scene,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "rows": rows,
        "ratios": {
            "time_cdkd_over_gdal": ours["wall_s"] / gdal["wall_s"],
            "time_cdkd_over_shapes": ours["wall_s"] / whole["wall_s"],
            "rss_cdkd_over_gdal": ours["peak_rss_mb"] / gdal["peak_rss_mb"],
            "rss_cdkd_over_shapes": ours["peak_rss_mb"] / whole["peak_rss_mb"],
            "rss_cdkd_above_import_mb": ours["peak_rss_mb"] - rows["import cdkd.vector only"]["peak_rss_mb"],
        },
    }


def print_table(result: dict) -> None:
    s = result["scene"]
    print(
        f"{s['size']} x {s['size']} px class raster, {s['classes']} classes, {s['nodata_share']:.1%} nodata, "
        f"{s['file_mb']:.1f} MB DEFLATE GeoTIFF; {result['cpus']} CPUs; one run each, each in its own process"
    )
    print(f"{'method':<26}{'wall (s)':>10}{'work (s)':>10}{'CPU (s)':>10}{'peak RSS (MB)':>15}{'polygons':>10}")
    for name, r in result["rows"].items():
        work = f"{r['work_s']:.2f}" if r["work_s"] is not None else "-"
        print(
            f"{name:<26}{r['wall_s']:>10.2f}{work:>10}{r['cpu_s']:>10.2f}{r['peak_rss_mb']:>15.0f}{r['polygons']:>10}"
        )
    q = result["ratios"]
    print(
        f"cdkd / gdal_polygonize: time {q['time_cdkd_over_gdal']:.2f}x, peak RSS {q['rss_cdkd_over_gdal']:.2f}x;"
        f"  cdkd / whole-array shapes: time {q['time_cdkd_over_shapes']:.2f}x, peak RSS "
        f"{q['rss_cdkd_over_shapes']:.2f}x"
    )
    print(f"cdkd peak RSS above its import baseline: {q['rss_cdkd_above_import_mb']:.0f} MB")
    m = result["measures"]
    print(
        f"measures on {m['sample']} of cdkd's polygons ({m['vertices'] / m['sample']:.0f} vertices each): planar "
        f"{m['planar_s_per_100k']:.2f} s, ellipsoidal {m['ellipsoidal_s_per_100k']:.1f} s per 100 000 polygons"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1], Path(argv[2]), Path(argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="raster side in px")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the raster and outputs here (default: a temporary folder, removed afterwards)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not Path(TIME).is_file():
        raise SystemExit(f"{TIME} (GNU time) not found: it measures each run's peak memory (apt install time)")
    if not Path(GDAL_POLYGONIZE).is_file():
        raise SystemExit(
            f"{GDAL_POLYGONIZE} not found (install GDAL's Python scripts, e.g. apt install gdal-bin python3-gdal)"
        )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cdkd-vectorize-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.size, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(result)
    if args.json:
        from cdkd.utils.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
