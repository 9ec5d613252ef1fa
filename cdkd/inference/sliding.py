"""Sliding-window inference over a whole image held in memory.

Used by evaluation: plan the windows (``tiler.plan_rows``), cut each tile out of the image (padding tiles of
images smaller than the tile), run the model on batches of tiles, crop the padding off its logits and blend
overlapping tiles with the scene engine's weights and order (``blend.window_weights``, ``rowblend``), so an
image evaluated here and the same image segmented as a scene get the same classes.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cdkd.errors import CdkdValueError
from cdkd.inference.blend import window_weights
from cdkd.inference.rowblend import PlanBlender, to_numpy
from cdkd.inference.tiler import (
    PAD_MODES,
    TileWindow,
    as_int,
    edge_margin,
    inside,
    pad_to_tile,
    plan_rows,
    reflect_outside,
)

Predict = Callable[[torch.Tensor], torch.Tensor]


def runtime_predict(runtime: Callable[[np.ndarray], np.ndarray]) -> Predict:
    """A runtime of ``cdkd.inference.runtimes`` (numpy (B, C, T, T) float32 -> numpy (B, K, T, T) logits: PyTorch,
    ONNX Runtime or TensorRT) as the ``predict`` of ``sliding_window_logits``, so any runtime plugs into the
    same windows and blending."""
    return lambda batch: torch.from_numpy(runtime(batch.cpu().numpy()))


def _batches(windows: Sequence[TileWindow], batch_size: int) -> Iterator[Sequence[TileWindow]]:
    """Consecutive chunks of at most ``batch_size`` windows (the last may be shorter)."""
    for start in range(0, len(windows), batch_size):
        yield windows[start : start + batch_size]


def _extract_tile(image: torch.Tensor, window: TileWindow, tile: int, pad_mode: str) -> torch.Tensor:
    """(C, tile, tile) tile of the (C, H, W) ``image`` at ``window``, on the image's device.

    A window is smaller than the tile only when the image is, and reaches past the image only in a plan with an
    edge margin (reflected about the edge: ``tiler.reflect_outside``, as the scene engine's reads), which makes
    the padding paths rare and small; they go through numpy because torch's reflect padding cannot extend an
    axis by more than its own length.
    """
    part, pads = inside(window, image.shape[1], image.shape[2])
    rows, cols = part.slices
    crop = image[:, rows, cols]
    if window.shape == (tile, tile) and part == window:
        return crop
    padded = reflect_outside(crop.cpu().numpy(), pads)
    padded, _ = pad_to_tile(padded, tile, mode=pad_mode)
    return torch.from_numpy(padded).to(image.device)


def _as_image(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The (C, H, W) image as a float32 tensor (numpy arrays are wrapped, not copied, when already float32)."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise CdkdValueError(f"image must be a torch tensor or numpy array, got {type(image).__name__}")
    if image.ndim != 3 or 0 in image.shape:
        raise CdkdValueError(f"image must have shape (C, H, W) with no empty dimension, got {tuple(image.shape)}")
    return image.float()


def sliding_window_logits(
    predict: Predict,
    image: torch.Tensor | np.ndarray,
    tile: int,
    overlap: int,
    num_classes: int,
    batch_size: int = 4,
    pad_mode: str = "reflect",
    edge_context: int | None = None,
) -> torch.Tensor:
    """Blended (K, H, W) float32 CPU logits of ``predict`` over the whole (C, H, W) ``image``.

    ``predict`` maps a (B, C, tile, tile) float32 batch (on the image's device: move the image to the GPU
    first, or let ``predict`` move the batch) to (B, K, tile, tile) logits, K = ``num_classes``. It is called
    under ``torch.inference_mode``. Windows overlap by ``overlap`` pixels and are blended with cosine weights
    (``window_weights``) in the canonical order of ``rowblend``; the output does not depend on ``batch_size``.
    Tiles of images smaller than the tile are padded at the bottom/right with ``pad_mode`` (see ``pad_to_tile``)
    and the padding is cropped from the logits, so it only influences the prediction through the model's context.
    ``edge_context``: the plan's edge margin in px (``tiler.edge_margin``: default 64, at most half a tile; as
    ``SegmentOptions.edge_context``): windows reach that far past the image, filled by reflection, so the pixels
    at its edge are predicted with context beyond them, as in the scene engine.
    """
    image = _as_image(image)
    tile = as_int("tile", tile)
    batch_size = as_int("batch_size", batch_size)
    num_classes = as_int("num_classes", num_classes)
    if batch_size <= 0:
        raise CdkdValueError(f"batch_size must be > 0, got batch_size={batch_size}")
    if num_classes <= 0:
        raise CdkdValueError(f"num_classes must be > 0, got num_classes={num_classes}")
    if pad_mode not in PAD_MODES:  # checked up front: padding is only reached for images smaller than the tile
        raise CdkdValueError(f"unknown pad mode {pad_mode!r}; choose one of {', '.join(PAD_MODES)}")
    _, height, width = image.shape
    margin = edge_margin(tile, edge_context)
    rows = plan_rows(height, width, tile, overlap, margin)  # validates tile and overlap
    windows = [w for row in rows for w in row]
    last_of_row = {id(row[-1]) for row in rows}
    blender = PlanBlender(
        num_classes,
        [row[0].row for row in rows],
        [w.col for w in rows[0]],
        rows[0][0].shape,
        (height, width),
        image.device,
        output="logits",
    )
    out = torch.zeros((num_classes, height, width), dtype=torch.float32)
    index = 0
    with torch.inference_mode():
        for chunk in _batches(windows, batch_size):
            batch = torch.stack([_extract_tile(image, w, tile, pad_mode) for w in chunk])
            logits = predict(batch)
            expected = (len(chunk), num_classes, tile, tile)
            if tuple(logits.shape) != expected:
                raise CdkdValueError(f"predict returned logits of shape {tuple(logits.shape)}, expected {expected}")
            logits = logits.detach().float().to(image.device)
            for window, tile_logits in zip(chunk, logits):
                if window.col == rows[0][0].col:  # the row's first window (-margin with an edge margin)
                    blender.begin(index)
                h, w = window.shape  # crop the padding off (only images smaller than the tile have any)
                weights = window_weights(window, height, width, overlap, margin=margin)  # the blender crops them
                blender.add(window, tile_logits[:, :h, :w], weights, np.ones((h, w), dtype=bool))
                if id(window) in last_of_row:
                    _, final = blender.end(index)
                    index += 1
                    if final is not None:
                        out[:, final.top : final.top + final.rows] = torch.from_numpy(to_numpy(final.logits))
    return out
