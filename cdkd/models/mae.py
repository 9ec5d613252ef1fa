"""Masked image modelling: random patch masks, pixel targets and the light reconstruction decoder.

Follows MAE's ``models_mae.py`` (He et al. 2022): per-patch normalised pixel targets and a loss on masked
patches only. The decoder takes a full token grid, so it serves both a teacher that keeps its grid (mask tokens
already inside) and a student that encoded visible tokens only (its masked positions are filled here).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block


def random_patch_mask(num_patches: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """A fresh random mask over ``num_patches`` (True = masked), exactly ``round(ratio * N)`` patches masked.

    Unlike a fixed stride-2 grid (4 possible masks per image), every call draws a new subset. The count is
    fixed so that every image in a batch keeps the same number of visible tokens (dense batching).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    n_mask = int(round(ratio * num_patches))
    mask = np.zeros(num_patches, dtype=bool)
    mask[rng.permutation(num_patches)[:n_mask]] = True
    return mask


class PatchMasker:
    """``mask_fn`` for the data pipeline: draws a mask for a ``tile_size`` tile from the item's own generator."""

    def __init__(self, tile_size: int, ratio: float, patch_size: int = 16) -> None:
        self.num_patches = (tile_size // patch_size) ** 2
        self.ratio = ratio

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return random_patch_mask(self.num_patches, self.ratio, rng)


def patchify(images: torch.Tensor, patch_size: int = 16) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels (p, p, C) inside each patch."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def reconstruction_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    *,
    patch_size: int = 16,
    norm_pix: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE on masked patches. pred (B, N, p*p*C), images (B, C, H, W), mask/valid (B, N) bool.

    ``norm_pix``: targets normalised per patch (mean 0, var 1), MAE's choice, which gives the loss unit scale.
    ``valid``: patches to count (False for padding); the loss averages over masked and valid patches.
    """
    target = patchify(images, patch_size).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    weight = mask if valid is None else mask & valid
    weight = weight.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


class MAEDecoder(nn.Module):
    """Light transformer decoder: tokens (B, N, in_dim) on an (h, w) grid -> pixels (B, N, p*p*out_chans).

    ``fill``: (B, N) bool; where True the token is replaced by the learned mask token (for an encoder that saw
    visible tokens only; build with ``fills_masked=True``). Position embeddings are fixed 2-D sin-cos computed
    for the grid, so any tile size works.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int = 256,
        depth: int = 4,
        num_heads: int = 8,
        patch_size: int = 16,
        out_chans: int = 3,
        fills_masked: bool = True,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        # Only a decoder behind a visible-only encoder owns a mask token: an unused parameter would stall DDP.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if fills_masked else None
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * out_chans)
        self.dim = dim
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], fill: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens)
        if fill is not None:
            if self.mask_token is None:
                raise ValueError("this decoder was built with fills_masked=False")
            x = torch.where(fill.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        pos = build_sincos2d_pos_embed(list(grid), dim=self.dim, device=x.device, dtype=x.dtype)
        x = x + pos.reshape(1, grid[0] * grid[1], self.dim)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
