"""``PlanBlender``'s device work as two Triton kernels: one launch per window, one per finished window row.

The torch form of the blend (``rowblend``) costs a window up to four frame pieces and an exclusive part, each a
handful of slicing, multiply, add, compare and fill kernels: about fifty launches from the thread that feeds the
GPU, for every 1024 px tile. Here a window is one launch whatever its frame looks like:

- ``_add_window_kernel``: every pixel of the window that lies inside the image and the blender's columns either
  belongs to the window alone (the row's exclusive rows and the window's exclusive columns), where its class id and
  confidence are reduced from the window's own logits straight into the row's output, or to the frame, where
  ``sum += logits * weight``, ``weights += weight`` and ``valid |= valid`` are added in place;
- ``_reduce_rows_kernel``: the finished rows of a window row, every pixel not already reduced (outside the exclusive
  rows, or in a column marked shared) reduced from its sums.

The arithmetic is ``rowblend``'s, in the same order: one rounded product and one rounded sum per term, the windows
of a row added in plan order (launches on one stream run in order), the first class winning ties, NaN propagated
by the running maximum as ``torch.maximum`` and ``np.maximum`` do. The kernels are compiled with
``enable_fp_fusion=False``, so no multiply-add is contracted and class ids equal those of the numpy and torch forms
bitwise, on the GPU as in Triton's CPU interpreter. Confidence agrees to 1 in 255 on a GPU: its ``exp`` and
division are the GPU's, not numpy's (in the interpreter they are numpy's, and it is bitwise too).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl

from cdkd.data.classraster import CONFIDENCE_NODATA, NODATA

__all__ = ["BLOCK", "add_window", "reduce_rows"]

BLOCK = (16, 64)  # (rows, columns) of a program's tile of pixels: 64 consecutive float32 columns per row


@triton.jit
def _confidence(x_ptr, offsets, stride_k, mask, weight, K):
    """uint8 ``round(255 * max softmax)`` of the K values at ``x_ptr + k * stride_k + offsets``, each divided by
    ``weight`` where it is positive (0 elsewhere), as ``rowblend.confidence(rowblend.blended(...))``."""
    has = weight > 0
    safe = tl.where(has, weight, 1.0)
    peak = tl.where(has, tl.load(x_ptr + offsets, mask=mask, other=0.0) / safe, 0.0)
    for k in range(1, K):
        v = tl.where(has, tl.load(x_ptr + k * stride_k + offsets, mask=mask, other=0.0) / safe, 0.0)
        peak = tl.maximum(peak, v, propagate_nan=tl.PropagateNan.ALL)
    total = tl.zeros_like(peak)
    for k in range(0, K):
        v = tl.where(has, tl.load(x_ptr + k * stride_k + offsets, mask=mask, other=0.0) / safe, 0.0)
        total = total + tl.exp(v - peak)
    scaled = 255.0 * (1.0 / total)
    # round half to even, as np.rint and torch.round: adding and taking away 1.5 * 2**23 leaves the float32
    # rounded to an integer (the value is in [1, 255], far inside that trick's range)
    rounded = (scaled + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(rounded, 1.0), 255.0).to(tl.uint8)


@triton.jit
def _first_argmax(x_ptr, offsets, stride_k, mask, K):
    """uint8 index of the largest of the K values at ``x_ptr + k * stride_k + offsets``, the first on ties."""
    peak = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    index = tl.zeros(peak.shape, dtype=tl.int32)
    for k in range(1, K):
        v = tl.load(x_ptr + k * stride_k + offsets, mask=mask, other=0.0)
        index = tl.where(v > peak, k, index)  # strictly greater: an equal later class does not win
        peak = tl.maximum(peak, v, propagate_nan=tl.PropagateNan.ALL)
    return index.to(tl.uint8)


@triton.jit
def _add_window_kernel(
    logits_ptr,
    weight_ptr,
    valid_ptr,
    sum_ptr,
    wsum_ptr,
    bvalid_ptr,
    direct_ptr,
    conf_ptr,
    K,
    h,
    w,
    stride_lk,
    stride_lr,
    win_row,
    win_col,
    top,
    x0,
    band_w,
    band_plane,
    height,
    c0,
    c1,
    r0,
    r1,
    e0,
    e1,
    HAS_LOGITS: tl.constexpr,
    PROBS: tl.constexpr,
    NODATA_ID: tl.constexpr,
    NODATA_CONF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    plane = band_plane.to(tl.int64)  # K planes of a wide row pass 2**31 elements: 64-bit offsets
    i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]  # the window's pixel rows
    j = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]  # and columns
    y = win_row + i  # image row
    x = win_col + j  # image column
    inside = (i < h) & (j < w) & (y >= 0) & (y < height) & (x >= c0) & (x < c1)
    alone = (y >= r0) & (y < r1) & (x >= e0) & (x < e1)  # no other window covers it: weight 1
    frame = inside & ~alone
    alone = inside & alone
    own = i * w + j  # weights and valid: (h, w) contiguous
    band = (y - top) * band_w + (x - x0)  # the row's buffers: (band rows, band_w) contiguous
    valid = tl.load(valid_ptr + own, mask=inside, other=0) != 0
    old = tl.load(bvalid_ptr + band, mask=frame, other=0) != 0
    tl.store(bvalid_ptr + band, (old | valid).to(tl.uint8), mask=frame)
    if HAS_LOGITS:
        lo = i * stride_lr + j  # the window's logits: (K, h, w) with a unit column stride
        weight = tl.load(weight_ptr + own, mask=frame, other=0.0)
        for k in range(0, K):
            s = tl.load(sum_ptr + k * plane + band, mask=frame, other=0.0)
            v = tl.load(logits_ptr + k * stride_lk + lo, mask=frame, other=0.0)
            tl.store(sum_ptr + k * plane + band, s + v * weight, mask=frame)
        ws = tl.load(wsum_ptr + band, mask=frame, other=0.0)
        tl.store(wsum_ptr + band, ws + weight, mask=frame)
        index = _first_argmax(logits_ptr, lo, stride_lk, alone, K)
        tl.store(direct_ptr + band, tl.where(valid, index, NODATA_ID).to(tl.uint8), mask=alone)
        if PROBS:
            conf = _confidence(logits_ptr, lo, stride_lk, alone, tl.full(index.shape, 1.0, tl.float32), K)
            tl.store(conf_ptr + band, tl.where(valid, conf, NODATA_CONF).to(tl.uint8), mask=alone)
    else:  # a skipped window (no valid pixel): its own pixels are nodata
        tl.store(direct_ptr + band, tl.full(valid.shape, NODATA_ID, tl.uint8), mask=alone)
        if PROBS:
            tl.store(conf_ptr + band, tl.full(valid.shape, NODATA_CONF, tl.uint8), mask=alone)


@triton.jit
def _reduce_rows_kernel(
    sum_ptr,
    wsum_ptr,
    bvalid_ptr,
    shared_ptr,
    direct_ptr,
    conf_ptr,
    K,
    row0,
    rows,
    band_w,
    band_plane,
    m0,
    m1,
    PROBS: tl.constexpr,
    NODATA_ID: tl.constexpr,
    NODATA_CONF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    plane = band_plane.to(tl.int64)  # as in _add_window_kernel
    r = row0 + tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]  # band rows
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    in_range = (r < row0 + rows) & (c < band_w)
    shared = tl.load(shared_ptr + c, mask=c < band_w, other=1) != 0
    todo = in_range & (shared | (r < m0) | (r >= m1))  # the exclusive parts are reduced already
    band = r * band_w + c
    valid = tl.load(bvalid_ptr + band, mask=todo, other=0) != 0
    index = _first_argmax(sum_ptr, band, plane, todo, K)  # dividing by one positive weight keeps the order
    tl.store(direct_ptr + band, tl.where(valid, index, NODATA_ID).to(tl.uint8), mask=todo)
    if PROBS:
        weight = tl.load(wsum_ptr + band, mask=todo, other=0.0)
        conf = _confidence(sum_ptr, band, plane, todo, weight, K)
        tl.store(conf_ptr + band, tl.where(valid, conf, NODATA_CONF).to(tl.uint8), mask=todo)


def _on(device: torch.device) -> Any:
    """Triton launches on the current CUDA device: make it the buffers' (``--device cuda:1``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_options() -> dict[str, Any]:
    # no contracted multiply-add: rowblend rounds the product and the sum once each, on every path
    return {"enable_fp_fusion": False}


def add_window(
    logits: torch.Tensor | None,
    weights: torch.Tensor | None,
    valid: torch.Tensor,
    buffers: dict[str, Any],
    window: tuple[int, int, int, int],
    band: tuple[int, int],
    clip: tuple[int, int, int],
    exclusive: tuple[int, int, int, int],
) -> None:
    """One window into a row's buffers (``PlanBlender.add``'s work in one launch).

    ``logits`` (K, h, w) float32 with a unit column stride (a crop of the model's output), or None for a skipped
    window; ``weights`` (h, w) float32 and ``valid`` (h, w) bool, contiguous; ``buffers``: the row's ``sum``
    (K, H_b, W_b) float32, ``weights`` and ``valid`` (H_b, W_b) float32 / bool, ``classes`` and ``confidence``
    (H_b, W_b) uint8 (``confidence`` None without probabilities), all contiguous on one device;
    ``window`` (row, col, h, w) in image pixels; ``band`` (top, x0): the image position of the buffers' first
    pixel; ``clip`` (image height, c0, c1): the image rows and the blender's columns of this window that count;
    ``exclusive`` (r0, r1, e0, e1): the rows and columns that no other window covers.
    """
    win_row, win_col, h, w = window
    top, x0 = band
    height, c0, c1 = clip
    r0, r1, e0, e1 = exclusive
    total = buffers["sum"]
    k, band_h, band_w = total.shape
    conf = buffers["confidence"]
    has_logits = logits is not None
    if logits is not None and logits.stride(2) != 1:
        logits = logits.contiguous()
    grid = (triton.cdiv(h, BLOCK[0]), triton.cdiv(w, BLOCK[1]))
    with _on(total.device):
        _add_window_kernel[grid](
            logits if logits is not None else total,
            weights if weights is not None else buffers["weights"],
            valid.view(torch.uint8),
            total,
            buffers["weights"],
            buffers["valid"].view(torch.uint8),
            buffers["classes"],
            conf if conf is not None else buffers["classes"],
            k,
            h,
            w,
            logits.stride(0) if logits is not None else 0,
            logits.stride(1) if logits is not None else 0,
            win_row,
            win_col,
            top,
            x0,
            band_w,
            band_h * band_w,
            height,
            c0,
            c1,
            r0,
            r1,
            e0,
            e1,
            HAS_LOGITS=has_logits,
            PROBS=conf is not None,
            NODATA_ID=NODATA,
            NODATA_CONF=CONFIDENCE_NODATA,
            BLOCK_R=BLOCK[0],
            BLOCK_C=BLOCK[1],
            **_launch_options(),
        )


def reduce_rows(
    buffers: dict[str, Any], shared: torch.Tensor, rows: tuple[int, int], exclusive: tuple[int, int]
) -> None:
    """Class ids (and confidence) of the band rows ``rows`` = [a, b) from their sums, except where the exclusive
    band rows ``exclusive`` = [m0, m1) meet a column that ``shared`` (W_b,) uint8 marks 0 (reduced by
    ``add_window`` already)."""
    total = buffers["sum"]
    k, band_h, band_w = total.shape
    a, b = rows
    m0, m1 = exclusive
    conf = buffers["confidence"]
    grid = (triton.cdiv(b - a, BLOCK[0]), triton.cdiv(band_w, BLOCK[1]))
    with _on(total.device):
        _reduce_rows_kernel[grid](
            total,
            buffers["weights"],
            buffers["valid"].view(torch.uint8),
            shared,
            buffers["classes"],
            conf if conf is not None else buffers["classes"],
            k,
            a,
            b - a,
            band_w,
            band_h * band_w,
            m0,
            m1,
            PROBS=conf is not None,
            NODATA_ID=NODATA,
            NODATA_CONF=CONFIDENCE_NODATA,
            BLOCK_R=BLOCK[0],
            BLOCK_C=BLOCK[1],
            **_launch_options(),
        )
