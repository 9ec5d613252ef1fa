"""Distillation recipes: the registry, RS4D's corruption, objective and adaptive ratios, configuration, resume
under rs4d, and the whole path distill -> finetune -> export -> segment with an rsmamba student."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, distill_single_and_ddp, one_clean_error, read_metrics
from typer.testing import CliRunner

from cdkd.artifacts import load_student
from cdkd.config import DistillConfig, RS4DConfig, TeacherConfig, apply_overrides, load_config, save_config
from cdkd.distill.corruption import PatchDraws, apply_corruption, patch_validity, select_patches
from cdkd.distill.recipes import RECIPES, build_recipe
from cdkd.distill.recipes.rs4d import RS4D, CorruptionControl
from cdkd.distill.trainer import distill, validate_config
from cdkd.errors import CdkdValueError
from cdkd.models.student import build_student
from cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
TINY_MAMBA = {"embed_dim": 32, "depth": 3, "d_inner": 64, "d_state": 4}


def rs4d_config(data: Path, **overrides) -> DistillConfig:
    """rs4d with a random vit_t teacher (SAM's architecture, small) and 64 px tiles: steps take well under a second."""
    base = {
        "recipe": "rs4d",
        "data.root": str(data),
        "data.tile_size": 64,
        "data.num_workers": 0,
        "data.stats_samples": 16,
        "teacher.variant": "vit_t",
        "teacher.random_init": True,
        "student.arch": "rsmamba_s",
        "train.batch_size": 2,
        "train.steps": 4,
        "train.warmup_steps": 1,
        "train.lr": 1e-3,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
    }
    return apply_overrides(DistillConfig(), dict(base, **overrides))


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_and_unknown_recipe() -> None:
    assert list(RECIPES)[:2] == ["mask-cdkd", "rs4d"]
    assert build_recipe(DistillConfig()).name == "mask-cdkd"  # the default is unchanged
    recipe = build_recipe(DistillConfig(recipe="rs4d"))
    assert recipe.terms == ("l1",) and recipe.settings == RS4DConfig()
    with pytest.raises(CdkdValueError, match="unknown recipe 'nope'; choose one of mask-cdkd, rs4d"):
        validate_config(DistillConfig(recipe="nope", teacher=TeacherConfig(random_init=True)))


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"rs4d.noise_ratio": 0.7, "rs4d.mask_ratio": 0.5}, "exceed 1"),
        ({"rs4d.mask_ratio": -0.1}, "must be >= 0"),
        ({"rs4d.adaptive": True, "rs4d.max_mask_ratio": 0.1}, "only rise"),
        ({"rs4d.noise_std": 0.0}, "noise_std must be > 0"),
    ],
)
def test_rs4d_settings_are_checked(bad: dict, match: str, tmp_path: Path) -> None:
    with pytest.raises(CdkdValueError, match=match):
        validate_config(rs4d_config(tmp_path, **bad))


# -------------------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("mask_ratio,noise_ratio", [(0.2, 0.2), (0.1, 0.0), (0.0, 0.1), (0.3, 0.3), (0.5, 0.5)])
def test_selection_has_exact_counts_and_spares_padding(mask_ratio: float, noise_ratio: float) -> None:
    g = torch.Generator().manual_seed(0)
    b, n = 6, 100
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    valid = torch.rand(b, n, generator=g) < torch.linspace(0.05, 1.0, b)[:, None]  # 5 % .. 100 % valid
    masked, noised = select_patches(order, valid, mask_ratio, noise_ratio)
    n_valid = valid.sum(1)
    for i in range(b):
        k_mask = round(mask_ratio * int(n_valid[i]))
        assert int(masked[i].sum()) == k_mask
        assert int(noised[i].sum()) == min(round(noise_ratio * int(n_valid[i])), int(n_valid[i]) - k_mask)
    assert not (masked & noised).any() and not ((masked | noised) & ~valid).any()
    # Fewer patches masked -> a subset of the same draw (ratios can rise during a run without reshuffling).
    fewer, _ = select_patches(order, valid, mask_ratio / 2, noise_ratio)
    assert not (fewer & ~masked).any()


def test_corruption_of_real_items_keeps_ratios_and_never_touches_padding(tile_dir: Path) -> None:
    """Tiles of 128 px from images of 80-96 px rows: a third or more of every tile is padding."""
    from cdkd.data import UnlabeledTiles, compute_stats, find_rasters

    rasters = [r for r in find_rasters(tile_dir, bands=(1, 2, 3)) if r.dtype == "uint8" and r.height < 128]
    stats = compute_stats(rasters, (1, 2, 3), n_samples=8, window=128, seed=0)
    items = PatchDraws(UnlabeledTiles(rasters, stats, 128, seed=0), 128, seed=0)
    batch = torch.utils.data.default_collate([items[i] for i in range(len(rasters))])
    again = torch.utils.data.default_collate([items[i] for i in range(len(rasters))])
    assert torch.equal(batch["patch_order"], again["patch_order"]) and torch.equal(
        batch["noise_seed"], again["noise_seed"]
    )
    images, valid = batch["image"], batch["valid"]
    patch_valid = patch_validity(valid, 16)
    assert (~patch_valid).any(1).all()  # every tile has padded patches
    masked, noised = select_patches(batch["patch_order"], patch_valid, 0.3, 0.3)
    n_valid = patch_valid.sum(1)
    assert masked.sum(1).tolist() == [round(0.3 * int(k)) for k in n_valid]
    noise = torch.randn(images.shape)
    out = apply_corruption(images, masked, noised, noise, 16)
    from cdkd.distill.corruption import pixel_mask

    px_mask, px_noise = pixel_mask(masked, (8, 8), 16), pixel_mask(noised, (8, 8), 16)
    px_mask, px_noise = px_mask.expand_as(images), px_noise.expand_as(images)
    untouched = ~(px_mask | px_noise)
    assert torch.equal(out[untouched], images[untouched])  # padding included: never touched
    assert (out[px_mask] == 0).all()
    torch.testing.assert_close(out[px_noise], images[px_noise] + noise[px_noise])
    padded_px = pixel_mask(~patch_valid, (8, 8), 16).expand_as(images)
    assert torch.equal(out[padded_px], images[padded_px])


# --------------------------------------------------------------------------------------------------- objective


def _rs4d_model(arch: str = "rsmamba_s", **overrides) -> RS4D:
    from cdkd.models.teacher import build_frozen_teacher

    torch.manual_seed(0)
    teacher = build_frozen_teacher(TeacherConfig(variant="vit_t", random_init=True))
    tiny = TINY_MAMBA if arch.startswith("rsmamba") else {"embed_dim": 48, "depth": 2, "num_heads": 2}
    student = build_student(arch, img_size=64, **tiny)
    return RS4D(teacher, student, RS4DConfig(**overrides))


def _batch(b: int = 2, size: int = 64) -> dict[str, torch.Tensor]:
    n = (size // 16) ** 2
    return {
        "image": torch.randn(b, 3, size, size),
        "valid": torch.ones(b, size, size, dtype=torch.bool),
        "patch_order": torch.stack([torch.randperm(n) for _ in range(b)]),
        "noise_seed": torch.arange(b, dtype=torch.int64) + 7,
    }


@pytest.mark.parametrize("arch", ["rsmamba_s", "vit_s"])
def test_rs4d_trains_student_and_projector_only(arch: str) -> None:
    model = _rs4d_model(arch).train()
    assert not any(p.requires_grad for p in model.teacher.parameters()) and not model.teacher.training
    batch = _batch()
    loss = model(batch, {"noise_ratio": 0.2, "mask_ratio": 0.2})["l1"]
    loss.backward()
    assert torch.isfinite(loss) and model.projector.weight.grad.abs().sum() > 0
    assert model.student.patch_embed.proj.weight.grad.abs().sum() > 0
    # The target is SAM's image embedding of the clean tile: the corruption never reaches the teacher.
    with torch.no_grad():
        target = model.teacher(batch["image"]).flatten(2).transpose(1, 2)
        assert target.shape == (2, 16, 256)
        torch.testing.assert_close(model.forward_teacher(batch["image"]), target)
        features = model.forward_student(batch["image"], torch.zeros(2, 16, dtype=torch.bool))
        want = (model.projector(features) - target).abs().mean()
        torch.testing.assert_close(model(batch, {"noise_ratio": 0.0, "mask_ratio": 0.0})["l1"], want)


def test_rs4d_corruption_is_a_function_of_the_seeds_and_padding_counts_nothing() -> None:
    model = _rs4d_model().eval()
    batch = _batch()
    with torch.no_grad():
        a = model(batch, {"noise_ratio": 0.3, "mask_ratio": 0.3})["l1"]
        b = model(batch, {"noise_ratio": 0.3, "mask_ratio": 0.3})["l1"]
        reseeded = model(dict(batch, noise_seed=batch["noise_seed"] + 1), {"noise_ratio": 0.3, "mask_ratio": 0.0})
        clean = model(batch, {"noise_ratio": 0.0, "mask_ratio": 0.0})["l1"]
        nothing = model(dict(batch, valid=torch.zeros_like(batch["valid"])), {})["l1"]
    assert float(a) == float(b) and float(a) != float(clean) and torch.isfinite(reseeded["l1"])
    assert float(nothing) == 0.0


def test_adaptive_ratios_rise_as_the_loss_falls_and_resume_exactly() -> None:
    cfg = RS4DConfig(
        noise_ratio=0.1,
        mask_ratio=0.1,
        adaptive=True,
        max_noise_ratio=0.3,
        max_mask_ratio=0.4,
        adapt_target=0.5,
        adapt_warmup=3,
        ema_decay=0.5,
    )
    control = CorruptionControl(cfg)
    losses = [1.0, 1.0, 1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.5, 1.0]
    seen, events = [], []
    half = None
    for i, loss in enumerate(losses):
        seen.append(control.knobs())
        event = control.update({"l1": loss})
        if event:
            events.append(event.record["event"])
        if i == 6:
            half = control.state_dict()
    noise = [k["noise_ratio"] for k in seen]
    assert noise[:4] == [0.1] * 4 and all(b >= a for a, b in zip(noise, noise[1:]))  # never back down
    assert control.knobs() == {"noise_ratio": pytest.approx(0.3), "mask_ratio": pytest.approx(0.4)}
    assert events[0] == "reference" and "ratios" in events
    resumed = CorruptionControl(cfg)
    resumed.load_state_dict(half)
    for loss in losses[7:]:
        resumed.update({"l1": loss})
    assert resumed.state_dict() == control.state_dict()
    fixed = CorruptionControl(RS4DConfig())
    for loss in losses:
        assert fixed.update({"l1": loss}) is None
    assert fixed.knobs() == {"noise_ratio": 0.2, "mask_ratio": 0.2} and fixed.weights() == {"l1": 1.0}
    assert fixed.update({"l1": math.nan}) is None and fixed.updates == len(losses)


# ------------------------------------------------------------------------------------------------ configuration


def test_recipe_settings_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = rs4d_config(
        tmp_path,
        **{"rs4d.noise_ratio": 0.3, "rs4d.mask_ratio": 0.1, "rs4d.adaptive": True, "student.grad_checkpointing": True},
    )
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(DistillConfig, tmp_path / "c.yaml") == cfg
    grid = {}
    for path in sorted((REPO / "examples").glob("rs4d_*.yaml")):
        ex = load_config(DistillConfig, path)
        assert ex.recipe == "rs4d" and ex.student.arch == "rsmamba_s" and ex.teacher.variant == "vit_b"
        grid[path.stem] = (round(100 * ex.rs4d.noise_ratio), round(100 * ex.rs4d.mask_ratio))
    assert sorted(grid.values()) == [(0, 10), (10, 0), (20, 20), (30, 30)]
    assert all(stem == f"rs4d_noise{n}_mask{m}" for stem, (n, m) in grid.items())


def test_cli_recipe_flags(tile_dir: Path, tmp_path: Path) -> None:
    base = ["distill", "--data", str(tile_dir), "--random-teacher", "--no-progress"]
    res = runner.invoke(app, base + ["--out", str(tmp_path / "a"), "--noise-ratio", "0.2"])
    assert res.exit_code == 2 and "belong to --recipe rs4d" in one_clean_error(res.output)
    res = runner.invoke(app, base + ["--out", str(tmp_path / "b"), "--recipe", "nope"])
    assert res.exit_code == 2 and "unknown recipe 'nope'" in one_clean_error(res.output)
    res = runner.invoke(
        app, base + ["--out", str(tmp_path / "c"), "--recipe", "rs4d", "--mask-ratio", "0.6", "--noise-ratio", "0.6"]
    )
    assert res.exit_code == 2 and "exceed 1" in one_clean_error(res.output)


# ----------------------------------------------------------------------------------------------------- training


@pytest.fixture
def rgb_tiles(tile_dir: Path) -> Path:
    for path in tile_dir.rglob("ms_uint16.tif"):
        path.unlink()  # one data type in the folder
    return tile_dir


def test_rs4d_resume_reproduces_the_uninterrupted_run(rgb_tiles: Path, tmp_path: Path) -> None:
    """Adaptive ratios on (they change within the run), so the control's state must survive the restart too."""
    run = tmp_path / "run"
    cfg = rs4d_config(
        rgb_tiles,
        **{
            "rs4d.adaptive": True,
            "rs4d.adapt_warmup": 1,
            "rs4d.ema_decay": 0.0,
            "rs4d.adapt_target": 0.999,
            "rs4d.max_noise_ratio": 0.4,
            "rs4d.max_mask_ratio": 0.4,
        },
    )
    distill(cfg, run, progress=False)
    full_state = load_student(run / "student.pt")[0].state_dict()
    full = read_metrics(run)
    (run / "checkpoints" / "step_0000004.pt").unlink()
    (run / "student.pt").unlink()
    res = runner.invoke(app, ["distill", "--out", str(run), "--resume", "--no-progress"])
    assert res.exit_code == 0, res.output
    resumed_state = load_student(run / "student.pt")[0].state_dict()
    for k in full_state:
        torch.testing.assert_close(resumed_state[k], full_state[k], rtol=0, atol=1e-6, msg=k)
    again = read_metrics(run)
    assert [m.get("event", "step") for m in again] == [m.get("event", "step") for m in full]
    for a, b in zip(again, full):
        assert a.get("l1") == pytest.approx(b.get("l1"), abs=1e-6)
        assert a.get("noise_ratio") == pytest.approx(b.get("noise_ratio"))
    rows = [m for m in full if "l1" in m]
    assert len(rows) == 4 and all(r["stage"] == "adaptive" and r["weights"] == [1.0] for r in rows)
    model, info = load_student(run / "student.pt")
    assert info.arch == "rsmamba_s" and info.provenance["recipe"] == "rs4d"
    assert info.provenance["objective"]["adaptive"] is True
    report = json.loads((run / "report.json").read_text())
    assert report["recipe"] == "rs4d" and set(report["final_losses"]) == {"loss", "l1"}


def test_rs4d_loss_falls_on_real_tiles(tmp_path: Path) -> None:
    data = SHARED_DATA / "unlabeled" / "rsscn7"
    if not data.is_dir():
        pytest.skip(f"real data not available: {data}")
    cfg = rs4d_config(
        data, **{"train.steps": 12, "train.lr": 2e-3, "train.warmup_steps": 2, "train.checkpoint_every": 100}
    )  # the real-size rsmamba_s
    distill(cfg, tmp_path / "run", progress=False)
    rows = [r for r in read_metrics(tmp_path / "run") if "l1" in r]
    assert len(rows) == 12 and rows[0]["noise_ratio"] == 0.2 and rows[0]["mask_ratio"] == 0.2
    last = sum(r["l1"] for r in rows[-4:]) / 4
    assert last < 0.8 * rows[0]["l1"], (rows[0]["l1"], last)


def test_rsmamba_round_trip_distill_finetune_export_segment(tmp_path: Path) -> None:
    """rs4d on real RSSCN7 tiles -> UPerNet on real Dubai pairs -> ONNX (parity on real Dubai tiles) -> a real
    GeoTIFF scene through ONNX Runtime, with ``rsmamba_test`` (4 blocks; the real-size rsmamba_s takes the same
    path, ~1 min of export alone: README) at 64 px tiles."""
    import rasterio

    need = [
        SHARED_DATA / "unlabeled" / "rsscn7",
        SHARED_DATA / "labeled" / "dubai",
        SHARED_DATA / "scenes" / "colorado_hro.tif",
    ]
    if not all(p.exists() for p in need):
        pytest.skip(f"real data not available under {SHARED_DATA}")
    rsscn7, dubai, scene = need
    res = runner.invoke(
        app,
        [
            "distill",
            "--recipe",
            "rs4d",
            "--noise-ratio",
            "0.2",
            "--mask-ratio",
            "0.2",
            "--student",
            "rsmamba_test",
            "--teacher",
            "vit_t",
            "--random-teacher",
            "--data",
            str(rsscn7),
            "--out",
            str(tmp_path / "d"),
            "--tile-size",
            "64",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "(rs4d, 2 steps" in res.output
    (tmp_path / "ft.yaml").write_text("head: {layers: [1, 2, 3, 4], channels: 32}\n")
    res = runner.invoke(
        app,
        [
            "finetune",
            "--student",
            str(tmp_path / "d" / "student.pt"),
            "--data",
            str(dubai),
            "--format",
            "dubai",
            "--split",
            "tile1",
            "--out",
            str(tmp_path / "f"),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--config",
            str(tmp_path / "ft.yaml"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "f" / "segmenter.pt"),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "m.onnx"),
            "--check-data",
            str(dubai / "tile1" / "images"),
        ],
    )
    assert res.exit_code == 0, res.output
    parity = json.loads((tmp_path / "m.export.json").read_text())["parity"]
    assert parity["agreement"] >= 0.999 and not parity["synthetic"]
    res = runner.invoke(
        app,
        [
            "segment",
            str(scene),
            "--engine",
            str(tmp_path / "m.onnx"),
            "--out",
            str(tmp_path / "lc.tif"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "lc.tif") as out, rasterio.open(scene) as src:
        assert (out.width, out.height, out.crs) == (src.width, src.height, src.crs)
        classes = out.read(1)
    assert np.isin(np.unique(classes), np.arange(6)).all()
    assert load_student(tmp_path / "d" / "student.pt")[1].provenance["recipe"] == "rs4d"


@pytest.mark.slow
def test_rs4d_ddp_two_gloo_processes_match_one_process(rgb_tiles: Path, tmp_path: Path) -> None:
    """The corruption is drawn per sample, so 2 ranks x batch 1 corrupt exactly what 1 process x batch 2 does."""
    common = [
        "distill",
        "--recipe",
        "rs4d",
        "--data",
        str(rgb_tiles),
        "--teacher",
        "vit_t",
        "--random-teacher",
        "--student",
        "rsmamba_test",
        "--tile-size",
        "64",
        "--steps",
        "2",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--lr",
        "1e-3",
        "--no-progress",
    ]
    single, ddp = distill_single_and_ddp(common, tmp_path)
    a, b = read_metrics(single), read_metrics(ddp)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    for ma, mb in zip(a, b):
        assert ma["l1"] == pytest.approx(mb["l1"], rel=1e-5, abs=1e-6)
    sa = load_student(single / "student.pt")[0].state_dict()
    sb = load_student(ddp / "student.pt")[0].state_dict()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-5
