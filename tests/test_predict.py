"""cdkd.predict: a lazy, dask-backed class DataArray that equals the scene engine's output."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from conftest import make_geotiff, make_segmenter, synthetic_image

import cdkd
from cdkd.errors import CdkdValueError, DataError
from cdkd.inference.runtimes import open_runtime
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.engine import segment_scene

rioxarray = pytest.importorskip("rioxarray")


class Counting:
    """A runtime that counts its forward passes."""

    def __init__(self, runtime) -> None:
        self.inner, self.calls = runtime, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        self.calls += 1
        return self.inner.forward(batch)


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory):
    return make_segmenter(tmp_path_factory.mktemp("m") / "segmenter.pt", tile=64, overlap=16)


@pytest.fixture
def scene(tmp_path):
    image = synthetic_image((3, 230, 190), seed=11)
    image[:, 200:, :60] = 0
    return make_geotiff(tmp_path / "scene.tif", image, nodata=0)


def test_predict_is_lazy_keeps_coordinates_and_equals_segment_scene(scene, model_pt, tmp_path):
    runtime = Counting(open_runtime(model_pt))
    data = rioxarray.open_rasterio(scene, chunks={"y": 70, "x": 80})
    classes = cdkd.predict(data, runtime)
    assert runtime.calls == 0 and classes.chunks is not None  # nothing ran yet: a dask graph
    assert classes.dims == ("y", "x") and classes.dtype == np.uint8
    assert np.array_equal(classes.y, data.y) and np.array_equal(classes.x, data.x)
    assert classes.rio.crs == data.rio.crs and classes.attrs["_FillValue"] == 255
    assert classes.attrs["flag_meanings"].split() == [n.replace(" ", "_") for n in runtime.meta.classes.names]
    result = classes.compute()
    assert runtime.calls > 0
    segment_scene(scene, runtime, tmp_path / "lc.tif", SegmentOptions(progress=False))
    with rasterio.open(tmp_path / "lc.tif") as src:
        assert np.array_equal(result.values, src.read(1))  # bitwise: same windows, weights and order


def test_predict_takes_a_model_path_and_numpy_backed_data(scene, model_pt):
    data = rioxarray.open_rasterio(scene).load()  # numpy-backed: chunked by predict
    classes = cdkd.predict(data, model_pt)
    assert classes.chunks is not None
    assert (classes.values[200:, :60] == 255).all() and (classes.values[:200] != 255).all()


def test_predict_refuses_what_it_cannot_use(scene, model_pt):
    data = rioxarray.open_rasterio(scene, chunks={})
    with pytest.raises(DataError, match="band 4 is needed"):
        cdkd.predict(data, model_pt, bands=(4, 2, 1))
    with pytest.raises(DataError, match="model takes 3"):
        cdkd.predict(data, model_pt, bands=(1, 2))
    with pytest.raises(CdkdValueError, match="band, y, x"):
        cdkd.predict(data[0], model_pt)
