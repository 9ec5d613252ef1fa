"""``cdkd vectorize`` outputs a GIS opens as they are: the QGIS style in the GeoPackage, FlatGeobuf and GeoParquet
by extension (equal to the GeoPackage's features), ``--config`` files, and enum choices refused at parse time."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely
from conftest import one_clean_error
from test_vectorize import SCHEMA, app, blob_ids, read, runner, scene_ids, write_class_raster

from cdkd.data.classes import color_hex
from cdkd.data.classraster import NODATA
from cdkd.errors import CdkdValueError, ConfigError, OutputExistsError
from cdkd.vector import VectorizeConfig, vectorize
from cdkd.vector.choices import AREA_MODES
from cdkd.vector.formats import FORMATS, geo_metadata
from cdkd.vector.style import qml


def _classes_in_qml(text: str) -> dict[int, tuple[str, str]]:
    """class id -> (label, fill colour "#RRGGBB") from a categorized renderer's QML."""
    root = ET.fromstring(text)
    renderer = root.find("renderer-v2")
    assert renderer is not None and renderer.get("type") == "categorizedSymbol"
    assert renderer.get("attr") == "class_id"
    fills = {}
    for symbol in renderer.find("symbols"):
        props = {p.get("k"): p.get("v") for p in symbol.iter("prop")}
        rgba = [int(v) for v in props["color"].split(",")]
        fills[symbol.get("name")] = color_hex(rgba[:3])
    return {int(c.get("value")): (c.get("label"), fills[c.get("symbol")]) for c in renderer.find("categories")}


def test_geopackage_opens_styled_in_qgis(tmp_path: Path) -> None:
    src = write_class_raster(tmp_path / "scene.tif", scene_ids())
    report = vectorize(src, tmp_path / "lc.gpkg", layer_per_class=True, progress=False)
    styles = pyogrio.read_dataframe(report.output, layer="layer_styles")
    assert sorted(styles.f_table_name) == sorted(report.layers)  # one default style per polygon layer
    assert (styles.f_geometry_column == pyogrio.read_info(report.output, layer=report.layers[0])["geometry_name"]).all()
    assert styles.useAsDefault.astype(bool).all() and (styles.styleName != "").all()
    expected = {c.id: (c.name, color_hex(c.color)) for c in SCHEMA.classes}
    for text in styles.styleQML:
        assert _classes_in_qml(text) == expected  # every class, named, in its colour
    assert report.style_path is None  # a GeoPackage holds its own style


def test_qml_escapes_class_names() -> None:
    from cdkd.data.classes import ClassSchema, LandCoverClass

    schema = ClassSchema((LandCoverClass(0, 'roads & "paths" <paved>', "#112233"), LandCoverClass(1, "eau", "#0000FF")))
    assert _classes_in_qml(qml(schema)) == {0: ('roads & "paths" <paved>', "#112233"), 1: ("eau", "#0000FF")}


@pytest.mark.parametrize("suffix", [".fgb", ".parquet"])
def test_flatgeobuf_and_geoparquet_hold_the_geopackages_features(tmp_path: Path, suffix: str) -> None:
    ids = blob_ids(96, seed=4)
    ids[80:, :30] = NODATA
    src = write_class_raster(tmp_path / "blobs.tif", ids)
    gpkg = vectorize(src, tmp_path / "lc.gpkg", window_rows=13, progress=False)
    other = vectorize(src, tmp_path / f"lc{suffix}", window_rows=13, progress=False)
    assert other.settings.format == FORMATS[suffix].name and other.polygons == gpkg.polygons
    # geopandas reads both as they are (GeoParquet through pyarrow: GDAL's own Parquet support varies by build)
    a = read(gpkg.output)
    b = gpd.read_parquet(other.output) if suffix == ".parquet" else gpd.read_file(other.output)
    assert b.crs == a.crs and list(b.columns) == list(a.columns)
    # FlatGeobuf's spatial index reorders features: compare as sorted sets
    key = ["class_id", "area_m2", "perimeter_m"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert (a.class_id.to_numpy() == b.class_id.to_numpy()).all() and (a.class_name == b.class_name).all()
    np.testing.assert_array_equal(a.area_m2, b.area_m2)
    assert shapely.equals_exact(a.geometry.values, b.geometry.values, tolerance=0).all()
    # the QGIS style beside the file, which QGIS loads as the layer's default
    assert other.style_path == tmp_path / "lc.qml"
    assert _classes_in_qml(other.style_path.read_text()) == {c.id: (c.name, color_hex(c.color)) for c in SCHEMA.classes}
    # nothing left behind: no staged GeoPackage, no temporary
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("lc")) == sorted(
        ["lc.gpkg", "lc.gpkg.json", f"lc{suffix}", f"lc{suffix}.json", "lc.qml"]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_geoparquet_metadata() -> None:
    meta = geo_metadata("EPSG:32633")
    assert meta["version"] == "1.1.0" and meta["primary_column"] == "geometry"
    column = meta["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"]
    assert column["crs"]["id"] == {"authority": "EPSG", "code": 32633}


def test_single_layer_formats_refuse_layer_per_class_and_overwrite_rules(tmp_path: Path) -> None:
    src = write_class_raster(tmp_path / "s.tif", scene_ids())
    with pytest.raises(CdkdValueError, match="holds one layer"):
        vectorize(src, tmp_path / "o.fgb", layer_per_class=True, progress=False)
    vectorize(src, tmp_path / "o.fgb", progress=False)
    (tmp_path / "o.fgb").unlink()
    (tmp_path / "o.fgb.json").unlink()
    # the style left beside it is the one this run writes (a.fgb and a.parquet share a.qml): no conflict
    assert vectorize(src, tmp_path / "o.fgb", progress=False).output.is_file()
    (tmp_path / "o.fgb").unlink()
    (tmp_path / "o.fgb.json").unlink()
    (tmp_path / "o.qml").write_text("<qgis>another style</qgis>")
    with pytest.raises(OutputExistsError, match=r"o\.qml: already holds another style"):
        vectorize(src, tmp_path / "o.fgb", progress=False)
    assert vectorize(src, tmp_path / "o.fgb", overwrite=True, progress=False).output.is_file()
    assert "another style" not in (tmp_path / "o.qml").read_text()


def test_unknown_extension_is_refused_in_one_line(tmp_path: Path) -> None:
    src = write_class_raster(tmp_path / "s.tif", scene_ids())
    for name in ("o.shp", "o.geojson", "o"):
        res = runner.invoke(app, ["vectorize", str(src), "--out", str(tmp_path / name), "--no-progress"])
        assert res.exit_code == 2
        line = one_clean_error(res.output)
        assert "unknown output extension" in line and ".gpkg (GeoPackage), .fgb (FlatGeobuf), .parquet" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


def test_area_choices_are_listed_and_a_wrong_one_refused_at_once(tmp_path: Path) -> None:
    help_text = runner.invoke(app, ["vectorize", "--help"], env={"COLUMNS": "250"}).output
    assert "<auto|planar|ellipsoidal>" in help_text
    res = runner.invoke(
        app,
        ["vectorize", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o.gpkg"), "--area", "flat"],
        env={"COLUMNS": "250"},
    )
    assert res.exit_code == 2 and "'flat' is not one of 'auto', 'planar', 'ellipsoidal'" in res.output
    assert not (tmp_path / "o.gpkg").exists()
    assert AREA_MODES == ("auto", "planar", "ellipsoidal")


def test_config_round_trip_and_flags_override_it(tmp_path: Path) -> None:
    cfg = VectorizeConfig(min_area="300m2", simplify=5.0, layer="land_cover", area="planar", window_rows=11)
    path = tmp_path / "vectorize.yaml"
    cfg.save(path)
    assert VectorizeConfig.load(path) == cfg
    src = write_class_raster(tmp_path / "s.tif", scene_ids())
    out = tmp_path / "o.gpkg"
    res = runner.invoke(
        app, ["vectorize", str(src), "--out", str(out), "--config", str(path), "--layer", "lc", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    import json

    settings = json.loads(Path(str(out) + ".json").read_text())["settings"]
    assert settings["layer"] == "lc"  # the flag wins over the file
    assert settings["min_area"] == "300m2" and settings["simplify"] == 5.0 and settings["window_rows"] == 11
    assert settings["area"] == "planar" and settings["min_area_px"] == 3


@pytest.mark.parametrize(
    "text, expected",
    [
        ("area: flat\n", "area 'flat': choose one of auto, planar, ellipsoidal"),
        ("min_area: 5 acres\n", "is not an area"),
        ("simplify: -1\n", "tolerance > 0"),
        ("colour: red\n", "unknown key(s) colour"),
        ("window_rows: 0\n", "window_rows must be a positive integer"),
    ],
)
def test_bad_config_files_name_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        VectorizeConfig.load(path)
    assert str(path) in str(err.value) and expected in str(err.value)
    src = write_class_raster(tmp_path / "s.tif", scene_ids())
    res = runner.invoke(app, ["vectorize", str(src), "--out", str(tmp_path / "o.gpkg"), "--config", str(path)])
    assert res.exit_code == 2 and "bad.yaml" in one_clean_error(res.output)


@pytest.mark.parametrize("suffix", [".fgb", ".parquet"])
def test_an_empty_layer_converts_to_an_empty_file(tmp_path: Path, suffix: str) -> None:
    """cdkd.scene.instances writes an empty layer when a scene has no object; converting it must still work."""
    from cdkd.vector.formats import convert

    staged = tmp_path / "empty.gpkg"
    pyogrio.raw.write(
        staged,
        np.zeros(0, object),
        [np.zeros(0, np.int32), np.zeros(0, object)],
        ["class_id", "class_name"],
        layer="objects",
        driver="GPKG",
        geometry_type="Polygon",
        crs="EPSG:32633",
    )
    out = tmp_path / f"objects{suffix}"
    convert(staged, "objects", out, FORMATS[suffix])
    frame = gpd.read_parquet(out) if suffix == ".parquet" else gpd.read_file(out)
    assert len(frame) == 0 and list(frame.columns) == ["class_id", "class_name", "geometry"]
    assert frame.crs.to_epsg() == 32633
