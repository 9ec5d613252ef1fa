"""``cdkd finetune/evaluate/segment`` with ``--task instance``: resume, clean errors, and the real data end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cdkd.artifacts import StudentInfo, load_detector, save_student
from cdkd.data.stats import NormStats
from cdkd.models.student import build_student
from cli.main import app
from tests.conftest import SHARED_DATA, TINY_STUDENT, _require, one_clean_error
from tests.test_coco import _coco

runner = CliRunner()
SMALL = "instance: {channels: 32, box_batch_size_per_image: 32, detections_per_image: 20}\n"


@pytest.fixture
def student_pt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "student.pt"
    norm = NormStats(mean=(120.0,) * 3, std=(60.0,) * 3, bands=(1, 2, 3), dtype="uint8")
    args = dict(TINY_STUDENT, img_size=64, in_chans=3)
    save_student(path, build_student("vit_s", **args), StudentInfo("vit_s", args, norm, {"teacher": "none"}))
    return path


def _run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _finetune(student: Path, data: Path, out: Path, *extra) -> object:
    config = out.parent / "small.yaml"
    if not config.exists():
        config.write_text(SMALL)
    return _run(
        "finetune",
        "--task",
        "instance",
        "--student",
        student,
        "--data",
        data,
        "--format",
        "coco",
        "--out",
        out,
        "--tile-size",
        "64",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--no-progress",
        "--config",
        config,
        *extra,
    )


def test_finetune_instance_resume_matches_uninterrupted(student_pt, tmp_path):
    _, json_path, _, _ = _coco(tmp_path)
    run = tmp_path / "det"
    (tmp_path / "small.yaml").write_text(SMALL + "train: {checkpoint_every: 2, log_every: 1}\n")
    res = _finetune(student_pt, json_path, run, "--steps", "4")
    assert res.exit_code == 0, res.output
    assert "detector:" in res.output and (run / "detector.pt").is_file()
    full = load_detector(run / "detector.pt")[0].state_dict()
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_mask", "loss_classifier", "objects_per_tile"} <= set(lines[-1])
    # crash after the step-2 checkpoint (remove what steps 3-4 wrote), resume, compare with the whole run
    (run / "checkpoints" / "step_0000004.pt").unlink()
    (run / "detector.pt").unlink()
    res = _run("finetune", "--out", run, "--resume", "--no-progress")  # the run's own config: task instance
    assert res.exit_code == 0, res.output
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    resumed = load_detector(run / "detector.pt")[0].state_dict()
    for k in full:
        assert torch.allclose(full[k].float(), resumed[k].float(), atol=1e-6), k


def test_cli_errors_are_one_clean_line(student_pt, tmp_path):
    root, json_path, _, _ = _coco(tmp_path, missing=True)
    res = _finetune(student_pt, json_path, tmp_path / "r")
    assert res.exit_code == 1 and "images are missing" in one_clean_error(res.output)
    res = _run(
        "finetune",
        "--student",
        student_pt,
        "--data",
        json_path,
        "--format",
        "coco",
        "--out",
        tmp_path / "s",
        "--no-progress",
    )
    assert res.exit_code == 2 and "--task instance" in one_clean_error(res.output)
    res = _run(
        "finetune",
        "--task",
        "instance",
        "--student",
        student_pt,
        "--data",
        root,
        "--format",
        "dubai",
        "--out",
        tmp_path / "t",
        "--no-progress",
    )
    assert res.exit_code == 2 and "not an instance format" in one_clean_error(res.output)


def test_detector_is_refused_by_the_semantic_paths(student_pt, tmp_path):
    """The model file says its task: a detector is evaluated as one (on instance data), and a --task that
    contradicts the file is one line."""
    _, json_path, _, _ = _coco(tmp_path)
    assert _finetune(student_pt, json_path, tmp_path / "det", "--steps", "1").exit_code == 0
    det = tmp_path / "det" / "detector.pt"
    res = _run("evaluate", det, "--data", tmp_path, "--format", "dubai", "--out", tmp_path / "e", "--no-progress")
    assert res.exit_code == 2 and "not an instance format" in one_clean_error(res.output)
    res = _run(
        "evaluate",
        det,
        "--task",
        "semantic",
        "--data",
        tmp_path,
        "--format",
        "dubai",
        "--out",
        tmp_path / "e",
        "--no-progress",
    )
    assert res.exit_code == 2 and "a model of the instance task, not semantic" in one_clean_error(res.output)
    res = _run("export", det, "--format", "tensorrt", "--out", tmp_path / "d.engine")
    assert res.exit_code == 2 and "do not build TensorRT engines" in one_clean_error(res.output)
    res = _run("segment", tmp_path / "x.tif", "--model", det, "--out-dir", tmp_path / "o")
    assert res.exit_code == 2 and "one scene at a time" in one_clean_error(res.output)


@pytest.mark.slow
def test_real_data_finetune_evaluate_segment(student_pt, tmp_path):
    """WHU buildings (COCO) -> detector.pt -> COCO AP on WHU val -> the SpaceNet scene (16-bit panchromatic,
    EPSG:32616) as polygons in its CRS; then the SpaceNet footprints themselves as training data (--format geo)."""
    whu = _require(SHARED_DATA / "instances" / "whu")
    solaris = _require(SHARED_DATA / "instances" / "solaris")
    run = tmp_path / "whu"
    res = _finetune(student_pt, whu / "annotations" / "train_instances.json", run, "--steps", "1", "--tile-size", "256")
    assert res.exit_code == 0, res.output
    det = run / "detector.pt"
    res = _run(
        "evaluate",
        det,
        "--task",
        "instance",
        "--data",
        whu / "annotations" / "val_instances.json",
        "--format",
        "coco",
        "--split",
        "val_1.tif",
        "--out",
        tmp_path / "eval",
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["images"] == 1 and saved["ground_truth_objects"] == 3 and "building" in saved["segm"]["per_class"]
    assert (tmp_path / "eval" / "predictions.png").is_file()
    out = tmp_path / "buildings.gpkg"
    res = _run(
        "segment",
        solaris / "sample_geotiff.tif",
        "--model",
        det,
        "--out",
        out,
        "--bands",
        "1,1,1",
        "--stats",
        "scene",
        "--min-score",
        "0.3",
        "--tile-size",
        "320",
        "--overlap",
        "64",
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    import pyogrio

    info = pyogrio.read_info(out, layer="buildings")
    assert info["crs"] == "EPSG:32616" and list(info["fields"]) == ["class_id", "class_name", "score", "area_m2"]
    assert "layer_styles" in [name for name, _ in pyogrio.list_layers(out)]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["tiles"] == report["tiles_run"] == 16 and report["crs"] == "EPSG:32616"

    res = _run(
        "finetune",
        "--task",
        "instance",
        "--student",
        student_pt,
        "--data",
        solaris / "sample_geotiff.tif",
        "--labels",
        solaris / "geotiff_labels.geojson",
        "--format",
        "geo",
        "--out",
        tmp_path / "geo",
        "--tile-size",
        "128",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--config",
        tmp_path / "small.yaml",
    )
    assert res.exit_code == 0, res.output
    _, info = load_detector(tmp_path / "geo" / "detector.pt")
    assert info.classes.names == ("building",) and info.norm.dtype == "uint16" and info.norm.bands == (1, 1, 1)
