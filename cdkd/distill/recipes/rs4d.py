"""Recipe ``rs4d``: RS4D's one-stage distillation of SAM's image embedding into a student that sees a corrupted tile.

RS4D (Remote Sensing Distillation for Downstream tasks, IEEE TGRS 2026) distils SAM ViT-B into RSMamba students.
Its distillation script is not published; this follows the paper's description:

* target: SAM's final image embedding (the neck's 256 channels at 1/16 resolution) of the clean tile, from a
  frozen SAM (no adapters, nothing trainable);
* student input: the same tile with a fraction of its patches given additive Gaussian noise and another
  fraction masked (studied pairs (noise %, mask %): (10, 0), (0, 10), (20, 20), (30, 30); default 20/20);
* loss: L1 between the student's last features, linearly projected to 256 channels, and the target, averaged
  over the valid (non-padding) patches of every tile, corrupted or not: the student must recover the clean
  embedding everywhere.

Masking: a student that keeps its token grid (RSMamba, ``vit_s_win``) gets its learnt mask token at the masked
patches (``forward_masked``, SimMIM); ``vit_s``, which would drop masked tokens and predict nothing there, sees
the masked patches as mean pixels (zeros after normalisation) through ``forward_features``.

Optional adaptive ratios (``adaptive: true``): after ``adapt_warmup`` steps the smoothed loss is taken as a
reference; as it falls toward ``adapt_target`` x reference, both ratios rise linearly from their base values to
``max_noise_ratio`` / ``max_mask_ratio``, never back down. They are logged with every step.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from cdkd.config import RS4DConfig
from cdkd.data.files import RasterInfo
from cdkd.data.stats import NormStats
from cdkd.distill.corruption import PatchDraws, apply_corruption, patch_validity, seeded_noise, select_patches
from cdkd.distill.objective import teacher_input
from cdkd.distill.recipes.base import Event, LossControl, Recipe
from cdkd.errors import CdkdValueError

TERMS = ("l1",)
RATIO_EVENT_STEP = 0.05  # log an event each time a ratio has moved this much since the last one


class RS4D(nn.Module):
    """Frozen SAM, the student and a linear projector to SAM's embedding channels, as one module.

    ``forward(batch, knobs)`` reads as its stages:

        target        = forward_teacher(images)                      # SAM's embedding of the clean tile
        masked, noised = choose_patches(batch, knobs)                # exact counts among valid patches
        corrupted     = corrupt(images, masked, noised, seeds)
        features      = forward_student(corrupted, masked)          # (B, N, C) last features
        l1            = l1_loss(projector(features), target, valid)
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: RS4DConfig) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.cfg = cfg
        self.patch_size = int(student.patch_size)
        self.projector = nn.Linear(student.embed_dim, teacher.out_chans)

    def train(self, mode: bool = True) -> RS4D:
        super().train(mode)
        self.teacher.eval()  # a fixed target network
        return self

    # ---------------------------------------------------------------------------------------------------- stages
    def forward_teacher(self, images: torch.Tensor) -> torch.Tensor:
        """SAM's image embedding of the clean tile as tokens (B, N, 256), row-major."""
        with torch.no_grad():
            return self.teacher(teacher_input(images)).flatten(2).transpose(1, 2)

    def choose_patches(
        self, batch: Mapping[str, torch.Tensor], patch_valid: torch.Tensor, knobs: Mapping[str, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask_ratio = float(knobs.get("mask_ratio", self.cfg.mask_ratio))
        noise_ratio = float(knobs.get("noise_ratio", self.cfg.noise_ratio))
        return select_patches(batch["patch_order"], patch_valid, mask_ratio, noise_ratio)

    def corrupt(
        self, images: torch.Tensor, masked: torch.Tensor, noised: torch.Tensor, seeds: torch.Tensor
    ) -> torch.Tensor:
        if noised.any():
            noise = seeded_noise(seeds, tuple(images.shape[1:]), images.device) * self.cfg.noise_std
        else:  # e.g. the (0 %, 10 %) ablation: no noise to draw
            noise = torch.zeros_like(images)
        return apply_corruption(images, masked, noised, noise, self.patch_size)

    def forward_student(self, images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The student's final (normed) tokens (B, N, C) on the corrupted tile."""
        if self.student.encodes_visible_only:
            return self.student.forward_features(images)
        return self.student.forward_masked(images, masked, ())[1]

    @staticmethod
    def l1_loss(pred: torch.Tensor, target: torch.Tensor, patch_valid: torch.Tensor) -> torch.Tensor:
        """Mean |pred - target| over channels and valid patches; pred/target (B, N, C), patch_valid (B, N)."""
        per_patch = (pred.float() - target.float()).abs().mean(-1)
        weight = patch_valid.to(per_patch.dtype)
        return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)

    def forward(
        self, batch: Mapping[str, torch.Tensor], knobs: Mapping[str, float] | None = None
    ) -> dict[str, torch.Tensor]:
        """batch: ``image`` (B, C, H, W) normalised, ``valid`` (B, H, W), ``patch_order`` (B, N), ``noise_seed``
        (B,); knobs: ``noise_ratio``, ``mask_ratio`` (default: the configured ones). Returns {"l1": loss}."""
        images, knobs = batch["image"], knobs or {}
        patch_valid = patch_validity(batch["valid"], self.patch_size)
        target = self.forward_teacher(images)
        masked, noised = self.choose_patches(batch, patch_valid, knobs)
        corrupted = self.corrupt(images, masked, noised, batch["noise_seed"])
        features = self.forward_student(corrupted, masked)
        return {"l1": self.l1_loss(self.projector(features), target, patch_valid)}


class CorruptionControl(LossControl):
    """Weight 1 on the L1 term; the corruption ratios as knobs, fixed or rising as the smoothed loss falls."""

    def __init__(self, cfg: RS4DConfig) -> None:
        self.cfg = cfg
        self.updates = 0
        self._ema = 0.0
        self.reference: float | None = None
        self.progress = 0.0
        self._logged = (cfg.noise_ratio, cfg.mask_ratio)

    @property
    def stage(self) -> str:
        return "adaptive" if self.cfg.adaptive else "fixed"

    @property
    def noise_ratio(self) -> float:
        c = self.cfg
        return c.noise_ratio + (c.max_noise_ratio - c.noise_ratio) * self.progress if c.adaptive else c.noise_ratio

    @property
    def mask_ratio(self) -> float:
        c = self.cfg
        return c.mask_ratio + (c.max_mask_ratio - c.mask_ratio) * self.progress if c.adaptive else c.mask_ratio

    @property
    def smoothed(self) -> float:
        """Bias-corrected EMA of the L1 loss; nan before the first update."""
        if self.updates == 0:
            return math.nan
        return self._ema / (1.0 - self.cfg.ema_decay**self.updates)

    def weights(self) -> dict[str, float]:
        return {"l1": 1.0}

    def knobs(self) -> dict[str, float]:
        return {"noise_ratio": self.noise_ratio, "mask_ratio": self.mask_ratio}

    def update(self, losses: Mapping[str, float]) -> Event | None:
        loss = losses["l1"]
        if not math.isfinite(loss):
            return None  # a non-finite step must not steer the ratios
        self.updates += 1
        self._ema = self.cfg.ema_decay * self._ema + (1.0 - self.cfg.ema_decay) * loss
        if not self.cfg.adaptive or self.updates < self.cfg.adapt_warmup:
            return None
        if self.reference is None:
            self.reference = self.smoothed
            return Event(
                f"rs4d: reference loss {self.reference:.4f}; corruption ratios now rise as the loss falls",
                {"event": "reference", "reference_loss": self.reference},
            )
        span = self.reference * (1.0 - self.cfg.adapt_target)
        self.progress = max(self.progress, min(1.0, max(0.0, (self.reference - self.smoothed) / max(span, 1e-12))))
        now = (self.noise_ratio, self.mask_ratio)
        if max(abs(a - b) for a, b in zip(now, self._logged)) < RATIO_EVENT_STEP:
            return None
        self._logged = now
        return Event(
            f"rs4d: noise ratio {now[0]:.3f}, mask ratio {now[1]:.3f} (smoothed loss {self.smoothed:.4f}, "
            f"reference {self.reference:.4f})",
            {"event": "ratios", "noise_ratio": now[0], "mask_ratio": now[1], "progress": self.progress},
        )

    def log_fields(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def summary(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "noise_ratio": self.noise_ratio,
            "mask_ratio": self.mask_ratio,
            "reference_loss": self.reference,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "updates": self.updates,
            "ema": self._ema,
            "reference": self.reference,
            "progress": self.progress,
            "logged": list(self._logged),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates, self._ema = int(state["updates"]), float(state["ema"])
        self.reference = None if state["reference"] is None else float(state["reference"])
        self.progress = float(state["progress"])
        self._logged = tuple(float(v) for v in state["logged"])  # type: ignore[assignment]


class RS4DRecipe(Recipe):
    name = "rs4d"
    section = "rs4d"
    terms = TERMS

    def validate(self) -> None:
        c: RS4DConfig = self.settings  # each setting's own range: config.check_ranges
        if c.noise_ratio + c.mask_ratio > 1.0:
            raise CdkdValueError(
                f"noise ratio {c.noise_ratio} + mask ratio {c.mask_ratio} exceed 1: noised and "
                "masked patches are disjoint"
            )
        if c.adaptive:
            if c.max_noise_ratio < c.noise_ratio or c.max_mask_ratio < c.mask_ratio:
                raise CdkdValueError(
                    "adaptive ratios only rise: max_noise_ratio / max_mask_ratio must be >= the noise / mask ratios"
                )
            if c.max_noise_ratio + c.max_mask_ratio > 1.0:
                raise CdkdValueError(
                    f"max noise ratio {c.max_noise_ratio} + max mask ratio {c.max_mask_ratio} exceed 1"
                )

    def build_teacher(self) -> nn.Module:
        from cdkd.models.teacher import build_frozen_teacher

        return build_frozen_teacher(self.cfg.teacher)

    def build(self, teacher: nn.Module, student: nn.Module) -> nn.Module:
        return RS4D(teacher, student, self.settings)

    def dataset(self, rasters: Sequence[RasterInfo], stats: NormStats) -> Dataset:
        d = self.cfg.data
        return PatchDraws(super().dataset(rasters, stats), d.tile_size, seed=self.cfg.train.seed)

    def control(self) -> LossControl:
        return CorruptionControl(self.settings)
