"""Training tiles for instance segmentation: a random window of an image with the objects it shows.

``InstanceTiles`` follows ``LabeledTiles``: ``len(ds)`` is the number of images (one epoch), ``ds[i]`` takes any
global sample number and is a pure function of ``(seed, i)`` (image order permuted per epoch, window and
augmentation from a generator seeded by ``(seed, 1, i)``), so a resumed run sees exactly the tiles it would have.

Objects are small and sparse in remote-sensing images, so a uniformly random window is often empty: with
probability ``object_bias`` the window is placed around a randomly chosen object (anywhere that still contains
its centre), else uniformly. Objects cut by the window keep their visible part if it has at least ``min_pixels``
pixels; boxes are the tight boxes of the visible masks, after flips and rotations. Crowd annotations are left out
(torchvision's Mask R-CNN has no notion of them).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cdkd.data.coco import InstanceData, InstanceImage, mask_bbox, object_mask
from cdkd.data.files import read_window
from cdkd.data.stats import NormStats
from cdkd.data.unlabeled import check_index, check_tile_size, flip_rotate
from cdkd.errors import DataError


class InstanceTiles(Dataset):
    """Items: ``image`` (C, T, T) float32 normalised (0 on padding and invalid pixels), ``boxes`` (N, 4) float32
    x0, y0, x1, y1 px, ``labels`` (N,) int64 class ids **1..K** (torchvision's convention: 0 is background),
    ``masks`` (N, T, T) uint8. Images smaller than the tile are placed top-left and padded."""

    def __init__(
        self,
        data: InstanceData,
        stats: NormStats,
        tile_size: int,
        augment: bool = True,
        seed: int = 0,
        object_bias: float = 0.75,
        min_pixels: int = 8,
    ) -> None:
        self.tile_size = check_tile_size(tile_size)
        if not data.images:
            raise DataError(f"{data.source}: no image to draw training tiles from")
        self.data, self.stats = data, stats
        self.augment, self.seed = bool(augment), int(seed)
        self.object_bias, self.min_pixels = float(object_bias), int(min_pixels)

    def __len__(self) -> int:
        return len(self.data.images)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def image_index(self, i: int) -> int:
        epoch, k = divmod(i, len(self.data.images))
        return int(np.random.default_rng([self.seed, epoch]).permutation(len(self.data.images))[k])

    def _window(self, im: InstanceImage, rng: np.random.Generator) -> tuple[int, int, int, int]:
        t = self.tile_size
        h, w = min(t, im.height), min(t, im.width)
        objects = [o for o in im.objects if not o.iscrowd]
        if objects and rng.random() < self.object_bias:
            x, y, bw, bh = objects[int(rng.integers(len(objects)))].bbox
            cy, cx = int(y + bh / 2), int(x + bw / 2)
            row = int(np.clip(cy - rng.integers(0, h), 0, im.height - h))
            col = int(np.clip(cx - rng.integers(0, w), 0, im.width - w))
        else:
            row = int(rng.integers(0, im.height - h + 1))
            col = int(rng.integers(0, im.width - w + 1))
        return row, col, h, w

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = check_index(i)
        im = self.data.images[self.image_index(i)]
        rng = np.random.default_rng([self.seed, 1, i])
        t = self.tile_size
        row, col, h, w = self._window(im, rng)
        pixels, ok = read_window(im.path, self.stats.bands, row, col, h, w)
        image = np.zeros((len(self.stats.bands), t, t), dtype=np.float32)
        image[:, :h, :w] = self.stats.normalize(pixels, ok)
        valid = np.zeros((t, t), dtype=bool)
        valid[:h, :w] = ok
        masks, labels = [], []
        for obj in im.objects:
            x, y, bw, bh = obj.bbox
            if obj.iscrowd or x >= col + w or y >= row + h or x + bw <= col or y + bh <= row:
                continue
            m = np.zeros((t, t), dtype=bool)
            m[:h, :w] = object_mask(obj, im.height, im.width, (row, col, h, w)) & ok
            if m.sum() >= self.min_pixels:
                masks.append(m)
                labels.append(obj.class_id + 1)
        stack = np.stack(masks).astype(np.float32) if masks else np.zeros((0, t, t), np.float32)
        if self.augment:
            twin = copy.deepcopy(rng)  # the masks get the image's flips and rotation
            image, valid = flip_rotate(image, valid, rng)
            if len(stack):
                stack, _ = flip_rotate(stack, np.zeros((t, t), bool), twin)
        boxes = [mask_bbox(m > 0.5) for m in stack]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.ascontiguousarray(stack > 0.5).astype(np.uint8)),
        }


def collate_instances(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """A batch: ``image`` (B, C, T, T) and ``targets``, a list of B dicts (boxes, labels, masks) for Mask R-CNN."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "targets": [{k: it[k] for k in ("boxes", "labels", "masks")} for it in items],
    }


__all__ = ["InstanceTiles", "collate_instances"]
