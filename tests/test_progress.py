"""cdkd.progress: one progress interface, a bar for people and JSON lines for programs (``--progress-format``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from conftest import make_geotiff
from typer.testing import CliRunner

from cdkd import progress
from cdkd.data.classes import BUILTIN_SCHEMAS
from cdkd.data.classraster import write_class_metadata
from cdkd.errors import CdkdValueError
from cli.main import app


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.fixture
def json_mode(monkeypatch):
    monkeypatch.setenv(progress.ENV, "json")


def test_json_lines_are_throttled_and_carry_each_steps_figures_as_numbers(json_mode, capsys, monkeypatch):
    monkeypatch.setattr(progress, "JSON_INTERVAL", 3600.0)  # only the first and the last line get through
    with progress.progress_bar(10, initial=2, desc="distill", unit="step") as bar:
        for step in range(3, 11):  # as the trainers do: count the step, then show its figures
            bar.update(1)
            bar.set_postfix(loss=f"{1 / step:.3f}", stage="early", img_s=float("nan"))
    lines = events(capsys.readouterr().err)
    assert lines[0] == {"event": "progress", "desc": "distill", "done": 2, "total": 10, "unit": "step", "fraction": 0.2}
    assert lines[1:] == [
        {
            "event": "progress",
            "desc": "distill",
            "done": 10,
            "total": 10,
            "unit": "step",
            "fraction": 1.0,
            "loss": 0.1,
            "stage": "early",
            "img_s": None,
        }
    ]  # NaN: null in JSON

    monkeypatch.setattr(progress, "JSON_INTERVAL", 0.0)  # every step
    with progress.progress_bar(3, desc="finetune", unit="step") as bar:
        for step in range(1, 4):
            bar.update(1)
            bar.set_postfix(loss=str(step))
    lines = events(capsys.readouterr().err)
    assert [(e["done"], e.get("loss")) for e in lines] == [(0, None), (1, None), (2, 2.0), (3, 3.0)]


def test_track_reports_where_it_stopped(json_mode, capsys):
    for i in progress.track(range(5), desc="vectorize", unit="strip"):
        if i == 2:
            break
    lines = events(capsys.readouterr().err)
    assert [(e["done"], e["total"]) for e in lines] == [(0, 5), (2, 5)]  # items 0 and 1 were done


def test_bar_and_none_formats_write_no_json(monkeypatch, capsys):
    for fmt in ("bar", "none"):
        monkeypatch.setenv(progress.ENV, fmt)
        assert list(progress.track([1, 2], desc="x", unit="tile")) == [1, 2]
        progress.emit("finish", outputs=[])
    assert "{" not in capsys.readouterr().err
    monkeypatch.setenv(progress.ENV, "json")
    assert type(progress.progress_bar(3, desc="x", unit="tile", enabled=False)) is progress.Progress  # --no-progress
    monkeypatch.setenv(progress.ENV, "xml")
    with pytest.raises(CdkdValueError, match="CDKD_PROGRESS='xml'"):
        progress.progress_format()


def test_cli_choice_mirrors_the_library() -> None:
    from cli import options as o

    assert tuple(c.value for c in o.ProgressFormat) == progress.FORMATS


@pytest.fixture
def class_raster(tmp_path):
    """A 40 x 60 class raster labelled with the Dubai classes: building on the left, vegetation on the right."""
    ids = np.zeros((1, 40, 60), np.uint8)
    ids[0, :, 30:] = 3
    path = make_geotiff(tmp_path / "classes.tif", ids, nodata=255)
    with rasterio.open(path, "r+") as dst:
        write_class_metadata(dst, BUILTIN_SCHEMAS["dubai"])
    return path


def test_cli_json_events_from_start_to_finish(class_raster, tmp_path, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    out = tmp_path / "polygons.gpkg"
    res = CliRunner().invoke(app, ["--progress-format", "json", "vectorize", str(class_raster), "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = events(res.stderr)
    assert lines[0]["event"] == "start" and lines[0]["command"] == "vectorize"
    stages = [(e["desc"], e["done"]) for e in lines if e["event"] == "progress"]
    assert stages == [("scan", 0), ("scan", 1), ("vectorize", 0), ("vectorize", 1)]
    assert lines[-1] == {"event": "finish", "outputs": [str(out), f"{out}.json"]}

    res = CliRunner().invoke(app, ["vectorize", str(class_raster), "--out", str(out)], env={progress.ENV: "json"})
    assert res.exit_code == 1
    error = events(res.stderr)[-1]
    assert error["event"] == "error" and error["exit_code"] == 1 and "--overwrite" in error["message"]
    assert f"Error: {error['message']}" in res.stderr  # the line for people is still there

    res = CliRunner().invoke(app, ["--progress-format", "yaml", "vectorize", str(class_raster), "--out", str(out)])
    assert res.exit_code == 2 and "'bar', 'json', 'none'" in res.output
