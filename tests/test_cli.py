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


@pytest.mark.parametrize(
    "cmd", [[], ["distill"], ["finetune"], ["evaluate"], ["export"], ["segment"], ["vectorize"], ["demo"], ["report"]]
)
def test_help(cmd: list[str]) -> None:
    res = runner.invoke(app, cmd + ["--help"])
    assert res.exit_code == 0
    assert "Usage" in res.output


def _distill(data: Path, out: Path, *extra: str):
    return _run(
        [
            "distill",
            "--data",
            data,
            "--out",
            out,
            "--teacher",
            "vit_b",
            "--tile-size",
            "64",
            "--steps",
            "1",
            "--workers",
            "0",
            "--no-progress",
            *extra,
        ]
    )


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
    assert "the files have 1 band(s)" in one_clean_error(out) and "--bands 1,1,1" in out
    res, out = _distill(data, tmp_path / "run", "--random-teacher", "--bands", "1,2", "--in-chans", "3")
    assert res.exit_code == 2 and "--bands selects 2 bands" in one_clean_error(out)
    res, out = _distill(data, tmp_path / "run", "--random-teacher", "--bands", "1,2")  # a 2-band student
    assert res.exit_code == 1 and "has 1 band, needs 2" in one_clean_error(out)


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


# ------------------------------------------------------------------------------------------ conventions


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    import cdkd

    res, out = _run(["--version"])
    assert res.exit_code == 0
    assert out.strip() == f"cdkd {version('cdkd')}" == f"cdkd {cdkd.__version__}"


def test_shell_completion_is_offered_and_completes_choices(monkeypatch) -> None:
    import os
    import shutil
    import subprocess

    res, out = _run(["--help"])
    assert "--install-completion" in out and "--show-completion" in out
    # --show-completion detects the shell from the parent processes (shellingham), which a job started under
    # nohup has none of; Typer's own switch makes the option take the shell's name instead
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    res = runner.invoke(app, ["--show-completion", "bash"], prog_name="cdkd")
    monkeypatch.delenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION")
    assert res.exit_code == 0 and "_CDKD_COMPLETE=complete_bash" in res.output
    exe = shutil.which("cdkd")
    if exe is None:
        pytest.skip("the cdkd console script is not installed")
    env = dict(os.environ, _CDKD_COMPLETE="complete_bash", COMP_WORDS="cdkd segment a.tif --on-error ", COMP_CWORD="4")
    done = subprocess.run([exe], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["fail", "skip"]
    env.update(COMP_WORDS="cdkd seg", COMP_CWORD="1")
    assert subprocess.run([exe], env=env, capture_output=True, text=True, timeout=60).stdout.split() == ["segment"]


def test_choice_options_mirror_the_library() -> None:
    from cdkd.artifacts import TASKS
    from cdkd.data.coco import INSTANCE_FORMATS
    from cdkd.data.labeled import FORMATS
    from cdkd.inference import runtimes
    from cdkd.models.upernet import HEADS
    from cdkd.scene.batch import ON_ERROR
    from cdkd.scene.core.source import STATS_MODES
    from cdkd.train import optim
    from cli import options as o

    def values(choice) -> tuple[str, ...]:
        return tuple(c.value for c in choice)

    assert values(o.Runtime) == runtimes.RUNTIMES and values(o.OnError) == ON_ERROR
    assert set(values(o.Amp)) == set(runtimes.AMP_MODES) == set(optim.AMP_MODES)
    assert values(o.Stats) == STATS_MODES and values(o.DataFormat) == FORMATS + INSTANCE_FORMATS
    assert values(o.Head) == HEADS and values(o.Task) == TASKS
    assert set(values(o.LrSchedule)) == set(optim.LR_SCHEDULES)


@pytest.mark.parametrize(
    "args, choices",
    [
        (["segment", "a.tif", "--on-error", "ignore"], "'fail', 'skip'"),
        (["segment", "a.tif", "--stats", "tile"], "'model', 'scene'"),
        (["segment", "a.tif", "--amp", "fp8"], "'bf16'"),
        (["segment", "a.tif", "--runtime", "tflite"], "'tensorrt'"),
        (["finetune", "--out", "r", "--format", "voc"], "'openearthmap'"),
        (["finetune", "--out", "r", "--head", "fcn"], "'upernet', 'linear'"),
        (["finetune", "--out", "r", "--lr-schedule", "step"], "'poly'"),
        (["evaluate", "m.pt", "--data", "d", "--out", "e", "--format", "voc"], "'dubai'"),
        (["evaluate", "m.pt", "--data", "d", "--out", "e", "--format", "dubai", "--runtime", "tvm"], "'onnx'"),
        (["export", "m.pt", "--out", "m.x", "--format", "tflite"], "'onnx', 'tensorrt'"),
        (["distill", "--out", "r", "--adapter", "lora"], "'multi', 'single'"),
        (["distill", "--out", "r", "--fusion", "concat"], "'gate', 'add'"),
        (["distill", "--out", "r", "--direction", "both"], "'bi', 'uni'"),
        (["distill", "--out", "r", "--schedule", "cosine"], "'dynamic', 'fixed'"),
        (["distill", "--out", "r", "--amp", "fp8"], "'bf16'"),
    ],
    ids=lambda v: v[-1] if isinstance(v, list) else "",
)
def test_a_wrong_choice_is_refused_at_once(args: list[str], choices: str, tmp_path: Path) -> None:
    res, out = _run(args)
    assert res.exit_code == 2, out
    flat = " ".join(out.replace("│", " ").split())  # typer's error panel wraps lines
    assert f"'{args[-1]}' is not one of" in flat and choices in flat and "Traceback" not in out


def test_help_lists_the_choices() -> None:
    out = _run(["segment", "--help"])[1]
    assert "fail|skip" in out and "model|scene" in out and "torch|onnx|tensorrt" in out
    assert "upernet|linear" in _run(["finetune", "--help"])[1]


# ------------------------------------------------------------------------------------------ segment


@pytest.fixture
def scene_and_model(tmp_path: Path) -> tuple[Path, Path]:
    from conftest import make_segmenter, synthetic_image

    return (
        make_geotiff(tmp_path / "scene.tif", synthetic_image((3, 90, 120), seed=2)),
        make_segmenter(tmp_path / "segmenter.pt", tile=64, overlap=16),
    )


def test_segment_config_file_and_flags_over_it(scene_and_model, tmp_path: Path) -> None:
    import json

    scene, model = scene_and_model
    cfg = tmp_path / "segment.yaml"
    cfg.write_text("tile_size: 48\noverlap: 8\nbatch_size: 2\nprobs: true\n")
    res, out = _run(["segment", scene, "--model", model, "--out", tmp_path / "a.tif", "--config", cfg, "--no-progress"])
    assert res.exit_code == 0, out
    report = json.loads((tmp_path / "a.json").read_text())
    assert (report["tile_size"], report["overlap"], report["batch_size"]) == (48, 8, 2)
    assert (tmp_path / "a_confidence.tif").exists()  # probs from the file
    res, out = _run(
        [
            "segment",
            scene,
            "--model",
            model,
            "--out",
            tmp_path / "b.tif",
            "--config",
            cfg,
            "--overlap",
            "16",
            "--no-probs",
            "--no-progress",
        ]
    )
    assert res.exit_code == 0, out
    report = json.loads((tmp_path / "b.json").read_text())
    assert (report["tile_size"], report["overlap"]) == (48, 16) and not (tmp_path / "b_confidence.tif").exists()
    cfg.write_text("tile: 48\n")
    res, out = _run(["segment", scene, "--model", model, "--out", tmp_path / "c.tif", "--config", cfg])
    assert res.exit_code == 2 and str(cfg) in one_clean_error(out) and "tile" in out
    assert not (tmp_path / "c.tif").exists()


def test_segment_preview_beside_the_output(scene_and_model, tmp_path: Path) -> None:
    from PIL import Image

    scene, model = scene_and_model
    out = tmp_path / "lc.tif"
    res, text = _run(["segment", scene, "--model", model, "--out", out, "--preview", "--no-progress"])
    assert res.exit_code == 0, text
    with Image.open(tmp_path / "lc.png") as im:
        assert "cdkd:legend" in im.text and im.size[0] > 2 * 120
    res, text = _run(["segment", scene, "--model", model, "--out", tmp_path / "lc2.tif", "--preview", "--no-progress"])
    assert res.exit_code == 0 and (tmp_path / "lc2.png").exists()
    (tmp_path / "x.png").write_bytes(b"mine")
    res, text = _run(["segment", scene, "--model", model, "--out", tmp_path / "x.tif", "--preview"])
    assert res.exit_code == 1 and "x.png" in one_clean_error(text) and "--overwrite" in text
    assert not (tmp_path / "x.tif").exists() and (tmp_path / "x.png").read_bytes() == b"mine"  # refused first
    res, text = _run(["segment", scene, "--model", model, "--out-dir", tmp_path / "many", "--preview", "--no-progress"])
    assert res.exit_code == 0, text
    assert (tmp_path / "many" / "scene.png").exists()
