"""Unlabeled image data: file discovery, windowed reads, normalisation statistics, training tiles, sampling."""

from cdkd.data.files import IMAGE_SUFFIXES, RasterInfo, find_rasters, read_window, require_one_dtype
from cdkd.data.sampler import StepSampler
from cdkd.data.stats import NormStats, compute_stats
from cdkd.data.unlabeled import UnlabeledTiles, check_tile_size

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
