"""The command line: help for every command, and one clear line plus a non-zero exit for every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_geotiff, one_clean_error
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def _run(args: list[str]):
    res = runner.invoke(app, [str(a) for a in args])
    return res, res.output


@pytest.mark.parametrize("cmd", [[], ["distill"], ["finetune"], ["evaluate"], ["export"], ["segment"], ["vectorize"], ["demo"]])
def test_help(cmd: list[str]) -> None:
    res = runner.invoke(app, cmd + ["--help"])
    assert res.exit_code == 0
    assert "Usage" in res.output


def _distill(data: Path, out: Path, *extra: str):
    return _run(["distill", "--data", data, "--out", out, "--teacher", "vit_b", "--tile-size", "64",
                 "--steps", "1", "--workers", "0", "--no-progress", *extra])


def test_missing_checkpoint_says_where_to_get_one(tile_dir: Path, tmp_path: Path) -> None:
    res, out = _distill(tile_dir, tmp_path / "run", "--teacher-checkpoint", tmp_path / "sam_vit_b.pth")
    assert res.exit_code == 1
    line = one_clean_error(out)
    assert "sam_vit_b.pth" in line and "model-checkpoints" in line
    res, out = _distill(tile_dir, tmp_path / "run")  # neither a checkpoint nor --random-teacher
    assert res.exit_code == 1 and "--random-teacher" in one_clean_error(out)
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_unreadable_checkpoint_leaves_no_run_folder(tmp_path: Path) -> None:
    """The checkpoint is read after the data are scanned and the run folder is reset: still nothing on disk."""
    data = tmp_path / "tiles"
    make_geotiff(data / "a.tif", np.full((3, 80, 80), 90, dtype=np.uint8))
    bad = tmp_path / "sam_vit_b.pth"
    bad.write_bytes(b"not a checkpoint")
    res, out = _distill(data, tmp_path / "run", "--teacher-checkpoint", bad)
    assert res.exit_code == 1 and "not a readable PyTorch checkpoint" in one_clean_error(out)
    assert not (tmp_path / "run").exists()


def test_tile_size_not_multiple_of_patch(tile_dir: Path, tmp_path: Path) -> None:
    res, out = _distill(tile_dir, tmp_path / "run", "--random-teacher", "--tile-size", "100")
    assert res.exit_code == 2
    assert "tile size 100 is not a multiple of the patch size 16" in one_clean_error(out)


def test_no_usable_images(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    (empty / "broken.tif").write_bytes(b"II*\x00garbage")
    res, out = _distill(empty, tmp_path / "run", "--random-teacher")
    assert res.exit_code == 1
    line = one_clean_error(out)
    assert str(empty) in line and "no usable image" in line
    res, out = _distill(tmp_path / "missing", tmp_path / "run", "--random-teacher")
    assert res.exit_code == 1 and "missing" in one_clean_error(out)


def test_wrong_band_count(tmp_path: Path) -> None:
    data = tmp_path / "pan"
    data.mkdir()
    make_geotiff(data / "pan.tif", np.full((1, 80, 80), 7, dtype=np.uint16))
    res, out = _distill(data, tmp_path / "run", "--random-teacher")  # a 3-band student, 1-band data
    assert res.exit_code == 1
    assert "band" in one_clean_error(out)
    res, out = _distill(data, tmp_path / "run", "--random-teacher", "--bands", "1,2")
    assert res.exit_code == 2 and "--bands selects 2 bands" in one_clean_error(out)


def test_existing_run_needs_resume_or_overwrite_and_resume_needs_a_checkpoint(tile_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "student.pt").write_bytes(b"earlier result")
    res, out = _distill(tile_dir, run, "--random-teacher")
    assert res.exit_code == 1 and "--overwrite" in one_clean_error(out)
    assert (run / "student.pt").read_bytes() == b"earlier result"
    res, out = _distill(tile_dir, tmp_path / "fresh", "--random-teacher", "--resume")
    assert res.exit_code == 1 and "nothing to resume" in one_clean_error(out)


def test_bad_config_file_and_bad_flags(tile_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {lr: [1, 2}\n")
    res, out = _distill(tile_dir, tmp_path / "run", "--random-teacher", "--config", cfg)
    assert res.exit_code == 2 and str(cfg) in one_clean_error(out)
    cfg.write_text("train: {learning_rate: 0.1}\n")
    res, out = _distill(tile_dir, tmp_path / "run", "--random-teacher", "--config", cfg)
    assert res.exit_code == 2 and "learning_rate" in one_clean_error(out)
    res, out = _distill(tile_dir, tmp_path / "run", "--random-teacher", "--teacher", "vit_x")
    assert res.exit_code == 2 and "vit_x" in one_clean_error(out)
    res, out = _distill(tile_dir, tmp_path / "run", "--random-teacher", "--teacher-checkpoint", cfg)
    assert res.exit_code == 2 and "exclude each other" in out
    res, out = _distill(tile_dir, tmp_path / "run", "--random-teacher", "--steps", "2", "--epochs", "1")
    assert res.exit_code == 2 and "--steps or --epochs" in one_clean_error(out)


def test_mixed_data_types_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "mixed"
    data.mkdir()
    for i in range(2):
        make_geotiff(data / f"rgb{i}.tif", np.full((3, 80, 80), 100, dtype=np.uint8))
    make_geotiff(data / "deep.tif", np.full((3, 80, 80), 3000, dtype=np.uint16))
    res, out = _distill(data, tmp_path / "run", "--random-teacher")
    assert res.exit_code == 1
    line = one_clean_error(out)
    assert "uint8: 2 files" in line and "uint16: 1 files" in line and "deep.tif" in line
    assert not (tmp_path / "run").exists()


def test_real_scenes_folder_with_broken_files_is_refused_clearly(shared_data: Path, tmp_path: Path) -> None:
    """../shared/data/scenes mixes uint8 and uint16 and holds corrupt files: a warning, then one clear error."""
    res, out = _distill(shared_data / "scenes", tmp_path / "run", "--random-teacher")
    assert res.exit_code == 1
    assert "Warning: skipped" in out and "corrupt.tif" in out
    assert "different data types" in one_clean_error(out)
    assert not (tmp_path / "run").exists()  # refused before anything was written
