"""``cdkd vectorize``: strip-wise polygons equal whole-raster ones, exact areas, sieve, coverage simplification,
GeoPackage layers and one clear error per bad input (through a CLI runner)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pyproj
import pytest
import rasterio
import shapely
import typer
from conftest import make_geotiff, one_clean_error
from rasterio.features import shapes
from rasterio.transform import Affine
from typer.testing import CliRunner

from cdkd.data.classes import ClassSchema, LandCoverClass
from cdkd.data.classraster import NODATA, write_class_metadata
from cdkd.errors import CdkdValueError, OutputExistsError
from cdkd.scene.core.areas import ClassAreaTally
from cdkd.vector import MinArea, parse_min_area, vectorize
from cdkd.vector.coverage import node
from cdkd.vector.join import join_pieces
from cdkd.vector.polygonize import StripMerger, polygonize
from cdkd.vector.sieve import sieve_halo, sieve_ids, sieve_size
from cdkd.vector.strips import plan_strips
from cli.vectorize import vectorize_command

SCHEMA = ClassSchema(
    (
        LandCoverClass(0, "grass", "#00FF00"),
        LandCoverClass(1, "water", "#0000FF"),
        LandCoverClass(2, "road", "#808080"),
        LandCoverClass(3, "building", "#FF0000"),
    )
)
UTM = Affine(10, 0, 500_000, 0, -10, 5_000_000)  # 10 m pixels: 100 m² each
PIXEL_M2 = 100.0

app = typer.Typer()
app.command("vectorize", no_args_is_help=True)(vectorize_command)


@app.callback()
def _main() -> None:
    """A stand-in for cli.main's app, so that 'vectorize' is a sub-command as it is there."""


runner = CliRunner()


# --------------------------------------------------------------------------------------------------------------
# fixtures


def write_class_raster(
    path: Path,
    ids: np.ndarray,
    *,
    labelled: bool = True,
    crs: str | None = "EPSG:32633",
    transform: Affine = UTM,
    nodata: float | None = NODATA,
) -> Path:
    """(H, W) integer ids as a single-band GeoTIFF, labelled with ``SCHEMA`` as cdkd segment labels its output."""
    make_geotiff(path, ids[None], crs=crs, transform=transform, nodata=nodata)
    if labelled:
        with rasterio.open(path, "r+") as dst:
            write_class_metadata(dst, SCHEMA)
    return path


def scene_ids() -> np.ndarray:
    """(64, 48) uint8 ids with shapes that strip borders cut in every way (rows 0..63; borders every 7 rows)."""
    ids = np.zeros((64, 48), dtype=np.uint8)
    ids[3:41, 2:5] = 1  # U: two arms that only meet at the bottom (rows 38..40), many borders above
    ids[3:41, 12:15] = 1
    ids[38:41, 2:15] = 1
    ids[5:8, 18:30] = 2  # ∩: one piece at the top that splits into two arms below
    ids[5:44, 18:21] = 2
    ids[5:44, 27:30] = 2
    ids[44:60, 2:20] = 3  # a ring around a hole (rows 47..56) with an island in the hole
    ids[47:57, 5:17] = 0
    ids[50:54, 8:13] = 1
    checker = (np.add.outer(np.arange(6), np.arange(6)) % 2).astype(np.uint8) + 1  # corner contacts only
    ids[11:17, 34:40] = checker  # crosses the border at row 14
    rng = np.random.default_rng(0)
    ids[20:40, 33:47] = rng.integers(0, 4, size=(20, 14))  # noise: many tiny regions on several borders
    ids[58:64, 30:44] = NODATA  # a nodata block at the bottom edge ...
    ids[30, 40] = NODATA  # ... and single nodata pixels inside a class
    ids[0, 0] = NODATA
    return ids


def blob_ids(size: int, classes: int = 4, seed: int = 0, scale: float = 0.03) -> np.ndarray:
    """(size, size) land-cover-like blobs: a smoothed random field cut into ``classes`` equal-area classes."""
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft2(rng.normal(size=(size, size)))
    ky, kx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    field = np.fft.irfft2(spectrum * np.exp(-(kx**2 + ky**2) / (2 * scale**2)), s=(size, size))
    edges = np.quantile(field, np.linspace(0, 1, classes + 1)[1:-1])
    return np.digitize(field, edges).astype(np.uint8)


def polygon_layers(path: Path) -> list[str]:
    """The polygon layers of a GeoPackage (not the attribute table ``layer_styles`` that holds their style)."""
    return [name for name, kind in pyogrio.list_layers(path) if kind is not None]


def read(path: Path, layer: str | None = None):
    """A polygon layer (by default the only one) of ``path`` as a GeoDataFrame."""
    if layer is None and Path(path).suffix == ".gpkg":
        (layer,) = polygon_layers(path)
    return pyogrio.read_dataframe(path, layer=layer)


def pixel_counts(ids: np.ndarray, k: int = 4) -> np.ndarray:
    return np.bincount(ids[ids != NODATA].ravel(), minlength=k)


def area_by_class(frame, k: int = 4) -> np.ndarray:
    return np.bincount(frame["class_id"].to_numpy(), weights=frame["area_m2"].to_numpy(), minlength=k)


def canonical(polygons: np.ndarray, classes: np.ndarray) -> list:
    """Polygons sorted by (class, area, centroid), each normalised, for comparing two polygon sets."""
    cx, cy = shapely.get_x(shapely.centroid(polygons)), shapely.get_y(shapely.centroid(polygons))
    order = np.lexsort((np.round(cy, 6), np.round(cx, 6), np.round(shapely.area(polygons), 6), classes))
    return list(zip(classes[order], shapely.normalize(polygons[order])))


def assert_same_polygons(a: list, b: list) -> None:
    assert len(a) == len(b)
    assert [c for c, _ in a] == [c for c, _ in b]
    assert all(shapely.equals(pa, pb) for (_, pa), (_, pb) in zip(a, b))


# --------------------------------------------------------------------------------------------------------------
# polygons


@pytest.mark.parametrize("window_rows", [1, 7, 16])
def test_strips_equal_one_window_and_whole_raster_polygonize(tmp_path: Path, window_rows: int) -> None:
    ids = scene_ids()
    src = write_class_raster(tmp_path / "scene.tif", ids)
    whole = vectorize(src, tmp_path / "whole.gpkg", progress=False)  # one strip: the raster is small
    strips = vectorize(src, tmp_path / "strips.gpkg", window_rows=window_rows, progress=False)
    assert whole.settings.strips == 1 and strips.settings.strips == -(-64 // window_rows)
    a, b = read(whole.output), read(strips.output)
    assert_same_polygons(
        canonical(a.geometry.values, a.class_id.to_numpy()), canonical(b.geometry.values, b.class_id.to_numpy())
    )
    # and both equal GDAL's polygons of the whole array, moved into the CRS
    ref = [
        (shapely.geometry.shape(g), int(v)) for g, v in shapes(ids, mask=ids != NODATA, connectivity=4, transform=UTM)
    ]
    ref_polygons, ref_classes = np.array([g for g, _ in ref]), np.array([v for _, v in ref])
    assert_same_polygons(canonical(ref_polygons, ref_classes), canonical(b.geometry.values, b.class_id.to_numpy()))
    assert strips.polygons == len(b) == len(ref)
    # areas are exact: pixel count x pixel area (coordinates are integers times 10 m)
    np.testing.assert_array_equal(area_by_class(b), pixel_counts(ids) * PIXEL_M2)
    assert [c.area_m2 for c in strips.classes] == list(pixel_counts(ids) * PIXEL_M2)
    assert shapely.is_valid(b.geometry.values).all() and set(b.geom_type) == {"Polygon"}


def test_u_ring_and_hole_survive_many_borders(tmp_path: Path) -> None:
    ids = scene_ids()
    src = write_class_raster(tmp_path / "scene.tif", ids)
    frame = read(vectorize(src, tmp_path / "out.gpkg", window_rows=7, progress=False).output)
    u = frame[(frame.class_id == 1) & (frame.area_m2 == (38 * 6 + 3 * 7) * PIXEL_M2)]
    assert len(u) == 1  # the two arms met below the borders at rows 7..35 and became one polygon
    ring = frame[(frame.class_id == 3) & (frame.area_m2 == (16 * 18 - 10 * 12) * PIXEL_M2)]
    assert len(ring) == 1 and len(ring.geometry.iloc[0].interiors) == 1  # its hole closed below a border
    cap = frame[(frame.class_id == 2) & (frame.area_m2 == (3 * 12 + 2 * 36 * 3) * PIXEL_M2)]
    assert len(cap) == 1  # the ∩ is one polygon, not one per arm
    # the checkerboard touches only at corners: 36 separate one-pixel polygons, also across the border at row 14
    window = shapely.box(500_000 + 340, 5_000_000 - 170, 500_000 + 400, 5_000_000 - 110)  # cols 34..39, rows 11..16
    inside = frame[frame.geometry.within(window.buffer(0.01))]
    assert len(inside) == 36 and (inside.area_m2 == PIXEL_M2).all()


def test_fields_crs_and_report(tmp_path: Path) -> None:
    ids = scene_ids()
    report = vectorize(
        write_class_raster(tmp_path / "scene.tif", ids), tmp_path / "out.gpkg", window_rows=9, progress=False
    )
    info = pyogrio.read_info(report.output, layer="scene")
    assert pyogrio.list_layers(report.output)[:, 0].tolist() == ["scene", "layer_styles"]
    assert pyproj.CRS(info["crs"]).to_epsg() == 32633
    assert list(info["fields"]) == ["class_id", "class_name", "area_m2", "perimeter_m"]
    frame = read(report.output)
    assert (frame.class_name == np.array(SCHEMA.names, dtype=object)[frame.class_id]).all()
    np.testing.assert_allclose(frame.perimeter_m, frame.geometry.length)  # metres: the CRS unit is the metre
    saved = json.loads(report.json_path.read_text())
    assert report.json_path == tmp_path / "out.gpkg.json"
    assert saved["polygons"] == report.polygons == len(frame) and saved["crs"] == "EPSG:32633"
    assert [c["name"] for c in saved["classes"]] == list(SCHEMA.names)
    assert saved["settings"]["window_rows"] == 9 and saved["settings"]["legend"] == "raster metadata"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_nodata_never_becomes_a_polygon(tmp_path: Path) -> None:
    ids = scene_ids()
    frame = read(
        vectorize(
            write_class_raster(tmp_path / "s.tif", ids), tmp_path / "o.gpkg", window_rows=5, progress=False
        ).output
    )
    rows, cols = np.nonzero(ids == NODATA)
    x, y = 500_000 + 10 * (cols + 0.5), 5_000_000 - 10 * (rows + 0.5)
    hits = shapely.STRtree(frame.geometry.values).query(shapely.points(x, y), predicate="within")
    assert hits.size == 0
    assert frame.area_m2.sum() == (ids != NODATA).sum() * PIXEL_M2


def test_dataset_mask_and_class_file_ignore_value(tmp_path: Path) -> None:
    """An unlabelled raster: its nodata value (0 here) and the class file's ignore value are both nodata."""
    raw = scene_ids().astype(np.int16)  # values 0..3 (0 becomes nodata) and 255 (ignore_index)
    raw[raw != NODATA] += 1  # raw 1..4 -> ids 0..3 through the class file's 'values'
    raw[:4, :4] = 0
    classes = tmp_path / "classes.yaml"
    SCHEMA.save(classes)
    text = classes.read_text() + "values: {1: 0, 2: 1, 3: 2, 4: 3}\n"
    classes.write_text(text)
    src = write_class_raster(tmp_path / "raw.tif", raw, labelled=False, nodata=0)
    report = vectorize(src, tmp_path / "o.gpkg", classes=classes, window_rows=6, progress=False)
    expected = scene_ids()
    expected[:4, :4] = NODATA
    assert [c.area_m2 for c in report.classes] == list(pixel_counts(expected) * PIXEL_M2)
    assert report.settings.legend == str(classes)


# --------------------------------------------------------------------------------------------------------------
# geographic CRS


def test_geographic_crs_gives_geodesic_m2(tmp_path: Path) -> None:
    ids = np.zeros((40, 50), dtype=np.uint8)
    ids[10:30, 5:45] = 1
    step, west, north = 0.001, 10.0, 45.04
    transform = Affine(step, 0, west, 0, -step, north)
    report = vectorize(
        write_class_raster(tmp_path / "geo.tif", ids, crs="EPSG:4326", transform=transform),
        tmp_path / "geo.gpkg",
        window_rows=7,
        progress=False,
    )
    geod = pyproj.Geod(ellps="WGS84")

    def pixels_m2(rows: range, cols: range) -> float:  # per-pixel geodesic truth
        return sum(
            abs(
                geod.geometry_area_perimeter(
                    shapely.box(west + c * step, north - (r + 1) * step, west + (c + 1) * step, north - r * step)
                )[0]
            )
            for r in rows
            for c in cols
        )

    block = shapely.box(west + 5 * step, north - 30 * step, west + 45 * step, north - 10 * step)
    _, block_perimeter = geod.geometry_area_perimeter(block)
    water = read(report.output).query("class_id == 1")
    assert len(water) == 1
    # 1e-7, not 1e-9: the block's 4.4 km edges are densified to 100 m (a 4-corner box's top and bottom edges
    # would be geodesic chords, not the parallels that pixel edges follow)
    assert water.area_m2.iloc[0] == pytest.approx(pixels_m2(range(10, 30), range(5, 45)), rel=1e-7)
    assert water.perimeter_m.iloc[0] == pytest.approx(block_perimeter, rel=1e-7)
    assert report.area_m2 == pytest.approx(pixels_m2(range(40), range(50)), rel=1e-7)
    # and close to the textbook value: (111.32 km x cos(lat) x dlon) x (111.13 km x dlat) for 40 x 20 pixels
    lat = np.radians(north - 20 * step)
    approx = (40 * step * 111_320 * np.cos(lat)) * (20 * step * 111_132)
    assert water.area_m2.iloc[0] == pytest.approx(approx, rel=5e-3)
    assert pyproj.CRS(pyogrio.read_info(report.output, layer="geo")["crs"]).to_epsg() == 4326


def test_min_area_in_m2_on_a_geographic_crs_uses_the_centre_pixel() -> None:
    from rasterio.crs import CRS

    transform = Affine(0.001, 0, 10.0, 0, -0.001, 45.04)
    centre = shapely.box(10.0 + 0.05, 45.04 - 0.021, 10.0 + 0.051, 45.04 - 0.020)  # pixel (col 50, row 20)
    pixel_m2 = abs(pyproj.Geod(ellps="WGS84").geometry_area_perimeter(centre)[0])
    assert sieve_size(MinArea(10 * pixel_m2, "m2"), transform, CRS.from_epsg(4326), 100, 40) == 10
    assert sieve_size(MinArea(10.5 * pixel_m2, "m2"), transform, CRS.from_epsg(4326), 100, 40) == 11


def _mercator_scene(tmp_path: Path) -> tuple[Path, np.ndarray, Affine]:
    """(60, 80) ids in Web Mercator at ~38° N with 0.6 m pixels (as cogeo.tif): planar areas are 1.6x the ground."""
    ids = np.zeros((60, 80), dtype=np.uint8)
    ids[10:50, 20:60] = 1
    ids[0:5, 0:80] = 2
    transform = Affine(0.6, 0, 1_340_000.0, 0, -0.6, 4_580_000.0)
    return write_class_raster(tmp_path / "merc.tif", ids, crs="EPSG:3857", transform=transform), ids, transform


def test_web_mercator_areas_are_ground_areas_by_default(tmp_path: Path) -> None:
    from rasterio.crs import CRS

    from cdkd.geodesy import footprint_area_m2

    src, ids, transform = _mercator_scene(tmp_path)
    ground = vectorize(src, tmp_path / "ground.gpkg", window_rows=7, progress=False)  # --area auto
    planar = vectorize(src, tmp_path / "planar.gpkg", area="planar", window_rows=7, progress=False)
    assert ground.settings.area == "ellipsoidal" and planar.settings.area == "planar"
    assert [c.area_m2 for c in planar.classes] == list(pixel_counts(ids) * 0.36)  # planar: exact CRS areas
    assert planar.warnings and "ellipsoidal gives ground areas" in planar.warnings[0] and not ground.warnings
    # the whole raster's ground area, measured independently on the densified footprint (scene engine's rule)
    footprint = footprint_area_m2(CRS.from_epsg(3857), transform, 80, 60)
    assert ground.area_m2 == pytest.approx(footprint, rel=1e-6)
    # textbook scales of the spherical Web Mercator on the WGS84 ellipsoid at the centre latitude: east-west
    # N cos(lat) / R, north-south M cos(lat) / R (N, M: the ellipsoid's radii of curvature; R: the sphere's)
    lat = np.radians(pyproj.Transformer.from_crs(3857, 4326, always_xy=True).transform(1_340_024.0, 4_579_982.0)[1])
    a, e2 = 6_378_137.0, 0.00669437999014
    w = 1 - e2 * np.sin(lat) ** 2
    east, north = a / np.sqrt(w) * np.cos(lat) / a, a * (1 - e2) / w**1.5 * np.cos(lat) / a
    for p, g in zip(planar.classes, ground.classes):
        assert g.area_m2 == pytest.approx(p.area_m2 * east * north, rel=1e-4)
    # what made auto choose the ellipsoid: planar areas here are 61 % larger than the ground (PROJ gives Web
    # Mercator's areal scale as the sphere's sec²(latitude), 61.06 %, where the ellipsoid's truth is 61.32 %)
    assert ground.settings.planar_scale_error_percent == pytest.approx(100 / (east * north) - 100, abs=0.5)
    water = read(ground.output).query("class_id == 1")
    assert water.perimeter_m.iloc[0] == pytest.approx(2 * 40 * 0.6 * (east + north), rel=1e-4)


def test_ellipsoidal_areas_in_utm_stay_close_to_planar(tmp_path: Path) -> None:
    ids = scene_ids()
    src = write_class_raster(tmp_path / "utm.tif", ids)
    planar = vectorize(src, tmp_path / "p.gpkg", progress=False)  # auto: planar on the central meridian
    ground = vectorize(src, tmp_path / "g.gpkg", area="ellipsoidal", progress=False)
    assert planar.settings.area == "planar" and not planar.warnings
    assert planar.settings.planar_scale_error_percent == pytest.approx(0.08, abs=1e-3)  # 1 - 0.9996²
    for p, g in zip(planar.classes, ground.classes):
        # UTM's linear scale on its central meridian (500 km easting) is 0.9996: planar areas are 0.08 % small
        assert p.area_m2 == pytest.approx(g.area_m2 * 0.9996**2, rel=2e-6)
        assert g.polygons == p.polygons


def test_auto_measures_utm_on_the_ellipsoid_near_a_zone_edge(tmp_path: Path) -> None:
    """Near the equator at a zone's edge UTM's areas are 0.2 % large: auto leaves planar for the ellipsoid."""
    edge = Affine(10, 0, 170_000, 0, -10, 120_000)  # ~3° west of 15° E, 1° N: areal scale 1.0019
    src = write_class_raster(tmp_path / "edge.tif", scene_ids(), transform=edge)
    report = vectorize(src, tmp_path / "edge.gpkg", progress=False)
    assert report.settings.area == "ellipsoidal" and report.settings.planar_scale_error_percent > 0.1
    planar = vectorize(src, tmp_path / "planar.gpkg", area="planar", progress=False)
    assert planar.warnings and "up to 0.19 %" in planar.warnings[0]
    for p, g in zip(planar.classes, report.classes):
        assert p.area_m2 / g.area_m2 == pytest.approx(1.0019, abs=2e-4)


def test_min_area_in_m2_follows_the_area_measure(tmp_path: Path) -> None:
    from rasterio.crs import CRS

    _, _, transform = _mercator_scene(tmp_path)
    crs = CRS.from_epsg(3857)
    assert sieve_size(MinArea(3.6, "m2"), transform, crs, 80, 60, "planar") == 10  # 0.36 m² a pixel
    ground_px = sieve_size(MinArea(3.6, "m2"), transform, crs, 80, 60, "ellipsoidal")
    assert ground_px == 17  # ground pixels are 0.224 m²: 3.6 m² is 16.1 of them, so regions under 17 px go
    with pytest.raises(CdkdValueError, match="--area 'flat'"):
        sieve_size(MinArea(3.6, "m2"), transform, crs, 80, 60, "flat")


# --------------------------------------------------------------------------------------------------------------
# simplification


def test_simplify_keeps_a_valid_coverage_and_the_areas(tmp_path: Path) -> None:
    ids = blob_ids(160)
    ids[150:, 100:] = NODATA
    src = write_class_raster(tmp_path / "blobs.tif", ids)
    plain = vectorize(src, tmp_path / "plain.gpkg", window_rows=23, progress=False)
    simple = vectorize(src, tmp_path / "simple.gpkg", window_rows=23, simplify=7.5, progress=False)
    frame = read(simple.output)
    polygons = frame.geometry.values
    assert shapely.coverage_is_valid(polygons)
    assert shapely.is_valid(polygons).all() and not shapely.is_empty(polygons).any()
    assert simple.polygons == plain.polygons
    exact = pixel_counts(ids) * PIXEL_M2
    np.testing.assert_allclose(area_by_class(frame), exact, rtol=5e-3)
    vertices = shapely.get_num_coordinates(read(plain.output).geometry.values).sum()
    assert shapely.get_num_coordinates(polygons).sum() < 0.75 * vertices  # 7.5 m: staircases become slopes
    assert simple.settings.simplify == 7.5


def test_node_inserts_t_junctions_so_the_coverage_is_valid() -> None:
    ids = np.zeros((6, 10), dtype=np.uint8)
    ids[3:, :5], ids[3:, 5:], ids[1, 1] = 1, 2, 3  # class 0's bottom edge meets two neighbours: a T-junction
    polygons, _ = polygonize(ids, np.ones(ids.shape, dtype=bool), 0)
    assert not shapely.coverage_is_valid(polygons)
    noded = node(polygons)
    assert shapely.coverage_is_valid(noded) and shapely.equals(noded, polygons).all()
    assert shapely.get_num_coordinates(noded).sum() == shapely.get_num_coordinates(polygons).sum() + 1


# --------------------------------------------------------------------------------------------------------------
# sieve


def islands_ids() -> np.ndarray:
    """(40, 30) grass with water islands of 1, 2 and 3 px (some across the borders at rows 8, 16, ...) and a
    large 7x7 water block; a road island next to nodata."""
    ids = np.zeros((40, 30), dtype=np.uint8)
    ids[3, 3] = 1
    ids[7:9, 10] = 1  # 2 px across the border at row 8
    ids[15:18, 20] = 1  # 3 px across the border at row 16
    ids[22, 5:8] = 3  # 3 px building
    ids[25:32, 15:22] = 1  # 49 px: stays
    ids[36:40, 0:6] = NODATA
    ids[35, 2] = 2  # 1 px road between grass and nodata
    return ids


@pytest.mark.parametrize("min_area", ["400m2", "4px", "3.5 px"])
def test_min_area_merges_small_islands_into_the_surrounding_class(tmp_path: Path, min_area: str) -> None:
    ids = islands_ids()
    report = vectorize(
        write_class_raster(tmp_path / "i.tif", ids),
        tmp_path / "i.gpkg",
        window_rows=8,
        min_area=min_area,
        progress=False,
    )
    assert report.settings.min_area_px == 4 and report.settings.sieve_halo_rows == 3
    frame = read(report.output)
    assert sorted(frame.class_id) == [0, 1]  # grass and the 49 px water block; the islands went to grass
    grass = frame[frame.class_id == 0].geometry.iloc[0]
    assert len(grass.interiors) == 1  # the only hole left is the big block's
    assert frame.area_m2.sum() == (ids != NODATA).sum() * PIXEL_M2  # nothing lost, nodata still nodata
    assert frame[frame.class_id == 1].area_m2.iloc[0] == 49 * PIXEL_M2


def test_strip_sieve_removes_what_a_whole_raster_sieve_removes() -> None:
    """The halo rule (sieve docstring): the set of changed pixels is exactly the whole-raster one."""
    ids = blob_ids(120, scale=0.08, seed=3)
    valid = np.random.default_rng(1).random(ids.shape) > 0.02
    for size in (3, 12, 40):
        whole = sieve_ids(ids, valid, size)
        strips = np.empty_like(ids)
        for s in plan_strips(ids.shape[0], 10, sieve_halo(size)):
            strips[s.row0 : s.row1] = sieve_ids(ids[s.read0 : s.read1], valid[s.read0 : s.read1], size)[s.core]
        np.testing.assert_array_equal((whole != ids) & valid, (strips != ids) & valid)
        assert (strips[~valid] == ids[~valid]).all()


def test_parse_min_area() -> None:
    assert parse_min_area("100m2") == MinArea(100.0, "m2")
    assert parse_min_area(" 2.5e3 m² ") == MinArea(2500.0, "m2")
    assert parse_min_area("25px") == MinArea(25.0, "px") and str(MinArea(25.0, "px")) == "25px"
    for bad in ("100", "m2", "-5m2", "0px", "100 acres", "1,000m2", ""):
        with pytest.raises(CdkdValueError, match="100m2"):
            parse_min_area(bad)


def test_nodata_rows_between_strips(tmp_path: Path) -> None:
    """A strip that is all nodata closes everything above it; nothing links across it."""
    ids = scene_ids()
    ids[21:28] = NODATA  # exactly strip 3 of 7-row strips
    ids[14, :] = NODATA  # and a nodata row on a border
    src = write_class_raster(tmp_path / "gap.tif", ids)
    report = vectorize(src, tmp_path / "gap.gpkg", window_rows=7, progress=False)
    frame = read(report.output)
    assert len(frame) == len(list(shapes(ids, mask=ids != NODATA, connectivity=4)))
    np.testing.assert_array_equal(area_by_class(frame), pixel_counts(ids) * PIXEL_M2)


def test_join_pieces_keeps_every_hole_and_drops_border_vertices() -> None:
    top = shapely.Polygon([(0, 0), (6, 0), (6, 4), (0, 4)], [[(1, 1), (1, 2), (2, 2), (2, 1)]])
    below = shapely.Polygon([(2, 4), (9, 4), (9, 8), (2, 8)], [[(4, 5), (4, 7), (6, 7), (6, 5)]])
    joined = join_pieces([top, below])
    assert joined.equals(shapely.union_all([top, below])) and joined.is_valid
    assert len(joined.interiors) == 2 and joined.area == 24 - 1 + 28 - 4
    assert shapely.get_num_coordinates(joined.exterior) == 9  # 8 corners + closing: no vertex left mid-edge


def test_merger_closes_everything_after_the_last_strip() -> None:
    ids = scene_ids()
    valid = ids != NODATA
    merger, count = StripMerger(), 0
    for s in plan_strips(ids.shape[0], 5):
        polygons, classes = polygonize(np.where(valid, ids, 0)[s.row0 : s.row1], valid[s.row0 : s.row1], s.row0)
        count += sum(
            len(p)
            for p, _ in merger.add(
                polygons, classes, ids[s.row0 : s.row1], valid[s.row0 : s.row1], s.row0, last=s.row1 == ids.shape[0]
            )
        )
    assert merger.open_components == 0
    assert count == len(list(shapes(ids, mask=valid, connectivity=4)))


# --------------------------------------------------------------------------------------------------------------
# GeoPackage layers and overwriting


def test_layer_per_class_and_layer_name(tmp_path: Path) -> None:
    ids = scene_ids()
    src = write_class_raster(tmp_path / "scene.tif", ids)
    report = vectorize(src, tmp_path / "per.gpkg", layer_per_class=True, window_rows=10, progress=False)
    layers = pyogrio.list_layers(report.output)
    assert sorted(polygon_layers(report.output)) == sorted(SCHEMA.names)
    assert set(layers[:, 1]) == {"Polygon", None}  # and the attribute table layer_styles
    for c in report.classes:
        frame = read(report.output, layer=c.name)
        assert len(frame) == c.polygons and (frame.class_id == c.class_id).all()
        assert frame.area_m2.sum() == pixel_counts(ids)[c.class_id] * PIXEL_M2
        assert pyogrio.read_info(report.output, layer=c.name)["features"] == c.polygons
    named = vectorize(src, tmp_path / "named.gpkg", layer="land_cover", progress=False)
    assert named.layers == ("land_cover",)
    with pytest.raises(CdkdValueError, match="not both"):
        vectorize(src, tmp_path / "x.gpkg", layer="a", layer_per_class=True, progress=False)


def test_refuses_to_overwrite_without_overwrite(tmp_path: Path) -> None:
    src = write_class_raster(tmp_path / "scene.tif", scene_ids())
    out = tmp_path / "out.gpkg"
    vectorize(src, out, progress=False)
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        vectorize(src, out, progress=False)
    assert out.read_bytes() == before
    res = runner.invoke(app, ["vectorize", str(src), "--out", str(out), "--no-progress"])
    assert res.exit_code == 1 and "--overwrite" in one_clean_error(res.output)
    report = vectorize(src, out, overwrite=True, min_area="2px", progress=False)
    assert report.settings.min_area_px == 2 and read(out).area_m2.sum() == report.area_m2


# --------------------------------------------------------------------------------------------------------------
# command line


def _run(*args) -> tuple[int, str]:
    res = runner.invoke(app, ["vectorize", *(str(a) for a in args), "--no-progress"])
    return res.exit_code, res.output


def test_cli_prints_the_table_and_the_output(tmp_path: Path) -> None:
    src = write_class_raster(tmp_path / "scene.tif", scene_ids())
    out = tmp_path / "maps" / "scene.gpkg"
    code, text = _run(src, "--out", out, "--min-area", "200m2", "--simplify", "5", "--layer-per-class")
    assert code == 0, text
    assert all(name in text for name in SCHEMA.names) and "total" in text
    assert str(out) in text and out.is_file() and Path(str(out) + ".json").is_file()
    assert runner.invoke(app, ["vectorize", "--help"]).exit_code == 0


def _truncated(path: Path) -> Path:
    """A GeoTIFF whose header is intact and whose second half of pixel data is cut off (no class metadata,
    which would be written after the pixels)."""
    write_class_raster(path, blob_ids(128), labelled=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    return path


@pytest.mark.parametrize(
    "case, code, expected",
    [
        ("text", 1, "not a readable raster"),
        ("missing", 1, "no such file"),
        ("truncated", 1, "cannot read rows"),
        ("bands", 1, "has 3 bands"),
        ("float", 1, "float32 is not an integer type"),
        ("no_crs", 1, "has no CRS"),
        ("unlabelled", 1, "--classes"),
        ("unknown_values", 1, "2 values that are neither class ids nor nodata: 7 (20 px), 9 (3 px)"),
        ("all_nodata", 1, "every pixel is nodata"),
        ("min_area", 2, "--min-area '100 acres' is not an area"),
        ("simplify", 2, "--simplify must be a tolerance > 0"),
        ("suffix", 2, "unknown output extension '.shp'; use .gpkg (GeoPackage), .fgb (FlatGeobuf), .parquet"),
        ("both_layers", 2, "not both"),
        ("classes_missing", 1, "class file not found"),
        ("planar_degrees", 1, "is in degrees: planar areas would be in square degrees"),
    ],
)
def test_cli_errors(tmp_path: Path, case: str, code: int, expected: str) -> None:
    ids = scene_ids()
    src = tmp_path / f"{case}.tif"
    out = tmp_path / "out.gpkg"
    extra: list = []
    if case == "text":
        src.write_text("not a raster\n")
    elif case == "truncated":
        _truncated(src)
        classes = tmp_path / "classes.yaml"
        SCHEMA.save(classes)
        extra = ["--classes", classes]
    elif case == "bands":
        make_geotiff(src, np.stack([ids] * 3))
    elif case == "float":
        make_geotiff(src, ids[None].astype(np.float32))
    elif case == "no_crs":
        write_class_raster(src, ids, crs=None)
    elif case == "unlabelled":
        write_class_raster(src, ids, labelled=False)
    elif case == "unknown_values":
        bad = ids.copy()
        bad[0:2, 20:30] = 7
        bad[10, 40:43] = 9
        write_class_raster(src, bad)
    elif case == "all_nodata":
        write_class_raster(src, np.full_like(ids, NODATA))
    elif case == "planar_degrees":
        write_class_raster(src, ids, crs="EPSG:4326", transform=Affine(0.001, 0, 10.0, 0, -0.001, 45.0))
        extra = ["--area", "planar"]
    elif case != "missing":
        write_class_raster(src, ids)
        extra = {
            "min_area": ["--min-area", "100 acres"],
            "simplify": ["--simplify", "-1"],
            "both_layers": ["--layer", "x", "--layer-per-class"],
            "classes_missing": ["--classes", tmp_path / "nope.yaml"],
            "area_mode": ["--area", "flat"],
        }.get(case, [])
        if case == "suffix":
            out = tmp_path / "out.shp"
    exit_code, text = _run(src, "--out", out, *extra)
    assert exit_code == code, text
    line = one_clean_error(text)
    assert expected in line
    if case not in ("min_area", "simplify", "suffix", "both_layers", "area_mode"):
        assert src.name in line or "nope.yaml" in line
    assert not out.exists() and not Path(str(out) + ".json").exists()  # nothing written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("name", ["colorado_hro_nodata.tif", "RGB.byte.tif"])
def test_real_scene_segmented_then_vectorised(shared_data: Path, tmp_path: Path, name: str) -> None:
    """End to end on a real scene: cdkd segment's class raster -> polygons that cover exactly its valid pixels."""
    from conftest import make_segmenter

    from cdkd.inference.runtimes import open_runtime
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene

    model = make_segmenter(tmp_path / "segmenter.pt", tile=512, overlap=64)
    raster = tmp_path / "lc.tif"
    segment_scene(shared_data / "scenes" / name, open_runtime(model), raster, SegmentOptions(progress=False))
    report = vectorize(raster, tmp_path / "lc.gpkg", progress=False, window_rows=97)
    with rasterio.open(raster) as src:
        ids = src.read(1)
        pixel_m2 = abs(src.transform.a * src.transform.e)
        crs, transform = src.crs, src.transform
    frame = read(tmp_path / "lc.gpkg")
    assert frame.crs == crs and shapely.is_valid(frame.geometry.values).all()
    # the same pixels give the same ground area in the polygons and in the scene report's per-pixel tally
    tally = ClassAreaTally(len(report.classes), crs, transform, ids.shape[1], ids.shape[0])
    tally.add(0, ids)
    for c in report.classes:
        if report.settings.area == "planar":  # RGB.byte.tif lies near its UTM zone's edge: ellipsoidal
            assert c.area_m2 == pytest.approx((ids == c.class_id).sum() * pixel_m2, rel=1e-9)
        assert c.area_m2 == pytest.approx(tally.area_m2[c.class_id], rel=1e-3)
    assert frame["area_m2"].sum() == pytest.approx(report.area_m2, rel=1e-9)
