"""Recipe hyperkd: feature-guided masking, the spectral loss, the objective, the run (resume, report, student.pt),
and wavelength metadata through student.pt, segmenter.pt, ONNX metadata and engine sidecars."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import TINY_STUDENT, make_geotiff, make_segmenter, one_clean_error, synthetic_image
from typer.testing import CliRunner

from cdkd.artifacts import InferenceMeta, engine_sidecar, load_segmenter, load_student
from cdkd.config import DistillConfig, HyperKDConfig, apply_overrides
from cdkd.data.alignment import alignment_weights
from cdkd.data.sensors import SENSOR_PRESETS, TEACHER_RGB
from cdkd.data.stats import NormStats
from cdkd.distill.guided_masking import guided_mask, gumbel_noise, hidden_patches, mask_saliency_rank, patch_saliency
from cdkd.distill.recipes import RECIPES, build_recipe
from cdkd.distill.recipes.hyperkd import HyperKD, init_patch_embed
from cdkd.distill.spectral import spectral_angle, spectral_angle_loss, to_physical
from cdkd.distill.trainer import distill, validate_config
from cdkd.errors import CdkdValueError
from cdkd.models.student import build_student
from cli.main import app

runner = CliRunner()
S2 = SENSOR_PRESETS["sentinel2_l2a"]


def _gumbel(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).gumbel(size=shape).astype(np.float32))


# ---------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("ratio,guided", [(0.75, 0.5), (0.5, 1.0), (0.3, 0.0), (0.6, 0.9)])
def test_guided_masks_keep_the_exact_ratio_and_spare_padding(ratio: float, guided: float) -> None:
    g = torch.Generator().manual_seed(1)
    b, n = 5, 64
    valid = torch.rand(b, n, generator=g) < torch.linspace(0.3, 1.0, b)[:, None]
    saliency = torch.rand(b, n, generator=g) * valid
    masked = guided_mask(saliency, valid, _gumbel((b, n), 0), ratio, guided)
    for i in range(b):
        assert int(masked[i].sum()) == round(ratio * int(valid[i].sum()))
    assert not (masked & ~valid).any()
    hidden = hidden_patches(masked, valid)  # what a visible-only encoder drops: equal counts, masks kept
    assert (
        len(set(hidden.sum(1).tolist())) == 1
        and (hidden & masked).equal(masked)
        and not (hidden & valid & ~masked).any()
    )


def test_guided_masks_prefer_salient_patches() -> None:
    b, n, k = 64, 100, 25
    valid = torch.ones(b, n, dtype=torch.bool)
    saliency = torch.full((b, n), 0.1)
    saliency[:, :k] = 10.0  # a quarter of the tile stands out
    noise = _gumbel((b, n), 3)

    def salient_share(guided: float) -> float:
        masked = guided_mask(saliency, valid, noise, 0.25, guided)
        return float(masked[:, :k].sum() / masked.sum())

    uniform, half, full = salient_share(0.0), salient_share(0.5), salient_share(1.0)
    assert abs(uniform - 0.25) < 0.05  # guided 0: uniform, a quarter of the masked patches are salient
    assert full > 0.9 and uniform < half < full  # probability ~ saliency: nearly all masked patches are salient
    masked = guided_mask(saliency, valid, noise, 0.25, 1.0)
    assert float(mask_saliency_rank(saliency + torch.rand(b, n) * 1e-3, masked, valid)) > 0.7


def test_saliency_is_distance_from_the_image_mean_feature() -> None:
    feats = torch.zeros(1, 4, 8)
    feats[0, :, 0] = torch.tensor([1.0, 1.0, 1.0, -5.0])
    feats[0, :, 1] = torch.tensor([0.0, 0.0, 0.0, 4.0])  # the odd one out
    s = patch_saliency(feats, torch.ones(1, 4, dtype=torch.bool))
    assert int(s.argmax()) == 3 and s[0, 0] == pytest.approx(s[0, 1].item())
    assert patch_saliency(feats, torch.tensor([[True, True, True, False]]))[0, 3] == 0


def test_mask_noise_is_a_function_of_the_sample_seed() -> None:
    seeds = torch.tensor([11, 12, 11])
    g = gumbel_noise(seeds, 4096, torch.device("cpu"))
    assert g[0].equal(g[2]) and not g[0].equal(g[1])  # PatchDraws' noise_seed fixes a sample's mask on --resume
    assert float(g.mean()) == pytest.approx(0.5772, abs=0.05)  # the Euler-Mascheroni constant: Gumbel's mean
    assert float(g.std()) == pytest.approx(math.pi / math.sqrt(6), abs=0.05)


# ---------------------------------------------------------------------------------------------- spectral loss


def test_spectral_angle_is_zero_for_brightness_changes_and_positive_otherwise() -> None:
    spectra = torch.rand(3, 10, 12) * 5000 + 100  # reflectance x 10000, 12 bands
    assert spectral_angle(spectra, 1.7 * spectra).abs().max() < 1e-3  # brighter, same shape
    assert spectral_angle(spectra, 0.2 * spectra).abs().max() < 1e-3
    shifted = spectra.clone()
    shifted[..., 7] += 3000  # more NIR: another material
    assert (spectral_angle(spectra, shifted) > 0.01).all()
    assert spectral_angle(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(math.pi / 2)
    weight = torch.ones(3, 10)
    assert float(spectral_angle_loss(spectra, 3.0 * spectra, weight)) < 1e-3
    assert float(spectral_angle_loss(spectra, shifted, weight)) > 0.01
    # the angle is taken in physical units: undoing the normalisations recovers the spectra
    mean, std = torch.full((12,), 1500.0), torch.full((12,), 700.0)
    normed = (spectra - mean) / std
    pm, ps = normed.mean(-1, keepdim=True), normed.std(-1, keepdim=True)
    assert torch.allclose(to_physical((normed - pm) / ps, mean, std, pm, ps), spectra, rtol=1e-4)


def _objective(in_chans: int = 12, arch: str = "vit_s", **cfg) -> HyperKD:
    from cdkd.config import TeacherConfig
    from cdkd.models.teacher import build_frozen_teacher

    torch.manual_seed(0)
    teacher = build_frozen_teacher(TeacherConfig(variant="vit_t", random_init=True))
    kwargs = TINY_STUDENT if arch == "vit_s" else {}
    student = build_student(arch, img_size=64, in_chans=in_chans, **kwargs)
    bands = S2.select(range(1, in_chans + 1))
    norm = NormStats((1500.0,) * in_chans, (800.0,) * in_chans, tuple(range(1, in_chans + 1)), "uint16", bands)
    settings = HyperKDConfig(student_taps=(1, 2, 3), **cfg)
    return HyperKD(teacher, student, settings, alignment_weights(bands, TEACHER_RGB), norm)


def test_objective_trains_student_heads_only_and_scores_spectral_shape() -> None:
    model = _objective().train()
    b = 2
    valid = torch.ones(b, 64, 64, dtype=torch.bool)
    valid[1, 40:, :] = False  # padding at the bottom of the second tile
    batch = {"image": torch.randn(b, 12, 64, 64), "valid": valid, "noise_seed": torch.tensor([1, 2])}
    losses = model(batch, {})
    assert set(losses) == {"kd", "pix", "spec", "mask_saliency"} and all(torch.isfinite(v) for v in losses.values())
    (losses["kd"] + losses["pix"] + losses["spec"]).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.patch_embed.proj.weight.grad is not None and model.decoder.pred.weight.grad is not None
    # a prediction that is the target up to brightness costs nothing in the spectral term
    images = batch["image"]
    patch_valid = torch.ones(b, 16, dtype=torch.bool)
    masked = torch.zeros(b, 16, dtype=torch.bool)
    masked[:, :8] = True
    phys = images * 800.0 + 1500.0
    brighter = (phys * 1.3 - 1500.0) / 800.0
    from cdkd.models.mae import patchify

    raw = HyperKD.reconstruction_losses.__get__(_objective(norm_pix_loss=False))
    _, spec = raw(patchify(brighter), images, masked, patch_valid, valid)
    assert float(spec) < 1e-3
    _, spec = raw(patchify(images.flip(1)), images, masked, patch_valid, valid)
    assert float(spec) > 0.05


def test_patch_embedding_starts_from_the_teacher_through_the_alignment() -> None:
    from cdkd.config import TeacherConfig
    from cdkd.models.teacher import build_frozen_teacher

    torch.manual_seed(0)
    teacher = build_frozen_teacher(TeacherConfig(variant="vit_t", random_init=True))  # 256-d
    student = build_student("vit_s", img_size=64, in_chans=12)  # 384-d
    before = student.patch_embed.proj.weight.detach().clone()
    weights = alignment_weights(S2, TEACHER_RGB)
    init_patch_embed(student, teacher, weights)
    after = student.patch_embed.proj.weight.detach()
    assert torch.equal(after[:, 4:], before[:, 4:])  # red edge, NIR, SWIR: the student's own init
    assert not torch.allclose(after[:256, :4], before[:256, :4])
    # on the bands the teacher sees, the first 256 filters give the teacher's embedding of the aligned patch in
    # another orthonormal basis: the same Gram matrix
    x = torch.randn(5, 12, 16, 16)
    x[:, 4:] = 0
    t_in = torch.einsum("tc,bchw->bthw", torch.as_tensor(weights, dtype=torch.float32), x)
    t_emb = torch.nn.functional.conv2d(t_in, teacher.patch_embed.proj.weight).flatten(1)
    s_emb = torch.nn.functional.conv2d(x, after[:256]).flatten(1)
    assert torch.allclose(t_emb @ t_emb.T, s_emb @ s_emb.T, rtol=1e-3, atol=1e-2)


# ---------------------------------------------------------------------------------------------- the recipe


def _s2_tiles(root: Path, n: int = 3, tags: bool = True) -> Path:
    for k in range(n):
        p = make_geotiff(root / f"s{k}.tif", synthetic_image((12, 64 + 16 * k, 80), seed=k, dtype="uint16"))
        if tags:
            with rasterio.open(p, "r+") as dst:
                for i, band in enumerate(S2.bands, start=1):
                    dst.update_tags(i, wavelength_nm=f"{band.center_nm:g}")
                    dst.set_band_description(i, band.name)
    return root


# A tiny grid-keeping student (mask tokens: the path vit_s_win and RSMamba take) and a small decoder: a step costs
# milliseconds of optimiser work instead of seconds for ViT-S's 22 M parameters.
TINY = {
    "student.arch": "rsmamba_test",
    "hyperkd.student_taps": [1, 2, 3],
    "hyperkd.decoder_dim": 32,
    "hyperkd.decoder_depth": 1,
    "hyperkd.decoder_heads": 2,
}


def hyperkd_config(data: Path, **overrides) -> DistillConfig:
    base = {
        "recipe": "hyperkd",
        "data.root": str(data),
        "data.tile_size": 64,
        "data.num_workers": 0,
        "data.stats_samples": 8,
        "teacher.variant": "vit_t",
        "teacher.random_init": True,
        "student.in_chans": 12,
        "train.batch_size": 2,
        "train.steps": 4,
        "train.warmup_steps": 1,
        "train.lr": 1e-3,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        **TINY,
    }
    return apply_overrides(DistillConfig(), dict(base, **overrides))


def test_registry_settings_and_missing_wavelengths(tmp_path: Path) -> None:
    assert (
        RECIPES["hyperkd"].name == "hyperkd"
        and build_recipe(DistillConfig(recipe="hyperkd")).settings == HyperKDConfig()
    )
    for bad, match in [
        ({"hyperkd.guided_ratio": 1.5}, "guided_ratio"),
        ({"hyperkd.mask_ratio": 0.0}, "mask_ratio"),
        ({"hyperkd.spectral_loss": "sid"}, "spectral_loss"),
        ({"hyperkd.teacher_ranges": [630, 690, 510]}, "pairs"),
    ]:
        with pytest.raises(CdkdValueError, match=match):
            validate_config(hyperkd_config(tmp_path, **bad))
    data = _s2_tiles(tmp_path / "plain", n=1, tags=False)
    with pytest.raises(CdkdValueError, match="hyperkd needs to know what each band measures.*--wavelengths"):
        distill(hyperkd_config(data, **{"train.steps": 1}), tmp_path / "run", progress=False)


def test_hyperkd_run_records_bands_and_alignment_and_resumes_exactly(tmp_path: Path) -> None:
    data = _s2_tiles(tmp_path / "s2")
    cfg = hyperkd_config(data, **{"train.steps": 2, "train.checkpoint_every": 1})
    full = distill(cfg, tmp_path / "full", progress=False)
    assert set(full.losses) == {"loss", "kd", "pix", "spec", "mask_saliency"}
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert report["alignment"]["table"][0] == "R (630-690 nm) <- 1.000 B04 (665 nm)"  # widths from the preset
    assert report["alignment"]["weights"]["G"] == {"B02": pytest.approx(0.263158), "B03": pytest.approx(0.736842)}
    _, info = load_student(full.student_path)
    assert info.norm.spectral.names == S2.names and info.provenance["recipe"] == "hyperkd"
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["weights"] for m in metrics if "weights" in m][0] == [1.0, 1.0, 1.0, 0.0]

    full_state = load_student(full.student_path)[0].state_dict()
    (tmp_path / "full" / "checkpoints" / "step_0000002.pt").unlink()  # as if stopped after step 1's checkpoint
    full.student_path.unlink()
    resumed = distill(cfg, tmp_path / "full", resume=True, progress=False)
    for k in ("kd", "pix", "spec", "mask_saliency"):
        assert resumed.losses[k] == pytest.approx(full.losses[k], rel=1e-5, abs=1e-6)
    resumed_state = load_student(resumed.student_path)[0].state_dict()
    for k in full_state:
        torch.testing.assert_close(resumed_state[k], full_state[k], rtol=0, atol=1e-6, msg=k)


def test_cli_hyperkd_flags(tmp_path: Path) -> None:
    data = _s2_tiles(tmp_path / "s2", n=1, tags=False)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        "student: {arch: rsmamba_test}\nhyperkd: {student_taps: [1, 2, 3], decoder_dim: 32, "
        "decoder_depth: 1, decoder_heads: 2}\n"
    )
    args = [
        "distill",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--recipe",
        "hyperkd",
        "--random-teacher",
        "--teacher",
        "vit_t",
        "--tile-size",
        "64",
        "--in-chans",
        "12",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--config",
        str(tiny),
    ]
    res = runner.invoke(app, args + ["--wavelengths", "sentinel2", "--guided-ratio", "0.7"])
    assert "the preset has 13 bands but the data has 12" in one_clean_error(res.output)  # no names: no narrowing
    res = runner.invoke(app, args + ["--wavelengths", "sentinel2_l2a", "--guided-ratio", "0.7", "--mask-ratio", "0.5"])
    assert res.exit_code == 0, res.output
    assert "spectral alignment" in res.output and "R (630-690 nm) <- 1.000 B04 (665 nm)" in res.output
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "guided_ratio: 0.7" in cfg and "wavelengths: sentinel2_l2a" in cfg
    res = runner.invoke(
        app,
        ["distill", "--data", str(data), "--out", str(tmp_path / "r2"), "--guided-ratio", "0.5", "--random-teacher"],
    )
    assert "--guided-ratio belongs to --recipe hyperkd" in one_clean_error(res.output)


# ---------------------------------------------------------------------------------------------- artifacts


def test_wavelengths_travel_through_student_segmenter_onnx_and_sidecar(tmp_path: Path) -> None:
    from cdkd.export.onnx import export_onnx
    from cdkd.inference.runtimes import read_onnx_meta

    bands = S2.select([2, 3, 4, 8])
    norm = NormStats((1500.0,) * 4, (800.0,) * 4, (1, 2, 3, 4), "uint16", spectral=bands)
    seg = make_segmenter(tmp_path / "segmenter.pt", in_chans=4, norm=norm)
    _, info = load_segmenter(seg)
    assert info.student.norm.spectral == bands and info.inference_meta().norm.spectral == bands
    exported = export_onnx(seg, tmp_path / "model.onnx", check_tiles=2)
    meta = read_onnx_meta(exported.onnx)
    assert meta.norm.spectral == bands and meta == info.inference_meta()
    import onnx

    props = {p.key: p.value for p in onnx.load(exported.onnx).metadata_props}
    assert props["cdkd.wavelengths_nm"] == "490,560,665,842"
    engine = tmp_path / "orin.engine"
    engine.write_bytes(b"not a real engine")
    res = runner.invoke(app, ["export", exported.onnx, "--sidecar", str(engine)])
    assert res.exit_code == 0, res.output
    assert InferenceMeta.from_json(engine_sidecar(engine).read_text()).norm.spectral == bands
