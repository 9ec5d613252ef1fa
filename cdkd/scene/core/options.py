"""How a scene is segmented (``SegmentOptions``) and what follows from the options before any work: the tiling a
model takes, the GDAL cache a scene needs, and whether the buffers fit in memory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdkd.artifacts import InferenceMeta
from cdkd.config import PATCH_SIZE, bounded, check_ranges
from cdkd.errors import CdkdValueError
from cdkd.inference.rowblend import check_backend
from cdkd.inference.tiler import PAD_MODES, edge_margin
from cdkd.scene.core.source import SceneInfo
from cdkd.utils.memory import check_fits

__all__ = ["SegmentOptions", "cache_budget", "check_buffers", "resolve_margin", "resolve_tiling"]


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment a scene; ``None`` sizes mean the model's own."""

    tile_size: int | None = bounded(None, ge=PATCH_SIZE, le=16384, flag="--tile-size")
    overlap: int | None = bounded(None, ge=0, flag="--overlap")
    batch_size: int = bounded(4, ge=1, le=4096, flag="--batch-size")
    bands: tuple[int, ...] | None = bounded(None, ge=1, flag="--bands")
    stats: str = "model"  # "model": the statistics stored with the model; "scene": computed from this scene
    probs: bool = False  # also write a uint8 confidence raster (max softmax x 255)
    pad_mode: str = "reflect"  # padding of scenes smaller than one tile
    # px of reflected context past the scene's edge (tiler.edge_margin); None: 64, at most (tile - 1) // 2
    edge_context: int | None = bounded(None, ge=0, flag="--edge-context")
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    checkpoint_seconds: float = bounded(30.0, ge=0)  # least time between checkpoints (--resume restarts there)
    read_threads: int | None = bounded(None, ge=0, le=256, flag="--read-threads")  # None: pipeline.reader_threads
    min_score: float | None = bounded(None, ge=0, le=1, flag="--min-score")  # instances: weaker ones dropped (0.5)
    assets: tuple[str, ...] | None = None  # STAC items: asset keys stacked as the bands (None: by the model's bands)
    # how the device blends (rowblend.blend_backend): numpy on the CPU, Triton kernels on CUDA; class ids are the
    # same bits with any of them
    blend_backend: str = "auto"


def resolve_tiling(
    meta: InferenceMeta, options: SegmentOptions, fixed_tile: bool = False, runtime: str = "torch"
) -> tuple[int, int]:
    """(tile, overlap) for ``options`` with a model described by ``meta``; ``fixed_tile``: the model (an ONNX or
    TensorRT export) takes its own tile size only."""
    check_ranges(options)
    tile = meta.tile_size if options.tile_size is None else int(options.tile_size)
    overlap = meta.overlap if options.overlap is None else int(options.overlap)
    if tile <= 0 or tile % PATCH_SIZE:
        raise CdkdValueError(f"tile size {tile} is not a positive multiple of the patch size {PATCH_SIZE}")
    if tile != meta.tile_size and fixed_tile:
        raise CdkdValueError(
            f"the {runtime} model was built for {meta.tile_size} px tiles and cannot take "
            f"--tile-size {tile}; export it again at that size or use the segmenter.pt"
        )
    if not 0 <= overlap < tile:
        raise CdkdValueError(f"overlap {overlap} must be >= 0 and smaller than the tile size {tile}")
    if options.batch_size < 1:
        raise CdkdValueError(f"batch size must be at least 1, got {options.batch_size}")
    if options.pad_mode not in PAD_MODES:
        raise CdkdValueError(f"unknown pad mode {options.pad_mode!r}; choose one of {', '.join(PAD_MODES)}")
    check_backend(options.blend_backend)
    if options.read_threads is not None and options.read_threads < 0:
        raise CdkdValueError(f"read threads must be >= 0, got {options.read_threads}")
    return tile, overlap


def resolve_margin(options: SegmentOptions, tile: int) -> int:
    """The edge margin of the plan (``tiler.edge_margin``): ``options.edge_context`` or the default for ``tile``."""
    return edge_margin(tile, options.edge_context)


def cache_budget(info: SceneInfo, tile: int) -> int:
    """GDAL block cache in bytes: two bands of input blocks across the scene, at least 64 MB.

    GDAL's default (5% of RAM) would keep every decoded block of a large scene, so memory would creep up with
    the scene's height; the windows of one row of tiles and the next need no more than this.
    """
    need = 2 * (tile + 512) * info.width * info.count * np.dtype(info.dtype).itemsize
    return max(64 * 2**20, need)


def check_buffers(info: SceneInfo, meta: InferenceMeta, tile: int, batch_size: int) -> None:
    """Refuse a tile size or batch whose buffers cannot fit before any work: one row of windows' blended logits
    (K x tile x width), a batch of tiles and of their logits, all float32 (the model's activations come on top)."""
    k = meta.num_classes
    need = 4 * (k * tile * info.width + batch_size * (meta.in_chans + k) * tile * tile)
    check_fits(
        need, f"{info.path}: tiles of {tile} px in batches of {batch_size}", "use a smaller --tile-size or --batch-size"
    )
