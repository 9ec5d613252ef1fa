"""Evaluation through any runtime (one sliding-window path), the decoder's share of the cost, --decoder-channels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image, make_segmenter
from typer.testing import CliRunner

from cdkd.artifacts import StudentInfo, load_segmenter, save_student
from cdkd.data.classes import ClassSchema
from cdkd.data.stats import NormStats
from cdkd.evaluation.semantic import StageTimer, evaluate, predict_image
from cdkd.inference.runtimes import open_runtime
from cdkd.inference.sliding import runtime_predict, sliding_window_logits
from cdkd.models.student import build_student
from cli.main import app

runner = CliRunner()
CLASSES = """classes:
  - {id: 0, name: dark, color: "#000080"}
  - {id: 1, name: mid, color: "#00FF00"}
  - {id: 2, name: bright, color: "#FFFF00"}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """images/ + masks/: two images larger than a 64 px tile (several windows) and one smaller (padding)."""
    root = tmp_path_factory.mktemp("eval") / "lc"
    rng = np.random.default_rng(1)
    for name, (h, w) in {"a": (96, 112), "b": (80, 80), "c": (48, 40)}.items():
        level = rng.integers(0, 3, size=(h // 8, w // 8)).repeat(8, 0).repeat(8, 1)
        image = (40 + 80 * level + rng.normal(0, 8, level.shape)).clip(0, 255).astype(np.uint8)
        make_image(root / "images" / f"{name}.png", np.stack([image] * 3), "PNG")
        make_image(root / "masks" / f"{name}.png", level.astype(np.uint8)[None], "PNG")
    (root / "classes.yaml").write_text(CLASSES)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory, data: Path) -> tuple[Path, Path]:
    """A tiny random segmenter.pt for the data's classes and its ONNX export (dynamic batch)."""
    from cdkd.export import export_onnx

    root = tmp_path_factory.mktemp("models")
    pt = make_segmenter(root / "segmenter.pt", tile=64, overlap=16, schema=ClassSchema.load(data / "classes.yaml"))
    return pt, export_onnx(pt, root / "model.onnx", dynamic_batch=True).onnx


def _evaluate(model: Path, data: Path, out: Path, **kw):
    return evaluate(model, data, "folder", out, classes=data / "classes.yaml", progress=False, **kw)


def test_onnx_evaluation_equals_torch(models, data: Path, tmp_path: Path) -> None:
    pt, onnx = models
    torch_rt, onnx_rt = open_runtime(pt, device="cpu", amp="none"), open_runtime(onnx, device="cpu")
    image = torch.from_numpy(
        torch_rt.meta.norm.normalize(np.random.default_rng(2).integers(0, 255, (3, 90, 150)).astype(np.uint8))
    )
    logits = [sliding_window_logits(runtime_predict(rt), image, 64, 16, 3, batch_size=3) for rt in (torch_rt, onnx_rt)]
    assert torch.allclose(logits[0], logits[1], atol=1e-3, rtol=1e-3)
    a = _evaluate(pt, data, tmp_path / "pt")
    b = _evaluate(onnx, data, tmp_path / "onnx")
    ja, jb = (json.loads(r.json_path.read_text()) for r in (a, b))
    assert np.asarray(ja["confusion"]).sum() == np.asarray(jb["confusion"]).sum() == 96 * 112 + 80 * 80 + 48 * 40
    assert abs(ja["miou"] - jb["miou"]) < 2e-3 and np.abs(np.subtract(ja["confusion"], jb["confusion"])).sum() <= 8
    assert (ja["cost"]["runtime"], jb["cost"]["runtime"]) == ("torch", "onnx")


def test_the_same_windows_whatever_the_runtime(models, data: Path) -> None:
    """predict_image takes a runtime's predict: the torch runtime gives what the bare nn.Module gives."""
    pt, _ = models
    model, info = load_segmenter(pt)
    rt = open_runtime(pt, device="cpu", amp="none")
    pixels = np.random.default_rng(3).integers(0, 255, (3, 70, 100)).astype(np.uint8)
    bare = predict_image(lambda b: model(b), rt.meta, pixels, batch_size=2)
    assert np.array_equal(predict_image(runtime_predict(rt), rt.meta, pixels, batch_size=2), bare)


def test_decoder_share_in_output_and_metrics(models, data: Path, tmp_path: Path) -> None:
    pt, onnx = models
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(pt),
            "--data",
            str(data),
            "--format",
            "folder",
            "--classes",
            str(data / "classes.yaml"),
            "--out",
            str(tmp_path / "e"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    cost = json.loads((tmp_path / "e" / "metrics.json").read_text())["cost"]
    assert cost["encoder_s"] > 0 and cost["decoder_s"] > 0
    assert cost["decoder_share"] == pytest.approx(cost["decoder_s"] / (cost["encoder_s"] + cost["decoder_s"]))
    assert cost["encoder_s"] + cost["decoder_s"] <= cost["seconds"] and cost["megapixels"] > 0
    assert f"({100 * cost['decoder_share']:.0f} % decoder)" in res.output and "with torch on cpu" in res.output
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(onnx),
            "--data",
            str(data),
            "--format",
            "folder",
            "--classes",
            str(data / "classes.yaml"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "with onnx on cpu" in res.output and "not measured" in res.output
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["cost"]["decoder_share"] is None
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(pt),
            "--runtime",
            "onnx",
            "--data",
            str(data),
            "--format",
            "folder",
            "--classes",
            str(data / "classes.yaml"),
            "--out",
            str(tmp_path / "x"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 1 and "not a readable ONNX model" in res.output


def test_stage_timer_splits_a_forward_pass_and_detaches(models) -> None:
    model, _ = load_segmenter(models[0])
    timer = StageTimer(model)
    with torch.inference_mode():
        model(torch.zeros(2, 3, 64, 64))
    assert timer.encoder_s > 0 and timer.decoder_s > 0
    timer.remove()
    before = (timer.encoder_s, timer.decoder_s)
    with torch.inference_mode():
        model(torch.zeros(1, 3, 64, 64))
    assert (timer.encoder_s, timer.decoder_s) == before


def test_finetune_decoder_channels_flag(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = tmp_path / "student.pt"
    norm = NormStats(mean=(120.0,) * 3, std=(60.0,) * 3, bands=(1, 2, 3), dtype="uint8")
    save_student(
        student,
        build_student("vit_s", img_size=32, embed_dim=48, depth=4, num_heads=2),
        StudentInfo(
            "vit_s",
            {"img_size": 32, "in_chans": 3, "embed_dim": 48, "depth": 4, "num_heads": 2},
            norm,
            {"teacher": "none"},
        ),
    )
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("head: {layers: [1, 2, 3, 4], channels: 8}\n")  # a 4-block student; the flag wins over 8
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
        "--out",
        tmp_path / "seg",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--config",
        cfg,
        "--decoder-channels",
        "24",
        "--no-progress",
    ]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    model, info = load_segmenter(tmp_path / "seg" / "segmenter.pt")
    assert info.head["channels"] == 24 and model.head.classifier.in_channels == 24
