"""STAC Items and ItemCollections as scenes (cdkd.data.stac): asset choice by the model's bands or --assets, the
band stack of the chosen assets (local files or COGs over HTTP range requests), errors naming item and band."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from conftest import SHARED_DATA, make_geotiff, make_segmenter, one_clean_error, synthetic_image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from typer.testing import CliRunner

from cdkd.data.bands import Band, BandSet
from cdkd.data.bandstack import write_manifest
from cdkd.data.files import open_raster
from cdkd.data.sensors import SENSOR_PRESETS
from cdkd.data.stac import StacAsset, StacBand, choose_assets, is_stac, stac_stem
from cdkd.data.stats import NormStats
from cdkd.errors import DataError
from cdkd.scene.core.source import SceneSource
from cli.main import app

S2 = SENSOR_PRESETS["sentinel2_l2a"]
S2_DIR = SHARED_DATA / "multispectral" / "bigearthnet_s2"
COMMON = {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "B11": "swir16"}
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
EO = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
MODEL_BANDS = ("B03", "B04", "B08", "B11")  # 10 m and 20 m: a mixed-resolution stack


def _patches(n: int) -> list[Path]:
    if not S2_DIR.is_dir():
        pytest.skip(f"real data not available: {S2_DIR}")
    return sorted(p for p in S2_DIR.iterdir() if p.is_dir() and p.name != "stacked")[:n]


def _eo(name: str) -> dict:
    band = next(b for b in S2.bands if b.name == name)
    return {
        "name": name,
        "common_name": COMMON[name],
        "center_wavelength": band.center_nm / 1000,
        "full_width_half_max": band.width_nm / 1000,
    }


def _item(root: Path, patch: Path, bands=("B02", "B03", "B04", "B08", "B11")) -> dict:
    """A Sentinel-2-style STAC item for a BigEarthNet patch: one COG per band under ``root/<id>/`` (hrefs relative
    to ``root``), each with its ``eo:bands``; a JPEG 2000 twin of B04 comes first and is never to be chosen (its
    file does not exist)."""
    folder = root / patch.name
    folder.mkdir(parents=True, exist_ok=True)
    assets = {
        "B04-jp2": {"href": f"{patch.name}/B04.jp2", "type": "image/jp2", "roles": ["data"], "eo:bands": [_eo("B04")]}
    }
    for name in bands:
        rasterio.shutil.copy(
            patch / f"{patch.name}_{name}.tif", folder / f"{name}.tif", driver="COG", BLOCKSIZE=64, OVERVIEWS="NONE"
        )
        assets[name] = {"href": f"{patch.name}/{name}.tif", "type": COG, "roles": ["data"], "eo:bands": [_eo(name)]}
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [EO],
        "id": patch.name,
        "geometry": None,
        "properties": {"datetime": "2017-06-13T10:10:31Z"},
        "links": [],
        "assets": assets,
    }


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _segmenter(path: Path, bands: tuple[str, ...] | None, in_chans: int = 4) -> Path:
    """A tiny real segmenter for uint16 data; it knows its bands (Sentinel-2 names and wavelengths) or not. Its
    64 px windows overlap by 8 px: four windows cover a 120 px patch."""
    spectral = None if bands is None else S2.select([S2.names.index(b) + 1 for b in bands])
    norm = NormStats(
        (1000.0,) * in_chans, (500.0,) * in_chans, tuple(range(1, in_chans + 1)), "uint16", spectral=spectral
    )
    return make_segmenter(path, overlap=8, in_chans=in_chans, norm=norm)


@pytest.fixture(scope="module")
def s2_model(tmp_path_factory) -> Path:
    """A segmenter that reads Sentinel-2's B03, B04, B08 and B11."""
    return _segmenter(tmp_path_factory.mktemp("models") / "s2.pt", MODEL_BANDS)


def _segment(*args) -> str:
    res = CliRunner().invoke(app, ["segment", *map(str, args), "--no-progress"])
    assert res.exit_code == 0, res.output
    return res.output


def _read(path: Path) -> tuple[np.ndarray, object, object]:
    with rasterio.open(path) as src:
        return src.read(), src.crs, src.transform


# ---------------------------------------------------------------------------------------------------- evidence


def test_a_stac_item_over_http_segments_to_the_raster_of_its_files_given_locally(tmp_path, http_folder, s2_model):
    patch = _patches(1)[0]
    catalog = tmp_path / "catalog"
    _write(catalog / f"{patch.name}.json", _item(catalog, patch))
    served = http_folder(catalog)
    model = s2_model
    url = f"{served.url}/{patch.name}.json"

    output = _segment(url, "--model", model, "--out", tmp_path / "remote.tif")
    assert f"item {patch.name}: reads asset(s) B03, B04, B08, B11" in output
    manifest = write_manifest(
        tmp_path / "local.bands.yaml", files=[catalog / patch.name / f"{b}.tif" for b in MODEL_BANDS]
    )
    _segment(manifest, "--model", model, "--out", tmp_path / "local.tif")

    remote, local = _read(tmp_path / "remote.tif"), _read(tmp_path / "local.tif")
    assert np.array_equal(remote[0], local[0]) and remote[1:] == local[1:]
    with rasterio.open(patch / f"{patch.name}_B03.tif") as b03:  # the finest asset's grid: 10 m
        assert remote[0].shape == (1, 120, 120) and (remote[1], remote[2]) == (b03.crs, b03.transform)
    assert json.loads((tmp_path / "remote.json").read_text())["scene"] == f"{url}#{patch.name}"
    read = {name for name, _, _ in served.ranges}
    # the model's assets were read by range requests; the others (B02, the JPEG 2000 twin) never
    assert read == {f"{patch.name}/{b}.tif" for b in MODEL_BANDS}


def test_a_missing_band_is_one_line_naming_the_item_and_the_band(tmp_path, s2_model):
    patch = _patches(1)[0]
    item = _write(tmp_path / "item.json", _item(tmp_path, patch, bands=("B02", "B03", "B04", "B08")))
    model = s2_model
    res = CliRunner().invoke(app, ["segment", str(item), "--model", str(model), "--out", str(tmp_path / "lc.tif")])
    assert res.exit_code == 1
    assert one_clean_error(res.output) == (
        f"Error: item {patch.name}: no asset for band B11 (swir16, 1610 nm); "
        "assets: B04-jp2, B02, B03, B04, B08 (choose them with --assets a,b,...)"
    )
    assert not list(tmp_path.glob("lc*"))


def test_assets_chosen_explicitly_or_as_red_green_blue_for_a_model_without_band_metadata(tmp_path):
    patch = _patches(1)[0]
    item = _write(tmp_path / "item.json", _item(tmp_path, patch, bands=("B02", "B03", "B04")))
    model = _segmenter(tmp_path / "rgb.pt", None, in_chans=3)
    assert "reads asset(s) B04, B03, B02" in _segment(
        item, "--model", model, "--out", tmp_path / "chosen.tif", "--assets", "B04,B03,B02"
    )
    files = [tmp_path / patch.name / f"{b}.tif" for b in ("B04", "B03", "B02")]
    _segment(
        write_manifest(tmp_path / "rgb.bands.yaml", files=files), "--model", model, "--out", tmp_path / "files.tif"
    )
    assert np.array_equal(_read(tmp_path / "chosen.tif")[0], _read(tmp_path / "files.tif")[0])
    norm = NormStats((1000.0,) * 3, (500.0,) * 3, (1, 2, 3), "uint16")
    with SceneSource(item, 3, norm) as rgb, SceneSource(item, 3, norm, assets=("B02", "B03", "B04")) as bgr:
        assert [a.key for a in rgb.stac.assets] == ["B04", "B03", "B02"]  # red, green, blue by their eo:bands
        assert [a.key for a in bgr.stac.assets] == ["B02", "B03", "B04"] and bgr.bands == (1, 2, 3)  # as given

    res = CliRunner().invoke(
        app, ["segment", str(item), "--model", str(model), "--out", str(tmp_path / "x.tif"), "--assets", "B04,nir,B02"]
    )
    assert res.exit_code == 1
    assert one_clean_error(res.output) == (f"Error: item {patch.name}: no asset 'nir'; assets: B04-jp2, B02, B03, B04")


def test_an_item_collection_gives_one_output_per_item_named_by_its_id(tmp_path, s2_model):
    patches = _patches(2)
    collection = {"type": "FeatureCollection", "features": [_item(tmp_path, p, bands=MODEL_BANDS) for p in patches]}
    path = _write(tmp_path / "items.json", collection)
    model = s2_model
    _segment(path, "--model", model, "--out-dir", tmp_path / "lc")
    report = json.loads((tmp_path / "lc" / "segment_report.json").read_text())
    assert [s["scene"] for s in report["scenes"]] == [f"{path}#{p.name}" for p in patches]
    for p in patches:
        with rasterio.open(p / f"{p.name}_B03.tif") as b03:
            classes, crs, transform = _read(tmp_path / "lc" / f"{p.name}.tif")
            assert classes.shape == (1, 120, 120) and (crs, transform) == (b03.crs, b03.transform)


class _Interrupted:
    """A runtime whose ``after``-th forward pass is cut short by Ctrl-C (a KeyboardInterrupt)."""

    def __init__(self, runtime, after: int) -> None:
        self.inner, self.after, self.calls = runtime, after, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.inner.forward(batch)


def test_an_interrupted_item_resumes_and_a_changed_item_is_refused(tmp_path, s2_model):
    from cdkd.errors import CheckpointError
    from cdkd.inference.runtimes import RuntimeSpec
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.core.runstate import output_paths
    from cdkd.scene.engine import segment_scene

    patch = _patches(1)[0]
    data = _item(tmp_path, patch, bands=MODEL_BANDS)
    item = _write(tmp_path / "item.json", data)
    runtime = RuntimeSpec(str(s2_model)).open()
    # a row of two windows per batch (edge_context 0: without margin, as the row count below)
    options = dict(progress=False, batch_size=2, checkpoint_seconds=0, edge_context=0)
    segment_scene(item, runtime, tmp_path / "whole.tif", SegmentOptions(**options))
    with pytest.raises(KeyboardInterrupt):
        segment_scene(item, _Interrupted(runtime, after=2), tmp_path / "out.tif", SegmentOptions(**options))
    state = json.loads((output_paths(tmp_path / "out.tif")[3] / "state.json").read_text())
    assert state["fingerprint"]["item"] == patch.name and set(state["fingerprint"]["assets"]) == set(MODEL_BANDS)
    original, stamp = item.read_text(), item.stat()
    data["assets"]["B11"]["href"] = f"{patch.name}/B12.tif"  # the item now points elsewhere
    rasterio.shutil.copy(tmp_path / patch.name / "B11.tif", tmp_path / patch.name / "B12.tif")
    _write(item, data)
    with pytest.raises(CheckpointError, match="cannot resume: assets, "):
        segment_scene(item, runtime, tmp_path / "out.tif", SegmentOptions(resume=True, **options))
    item.write_text(original)
    os.utime(item, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # the very file of the interrupted run
    report = segment_scene(item, runtime, tmp_path / "out.tif", SegmentOptions(resume=True, **options))
    assert report.resumed_from_row == 1 and np.array_equal(
        _read(tmp_path / "out.tif")[0], _read(tmp_path / "whole.tif")[0]
    )


# ---------------------------------------------------------------------------------------------- without shared data


def test_assets_are_matched_by_wavelength_common_name_or_preset_name():
    def asset(key, *bands, media="image/tiff; application=geotiff"):
        return StacAsset(key, f"/x/{key}.tif", tuple(bands), media)

    assets = [
        asset("visual", StacBand("", "red"), StacBand("", "green"), StacBand("", "blue")),  # three bands: not stacked
        asset("nir", StacBand("", "nir")),  # a common name alone: its range 750-1000 nm
        asset("rededge1", StacBand("B05")),  # a preset band name alone: Sentinel-2's 705 nm
        asset("red", StacBand("", "red", 665.0, 30.0)),
        asset("red-jp2", StacBand("", "red", 665.0, 30.0), media="image/jp2"),
    ]
    model = BandSet((Band(842, 115, "B08"), Band(665, 30, "B04"), Band(705, 15, "B05")))
    assert [a.key for a in choose_assets("item x", assets, model, 3, None)] == ["nir", "red", "rededge1"]
    with pytest.raises(
        DataError, match=r"^item x: no asset for bands B12 \(swir22, 2190 nm\), 443 nm \(coastal\); assets: "
    ):
        choose_assets("item x", assets, BandSet((Band(2190, 180, "B12"), Band(443))), 2, None)
    with pytest.raises(DataError, match="the model does not say which bands its 4 channels are; choose 4 assets"):
        choose_assets("item x", assets, None, 4, None)
    assert (
        is_stac("items.json#A") and is_stac("https://h/v1/collections/s2/items/S2A_1") and stac_stem("a.json#A") == "A"
    )
    assert not is_stac("scene.bands.json") and not is_stac("https://h/scene.tif")


def test_stac_1_1_bands_and_the_projection_extension_place_assets_without_georeferencing(tmp_path):
    arrays = synthetic_image((3, 40, 50), seed=3, dtype="uint16")
    assets = {}
    for name, array, colour in zip(("r", "g", "b"), arrays, ("red", "green", "blue")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(
                tmp_path / f"{name}.tif", "w", driver="GTiff", width=50, height=40, count=1, dtype="uint16"
            ) as dst:
                dst.write(array, 1)
        assets[name] = {
            "href": f"./{name}.tif",
            "type": "image/tiff",
            "bands": [{"name": name, "eo:common_name": colour}],
        }
    item = {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": "plain",
        "geometry": None,
        "links": [],
        "properties": {
            "datetime": "2020-01-01T00:00:00Z",
            "proj:code": "EPSG:32633",
            "proj:transform": [10, 0, 500000, 0, -10, 5000000],
        },
        "assets": assets,
    }
    path = _write(tmp_path / "plain.json", item)
    with open_raster(path) as src:  # no model: the item's red, green and blue assets
        assert src.crs == "EPSG:32633" and src.transform == Affine(10, 0, 500000, 0, -10, 5000000)
        assert np.array_equal(src.read(), arrays)
    del item["properties"]["proj:code"]
    with pytest.raises(DataError, match="item plain: its assets carry no CRS and the item gives no proj:code"):
        open_raster(_write(tmp_path / "nocrs.json", item))
    make_geotiff(tmp_path / "b.tif", arrays[2:, :20, :25], crs=None, transform=Affine.identity())
    item["properties"]["proj:epsg"] = 32633
    with pytest.raises(DataError, match="item plain: its assets carry no georeferencing, and they differ in size"):
        open_raster(_write(tmp_path / "sizes.json", item))
