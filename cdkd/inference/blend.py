"""Blending the predictions of overlapping tiles into one seamless output.

A ViT segmenter sees less context near a tile's border, so its logits there are less reliable and differ from
the neighbouring tile's: averaging with equal weights leaves visible seams. Each tile's logits are instead
weighted by a window that is 1 in the interior and falls off smoothly (raised cosine) across the overlap band,
and the weighted sum is divided by the sum of weights.

``window_weights`` is the rule every path uses (scene engine, evaluation, ``cdkd.predict``): a window ramps only
on a side where a neighbouring window takes over, and there it falls to almost 0 at its last pixel, so the
blended logits are continuous across every window edge (a weight that stops at a floor leaves a step, and the
step shows as extra class changes along window edges). On a side at the image border no window takes over, so
the profile stays 1 there and the border pixels keep their full prediction. With the regular stride
``tile - overlap`` two neighbours' ramps sum to exactly 1; the normalisation makes the result exact where the
plan is irregular (the last, shifted window) or a neighbour was skipped (no valid pixel).
"""

from __future__ import annotations

import numpy as np

from cdkd.errors import CdkdValueError
from cdkd.inference.tiler import TileWindow

BLEND_KINDS = ("cosine", "flat")


def _ramp(tile: int, overlap: int) -> np.ndarray:
    """(tile,) float64 1-D profile: Hann ramp up over the first ``overlap`` pixels, down over the last, 1 between.

    Pixel ``i`` of the rising ramp gets ``0.5 - 0.5 cos(pi (i + 0.5) / overlap)``, sampled at pixel centres so
    that the ramp is symmetric and two neighbours' ramps (one rising, one falling, ``overlap`` pixels) sum to
    exactly 1. When ``overlap > tile / 2`` the two ramps meet; the lower one wins, so the profile stays
    symmetric and peaks in the middle.
    """
    i = np.arange(tile, dtype=np.float64)
    rise = np.clip((i + 0.5) / overlap, 0.0, 1.0)  # 0..1 across the band, 1 beyond it
    up = 0.5 - 0.5 * np.cos(np.pi * rise)
    return np.minimum(up, up[::-1])


def neighbours(offset: int, length: int, size: int, margin: int = 0) -> tuple[bool, bool]:
    """Whether a window at ``offset`` covering ``length`` px of an axis of ``size`` px has a neighbouring window
    (before, after) in a plan with edge margin ``margin`` (``tiler.plan_rows``): the plan's first window starts
    at ``-margin`` and its last ends ``margin`` px past the image, along an axis longer than the window (an axis
    no longer than the tile has one window of its own size and no margin)."""
    m = margin if size > length else 0
    return offset > -m, offset + length < size + m


def axis_profile(
    offset: int, length: int, size: int, overlap: int, kind: str = "cosine", margin: int = 0
) -> np.ndarray:
    """(length,) float64 weights along one axis of a window at ``offset`` covering ``length`` of ``size`` px.

    A Hann ramp over ``overlap`` px on each side that has a neighbouring window (``neighbours``: the window is not
    the plan's first or last there), flat 1 on a side at the border. ``"flat"`` (or ``overlap == 0``): all ones.
    """
    if kind not in BLEND_KINDS:
        raise CdkdValueError(f"unknown blend kind {kind!r}; choose one of {', '.join(BLEND_KINDS)}")
    profile = np.ones(length, dtype=np.float64)
    if kind == "flat" or overlap == 0:
        return profile
    ramp = _ramp(length, min(overlap, length))
    half = np.arange(length) < (length + 1) // 2  # _ramp meets itself in the middle: split it there
    before, after = neighbours(offset, length, size, margin)
    if before:  # a neighbour before: rise from ~0
        profile = np.where(half, ramp, profile)
    if after:  # a neighbour after: fall to ~0
        profile = np.where(~half, ramp, profile)
    return profile


def window_weights(
    window: TileWindow, height: int, width: int, overlap: int, kind: str = "cosine", margin: int = 0
) -> np.ndarray:
    """(h, w) float32 weights for the logits of ``window`` in a ``height`` x ``width`` image (see the module).

    The outer product of the row and column profiles (``axis_profile``): separable, so along an image border two
    neighbours blend in the same proportions as further in. The smallest weight, in a corner shared by four
    windows, is ``(0.5 - 0.5 cos(pi / (2 overlap)))**2`` (1e-7 for overlap 64): positive, so a pixel whose
    neighbours were all skipped still gets a defined value.

    A window of a plan with an edge margin ``margin`` (``tiler.plan_rows``) may reach past the image; its weights
    cover the whole window, as those of the image padded by ``margin`` px with a plan without margin, and the
    blender keeps the part inside the image.
    """
    rows = axis_profile(window.row, window.height, height, overlap, kind, margin)
    cols = axis_profile(window.col, window.width, width, overlap, kind, margin)
    return np.outer(rows, cols).astype(np.float32)


def seam_index(
    classes: np.ndarray, tile: int, overlap: int, nodata: int | None = None, margin: int = 0
) -> tuple[float, float]:
    """How much more often the class changes across a window edge than across any pixel boundary.

    ``classes``: (H, W) class ids of a scene segmented with ``tile``/``overlap`` windows and edge margin
    ``margin`` (the report's ``edge_context``: it shifts the grid). Returns (across columns, across rows): the
    change rate between the two pixels at an inner window edge (``tiler.window_edges``) over the scene's mean
    change rate in that direction; 1.0 means the window grid leaves no trace. Pairs with a ``nodata`` pixel are
    left out.
    """
    from cdkd.inference.tiler import window_edges

    def ratio(a: np.ndarray) -> float:  # along axis 1 of a
        change = a[:, 1:] != a[:, :-1]
        ok = np.ones_like(change) if nodata is None else (a[:, 1:] != nodata) & (a[:, :-1] != nodata)
        idx = window_edges(a.shape[1], tile, overlap, margin)
        mean = change[ok].mean() if ok.any() else 0.0
        at = change[:, idx][ok[:, idx]].mean() if idx and ok[:, idx].any() else 0.0
        return float(at / mean) if mean > 0 else 1.0

    return ratio(classes), ratio(classes.T)
