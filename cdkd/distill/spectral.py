"""Spectral-aware reconstruction (HyperKD): a per-pixel spectral term beside the pixel loss.

The pixel MSE scores every band value on its own; it does not care whether a pixel's reconstructed spectrum has
the right *shape* (the ratios between bands that tell vegetation, water and soil apart). The spectral angle
(Kruse et al. 1993's Spectral Angle Mapper) does: the angle between the predicted and the true spectrum of a
pixel, zero when they differ only by brightness (illumination, topography) and growing as the shape departs.

Angles are measured on spectra in the data's physical units (reflectance, DN): a brightness change is a scaling
there, while after per-band normalisation ``(x - mean) / std`` it is not. ``to_physical`` undoes the
normalisations the reconstruction target went through (MAE's per-patch one, then the dataset's per-band one).
"""

from __future__ import annotations

import torch

__all__ = ["patch_spectra", "spectral_angle", "spectral_angle_loss", "to_physical"]

ANGLE_EPS = 1e-7  # cos clamped to [-1 + eps, 1 - eps]: acos has an infinite slope at +-1


def spectral_angle(pred: torch.Tensor, target: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """Angle in radians between spectra along ``dim`` (the band axis); the other axes are kept.

    0 for spectra that are positive multiples of each other, pi/2 for orthogonal ones. A zero spectrum has no
    direction; it scores pi/2 against anything (cos 0), never NaN.
    """
    p, t = pred.float(), target.float()
    cos = (p * t).sum(dim) / (p.norm(dim=dim) * t.norm(dim=dim)).clamp_min(eps)
    return torch.acos(cos.clamp(-1.0 + ANGLE_EPS, 1.0 - ANGLE_EPS))


def patch_spectra(patches: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, N, p*p*C) patches in ``cdkd.models.mae.patchify`` order (pixels (p, p, C)) -> (B, N, p*p, C) spectra."""
    b, n, d = patches.shape
    return patches.reshape(b, n, d // channels, channels)


def to_physical(
    spectra: torch.Tensor,
    band_mean: torch.Tensor,
    band_std: torch.Tensor,
    patch_mean: torch.Tensor | None = None,
    patch_std: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N, P, C) spectra in normalised units -> physical units.

    ``patch_mean``/``patch_std`` (B, N, 1, 1): MAE's per-patch normalisation to undo first (norm_pix targets),
    then ``band_mean``/``band_std`` (C,): the dataset's per-band statistics (``NormStats``).
    """
    x = spectra.float()
    if patch_mean is not None and patch_std is not None:
        x = x * patch_std + patch_mean
    return x * band_std.float() + band_mean.float()


def spectral_angle_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean spectral angle (radians) over the pixels with ``weight`` > 0. pred/target (B, N, P, C) physical
    spectra, weight (B, N, P) (e.g. masked-and-valid patch x valid pixel)."""
    angle = spectral_angle(pred, target, dim=-1)
    w = weight.to(angle.dtype)
    return (angle * w).sum() / w.sum().clamp_min(1.0)
