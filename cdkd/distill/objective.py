"""The Mask-CDKD objective (recipe ``mask-cdkd``): feature alignment (KD) and masked reconstruction for teacher
and student.

``MaskCDKD.forward`` reads as its stages (MAE's ``models_mae.py`` layout):

    teacher_out = forward_teacher(images, mask)           # SAM + MMoA on the masked view, full grid
    student_out = forward_student(images, mask)           # ViT-S on the same masked view
    kd          = kd_loss(teacher taps, student taps)     # MSE on shared visible tokens
    t_mae/s_mae = reconstruction of the masked patches by each MAE head

It returns the three unweighted losses; the loss weights come from :mod:`cdkd.distill.schedule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cdkd.config import ObjectiveConfig
from cdkd.distill.corruption import patch_validity
from cdkd.errors import CdkdValueError
from cdkd.models.mae import MAEDecoder, reconstruction_loss
from cdkd.models.teacher import MMoATeacher, default_teacher_taps


@dataclass
class Losses:
    kd: torch.Tensor
    t_mae: torch.Tensor
    s_mae: torch.Tensor

    def weighted(self, weights: Sequence[float]) -> torch.Tensor:
        w_kd, w_t, w_s = weights
        return w_kd * self.kd + w_t * self.t_mae + w_s * self.s_mae

    def detached(self) -> torch.Tensor:
        return torch.stack([self.kd.detach(), self.t_mae.detach(), self.s_mae.detach()]).float()


def teacher_input(images: torch.Tensor) -> torch.Tensor:
    """The three channels SAM sees: the first three selected bands; a single band is repeated.

    Order bands with ``--bands`` (e.g. 3,2,1 for R,G,B of a B,G,R,NIR product) so the first three are RGB.
    """
    c = images.shape[1]
    if c >= 3:
        return images[:, :3]
    return images.repeat(1, 3 // c + 1, 1, 1)[:, :3]


class MaskCDKD(nn.Module):
    """Teacher (frozen SAM + trainable MMoA), student, two MAE heads and the KD projectors, as one module.

    Everything that trains in one stage lives here, so one optimiser and one DDP wrapper cover it.
    """

    def __init__(self, teacher: MMoATeacher, student: nn.Module, cfg: ObjectiveConfig, in_chans: int = 3) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.cfg = cfg
        self.patch_size = 16
        t_taps = cfg.teacher_taps or default_teacher_taps(teacher.variant)
        if len(t_taps) != len(cfg.student_taps):
            raise CdkdValueError(f"teacher taps {t_taps} and student taps {cfg.student_taps} must pair up")
        self._check_taps(t_taps, teacher.depth, "teacher")
        self._check_taps(cfg.student_taps, student.depth, "student")
        if cfg.direction not in ("bi", "uni"):
            raise CdkdValueError(f"direction must be 'bi' or 'uni', got {cfg.direction!r}")
        self.teacher_taps = tuple(t - 1 for t in t_taps)
        self.student_taps = tuple(s - 1 for s in cfg.student_taps)
        self.projectors = nn.ModuleList(nn.Linear(student.embed_dim, teacher.embed_dim) for _ in t_taps)
        dec = dict(dim=cfg.decoder_dim, depth=cfg.decoder_depth, num_heads=cfg.decoder_heads, patch_size=16)
        self.teacher_decoder = MAEDecoder(teacher.embed_dim, out_chans=3, fills_masked=False, **dec)
        self.student_decoder = MAEDecoder(
            student.embed_dim, out_chans=in_chans, fills_masked=student.encodes_visible_only, **dec
        )

    @staticmethod
    def _check_taps(taps: Sequence[int], depth: int, who: str) -> None:
        if any(not 1 <= t <= depth for t in taps):
            raise CdkdValueError(f"{who} taps {tuple(taps)} outside blocks 1..{depth}")

    # ---------------------------------------------------------------------------------------------------- stages
    def forward_teacher(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.teacher.forward_masked(teacher_input(images), mask, self.teacher_taps)

    def forward_student(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.student.forward_masked(images, mask, self.student_taps)

    def kd_loss(
        self, t_feats: Sequence[torch.Tensor], s_feats: Sequence[torch.Tensor], keep: torch.Tensor
    ) -> torch.Tensor:
        """MSE between projected student and teacher features on ``keep`` tokens (visible and valid), per pair.

        Teacher features are layer-normalised (no affine) first: SAM's raw activations have block-dependent
        scales in the tens, which would swamp the unit-scale MAE terms; normalised targets keep KD and MAE
        comparable (as MaskDistill and MILAN do). With direction "uni" the targets are detached so KD trains the
        student only; with "bi" its gradient also calibrates the teacher adapters.
        """
        weight = keep.to(torch.float32)
        denom = weight.sum().clamp_min(1.0)
        total = torch.zeros((), device=keep.device)
        for proj, t, s in zip(self.projectors, t_feats, s_feats):
            target = F.layer_norm(t.float(), t.shape[-1:])
            if self.cfg.direction == "uni":
                target = target.detach()
            per_token = ((proj(s).float() - target) ** 2).mean(-1)
            total = total + (per_token * weight).sum() / denom
        return total / len(self.projectors)

    def forward(self, images: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None = None) -> Losses:
        """images (B, C, H, W) normalised; mask (B, N) bool, True = masked; valid (B, H, W) bool or None."""
        grid = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        patch_valid = None if valid is None else patch_validity(valid, self.patch_size)
        t_feats, t_last = self.forward_teacher(images, mask)
        s_feats, s_last = self.forward_student(images, mask)
        keep = ~mask if patch_valid is None else ~mask & patch_valid
        kd = self.kd_loss(t_feats, s_feats, keep)
        t_pred = self.teacher_decoder(t_last, grid)
        s_fill = mask if self.student.encodes_visible_only else None
        s_pred = self.student_decoder(s_last, grid, fill=s_fill)
        rec: dict[str, Any] = dict(patch_size=self.patch_size, norm_pix=self.cfg.norm_pix_loss, valid=patch_valid)
        t_mae = reconstruction_loss(t_pred, teacher_input(images), mask, **rec)
        s_mae = reconstruction_loss(s_pred, images, mask, **rec)
        return Losses(kd=kd, t_mae=t_mae, s_mae=s_mae)
