"""Unlabeled image data: file discovery, windowed reads, normalisation statistics, training tiles, sampling.

The torch-based parts (``UnlabeledTiles``, ``StepSampler``, ``check_tile_size``) load on first use, so that
raster-only work (the scene engine's reads, ``cdkd vectorize``) does not pay for importing torch.
"""

from importlib import import_module
from typing import Any

from cdkd.data.files import (
    IMAGE_SUFFIXES,
    RasterInfo,
    find_rasters,
    read_window,
    require_one_dtype,
)
from cdkd.data.stats import NormStats, compute_stats

_LAZY = {
    "StepSampler": "cdkd.data.sampler",
    "UnlabeledTiles": "cdkd.data.unlabeled",
    "check_tile_size": "cdkd.data.unlabeled",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cdkd.data' has no attribute {name!r}")


__all__ = [
    "IMAGE_SUFFIXES",
    "NormStats",
    "RasterInfo",
    "StepSampler",
    "UnlabeledTiles",
    "check_tile_size",
    "compute_stats",
    "find_rasters",
    "read_window",
    "require_one_dtype",
]
