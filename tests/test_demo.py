"""``cdkd demo`` runs every stage end to end on data made in code (the README's first command)."""

from __future__ import annotations

import json

import geopandas as gpd
import pytest
import rasterio
from typer.testing import CliRunner

from cdkd.demo.landscape import demo_schema, make_landscape
from cli.main import app


def test_landscape_classes_follow_the_image():
    image, classes = make_landscape(96, 128, seed=0)
    assert image.shape == (3, 96, 128) and classes.shape == (96, 128)
    assert set(classes.ravel()) == set(range(demo_schema().num_classes))
    water, soil = image[:, classes == 0].mean(axis=1), image[:, classes == 3].mean(axis=1)
    assert water[2] > water[0] and soil[0] > soil[2]  # blue water, reddish soil


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    for name in (
        "model.onnx",
        "landcover.tif",
        "landcover_confidence.tif",
        "landcover.json",
        "landcover.gpkg",
        "distill/student.pt",
        "finetune/segmenter.pt",
        "demo.json",
    ):
        assert (out / name).exists(), name
    summary = json.loads((out / "demo.json").read_text())
    assert summary["agreement"] > 0.5  # four classes: chance is ~0.25
    with rasterio.open(out / "landcover.tif") as src, rasterio.open(out / "data" / "scene.tif") as scene:
        assert src.crs == scene.crs and src.transform == scene.transform
        valid = scene.dataset_mask() > 0
        assert ((src.read(1) == 255) == ~valid).all()
    polygons = gpd.read_file(out / "landcover.gpkg")
    assert len(polygons) > 0 and set(polygons["class_name"]) <= set(demo_schema().names)
    assert "Real use needs a SAM checkpoint" in res.output
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--no-progress"])
    assert res.exit_code == 1 and "--overwrite" in res.output
