"""Edge context: a scene's border pixels are predicted from windows reaching past the scene, filled by reflection,
in every path that blends windows (scene engine, cluster blocks, ``cdkd.predict``, evaluation's sliding windows),
bitwise alike; by definition the same as ``np.pad(mode="reflect")``-ing the image and cropping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import make_geotiff, make_segmenter, one_clean_error, synthetic_image
from typer.testing import CliRunner

import cdkd
from cdkd.errors import CdkdValueError, CheckpointError
from cdkd.inference.runtimes import RuntimeSpec, open_runtime
from cdkd.inference.sliding import sliding_window_logits
from cdkd.inference.tiler import edge_margin, plan_rows
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.engine import segment_scene
from cli.main import app

MARGIN = 20  # with 64 px tiles and 16 px overlap: the first window row starts at -20, the second at 28
QUIET = dict(progress=False, checkpoint_seconds=0)


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory) -> Path:
    return make_segmenter(tmp_path_factory.mktemp("model") / "segmenter.pt", tile=64, overlap=16)


@pytest.fixture(scope="module")
def runtime(model_pt):
    return open_runtime(model_pt)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    image = synthetic_image((3, 150, 203), seed=5)
    image[:, :30, 180:] = 0  # nodata at the top-right corner: the valid mask is reflected with the pixels
    return image


@pytest.fixture(scope="module")
def scene(tmp_path_factory, image) -> Path:
    return make_geotiff(tmp_path_factory.mktemp("scene") / "scene.tif", image, nodata=0)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _sliding(runtime, x: np.ndarray, edge_context: int) -> np.ndarray:
    predict = lambda batch: torch.from_numpy(runtime(batch.numpy()))  # noqa: E731
    return sliding_window_logits(predict, x, 64, 16, runtime.meta.num_classes, 2, edge_context=edge_context).numpy()


def test_plan_with_a_margin_reaches_past_the_image_by_the_margin():
    rows = plan_rows(150, 203, 64, 16, margin=MARGIN)
    tops, cols = [r[0].row for r in rows], [w.col for w in rows[0]]
    assert tops[0] == cols[0] == -MARGIN and tops[-1] + 64 == 150 + MARGIN and cols[-1] + 64 == 203 + MARGIN
    assert plan_rows(40, 203, 64, 16, margin=MARGIN)[0][0].row == 0  # an axis within one tile keeps its window
    assert edge_margin(1024) == 64 and edge_margin(64) == 31 and edge_margin(64, 0) == 0
    with pytest.raises(CdkdValueError, match="--edge-context 32 must be"):
        edge_margin(64, 32)


def test_border_logits_are_those_of_the_reflect_padded_image(runtime, image):
    """The definition: pad the image by the margin with ``np.pad(mode="reflect")``, run without margin, crop."""
    x = runtime.meta.norm.normalize(image[:, 30:, :180])  # no nodata here: sliding has no validity
    ours = _sliding(runtime, x, MARGIN)
    padded = np.pad(x, [(0, 0), (MARGIN, MARGIN), (MARGIN, MARGIN)], mode="reflect")
    reference = _sliding(runtime, padded, 0)[:, MARGIN:-MARGIN, MARGIN:-MARGIN]
    assert np.array_equal(ours, reference)  # bitwise, border pixels included
    assert not np.array_equal(ours[:, :, 0], _sliding(runtime, x, 0)[:, :, 0])  # the margin changes the border


def test_every_path_gives_the_same_classes_with_a_margin(scene, image, runtime, model_pt, tmp_path):
    distributed = pytest.importorskip("distributed")
    rioxarray = pytest.importorskip("rioxarray")
    from cdkd.scene.blocks import segment_scene_on_cluster

    options = SegmentOptions(edge_context=MARGIN, probs=True, batch_size=3, **QUIET)
    report = segment_scene(scene, runtime, tmp_path / "engine.tif", options)
    engine = _read(tmp_path / "engine.tif")
    assert report.edge_context == MARGIN and report.tiles == 4 * 5
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c:
        cluster = segment_scene_on_cluster(
            scene, RuntimeSpec(str(model_pt)), tmp_path / "cl.tif", c.scheduler_address, options, rows_per_block=1
        )
    assert cluster.runtime_options["blocks"] == 4 and cluster.edge_context == MARGIN  # three seams
    assert np.array_equal(_read(tmp_path / "cl.tif"), engine)
    assert np.array_equal(_read(tmp_path / "cl_confidence.tif"), _read(tmp_path / "engine_confidence.tif"))
    data = rioxarray.open_rasterio(scene, chunks={"y": 70, "x": 80})
    assert np.array_equal(cdkd.predict(data, runtime, edge_context=MARGIN).values, engine)
    valid = (image != 0).any(axis=0)
    classes = _sliding(runtime, runtime.meta.norm.normalize(image, valid), MARGIN).argmax(0)
    assert np.array_equal(classes[valid], engine[valid]) and (engine[~valid] == 255).all()
    # and the scene as a reflect-padded image segmented without margin, cropped: the definition, via the engine
    padded = np.pad(image, [(0, 0), (MARGIN, MARGIN), (MARGIN, MARGIN)], mode="reflect")
    segment_scene(
        make_geotiff(tmp_path / "padded.tif", padded, nodata=0),
        runtime,
        tmp_path / "padded_lc.tif",
        SegmentOptions(edge_context=0, **QUIET),
    )
    assert np.array_equal(_read(tmp_path / "padded_lc.tif")[MARGIN:-MARGIN, MARGIN:-MARGIN], engine)


class Interrupting:
    """A runtime interrupted (KeyboardInterrupt) on its ``after``-th forward."""

    def __init__(self, runtime, after: int) -> None:
        self.inner, self.after, self.calls = runtime, after, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.inner.forward(batch)


def test_resume_with_another_margin_is_refused_and_with_the_same_is_exact(scene, runtime, tmp_path):
    out = tmp_path / "lc.tif"
    with pytest.raises(KeyboardInterrupt):
        segment_scene(scene, Interrupting(runtime, after=5), out, SegmentOptions(edge_context=MARGIN, **QUIET))
    with pytest.raises(CheckpointError, match="cannot resume: edge_context differ") as e:
        segment_scene(scene, runtime, out, SegmentOptions(edge_context=10, resume=True, **QUIET))
    assert "\n" not in str(e.value) and "--overwrite" in str(e.value)
    segment_scene(scene, runtime, out, SegmentOptions(edge_context=MARGIN, resume=True, **QUIET))
    segment_scene(scene, runtime, tmp_path / "whole.tif", SegmentOptions(edge_context=MARGIN, **QUIET))
    assert np.array_equal(_read(out), _read(tmp_path / "whole.tif"))


def test_an_edge_context_of_half_a_tile_is_refused_in_one_line(scene, runtime, tmp_path):
    with pytest.raises(CdkdValueError, match="--edge-context 40 must be") as e:
        segment_scene(scene, runtime, tmp_path / "lc.tif", SegmentOptions(edge_context=40, **QUIET))
    assert "\n" not in str(e.value) and not (tmp_path / "lc.tif").exists()


def test_the_default_margin_is_the_same_in_the_engine_and_in_evaluation(scene, image, runtime, tmp_path):
    report = segment_scene(scene, runtime, tmp_path / "lc.tif", SegmentOptions(**QUIET))
    assert report.edge_context == edge_margin(64) == 31
    valid = (image != 0).any(axis=0)
    predict = lambda batch: torch.from_numpy(runtime(batch.numpy()))  # noqa: E731
    x = runtime.meta.norm.normalize(image, valid)
    classes = sliding_window_logits(predict, x, 64, 16, runtime.meta.num_classes).numpy().argmax(0)
    assert np.array_equal(classes[valid], _read(tmp_path / "lc.tif")[valid])


def test_cli_takes_edge_context_and_refuses_a_bad_one_in_one_line(scene, model_pt, tmp_path):
    args = ["segment", str(scene), "--model", str(model_pt), "--no-progress", "--out"]
    res = CliRunner().invoke(app, [*args, str(tmp_path / "a.tif"), "--edge-context", "40"])
    assert res.exit_code != 0 and "--edge-context 40 must be" in one_clean_error(res.output)
    assert not list(tmp_path.iterdir())  # nothing left behind
    res = CliRunner().invoke(app, [*args, str(tmp_path / "b.tif"), "--edge-context", "12"])
    assert res.exit_code == 0, res.output
    assert '"edge_context": 12' in (tmp_path / "b.json").read_text()
