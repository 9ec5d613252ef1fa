"""Fine-tuning and evaluation end to end: finetune -> segmenter.pt -> evaluate, resume, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image
from typer.testing import CliRunner

from cdkd.artifacts import StudentInfo, load_segmenter, save_student
from cdkd.data.stats import NormStats
from cdkd.models.student import build_student
from cli.main import app

runner = CliRunner()
CLASSES = """ignore_index: 255
classes:
  - {id: 0, name: dark, color: "#000080"}
  - {id: 1, name: mid, color: "#00FF00"}
  - {id: 2, name: bright, color: "#FFFF00"}
ignore: [{value: 9}]
"""


@pytest.fixture
def student_pt(tmp_path: Path) -> Path:
    """A real (undistilled) vit_s student file for 32 px tiles: fine-tuning does not care how it was trained."""
    torch.manual_seed(0)
    path = tmp_path / "student.pt"
    norm = NormStats(mean=(120.0, 120.0, 120.0), std=(60.0, 60.0, 60.0), bands=(1, 2, 3), dtype="uint8")
    save_student(
        path,
        build_student("vit_s", img_size=32),
        StudentInfo("vit_s", {"img_size": 32, "in_chans": 3}, norm, {"teacher": "none"}),
    )
    return path


@pytest.fixture
def folder_data(tmp_path: Path) -> Path:
    """images/ + masks/ (index PNGs): three brightness classes in blocks, one ignore value; learnable."""
    root = tmp_path / "lc"
    rng = np.random.default_rng(0)
    for i in range(6):
        level = rng.integers(0, 3, size=(6, 6)).repeat(8, 0).repeat(8, 1)  # 48 x 48 label blocks
        image = (40 + 80 * level + rng.normal(0, 8, level.shape)).clip(0, 255).astype(np.uint8)
        mask = level.astype(np.uint8)
        mask[:2, :2] = 9  # an ignore value
        sub = "train" if i < 4 else "test"
        make_image(root / "images" / sub / f"t{i}.png", np.stack([image] * 3), "PNG")
        make_image(root / "masks" / sub / f"t{i}.png", mask[None], "PNG")
    (root / "classes.yaml").write_text(CLASSES)
    return root


def _finetune(student: Path, data: Path, out: Path, *extra: str):
    args = [
        "finetune",
        "--student",
        student,
        "--data",
        data,
        "--format",
        "folder",
        "--classes",
        data / "classes.yaml",
        "--split",
        "train",
        "--out",
        out,
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]
    return runner.invoke(app, [str(a) for a in args])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetune_then_evaluate_round_trip(student_pt: Path, folder_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "seg"
    cfg = tmp_path / "log.yaml"
    cfg.write_text("train: {log_every: 1}\n")
    res = _finetune(student_pt, folder_data, run, "--steps", "30", "--lr", "1e-3", "--config", cfg)
    assert res.exit_code == 0, res.output
    losses = [m["loss"] for m in _metrics(run)]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    model, info = load_segmenter(run / "segmenter.pt")
    assert info.classes.names == ("dark", "mid", "bright") and info.tile_size == 32 and info.overlap == 8
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    # the frozen encoder is still the student's
    student = torch.load(student_pt, weights_only=True)["state_dict"]
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, student["blocks.0.attn.qkv.weight"])

    ev = tmp_path / "eval"
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(run / "segmenter.pt"),
            "--data",
            str(folder_data),
            "--format",
            "folder",
            "--classes",
            str(folder_data / "classes.yaml"),
            "--split",
            "test",
            "--out",
            str(ev),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "mIoU" in res.output and "bright" in res.output
    report = json.loads((ev / "metrics.json").read_text())
    assert report["images"] == 2
    assert (ev / "confusion.png").stat().st_size > 1000 and (ev / "metrics.md").is_file()
    # 2 images x (48 x 48 - 4 ignored pixels) were scored
    assert sum(map(sum, report["confusion"])) == 2 * (48 * 48 - 4)
    assert report["oa"] > 0.5  # brightness classes are easy; a broken pipeline sits near 1/3
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(run / "segmenter.pt"),
            "--data",
            str(folder_data),
            "--format",
            "folder",
            "--classes",
            str(folder_data / "classes.yaml"),
            "--out",
            str(ev),
            "--no-progress",
        ],
    )
    assert res.exit_code == 1 and "--overwrite" in res.output


def test_finetune_resume_matches_uninterrupted(student_pt: Path, folder_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "seg"
    assert _finetune(student_pt, folder_data, run, "--steps", "4").exit_code == 0
    full = load_segmenter(run / "segmenter.pt")[0].state_dict()
    # config.yaml has checkpoint_every 200: the run kept only the final step-4 checkpoint, so restart from
    # scratch with checkpoints every 2 steps, crash after 2, resume, and compare with the uninterrupted run.
    run2 = tmp_path / "seg2"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {checkpoint_every: 2}\n")
    assert _finetune(student_pt, folder_data, run2, "--steps", "4", "--config", cfg).exit_code == 0
    (run2 / "checkpoints" / "step_0000004.pt").unlink()
    (run2 / "segmenter.pt").unlink()
    res = runner.invoke(app, ["finetune", "--out", str(run2), "--resume", "--no-progress"])
    assert res.exit_code == 0, res.output
    resumed = load_segmenter(run2 / "segmenter.pt")[0].state_dict()
    for k in full:
        assert torch.allclose(full[k].float(), resumed[k].float(), atol=1e-6), (
            k,
            float((full[k].float() - resumed[k].float()).abs().max()),
        )


def test_linear_head_and_class_balanced(student_pt: Path, folder_data: Path, tmp_path: Path) -> None:
    res = _finetune(student_pt, folder_data, tmp_path / "lin", "--steps", "2", "--head", "linear", "--class-balanced")
    assert res.exit_code == 0, res.output
    _, info = load_segmenter(tmp_path / "lin" / "segmenter.pt")
    assert info.head["head"] == "linear"


def _one_error(output: str) -> str:
    assert "Traceback" not in output
    lines = [ln for ln in output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, output
    return lines[0]


def test_bad_inputs(student_pt: Path, folder_data: Path, tmp_path: Path) -> None:
    res = _finetune(tmp_path / "nope.pt", folder_data, tmp_path / "a", "--steps", "1")
    assert res.exit_code == 1 and "nope.pt" in _one_error(res.output)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "classes.yaml").write_text(CLASSES)
    res = _finetune(student_pt, empty, tmp_path / "b", "--steps", "1")
    assert res.exit_code == 1 and str(empty) in _one_error(res.output)
    # a mask whose size differs from its image
    make_image(folder_data / "masks" / "train" / "t0.png", np.zeros((1, 40, 48), dtype=np.uint8), "PNG")
    res = _finetune(student_pt, folder_data, tmp_path / "c", "--steps", "1")
    assert res.exit_code == 1
    line = _one_error(res.output)
    assert "t0.png" in line and "40" in line
    # a class file that does not match the masks (value 7 is unknown)
    make_image(folder_data / "masks" / "train" / "t0.png", np.full((1, 48, 48), 7, dtype=np.uint8), "PNG")
    res = _finetune(student_pt, folder_data, tmp_path / "d", "--steps", "2", "--batch-size", "6")
    assert res.exit_code == 1 and "7" in _one_error(res.output)
    # tile size not a multiple of 16
    res = _finetune(student_pt, folder_data, tmp_path / "e", "--steps", "1", "--tile-size", "40")
    assert res.exit_code == 2 and "multiple of the patch size" in _one_error(res.output)
    res = _finetune(student_pt, folder_data, tmp_path / "f", "--steps", "1", "--amp", "fp17")
    assert res.exit_code == 2 and "fp17" in res.output and "bf16" in res.output  # refused by the --amp choice


def test_evaluate_refuses_classes_that_do_not_match_the_model(
    student_pt: Path, folder_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "seg"
    assert _finetune(student_pt, folder_data, run, "--steps", "1").exit_code == 0
    other = tmp_path / "other.yaml"
    other.write_text(CLASSES.replace("bright", "shiny"))
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(run / "segmenter.pt"),
            "--data",
            str(folder_data),
            "--format",
            "folder",
            "--classes",
            str(other),
            "--out",
            str(tmp_path / "ev"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 1 and "do not match" in _one_error(res.output)
