"""End-to-end distillation on CPU: learning, resume, DDP with gloo, and the run folder contract.

A random-weight SAM vit_b teacher (the real architecture) and 64 px tiles keep each step around a second.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import distill_single_and_ddp, read_metrics
from typer.testing import CliRunner

from cdkd.artifacts import load_student
from cdkd.config import DistillConfig, apply_overrides, load_config
from cdkd.distill.trainer import distill
from cli.main import app


@pytest.fixture
def rgb_tiles(tile_dir: Path) -> Path:
    """The shared synthetic folder (JPEG, PNG, GeoTIFF, broken files) without its uint16 file: one data type."""
    import rasterio

    for path in tile_dir.rglob("*.tif"):
        try:
            with rasterio.open(path) as src:
                deep = src.dtypes[0] != "uint8"
        except rasterio.errors.RasterioIOError:
            continue  # the broken files stay: the run must skip them
        if deep:
            path.unlink()
    return tile_dir


def small_config(data: Path, **overrides) -> DistillConfig:
    base = {
        "data.root": str(data),
        "data.tile_size": 64,
        "data.num_workers": 0,
        "data.stats_samples": 16,
        "teacher.variant": "vit_b",
        "teacher.random_init": True,
        "teacher.adapter_dim": 16,
        "objective.decoder_dim": 64,
        "objective.decoder_depth": 1,
        "objective.decoder_heads": 4,
        "train.batch_size": 2,
        "train.steps": 4,
        "train.warmup_steps": 1,
        "train.lr": 1e-4,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
    }
    return apply_overrides(DistillConfig(), dict(base, **overrides))


def _student_state(run: Path) -> dict[str, torch.Tensor]:
    model, _ = load_student(run / "student.pt")
    return model.state_dict()


def test_loss_decreases_on_real_tiles(rsscn7_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(
        rsscn7_dir,
        **{
            "train.steps": 30,
            "train.lr": 5e-4,
            "train.warmup_steps": 3,
            "train.checkpoint_every": 100,
            "objective.schedule_warmup": 5,
        },
    )
    result = distill(cfg, tmp_path / "run", progress=False)
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 30
    first = sum(r["kd"] + r["t_mae"] + r["s_mae"] for r in rows[:5]) / 5
    last = sum(r["kd"] + r["t_mae"] + r["s_mae"] for r in rows[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert result.student_path.is_file()
    model, info = load_student(result.student_path)
    assert info.arch == "vit_s" and info.tile_size == 64 and info.norm.dtype == "uint8"
    assert info.provenance["teacher"]["random_init"] is True and info.provenance["steps"] == 30
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 384)


def test_run_folder_contract_and_refusal_to_overwrite(rgb_tiles: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = small_config(rgb_tiles, **{"train.steps": 2})
    distill(cfg, run, progress=False)
    for name in ("student.pt", "config.yaml", "metrics.jsonl", "report.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002.pt"]
    # the resolved configuration: absolute paths (a --resume from another folder finds the data) and bands settled
    settled = replace(
        cfg,
        data=replace(cfg.data, root=str(Path(cfg.data.root).absolute()), bands=(1, 2, 3)),
        student=replace(cfg.student, in_chans=3),
    )
    assert load_config(DistillConfig, run / "config.yaml") == settled
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 2 and report["images_seen"] == 4
    assert not list(run.glob(".*.tmp*"))  # no temporary left behind
    from cdkd.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="--resume"):
        distill(cfg, run, progress=False)
    distill(cfg, run, overwrite=True, progress=False)


def test_resume_continues_the_same_trajectory(rgb_tiles: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = small_config(rgb_tiles, **{"train.steps": 4, "train.checkpoint_every": 2})
    distill(cfg, run, progress=False)
    uninterrupted = _student_state(run)
    full_metrics = read_metrics(run)
    # Simulate a crash after step 2: the step-4 checkpoint and the final outputs never got written.
    (run / "checkpoints" / "step_0000004.pt").unlink()
    (run / "student.pt").unlink()
    res = CliRunner().invoke(app, ["distill", "--out", str(run), "--resume", "--no-progress"])
    assert res.exit_code == 0, res.output
    resumed = _student_state(run)
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.allclose(resumed[k], uninterrupted[k], atol=1e-6), k
    resumed_metrics = read_metrics(run)
    assert [m["step"] for m in resumed_metrics] == [m["step"] for m in full_metrics]  # each step logged once
    for a, b in zip(resumed_metrics, full_metrics):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_resume_refuses_a_changed_configuration(rgb_tiles: Path, tmp_path: Path) -> None:
    from cdkd.errors import ConfigError

    run = tmp_path / "run"
    distill(small_config(rgb_tiles, **{"train.steps": 2}), run, progress=False)
    with pytest.raises(ConfigError, match="train.lr"):
        distill(small_config(rgb_tiles, **{"train.steps": 2, "train.lr": 1.0}), run, resume=True, progress=False)


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(rgb_tiles: Path, tmp_path: Path) -> None:
    """2 ranks x batch 1 see exactly the samples of 1 process x batch 2, so losses and weights agree."""
    common = [
        "distill",
        "--data",
        str(rgb_tiles),
        "--teacher",
        "vit_b",
        "--random-teacher",
        "--tile-size",
        "64",
        "--steps",
        "2",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--lr",
        "1e-4",
        "--no-progress",
    ]
    cfg_file = tmp_path / "small.yaml"
    cfg_file.write_text(
        "teacher: {adapter_dim: 16}\nobjective: {decoder_dim: 64, decoder_depth: 1, decoder_heads: 4}\n"
        "train: {warmup_steps: 1}\ndata: {stats_samples: 16}\n"
    )
    common += ["--config", str(cfg_file)]
    single, ddp = distill_single_and_ddp(common, tmp_path)
    a, b = read_metrics(single), read_metrics(ddp)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    for ma, mb in zip(a, b):
        for key in ("kd", "t_mae", "s_mae"):
            assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-5), (key, ma, mb)
    sa, sb = _student_state(single), _student_state(ddp)
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    # Two AdamW steps move weights by up to ~2e-4; summation-order noise must stay far below that.
    assert worst < 2e-5, worst


def test_windowed_student_and_fixed_uni_ablation_run(rgb_tiles: Path, tmp_path: Path) -> None:
    """vit_s_win (full grid + mask token) with the single-adapter, additive, one-way, fixed-weight ablation."""
    cfg = small_config(
        rgb_tiles,
        **{
            "student.arch": "vit_s_win",
            "train.steps": 2,
            "teacher.adapter": "single",
            "teacher.fusion": "add",
            "objective.direction": "uni",
            "objective.schedule": "fixed",
            "objective.fixed_weights": (0.5, 0.25, 0.25),
        },
    )
    distill(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert all(r["weights"] == [0.5, 0.25, 0.25] and r["stage"] == "fixed" for r in rows)
    model, info = load_student(tmp_path / "run" / "student.pt")
    assert info.arch == "vit_s_win" and not model.encodes_visible_only
    assert model.forward_features(torch.randn(1, 3, 96, 96)).shape == (1, 36, 384)
