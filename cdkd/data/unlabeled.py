"""Random training tiles from unlabeled image files.

An item is a pure function of ``(seed, i)`` where ``i`` is a global sample number (see ``StepSampler``): no
state is carried between calls, so resuming at sample ``i`` or splitting samples over worker processes and
ranks reproduces exactly the stream that one uninterrupted process would have seen.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cdkd.config import PATCH_SIZE
from cdkd.data.files import RasterInfo, read_window
from cdkd.data.stats import NormStats
from cdkd.errors import CdkdValueError, DataError


def check_tile_size(tile_size: int) -> int:
    """Return ``tile_size`` if it is a positive multiple of the ViT patch size, else raise CdkdValueError."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)):
        raise CdkdValueError(f"tile size {tile_size!r} is not an integer")
    if tile_size < PATCH_SIZE or tile_size % PATCH_SIZE:
        raise CdkdValueError(f"tile size {tile_size} is not a multiple of the patch size {PATCH_SIZE}")
    return int(tile_size)


class UnlabeledTiles(Dataset):
    """Training tiles of ``tile_size`` x ``tile_size`` pixels, one random window per sample.

    ``len(ds)`` is the number of files (one epoch); ``ds[i]`` accepts any global sample number ``i >= 0``:
    epoch ``i // len(ds)`` visits the files in a permutation seeded by ``(seed, epoch)``, and every other random
    choice (window position, flips, rotation, the mask) comes from a generator seeded by ``(seed, 1, i)``.

    Each item is a dict:

    - ``image``: float32 (C, T, T), normalised with ``stats`` (C = len(stats.bands)).
    - ``valid``: bool (T, T), False on padding and on pixels the file marks invalid (nodata/alpha/mask).
    - ``mask``: bool tensor from ``mask_fn(rng)``, only when ``mask_fn`` is given; drawn after the window and
      augmentation so that the image is the same with or without it.

    Images smaller than the tile in a dimension are read whole in that dimension, placed at the top-left and
    padded with 0 in normalised space (the dataset mean), with ``valid`` False on the padding. Zero-mean
    padding is neutral for the network, and the losses exclude it through ``valid``. Reflect padding is not
    used: it cannot extend an image by more than its own size (a 400 px image in a 1024 px tile) and it would
    fabricate texture that the models would then be trained to reproduce. Invalid pixels are set to 0 too.

    Large images are never read whole: only the T x T window is read (``read_window``).
    """

    def __init__(
        self,
        rasters: Sequence[RasterInfo],
        stats: NormStats,
        tile_size: int,
        augment: bool = True,
        seed: int = 0,
        mask_fn: Callable[[np.random.Generator], np.ndarray] | None = None,
    ) -> None:
        self.tile_size = check_tile_size(tile_size)
        if not rasters:
            raise DataError("no image file to draw training tiles from")
        needed = max(stats.bands)
        short = [r for r in rasters if r.count < needed]
        if short:
            raise DataError(
                f"{short[0].path}: has {short[0].count} bands but the statistics use bands {list(stats.bands)} "
                f"({len(short)} such file(s))"
            )
        self.rasters = list(rasters)
        self.stats = stats
        self.augment = bool(augment)
        self.seed = int(seed)
        self.mask_fn = mask_fn

    def __len__(self) -> int:
        return len(self.rasters)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # without this, Python's legacy __getitem__ iteration would never stop: every i >= 0 is a valid sample
        return (self[i] for i in range(len(self)))

    def raster_for(self, i: int) -> RasterInfo:
        """The file that global sample ``i`` is drawn from."""
        epoch, k = divmod(i, len(self.rasters))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rasters))
        return self.rasters[int(order[k])]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = check_index(i)
        info = self.raster_for(i)
        rng = np.random.default_rng([self.seed, 1, i])
        image, valid = self._read_tile(info, rng)
        if self.augment:
            image, valid = flip_rotate(image, valid, rng)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "valid": torch.from_numpy(np.ascontiguousarray(valid)),
        }
        if self.mask_fn is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(self.mask_fn(rng), dtype=bool))
        return item

    def _read_tile(self, info: RasterInfo, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (C, T, T) float32 tile and (T, T) validity, zero-padded at the bottom/right if needed."""
        t = self.tile_size
        h, w = min(t, info.height), min(t, info.width)
        row = int(rng.integers(0, info.height - h + 1))
        col = int(rng.integers(0, info.width - w + 1))
        pixels, valid = read_window(info.path, self.stats.bands, row, col, h, w)
        norm = self.stats.normalize(pixels, valid)
        image = np.zeros((len(self.stats.bands), t, t), dtype=np.float32)
        mask = np.zeros((t, t), dtype=bool)
        image[:, :h, :w] = norm
        mask[:h, :w] = valid
        return image, mask


def check_index(i: int) -> int:
    """A global sample number (``StepSampler``'s): a non-negative integer, else CdkdValueError."""
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
        raise CdkdValueError(f"sample number must be a non-negative integer, got {i!r}")
    return int(i)


def flip_rotate(image: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal flip, vertical flip and 90-degree rotation, the same for (C, T, T) image and (T, T) mask."""
    hflip = bool(rng.random() < 0.5)
    vflip = bool(rng.random() < 0.5)
    k = int(rng.integers(0, 4))
    if hflip:
        image, valid = image[:, :, ::-1], valid[:, ::-1]
    if vflip:
        image, valid = image[:, ::-1, :], valid[::-1, :]
    image, valid = np.rot90(image, k, axes=(1, 2)), np.rot90(valid, k, axes=(0, 1))
    return np.ascontiguousarray(image), np.ascontiguousarray(valid)
