"""The scene engine: streaming equals in-memory blending, nodata exactness, COG output, resume, errors, many scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import make_geotiff, make_segmenter, one_clean_error, synthetic_image
from typer.testing import CliRunner

from cdkd.data.classraster import NODATA, read_class_schema
from cdkd.errors import CheckpointError, DataError, OutputExistsError
from cdkd.inference.runtimes import open_runtime
from cdkd.inference.sliding import sliding_window_logits
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.core.runstate import output_paths
from cdkd.scene.core.writer import overview_factors
from cdkd.scene.engine import segment_scene
from cli.main import app

runner = CliRunner()
QUIET = dict(progress=False, checkpoint_seconds=0)


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory) -> Path:
    return make_segmenter(tmp_path_factory.mktemp("model") / "segmenter.pt", tile=64, overlap=16)


@pytest.fixture(scope="module")
def runtime(model_pt):
    return open_runtime(model_pt)


@pytest.fixture
def scene(tmp_path) -> Path:
    return make_geotiff(tmp_path / "scene.tif", synthetic_image((3, 150, 203), seed=1))


def _classes(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def test_streaming_equals_whole_image_blending(scene, runtime, tmp_path):
    """Row-band streaming must give exactly the argmax of blending the whole image at once (no seams)."""
    options = SegmentOptions(batch_size=1, edge_context=0, **QUIET)  # 0: the tile count below is without margin
    report = segment_scene(scene, runtime, tmp_path / "out.tif", options)
    with rasterio.open(scene) as src:
        image = runtime.meta.norm.normalize(src.read())
    predict = runtime_as_torch(runtime)
    logits = sliding_window_logits(predict, image, 64, 16, runtime.meta.num_classes, batch_size=1, edge_context=0)
    expected = logits.argmax(0).numpy()
    assert np.array_equal(_classes(tmp_path / "out.tif"), expected)
    assert report.tiles == report.tiles_run == 12  # 150 -> rows 0, 48, 86; 203 -> cols 0, 48, 96, 139
    assert report.valid_pixels == 150 * 203


def runtime_as_torch(runtime):
    import torch

    return lambda batch: torch.from_numpy(runtime(batch.numpy()))


def test_output_is_a_labelled_cog_with_the_input_georeferencing(scene, runtime, tmp_path):
    out = tmp_path / "lc.tif"
    report = segment_scene(scene, runtime, out, SegmentOptions(probs=True, **QUIET))
    with rasterio.open(scene) as src, rasterio.open(out) as dst:
        assert dst.crs == src.crs and dst.transform == src.transform
        assert (dst.width, dst.height, dst.count, dst.dtypes[0], dst.nodata) == (203, 150, 1, "uint8", NODATA)
        assert dst.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert dst.compression.value == "DEFLATE"
        assert read_class_schema(dst).names == runtime.meta.classes.names
        assert dst.colormap(1)[0][:3] == runtime.meta.classes.classes[0].color
    conf = _classes(Path(report.confidence))
    assert conf.min() >= 255 // runtime.meta.num_classes and conf.max() <= 255
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["valid_pixels"] == 150 * 203 and sum(c["pixels"] for c in saved["classes"].values()) == 150 * 203
    assert saved["area_m2"] == pytest.approx(150 * 203 * 100, rel=2e-3)  # UTM: ground ~ grid area
    assert not output_paths(out)[3].exists()  # the partial-work folder is gone


def test_areas_are_ground_areas_in_web_mercator():
    from rasterio.transform import from_origin

    from cdkd.geodesy import footprint_area_m2

    # 100 x 100 pixels of 10 "m" at 60° N: Web Mercator stretches lengths by 1/cos(60°) = 2
    y60 = 8399737.89  # EPSG:3857 northing of latitude 60°
    area = footprint_area_m2("EPSG:3857", from_origin(0, y60 + 500, 10, 10), 100, 100)
    assert area == pytest.approx(1e6 * 0.25, rel=0.01)


def test_overview_factors():
    assert overview_factors(500, 300) == []
    assert overview_factors(1024, 600) == [2]
    assert overview_factors(5000, 2000) == [2, 4, 8, 16]


def test_nodata_is_exact_and_empty_windows_are_skipped(tmp_path, runtime):
    image = synthetic_image((3, 160, 160), seed=2)
    image[:, :, :80] = 0  # a nodata collar: the left half, wider than a window
    image[1, 100:110, 100:110] = 0  # only one band 0: still valid (GDAL: all bands must equal nodata)
    path = make_geotiff(tmp_path / "collar.tif", image, nodata=0)
    report = segment_scene(path, runtime, tmp_path / "out.tif", SegmentOptions(**QUIET))
    with rasterio.open(path) as src:
        valid = src.dataset_mask() > 0
    out = _classes(tmp_path / "out.tif")
    assert np.array_equal(out == NODATA, ~valid)
    assert valid[105, 105] and out[105, 105] != NODATA
    assert report.tiles_skipped > 0 and report.tiles_run + report.tiles_skipped == report.tiles


def test_float_nan_pixels_become_nodata(tmp_path, runtime):
    image = synthetic_image((3, 70, 90), seed=3).astype("float32")
    image[:, 10:20, 30:40] = np.nan
    path = make_geotiff(tmp_path / "float.tif", image)
    segment_scene(path, runtime, tmp_path / "out.tif", SegmentOptions(stats="scene", **QUIET))
    out = _classes(tmp_path / "out.tif")
    assert (out[10:20, 30:40] == NODATA).all() and (out != NODATA).sum() == 70 * 90 - 100


def test_scene_smaller_than_a_tile(tmp_path, runtime):
    path = make_geotiff(tmp_path / "small.tif", synthetic_image((3, 23, 41), seed=4))
    report = segment_scene(path, runtime, tmp_path / "out.tif", SegmentOptions(**QUIET))
    assert report.tiles == 1 and _classes(tmp_path / "out.tif").shape == (23, 41)


class Interrupting:
    """A runtime that is interrupted on its ``after``-th call: by a raised KeyboardInterrupt, or (``signal=True``)
    by a real SIGINT sent to this process, as Ctrl-C in a terminal would."""

    def __init__(self, runtime, after: int, signal: bool = False) -> None:
        self.inner, self.after, self.calls, self.signal = runtime, after, 0, signal

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        self.calls += 1
        if self.calls == self.after:
            if not self.signal:
                raise KeyboardInterrupt
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)
        return self.inner.forward(batch)


def test_resume_continues_and_matches_an_uninterrupted_run(scene, runtime, tmp_path):
    whole = tmp_path / "whole.tif"
    pinned = dict(batch_size=2, edge_context=0, **QUIET)  # 0: the row and call counts below are without margin
    segment_scene(scene, runtime, whole, SegmentOptions(**pinned))
    out = tmp_path / "out.tif"
    with pytest.raises(KeyboardInterrupt):  # 2 calls per window row: dies in the third row
        segment_scene(scene, Interrupting(runtime, after=5), out, SegmentOptions(**pinned))
    assert not out.exists() and (output_paths(out)[3] / "state.json").exists()
    with pytest.raises(OutputExistsError, match="--resume"):
        segment_scene(scene, runtime, out, SegmentOptions(**pinned))
    counting = Interrupting(runtime, after=-1)
    report = segment_scene(scene, counting, out, SegmentOptions(resume=True, **pinned))
    assert report.resumed_from_row == 2 and counting.calls == 2  # only the last window row was run again
    assert np.array_equal(_classes(out), _classes(whole))
    assert report.valid_pixels == 150 * 203


def test_resume_refuses_a_changed_setting(scene, runtime, tmp_path):
    out = tmp_path / "out.tif"
    with pytest.raises(KeyboardInterrupt):
        # 0: a first window row of three windows, done before the second call (with a margin, six)
        segment_scene(scene, Interrupting(runtime, after=2), out, SegmentOptions(batch_size=4, edge_context=0, **QUIET))
    with pytest.raises(CheckpointError, match="overlap"):
        segment_scene(scene, runtime, out, SegmentOptions(overlap=8, edge_context=0, resume=True, **QUIET))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        segment_scene(scene, runtime, tmp_path / "other.tif", SegmentOptions(resume=True, **QUIET))


def test_refuses_to_overwrite_unless_asked(scene, runtime, tmp_path):
    out = tmp_path / "out.tif"
    segment_scene(scene, runtime, out, SegmentOptions(**QUIET))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        segment_scene(scene, runtime, out, SegmentOptions(**QUIET))
    segment_scene(scene, runtime, out, SegmentOptions(overwrite=True, **QUIET))


def test_uint16_needs_scene_statistics_and_band_selection_works(tmp_path, runtime):
    path = make_geotiff(tmp_path / "ms.tif", synthetic_image((4, 80, 80), seed=5, dtype="uint16"))
    with pytest.raises(DataError, match="--stats scene"):
        segment_scene(path, runtime, tmp_path / "a.tif", SegmentOptions(**QUIET))
    report = segment_scene(path, runtime, tmp_path / "b.tif", SegmentOptions(bands=(4, 3, 2), stats="scene", **QUIET))
    assert report.valid_pixels == 80 * 80


def test_all_nodata_scene_is_refused_and_leaves_nothing(tmp_path, runtime):
    path = make_geotiff(tmp_path / "empty.tif", np.zeros((3, 70, 70), np.uint8), nodata=0)
    out = tmp_path / "out.tif"
    with pytest.raises(DataError, match="no valid pixel"):
        segment_scene(path, runtime, out, SegmentOptions(**QUIET))
    assert list(tmp_path.iterdir()) == [path]


def test_other_tile_size_with_torch(scene, runtime, tmp_path):
    report = segment_scene(
        scene, runtime, tmp_path / "out.tif", SegmentOptions(tile_size=96, overlap=32, edge_context=0, **QUIET)
    )
    assert report.tile_size == 96 and report.tiles == 6  # without margin (edge_context 0)


# ---------------------------------------------------------------------------------------------------------- CLI


def _segment(*args) -> object:
    return runner.invoke(app, ["segment", *[str(a) for a in args], "--no-progress"])


@pytest.mark.parametrize(
    "make, extra, code, message",
    [
        (lambda p: make_geotiff(p, synthetic_image((3, 40, 40)), crs=None), [], 1, "has no CRS"),
        (lambda p: make_geotiff(p, synthetic_image((1, 40, 40))), [], 1, "--bands 1,1,1"),
        (lambda p: make_geotiff(p, synthetic_image((3, 40, 40))), ["--tile-size", "50"], 2, "multiple of the patch"),
        (lambda p: p.write_bytes(b"II*\x00garbage"), [], 1, "not a readable raster"),
        (lambda p: make_geotiff(p, synthetic_image((3, 40, 40))), ["--bands", "1,2"], 1, "the model takes 3"),
    ],
    ids=["no-crs", "one-band", "tile-size", "not-a-tiff", "band-count"],
)
def test_cli_bad_input_is_one_line(tmp_path, model_pt, make, extra, code, message):
    scene = tmp_path / "bad.tif"
    make(scene)
    res = _segment(scene, "--model", model_pt, "--out", tmp_path / "out.tif", *extra)
    assert res.exit_code == code, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out.tif").exists()


def test_cli_missing_model(tmp_path, scene):
    res = _segment(scene, "--model", tmp_path / "nope.pt", "--out", tmp_path / "out.tif")
    assert res.exit_code == 1 and "not found" in res.output


def test_cli_segments_and_reports(tmp_path, scene, model_pt):
    res = _segment(scene, "--model", model_pt, "--out", tmp_path / "lc.tif", "--probs")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "lc.tif").exists() and (tmp_path / "lc_confidence.tif").exists()
    assert "building" in res.output


def test_many_scenes_locally_report_each_failure(tmp_path, model_pt):
    good = [make_geotiff(tmp_path / f"s{i}.tif", synthetic_image((3, 70, 90), seed=i)) for i in range(2)]
    bad = make_geotiff(tmp_path / "nocrs.tif", synthetic_image((3, 40, 40)), crs=None)
    out = tmp_path / "lc"
    res = _segment(good[0], bad, good[1], "--model", model_pt, "--out-dir", out, "--on-error", "skip")
    assert res.exit_code == 1 and "nocrs.tif: has no CRS" in res.output
    report = json.loads((out / "segment_report.json").read_text())
    assert [s["ok"] for s in report["scenes"]] == [True, False, True]
    assert (out / "s0.tif").exists() and (out / "s1.tif").exists()
    res = _segment(bad, *good, "--model", model_pt, "--out-dir", tmp_path / "lc2", "--on-error", "fail")
    assert res.exit_code == 1 and not (tmp_path / "lc2" / "s0.tif").exists()


def test_a_folder_stands_for_its_scenes_including_a_vrt(tmp_path, model_pt):
    """A folder is replaced by its scene files: GeoTIFFs and VRT mosaics, not sub-folders or hidden files."""
    from rasterio.shutil import copy as gdal_copy

    folder = tmp_path / "scenes"
    (folder / "sources").mkdir(parents=True)
    make_geotiff(folder / "a.tif", synthetic_image((3, 70, 90), seed=0))
    source = make_geotiff(folder / "sources" / "b_src.tif", synthetic_image((3, 60, 80), seed=1))
    gdal_copy(source, folder / "b.vrt", driver="VRT")  # a VRT that points at a file in a sub-folder
    make_geotiff(folder / ".hidden.tif", synthetic_image((3, 40, 40), seed=2))
    out = tmp_path / "lc"
    res = _segment(folder, "--model", model_pt, "--out-dir", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "segment_report.json").read_text())
    assert [Path(s["scene"]).name for s in report["scenes"]] == ["a.tif", "b.vrt"]
    direct = tmp_path / "b_direct.tif"
    assert _segment(source, "--model", model_pt, "--out", direct).exit_code == 0
    assert np.array_equal(_classes(out / "b.tif"), _classes(direct))  # the VRT reads as its source does
    res = _segment(tmp_path / "lc" / "nothing_here", "--model", model_pt, "--out-dir", out)
    assert res.exit_code == 1
    (tmp_path / "empty").mkdir()
    res = _segment(tmp_path / "empty", "--model", model_pt, "--out-dir", out)
    assert res.exit_code == 1 and "empty: no scene in this folder" in one_clean_error(res.output)


def test_an_output_never_replaces_its_scene(tmp_path, model_pt):
    scene = make_geotiff(tmp_path / "s.tif", synthetic_image((3, 40, 40)))
    before = scene.read_bytes()
    for args in (
        ["--out", scene, "--overwrite"],
        ["--out-dir", tmp_path, "--overwrite"],
        ["--out", tmp_path / "s.tiff", "--overwrite"],
    ):
        res = _segment(scene, "--model", model_pt, *args)
        if args[1] == tmp_path / "s.tiff":  # a different file: allowed
            assert res.exit_code == 0, res.output
            continue
        assert res.exit_code != 0 and "would replace the scene being segmented" in res.output, res.output
    assert scene.read_bytes() == before


# ------------------------------------------------------------------------------------------------- real scenes


@pytest.fixture(scope="module")
def big_model_pt(tmp_path_factory) -> Path:
    """512 px tiles: colorado_hro (383x232) is smaller than one tile."""
    return make_segmenter(tmp_path_factory.mktemp("big") / "segmenter.pt", tile=512, overlap=64)


@pytest.mark.parametrize(
    "name",
    [
        "colorado_hro.tif",
        "colorado_hro_nodata.tif",
        "colorado_hro_alpha.tif",
        "colorado_hro_mask.tif",
        "RGB.byte.tif",
        "pix4d_rgba_nodata.tif",
    ],
)
def test_real_scenes_keep_georeferencing_and_nodata(shared_data, big_model_pt, tmp_path, name):
    scene = shared_data / "scenes" / name
    report = segment_scene(scene, open_runtime(big_model_pt), tmp_path / "out.tif", SegmentOptions(**QUIET))
    with rasterio.open(scene) as src, rasterio.open(tmp_path / "out.tif") as dst:
        assert dst.crs == src.crs and dst.transform == src.transform and dst.shape == src.shape
        valid = src.dataset_mask() > 0
        assert np.array_equal(dst.read(1) == NODATA, ~valid)
    assert report.valid_pixels == int(valid.sum())


def test_real_cogeo_is_a_valid_cog(shared_data, runtime, tmp_path):
    out = tmp_path / "out.tif"
    segment_scene(shared_data / "scenes" / "cogeo.tif", runtime, out, SegmentOptions(overlap=0, batch_size=16, **QUIET))
    with rasterio.open(out) as dst, rasterio.open(shared_data / "scenes" / "cogeo.tif") as src:
        assert dst.crs == src.crs and dst.transform == src.transform
        assert dst.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and dst.block_shapes[0] == (512, 512)
        assert dst.overviews(1) == [2]


def test_real_naip_band_selection(shared_data, runtime, tmp_path):
    scene = shared_data / "scenes" / "naip_4band.tif"
    report = segment_scene(
        scene, runtime, tmp_path / "out.tif", SegmentOptions(bands=(4, 1, 2), overlap=0, batch_size=16, **QUIET)
    )
    assert report.valid_pixels > 0


@pytest.mark.parametrize(
    "name, message",
    [
        ("corrupt.tif", "cannot read pixels"),
        ("rotated.tif", "has no CRS"),
        ("spacenet_pan_uint16.tif", "--bands"),
        ("all-nodata.tif", "uint16"),
    ],
)
def test_real_broken_scenes_fail_clearly(shared_data, model_pt, tmp_path, name, message):
    res = _segment(shared_data / "scenes" / name, "--model", model_pt, "--out", tmp_path / "out.tif")
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out.tif").exists()


def test_real_all_nodata_with_scene_stats_is_empty(shared_data, model_pt, tmp_path):
    res = _segment(
        shared_data / "scenes" / "all-nodata.tif",
        "--model",
        model_pt,
        "--out",
        tmp_path / "out.tif",
        "--stats",
        "scene",
    )
    assert res.exit_code == 1 and "no valid pixel" in res.output


def test_real_pan_uint16_with_mapped_bands(shared_data, runtime, tmp_path):
    report = segment_scene(
        shared_data / "scenes" / "spacenet_pan_uint16.tif",
        runtime,
        tmp_path / "out.tif",
        SegmentOptions(bands=(1, 1, 1), stats="scene", overlap=0, batch_size=16, **QUIET),
    )
    assert report.valid_pixels > 0


def test_torch_and_onnx_runtimes_give_the_same_map(scene, model_pt, runtime, tmp_path):
    from cdkd.export.onnx import export_onnx

    onnx_path = tmp_path / "model.onnx"
    export_onnx(model_pt, onnx_path, dynamic_batch=True)
    onnx_runtime = open_runtime(onnx_path)
    assert onnx_runtime.name == "onnx" and onnx_runtime.meta == runtime.meta
    a = segment_scene(scene, runtime, tmp_path / "torch.tif", SegmentOptions(**QUIET))
    b = segment_scene(scene, onnx_runtime, tmp_path / "onnx.tif", SegmentOptions(**QUIET))
    agreement = (_classes(tmp_path / "torch.tif") == _classes(tmp_path / "onnx.tif")).mean()
    assert agreement >= 0.999 and b.runtime == "onnx" and a.classes.keys() == b.classes.keys()
    with pytest.raises(Exception, match="cannot take --tile-size 96"):
        segment_scene(scene, onnx_runtime, tmp_path / "x.tif", SegmentOptions(tile_size=96, **QUIET))


def test_tensorrt_engine_without_tensorrt_is_a_clear_error(scene, tmp_path, model_pt):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    res = _segment(scene, "--engine", engine, "--out", tmp_path / "out.tif")
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "model.engine.json" in res.output or "TensorRT" in res.output


def test_cli_unreachable_scheduler_is_one_line(tmp_path, scene, model_pt):
    pytest.importorskip("distributed")
    res = _segment(scene, "--model", model_pt, "--out-dir", tmp_path / "lc", "--scheduler", "tcp://127.0.0.1:9")
    assert res.exit_code == 2 and "cannot reach the dask scheduler" in res.output and "Traceback" not in res.output
