"""Synthetic land cover for the demo: a class map of smooth regions and an RGB image whose colours and textures
follow it, so a model can learn the mapping in a few CPU minutes. Not a substitute for real imagery.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cdkd.data.classes import ClassSchema, LandCoverClass

# (name, legend colour, mean RGB of the "surface", texture strength)
SURFACES = (
    ("water", "#2B6CB0", (40, 70, 110), 4.0),
    ("vegetation", "#2F855A", (60, 120, 50), 14.0),
    ("built-up", "#C53030", (150, 140, 140), 30.0),
    ("bare soil", "#D69E2E", (190, 160, 110), 10.0),
)


def demo_schema() -> ClassSchema:
    """The demo's four classes (ids 0..3, 255 = ignore)."""
    # LandCoverClass parses the "#RRGGBB" colours into RGB tuples
    return ClassSchema(
        tuple(LandCoverClass(i, name, color) for i, (name, color, _, _) in enumerate(SURFACES))  # type: ignore[arg-type]
    )


def _smooth_noise(rng: np.random.Generator, n: int, height: int, width: int, scale: int) -> np.ndarray:
    """(n, H, W) float32 smooth random fields: a coarse Gaussian grid upsampled bicubically (~``scale`` px blobs)."""
    coarse = rng.standard_normal((1, n, height // scale + 3, width // scale + 3)).astype(np.float32)
    fine = F.interpolate(torch.from_numpy(coarse), scale_factor=scale, mode="bicubic", align_corners=False)
    return fine[0, :, :height, :width].numpy()


def make_landscape(height: int, width: int, seed: int = 0, scale: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(image (3, H, W) uint8, classes (H, W) uint8): regions of ~``scale`` px, each class its own colour/texture."""
    rng = np.random.default_rng(seed)
    k = len(SURFACES)
    fields = _smooth_noise(rng, k, height, width, scale)
    fields[0] -= 0.4  # water rarer than the rest, as on most land scenes
    classes = fields.argmax(axis=0).astype(np.uint8)
    texture = _smooth_noise(rng, 3, height, width, 3) + 0.5 * rng.standard_normal((3, height, width))
    shade = 12.0 * _smooth_noise(rng, 1, height, width, 4 * scale)[0]  # illumination drifts across the scene
    image = np.empty((3, height, width), dtype=np.float32)
    for c, (_, _, rgb, strength) in enumerate(SURFACES):
        where = classes == c
        for b in range(3):
            image[b][where] = rgb[b] + strength * texture[b][where] + shade[where]
    return np.clip(np.rint(image), 1, 255).astype(np.uint8), classes
