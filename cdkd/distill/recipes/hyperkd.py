"""Recipe ``hyperkd``: a student that reads every band of the scene, taught by an RGB SAM teacher.

HyperKD (Matin et al., DSAA 2025, arXiv 2508.09453) distils Prithvi (six bands) into an EnMAP student (224
bands) with three ideas, all here with SAM (three bands) as the teacher:

* **spectral-range channel alignment**: the teacher's R, G, B inputs are formed from the student's bands by
  their overlap with the teacher channels' spectral ranges (``cdkd.data.alignment``; the bands' wavelengths
  come from the data or ``--wavelengths``); the student's patch embedding starts as the teacher's through the
  same mapping (``init_patch_embed``);
* **spatial feature-guided masking**: the frozen teacher sees the clean aligned tile once; its per-patch
  feature saliency steers which patches are masked, mixed with uniform sampling (``guided_ratio``), exactly
  round(mask_ratio * n) valid patches per tile, padding never (``cdkd.distill.guided_masking``);
* **spectral-aware reconstruction**: the student reconstructs every band of the masked patches, scored by the
  pixel MSE (MAE's per-patch normalised targets) and the spectral angle of each pixel's spectrum in physical
  units (``cdkd.distill.spectral``).

Beside them the student's visible tokens are aligned to the teacher's features of the clean tile at three depth
pairs (Mask-CDKD's KD: linear projectors, MSE to layer-normalised targets).

Why a recipe of its own rather than options on ``mask-cdkd``: there the teacher sees the *masked* view and
trains its MMoA adapters through its own reconstruction, weighted by r = L_T_MAE / L_S_MAE. Feature-guided
masking needs the teacher's features of the *unmasked* tile before the mask exists, which on mask-cdkd would
cost a second full teacher pass (the teacher dominates a step's cost), and a spectral term on the student's
reconstruction only would skew r. Here one frozen teacher pass serves the saliency and the KD targets.

Loss terms: ``kd``, ``pix``, ``spec`` (weights ``hyperkd.weights``) and ``mask_saliency``, a monitor of weight 0:
the mean saliency percentile of the masked patches (0.5 = uniform masking).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from cdkd.config import HyperKDConfig
from cdkd.data.alignment import alignment_weights, format_alignment, patch_embed_from_teacher
from cdkd.data.bands import BandSet
from cdkd.data.files import RasterInfo
from cdkd.data.sensors import teacher_bands
from cdkd.data.stats import NormStats
from cdkd.distill.corruption import PatchDraws, patch_validity
from cdkd.distill.guided_masking import guided_mask, gumbel_noise, hidden_patches, mask_saliency_rank, patch_saliency
from cdkd.distill.recipes.base import FixedWeights, LossControl, Recipe
from cdkd.distill.spectral import patch_spectra, spectral_angle_loss, to_physical
from cdkd.errors import CdkdValueError
from cdkd.models.mae import MAEDecoder, patchify, reconstruction_loss
from cdkd.models.teacher import default_teacher_taps

TERMS = ("kd", "pix", "spec", "mask_saliency")
SPECTRAL_LOSSES = ("angle", "none")


class HyperKD(nn.Module):
    """Frozen SAM teacher, the student, KD projectors and the student's reconstruction head, as one module.

    ``forward(batch, knobs)`` reads as its stages:

        aligned          = align(images)                               # (B, 3, H, W): teacher channels from bands
        t_feats, t_last  = forward_teacher(aligned)                    # clean tile, full grid, no gradient
        masked           = choose_mask(t_last, batch, patch_valid)     # feature-guided, exact count
        s_feats, s_last  = forward_student(images, hidden)             # every band, masked view
        kd               = kd_loss(t_feats, s_feats, visible & valid)
        pix, spec        = reconstruction_losses(decode(s_last), images, masked, valid)

    Args:
        weights: (T, C) alignment weights (``cdkd.data.alignment.alignment_weights``).
        norm: the data's statistics: the spectral term measures angles in the data's units.
    """

    align_weights: torch.Tensor  # buffers, registered in __init__
    band_mean: torch.Tensor
    band_std: torch.Tensor

    def __init__(
        self, teacher: nn.Module, student: nn.Module, cfg: HyperKDConfig, weights: np.ndarray, norm: NormStats
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.cfg = cfg
        self.patch_size = int(student.patch_size)
        t_taps = cfg.teacher_taps or default_teacher_taps(teacher.variant)
        if len(t_taps) != len(cfg.student_taps):
            raise CdkdValueError(f"hyperkd: teacher taps {t_taps} and student taps {cfg.student_taps} must pair up")
        for taps, depth, who in ((t_taps, teacher.depth, "teacher"), (cfg.student_taps, student.depth, "student")):
            if any(not 1 <= t <= depth for t in taps):
                raise CdkdValueError(f"hyperkd: {who} taps {tuple(taps)} outside blocks 1..{depth}")
        self.teacher_taps = tuple(t - 1 for t in t_taps)
        self.student_taps = tuple(s - 1 for s in cfg.student_taps)
        in_chans = weights.shape[1]
        # Derived from the data, rebuilt identically on --resume: not part of the state dict.
        self.register_buffer("align_weights", torch.as_tensor(weights, dtype=torch.float32), persistent=False)
        self.register_buffer("band_mean", torch.tensor(norm.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("band_std", torch.tensor(norm.std, dtype=torch.float32), persistent=False)
        self.projectors = nn.ModuleList(nn.Linear(student.embed_dim, teacher.embed_dim) for _ in t_taps)
        self.decoder = MAEDecoder(
            student.embed_dim,
            dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
            patch_size=self.patch_size,
            out_chans=in_chans,
            fills_masked=student.encodes_visible_only,
        )

    def train(self, mode: bool = True) -> HyperKD:
        super().train(mode)
        self.teacher.eval()  # a fixed target network
        return self

    # ---------------------------------------------------------------------------------------------------- stages
    def align(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised bands -> (B, T, H, W) teacher input: each teacher channel the overlap-weighted
        mean of the bands in its spectral range."""
        return torch.einsum("tc,bchw->bthw", self.align_weights.to(images.dtype), images)

    def forward_teacher(self, aligned: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        with torch.no_grad():
            return self.teacher.forward_masked(aligned, None, self.teacher_taps)

    def choose_mask(
        self,
        t_last: torch.Tensor,
        batch: Mapping[str, torch.Tensor],
        patch_valid: torch.Tensor,
        knobs: Mapping[str, float],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked, saliency), each (B, N)."""
        saliency = patch_saliency(t_last, patch_valid)
        ratio = float(knobs.get("mask_ratio", self.cfg.mask_ratio))
        guided = float(knobs.get("guided_ratio", self.cfg.guided_ratio))
        noise = gumbel_noise(batch["noise_seed"], patch_valid.shape[1], patch_valid.device)
        return guided_mask(saliency, patch_valid, noise, ratio, guided), saliency

    def forward_student(self, images: torch.Tensor, hidden: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.student.forward_masked(images, hidden, self.student_taps)

    def kd_loss(
        self, t_feats: Sequence[torch.Tensor], s_feats: Sequence[torch.Tensor], keep: torch.Tensor
    ) -> torch.Tensor:
        """MSE between projected student features and layer-normalised teacher features on ``keep`` tokens,
        averaged over the tap pairs (Mask-CDKD's KD with a frozen teacher)."""
        weight = keep.to(torch.float32)
        denom = weight.sum().clamp_min(1.0)
        total = torch.zeros((), device=keep.device)
        for proj, t, s in zip(self.projectors, t_feats, s_feats):
            target = F.layer_norm(t.float(), t.shape[-1:])
            total = total + (((proj(s).float() - target) ** 2).mean(-1) * weight).sum() / denom
        return total / len(self.projectors)

    def reconstruction_losses(
        self,
        pred: torch.Tensor,
        images: torch.Tensor,
        masked: torch.Tensor,
        patch_valid: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel MSE, spectral angle) on the masked valid patches; pred (B, N, p*p*C)."""
        p, c = self.patch_size, images.shape[1]
        pix = reconstruction_loss(
            pred, images, masked, patch_size=p, norm_pix=self.cfg.norm_pix_loss, valid=patch_valid
        )
        if self.cfg.spectral_loss == "none":
            return pix, pix.new_zeros(())
        target = patchify(images, p).float()
        mean = std = None
        if self.cfg.norm_pix_loss:  # pred lives in per-patch normalised units: undo them with the target's stats
            mean = target.mean(-1, keepdim=True).unsqueeze(-1)
            std = (target.var(-1, keepdim=True) + 1e-6).sqrt().unsqueeze(-1)
        pred_phys = to_physical(patch_spectra(pred.float(), c), self.band_mean, self.band_std, mean, std)
        true_phys = to_physical(patch_spectra(target, c), self.band_mean, self.band_std)
        pixel_valid = patchify(valid[:, None].to(target.dtype), p)  # (B, N, p*p)
        weight = pixel_valid * (masked & patch_valid).unsqueeze(-1)
        return pix, spectral_angle_loss(pred_phys, true_phys, weight)

    def forward(
        self, batch: Mapping[str, torch.Tensor], knobs: Mapping[str, float] | None = None
    ) -> dict[str, torch.Tensor]:
        """batch: ``image`` (B, C, H, W) normalised, ``valid`` (B, H, W), ``noise_seed`` (B,); knobs: optional
        ``mask_ratio`` / ``guided_ratio``. Returns the unweighted terms of ``TERMS``."""
        images, knobs = batch["image"], knobs or {}
        grid = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        patch_valid = patch_validity(batch["valid"], self.patch_size)
        t_feats, t_last = self.forward_teacher(self.align(images))
        masked, saliency = self.choose_mask(t_last, batch, patch_valid, knobs)
        hidden = hidden_patches(masked, patch_valid) if self.student.encodes_visible_only else masked
        s_feats, s_last = self.forward_student(images, hidden)
        kd = self.kd_loss(t_feats, s_feats, ~hidden & patch_valid)
        pred = self.decoder(s_last, grid, fill=hidden if self.student.encodes_visible_only else None)
        pix, spec = self.reconstruction_losses(pred, images, masked, patch_valid, batch["valid"])
        return {"kd": kd, "pix": pix, "spec": spec, "mask_saliency": mask_saliency_rank(saliency, masked, patch_valid)}


class HyperKDControl(FixedWeights):
    """Fixed weights; the report also carries the spectral alignment (teacher channel <- student bands)."""

    def __init__(self, weights: Mapping[str, float], alignment: dict[str, Any]) -> None:
        super().__init__(weights)
        self.alignment = alignment

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "alignment": self.alignment}


class HyperKDRecipe(Recipe):
    name = "hyperkd"
    section = "hyperkd"
    terms = TERMS
    every_band = True

    def validate(self) -> None:
        c: HyperKDConfig = self.settings  # each setting's own range: config.check_ranges
        if c.spectral_loss not in SPECTRAL_LOSSES:
            raise CdkdValueError(
                f"hyperkd.spectral_loss must be one of {', '.join(SPECTRAL_LOSSES)}, got {c.spectral_loss!r}"
            )
        teacher_bands(c.teacher_ranges)  # raises on malformed ranges

    def band_set(self) -> BandSet:
        """The student's bands (from the data's statistics, which the trainer sets before ``build``)."""
        stats = self.stats
        if stats is None or stats.spectral is None:
            raise CdkdValueError(
                "hyperkd needs to know what each band measures, and the data says nothing about "
                "wavelengths (no wavelength_nm / CENTRAL_WAVELENGTH_UM tags, ENVI header or known "
                "band names): pass --wavelengths with a sensor preset (sentinel2, naip, "
                "worldview3, enmap) or the centres in nm"
            )
        return stats.spectral

    def alignment(self) -> tuple[np.ndarray, BandSet, BandSet]:
        """(weights (3, C), student bands, teacher channels)."""
        student, teacher = self.band_set(), teacher_bands(self.settings.teacher_ranges)
        try:
            return alignment_weights(student, teacher), student, teacher
        except CdkdValueError as e:
            bands = ",".join(map(str, self.cfg.data.bands or ()))
            raise CdkdValueError(
                f"{e}; the student reads band(s) {bands} of the data: read more of them (--bands, "
                "--in-chans; by default hyperkd reads every band)"
            ) from None

    def build_teacher(self) -> nn.Module:
        from cdkd.models.teacher import build_frozen_teacher

        return build_frozen_teacher(self.cfg.teacher)

    def build(self, teacher: nn.Module, student: nn.Module) -> nn.Module:
        weights, _, _ = self.alignment()
        if self.settings.init_patch_embed:
            init_patch_embed(student, teacher, weights)
        return HyperKD(teacher, student, self.settings, weights, self.stats)

    def dataset(self, rasters: Sequence[RasterInfo], stats: NormStats) -> Dataset:
        return PatchDraws(super().dataset(rasters, stats), self.cfg.data.tile_size, seed=self.cfg.train.seed)

    def control(self) -> LossControl:
        weights, student, teacher = self.alignment()
        w = dict(zip(TERMS, (*self.settings.weights, 0.0)))
        return HyperKDControl(w, alignment_record(weights, student, teacher))

    def provenance(self) -> dict[str, Any]:
        weights, student, teacher = self.alignment()
        return {**super().provenance(), "alignment": alignment_record(weights, student, teacher)}


def alignment_record(weights: np.ndarray, student: BandSet, teacher: BandSet) -> dict[str, Any]:
    """The alignment as report.json / student.pt keep it: the table as text lines and the weights per channel."""
    names = [b.name or f"{b.center_nm:g}nm" for b in student.bands]
    return {
        "table": format_alignment(weights, student, teacher).splitlines(),
        "teacher": teacher.to_dict(),
        "weights": {
            t.name: {n: round(float(w), 6) for n, w in zip(names, row) if w > 0}
            for t, row in zip(teacher.bands, weights)
        },
    }


def init_patch_embed(student: nn.Module, teacher: nn.Module, weights: np.ndarray) -> None:
    """Set the student's patch-embedding filters from the teacher's through the alignment ``weights`` (T, C)
    (``cdkd.data.alignment.patch_embed_from_teacher``); its bias too when the widths agree. Every cdkd student
    and SAM keep the embedding in ``patch_embed.proj`` (a 16 x 16 stride-16 convolution)."""
    s_conv = cast(nn.Conv2d, student.patch_embed.proj)  # type: ignore[union-attr]
    t_conv = cast(nn.Conv2d, teacher.patch_embed.proj)  # type: ignore[union-attr]
    if tuple(s_conv.kernel_size) != tuple(t_conv.kernel_size):
        raise CdkdValueError(
            f"hyperkd: student patch {tuple(s_conv.kernel_size)} and teacher patch "
            f"{tuple(t_conv.kernel_size)} differ; set hyperkd.init_patch_embed: false"
        )
    with torch.no_grad():
        new = patch_embed_from_teacher(
            t_conv.weight.detach().cpu().numpy(),
            weights,
            s_conv.out_channels,
            base=s_conv.weight.detach().cpu().numpy(),
        )
        s_conv.weight.copy_(torch.as_tensor(new, dtype=s_conv.weight.dtype))
        if s_conv.bias is not None and t_conv.bias is not None and s_conv.out_channels == t_conv.out_channels:
            s_conv.bias.copy_(t_conv.bias)
