"""Patch corruption for distillation: which patches of a tile get noise or a mask, and applying it.

Counts are exact and padding is never touched. The random part is drawn per sample in the data pipeline
(``PatchDraws``: a random order of the tile's patches and a noise seed, a pure function of the sample number,
so ``--resume`` and DDP see the same draws), while the ratios are applied on the device at training time
(``select_patches``), so they can change during a run (adaptive ratios) without the data workers knowing.

Selection: the valid patches are ranked by the drawn order; the first ``round(mask_ratio * n_valid)`` are masked,
the next ``round(noise_ratio * n_valid)`` get noise. A patch is valid when at least half its pixels are
(``patch_validity``, the same rule by which the losses exclude padding). A recipe that ranks patches by something
else (a teacher's features, say) passes its own order to ``select_patches``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["PatchDraws", "apply_corruption", "patch_validity", "pixel_mask", "seeded_noise", "select_patches"]


def patch_validity(valid: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, H, W) pixel validity -> (B, N) row-major: a patch counts when at least half its pixels are valid."""
    frac = F.avg_pool2d(valid[:, None].float(), patch_size).flatten(1)
    return frac >= 0.5


class PatchDraws(Dataset):
    """Items of ``tiles`` (an ``UnlabeledTiles``) plus two per-sample draws for corruption at training time:

    - ``patch_order``: int64 (N,), a random permutation of the tile's N patches (row-major): the order in which
      valid patches are picked;
    - ``noise_seed``: int64 scalar, seeds the Gaussian noise of this sample (``seeded_noise``).

    They come from a generator seeded by ``(seed, 2, i)``, a stream of their own, so the tile's pixels are those
    ``tiles[i]`` gives without them.
    """

    def __init__(self, tiles: Dataset, tile_size: int, seed: int, patch_size: int = 16) -> None:
        self.tiles = tiles
        self.seed = int(seed)
        self.num_patches = (tile_size // patch_size) ** 2

    def __len__(self) -> int:
        return len(self.tiles)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.tiles[i]
        rng = np.random.default_rng([self.seed, 2, int(i)])
        item["patch_order"] = torch.from_numpy(rng.permutation(self.num_patches).astype(np.int64))
        item["noise_seed"] = torch.tensor(int(rng.integers(0, 2**62)), dtype=torch.int64)
        return item


def select_patches(
    order: torch.Tensor, patch_valid: torch.Tensor, mask_ratio: float, noise_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-count patch choice per image.

    Args:
        order: (B, N) int, a permutation of 0..N-1 per image (smaller = picked first).
        patch_valid: (B, N) bool; invalid patches are never picked.
        mask_ratio, noise_ratio: fractions of each image's valid patches, summing to at most 1.

    Returns:
        (masked, noised), each (B, N) bool and disjoint: round(mask_ratio * n_valid) masked patches and
        min(round(noise_ratio * n_valid), n_valid - masked) noised ones per image (round half to even).
    """
    n = order.shape[1]
    # Valid patches keep their draw; invalid ones move behind all of them, so ranks 0..n_valid-1 are valid.
    keys = torch.where(patch_valid, order, order + n)
    rank = torch.argsort(torch.argsort(keys, dim=1), dim=1)
    n_valid = patch_valid.sum(dim=1, keepdim=True)
    k_mask = torch.round(n_valid.double() * mask_ratio).long()
    k_noise = torch.minimum(torch.round(n_valid.double() * noise_ratio).long(), n_valid - k_mask)
    masked = rank < k_mask
    noised = (rank >= k_mask) & (rank < k_mask + k_noise)
    return masked, noised


def pixel_mask(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, N) per-patch flags, row-major on ``grid`` (h, w) -> (B, 1, h * p, w * p) per-pixel flags."""
    b = patches.shape[0]
    h, w = grid
    p = patch_size
    return patches.view(b, 1, h, 1, w, 1).expand(b, 1, h, p, w, p).reshape(b, 1, h * p, w * p)


def seeded_noise(seeds: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Standard normal noise (B, *shape) float32, image b drawn from a generator seeded with ``seeds[b]``."""
    out = []
    for seed in seeds.tolist():
        g = torch.Generator(device=device).manual_seed(int(seed))
        out.append(torch.randn(shape, generator=g, device=device))
    return torch.stack(out)


def apply_corruption(
    images: torch.Tensor, masked: torch.Tensor, noised: torch.Tensor, noise: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Images (B, C, H, W), normalised: ``noise`` (B, C, H, W, already scaled) added inside the ``noised``
    patches, the ``masked`` patches set to 0 (the dataset mean); every other pixel unchanged."""
    grid = images.shape[-2] // patch_size, images.shape[-1] // patch_size
    noisy = pixel_mask(noised, grid, patch_size).to(images.dtype)
    out = images + noise.to(images.dtype) * noisy
    return out.masked_fill(pixel_mask(masked, grid, patch_size), 0.0)
