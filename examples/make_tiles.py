"""Write a small folder of synthetic georeferenced tiles, for a first ``cdkd distill`` run without real data.

    python examples/make_tiles.py demo_tiles --count 24 --size 128

The tiles are smooth fields with blobs and edges in three uint8 bands (GeoTIFF, EPSG:32633, 1 m pixels): enough
for the pipeline to run end to end and the losses to fall. Real use needs real imagery and a SAM checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin


def synthetic_tile(size: int, rng: np.random.Generator) -> np.ndarray:
    """(3, size, size) uint8: a few 'parcels' (half-planes and discs) of distinct colours over a gradient."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.3 + 0.2 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) for _ in range(3)])
    for _ in range(int(rng.integers(3, 7))):
        colour = rng.uniform(0.1, 0.9, size=(3, 1, 1))
        if rng.random() < 0.5:
            a, b, c = rng.uniform(-1, 1, 3)
            region = a * (xx - 0.5) + b * (yy - 0.5) > c * 0.3
        else:
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
            region = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = np.where(region[None], colour, img)
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for i in range(args.count):
        tile = synthetic_tile(args.size, rng)
        profile = dict(driver="GTiff", width=args.size, height=args.size, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000 + 1000 * i, 5000000, 1.0, 1.0))
        with rasterio.open(args.out / f"tile_{i:03d}.tif", "w", **profile) as dst:
            dst.write(tile)
    print(f"wrote {args.count} tiles of {args.size} px to {args.out}")


if __name__ == "__main__":
    main()
