"""Ground areas against a per-pixel geodesic truth (each pixel's area from ``pyproj.Geod``, summed per class), in
EPSG:4326, EPSG:3857 and UTM: the polygon measures (any ring orientation, holes, ``--simplify``), ``--area auto``'s
rule, ``PixelAreas`` and the scene report's ``ClassAreaTally`` (a 2000 km tall scene included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyproj
import pytest
import shapely
from rasterio.transform import Affine
from test_vectorize import area_by_class, read, write_class_raster

from cdkd.data.classraster import NODATA
from cdkd.errors import CdkdValueError, CheckpointError
from cdkd.geodesy import (
    PixelAreas,
    footprint_area_m2,
    geodesic_area_perimeter,
    lonlat,
    pixel_quad_areas,
    planar_scale_error,
)
from cdkd.scene.core.areas import ClassAreaTally
from cdkd.vector import vectorize
from cdkd.vector.coverage import simplify_coverage
from cdkd.vector.polygonize import polygonize

# around 8.5 E, 47 N, as the rasters
GRIDS = {
    "EPSG:4326": Affine(1e-4, 0, 8.5, 0, -1e-4, 47.0),  # ~7.6 x 11 m pixels
    "EPSG:3857": Affine(10, 0, 946_000, 0, -10, 5_940_000),
    "EPSG:32632": Affine(5, 0, 462_000, 0, -5, 5_206_000),  # 38 km west of the central meridian
}


def truth_m2(crs: str, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) every pixel's geodesic area, its four corners measured with pyproj.Geod on the CRS's ellipsoid."""
    h, w = shape
    c, r = np.meshgrid(np.arange(w, dtype=float), np.arange(h, dtype=float))
    x, y = transform @ (np.stack([c, c + 1, c + 1, c], -1), np.stack([r, r, r + 1, r + 1], -1))
    lon, lat = lonlat(crs, np.asarray(x).ravel(), np.asarray(y).ravel())
    geod = pyproj.CRS(crs).get_geod()
    quads = zip(np.asarray(lon).reshape(-1, 4), np.asarray(lat).reshape(-1, 4))
    return np.array([abs(geod.polygon_area_perimeter(lo, la)[0]) for lo, la in quads]).reshape(h, w)


def truth_by_class(ids: np.ndarray, pixel_m2: np.ndarray, k: int = 4) -> np.ndarray:
    ok = ids != NODATA
    return np.bincount(ids[ok], weights=pixel_m2[ok], minlength=k)


def land_cover(n: int = 100, seed: int = 0) -> np.ndarray:
    """(n, n) ids 0..3: an annulus (1) with an island (2) in its hole and a ragged outer edge, a blob (3) with a
    hole, and a nodata patch."""
    r, c = np.mgrid[:n, :n]
    ids = np.zeros((n, n), np.uint8)
    d = np.hypot(r - n * 0.35, c - n * 0.35)
    ids[(d > n * 0.12) & (d < n * 0.3)] = 1
    ids[d < n * 0.05] = 2
    ids[np.hypot((r - n * 0.75) / 1.3, c - n * 0.7) < n * 0.2] = 3
    ids[np.hypot(r - n * 0.75, c - n * 0.7) < n * 0.06] = 0
    ragged = np.random.default_rng(seed).random((n, n)) < 0.15
    ids[ragged & (np.abs(d - n * 0.3) < 2)] = 1
    ids[n - 12 : n - 4, 4:20] = NODATA
    return ids


# --------------------------------------------------------------------------------------------------------------
# polygon measures


@pytest.mark.parametrize("crs", list(GRIDS))
def test_ring_orientation_does_not_change_area_or_perimeter(crs: str) -> None:
    t = GRIDS[crs]
    shell = [t @ p for p in [(0, 0), (40, 0), (40, 30), (0, 30)]]
    hole = [t @ p for p in [(10, 10), (20, 10), (20, 20), (10, 20)]]
    variants = [shapely.Polygon(s, [h]) for s in (shell, shell[::-1]) for h in (hole, hole[::-1])]
    area, perimeter = geodesic_area_perimeter(np.array(variants), crs)
    pixels = truth_m2(crs, t, (30, 40))
    expected = pixels.sum() - pixels[10:20, 10:20].sum()
    np.testing.assert_allclose(area, expected, rtol=1e-7)  # clockwise shells, counter-clockwise holes, ...
    geod = pyproj.CRS(crs).get_geod()
    rings = [np.asarray(lonlat(crs, *np.asarray(r).T)) for r in (shell + shell[:1], hole + hole[:1])]
    np.testing.assert_allclose(perimeter, sum(geod.line_length(lo, la) for lo, la in rings), rtol=1e-6)
    # a multipolygon sums its parts; an empty polygon measures nothing
    area, _ = geodesic_area_perimeter(np.array([shapely.MultiPolygon([variants[0]]), shapely.Polygon()]), crs)
    assert area[0] == pytest.approx(expected, rel=1e-7) and area[1] == 0


def test_long_straight_edges_follow_the_crs_not_the_geodesic() -> None:
    """Web Mercator at 47° N: a polygon whose top edge runs 8000 px (80 km, a parallel) along row 0 and whose
    bottom is a comb of 1 px edges. Measured as one geodesic, the top edge would bulge ~130 m poleward and add
    ~5x the polygon's area; densified, it follows the parallel, as the pixels do."""
    t = GRIDS["EPSG:3857"]
    comb = [(8000, 3)]
    for x in range(8000, 0, -2):
        comb += [(x - 1, 3), (x - 1, 2), (x - 2, 2), (x - 2, 3)]
    pixel_ring = [(0, 0), (8000, 0)] + comb
    polygon = shapely.Polygon([t @ p for p in pixel_ring])
    area, _ = geodesic_area_perimeter(np.array([polygon]), "EPSG:3857")
    per_row = pixel_quad_areas("EPSG:3857", t, np.zeros(3), np.arange(3.0))  # areas depend on the row only
    assert area[0] == pytest.approx(8000 * (per_row[0] + per_row[1]) + 4000 * per_row[2], rel=1e-4)
    lon, lat = lonlat("EPSG:3857", *np.asarray(polygon.exterior.coords).T)
    chords = abs(pyproj.Geod(ellps="WGS84").polygon_area_perimeter(lon, lat)[0])
    assert chords > 3 * area[0]  # what measuring the top edge as one geodesic gives


@pytest.mark.parametrize("crs", list(GRIDS))
def test_vectorize_areas_per_class_against_the_per_pixel_truth(tmp_path: Path, crs: str) -> None:
    ids, t = land_cover(), GRIDS[crs]
    truth = truth_by_class(ids, truth_m2(crs, t, ids.shape))
    src = write_class_raster(tmp_path / "lc.tif", ids, crs=crs, transform=t)
    report = vectorize(src, tmp_path / "lc.gpkg", window_rows=17, progress=False)  # default flags: --area auto
    got = area_by_class(read(report.output))
    assert report.settings.area == ("planar" if crs == "EPSG:32632" else "ellipsoidal")
    np.testing.assert_allclose(got, truth, rtol=1e-3)  # every class within 0.1 % (UTM planar: -0.077 %)
    if crs != "EPSG:32632":
        np.testing.assert_allclose(got, truth, rtol=1e-7)
    # the segment report's tally gives the same areas from the same pixels
    tally = ClassAreaTally(4, crs, t, ids.shape[1], ids.shape[0])
    tally.add(0, ids)
    np.testing.assert_allclose(tally.area_m2, truth, rtol=1e-6)


@pytest.mark.parametrize("crs", list(GRIDS))
def test_simplified_polygons_measure_their_ground_area(tmp_path: Path, crs: str) -> None:
    """--simplify moves boundaries (its own area change, a few % for a 5 px island, is the same in planar
    measures); what the measure adds on top must be nothing. coverage_simplify returns holes turning like their
    shells, which the old abs(sum of signed rings) counted as area (+127 % in the issue)."""
    ids, t = land_cover(), GRIDS[crs]
    tolerance = 1.5 * abs(t.a)
    polygons, classes = polygonize(ids, ids != NODATA, 0)
    simple = simplify_coverage(polygons, t, tolerance)
    same_turn = [
        p
        for p in simple
        if len(p.interiors) and shapely.LinearRing(p.exterior).is_ccw == shapely.LinearRing(p.interiors[0]).is_ccw
    ]
    assert same_turn  # the case the issue found
    src = write_class_raster(tmp_path / "lc.tif", ids, crs=crs, transform=t)
    ground = area_by_class(
        read(vectorize(src, tmp_path / "g.gpkg", simplify=tolerance, area="ellipsoidal", progress=False).output)
    )
    truth = truth_by_class(ids, truth_m2(crs, t, ids.shape))
    # planar areas of the same simplified polygons, relative to the planar pixel areas: simplification alone
    planar_change = np.bincount(classes, weights=shapely.area(simple), minlength=4) / (
        np.bincount(ids[ids != NODATA], minlength=4) * abs(t.determinant)
    )
    np.testing.assert_allclose(ground / truth, planar_change, rtol=1e-4)
    assert np.abs(ground / truth - 1).max() < 0.1  # the 5 px island loses 6 % to simplification


def test_footprint_area_is_the_sum_of_pixel_areas() -> None:
    t = Affine(0.01, 0, 5.0, 0, -0.01, 62.0)  # 2° x 4°: long edges, strongly varying pixel areas
    assert footprint_area_m2("EPSG:4326", t, 200, 400) == pytest.approx(
        PixelAreas("EPSG:4326", t, 200, 400).total(), rel=1e-6
    )


# --------------------------------------------------------------------------------------------------------------
# --area auto's rule


@pytest.mark.parametrize(
    "crs, transform, expected",
    [
        ("EPSG:32632", Affine(5, 0, 500_000, 0, -5, 5_200_000), 8.0e-4),  # central meridian: k0² = 0.9992
        ("EPSG:32632", Affine(10, 0, 170_000, 0, -10, 120_000), 1.9e-3),  # zone edge near the equator: +0.19 %
        ("EPSG:3857", GRIDS["EPSG:3857"], 1.15),  # 47° N: areas x2.15
        ("EPSG:3035", Affine(10, 0, 4_300_000, 0, -10, 2_700_000), 0.0),  # equal area
        ("EPSG:2263", Affine(10, 0, 980_000, 0, -10, 200_000), 0.0),  # US survey feet: the unit is accounted for
    ],
)
def test_planar_scale_error(crs: str, transform: Affine, expected: float) -> None:
    assert planar_scale_error(crs, transform, 1000, 1000) == pytest.approx(expected, abs=5e-5, rel=1e-2)


def test_planar_scale_error_is_infinite_in_degrees() -> None:
    assert planar_scale_error("EPSG:4326", GRIDS["EPSG:4326"], 10, 10) == np.inf


# --------------------------------------------------------------------------------------------------------------
# PixelAreas


@pytest.mark.parametrize(
    "crs, transform, blocks",
    [
        ("EPSG:4326", GRIDS["EPSG:4326"], 1),
        ("EPSG:3857", GRIDS["EPSG:3857"], 1),
        ("EPSG:32632", Affine(200, 0, 200_000, 0, -200, 5_300_000), 2),  # 300 km from the central meridian
        ("EPSG:4326", Affine(0.17320508, 0.1, 8.5, 0.1, -0.17320508, 60.0), 7),  # rotated 30°: rows cross parallels
    ],
)
def test_pixel_areas_match_every_pixels_geodesic_area(crs: str, transform: Affine, blocks: int) -> None:
    grid = PixelAreas(crs, transform, 60, 40)
    assert grid.blocks >= blocks and (blocks > 1) == (grid.blocks > 1)
    np.testing.assert_allclose(grid.pixels(0, 40), truth_m2(crs, transform, (40, 60)), rtol=1e-4)
    if blocks == 1:  # one block: exact per row
        np.testing.assert_allclose(grid.pixels(0, 40), truth_m2(crs, transform, (40, 60)), rtol=1e-9)


def test_pixel_areas_interpolate_between_knot_rows() -> None:
    t = Affine(0.09, 0, 5.0, 0, -0.09, 62.0)  # 10 km rows over 18° of latitude
    exact = PixelAreas("EPSG:4326", t, 3, 200)
    sparse = PixelAreas("EPSG:4326", t, 3, 200, max_knot_rows=50)
    np.testing.assert_allclose(sparse.rows(0, 200), exact.rows(0, 200), rtol=1e-5)
    assert np.abs(sparse.rows(0, 200) / exact.rows(0, 200) - 1).max() > 1e-8  # it did interpolate


def test_pixel_areas_refuse_a_raster_past_the_pole() -> None:
    from cdkd.errors import DataError

    with pytest.raises(DataError, match="pixel areas cannot be computed"):
        PixelAreas("EPSG:4326", Affine(0.1, 0, 0, 0, 0.1, 80.0), 10, 200)  # rows run north, past 90°


# --------------------------------------------------------------------------------------------------------------
# ClassAreaTally


def tall_scene() -> tuple[np.ndarray, Affine]:
    """A 2000 km tall EPSG:4326 scene (62° N to 44° N, 10 km pixels) whose classes sit north, south or all over."""
    h, w = 200, 60
    ids = np.zeros((h, w), np.uint8)
    ids[:50] = 1  # the north
    ids[150:, :30] = 2  # the south-west
    ids[np.random.default_rng(0).random((h, w)) < 0.1] = 3  # everywhere
    ids[10:20, 10:20] = NODATA
    return ids, Affine(0.09, 0, 5.0, 0, -0.09, 62.0)


def test_tally_of_a_2000_km_tall_scene_is_exact_per_class() -> None:
    ids, t = tall_scene()
    truth = truth_by_class(ids, truth_m2("EPSG:4326", t, ids.shape))
    tally = ClassAreaTally(4, "EPSG:4326", t, ids.shape[1], ids.shape[0])
    tally.add(0, ids)
    np.testing.assert_allclose(tally.area_m2, truth, rtol=1e-9)  # well within 0.1 %
    np.testing.assert_array_equal(tally.pixels, np.bincount(ids[ids != NODATA], minlength=4))
    mean = footprint_area_m2("EPSG:4326", t, ids.shape[1], ids.shape[0]) / ids.size
    assert np.abs(tally.pixels * mean / truth - 1).max() > 0.1  # the mean pixel area is off by > 10 %


def test_tally_bands_in_any_order_merge_and_resume() -> None:
    ids, t = tall_scene()
    h, w = ids.shape
    whole = ClassAreaTally(4, "EPSG:4326", t, w, h)
    whole.add(0, ids)
    a, b = ClassAreaTally(4, "EPSG:4326", t, w, h), ClassAreaTally(4, "EPSG:4326", t, w, h)
    for top in (150, 30, 110):  # out of order, two workers
        a.add(top, ids[top : top + 40])
    b.add(0, ids[:30])
    b.add(70, ids[70:110])
    b.add(190, ids[190:])
    assert not a.complete and a.rows_done == [[30, 70], [110, 190]]
    resumed = ClassAreaTally.from_state(json.loads(json.dumps(a.state())), "EPSG:4326", t, w, h)
    assert (resumed.area_m2 == a.area_m2).all() and resumed.rows_done == a.rows_done
    resumed.merge(b)
    assert resumed.complete
    np.testing.assert_array_equal(resumed.pixels, whole.pixels)
    np.testing.assert_allclose(resumed.area_m2, whole.area_m2, rtol=1e-12)
    with pytest.raises(CdkdValueError, match="rows 40..69 are already tallied"):
        resumed.add(40, ids[40:70])  # a band replayed after a resume is not counted twice
    with pytest.raises(CdkdValueError, match="already tallied"):
        a.merge(a)


def test_tally_validity_mask_and_bad_input() -> None:
    ids, t = tall_scene()
    h, w = ids.shape
    tally = ClassAreaTally(4, "EPSG:4326", t, w, h)
    valid = np.ones(ids.shape, bool)
    valid[:, :10] = False
    tally.add(0, ids, valid)
    masked = np.where(valid, ids, NODATA)
    assert (tally.pixels == np.bincount(masked[masked != NODATA], minlength=4)).all()
    with pytest.raises(CdkdValueError, match="class id 7 is neither 0..3 nor nodata"):
        ClassAreaTally(4, "EPSG:4326", t, w, h).add(0, np.full((2, w), 7, np.uint8))
    with pytest.raises(CdkdValueError, match="outside the raster"):
        ClassAreaTally(4, "EPSG:4326", t, w, h).add(199, ids[:2])
    with pytest.raises(CdkdValueError, match=r"must be \(rows, 60\)"):
        ClassAreaTally(4, "EPSG:4326", t, w, h).add(0, ids[:, :5])
    with pytest.raises(CheckpointError, match="another raster"):
        ClassAreaTally.from_state(tally.state(), "EPSG:4326", t, w + 1, h)
