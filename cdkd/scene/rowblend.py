"""Blending tile logits one row of windows at a time, on the runtime's device, in one canonical order.

Every path that blends (the streaming scene engine, a scene split across a cluster, ``cdkd.predict`` over dask
chunks, in-memory evaluation) sums a pixel's weighted logits in the same order: first across the windows of one
window row, left to right (the row's *partial*), then the row partials top to bottom. Each term is the same
float32 product ``logits * weight`` wherever it is computed, and a sum of two terms does not depend on their
order, so any path that keeps this order gives bitwise the same blended logits, whether it holds the whole
scene, a band of rows or a block with halos. (Summing windows one by one in plan order would not: float addition
is not associative, and a block that starts mid-scene cannot know the earlier terms.)

``RowBlender`` holds one row partial (K x tile x W float32 on the device) plus the *carry*: the sum of the
earlier rows over the pixel rows the next window row will still touch (normally ``overlap`` rows). Memory grows
with the scene's width, never its height. Only uint8 class ids (and confidence) leave the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from cdkd.errors import CdkdValueError
from cdkd.scene.classraster import NODATA
from cdkd.scene.tiler import TileWindow

CONFIDENCE_NODATA = 0  # confidence is round(255 * max softmax) >= 255 / K >= 1 wherever a pixel is valid


@dataclass(frozen=True)
class Partial:
    """Weighted sums over image rows ``[top, top + rows)`` and the blender's columns: not (yet) final.

    ``logit_sum`` (K, n, W) float32, ``weight_sum`` (n, W) float32 and ``valid`` (n, W) bool, on one device.
    """

    top: int
    logit_sum: torch.Tensor
    weight_sum: torch.Tensor
    valid: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.weight_sum.shape[0])

    @property
    def bottom(self) -> int:
        return self.top + self.rows

    def slice(self, start: int, stop: int) -> Partial:
        """Image rows ``[start, stop)`` (views, not copies)."""
        if not self.top <= start <= stop <= self.bottom:
            raise CdkdValueError(f"rows {start}..{stop} lie outside the partial's {self.top}..{self.bottom}")
        a, b = start - self.top, stop - self.top
        return Partial(start, self.logit_sum[:, a:b], self.weight_sum[a:b], self.valid[a:b])

    def state(self) -> dict[str, np.ndarray]:
        """CPU numpy copies, for a checkpoint or to send to another process (``from_state`` restores them)."""
        return {"top": np.asarray(self.top), "logit_sum": self.logit_sum.cpu().numpy(),
                "weight_sum": self.weight_sum.cpu().numpy(), "valid": self.valid.cpu().numpy()}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> Partial:
        return cls(int(state["top"]), torch.as_tensor(np.asarray(state["logit_sum"])).to(device),
                   torch.as_tensor(np.asarray(state["weight_sum"])).to(device),
                   torch.as_tensor(np.asarray(state["valid"])).to(device))


def accumulate(earlier: Partial | None, later: Partial) -> Partial:
    """``later`` with ``earlier`` (the sum of the window rows above it) added in: the canonical order's next step.

    ``earlier`` must start at ``later``'s top and end no lower. ``later`` is updated in place and returned.
    """
    if earlier is None or earlier.rows == 0:
        return later
    if earlier.top != later.top or earlier.bottom > later.bottom:
        raise CdkdValueError(f"cannot add rows {earlier.top}..{earlier.bottom} to {later.top}..{later.bottom}")
    n = earlier.rows
    later.logit_sum[:, :n] += earlier.logit_sum  # a sum of two terms: the same whichever is added to which
    later.weight_sum[:n] += earlier.weight_sum
    later.valid[:n] |= earlier.valid
    return later


class RowStitcher:
    """Row partials in, final rows out: adds the carry of the rows above and keeps what the next row will touch.

    ``tops`` are the window rows' offsets, ``height`` the image's. A block that starts below the first window row
    (``head_end``: its first rows are also covered by the block above, which it does not see) hands those rows
    out as its *head* instead of finishing them; the carry left after a block's last row is its *tail*. The two
    meet in ``accumulate(tail, head)``.
    """

    def __init__(self, tops: Sequence[int], height: int, carry: Partial | None = None,
                 head_end: int | None = None) -> None:
        self.tops, self.height, self.carry, self.head_end = list(tops), height, carry, head_end

    def push(self, index: int, partial: Partial) -> tuple[Partial | None, Partial | None]:
        """(head or None, final rows or None) after window row ``index``'s partial."""
        total = accumulate(self.carry, partial)
        next_top = self.tops[index + 1] if index + 1 < len(self.tops) else self.height
        start, head = total.top, None
        if self.head_end is not None:
            head, start, self.head_end = _copy(total.slice(start, self.head_end)), self.head_end, None
        stop = min(next_top, total.bottom)
        self.carry = _copy(total.slice(stop, total.bottom)) if stop < total.bottom else None
        return head, (total.slice(start, stop) if start < stop else None)


def _copy(p: Partial) -> Partial:
    """A partial that owns its memory (a view would keep the whole row's sums alive)."""
    return Partial(p.top, p.logit_sum.clone(), p.weight_sum.clone(), p.valid.clone())


class RowBlender:
    """The partial of one window row at a time: ``begin(top, height)``, ``add``/``add_valid`` per window in
    plan order, ``partial()``. Columns ``[x0, x0 + width)`` of the image (a block of ``cdkd.predict`` need not
    start at column 0); windows are clipped to them."""

    def __init__(self, num_classes: int, width: int, device: str | torch.device = "cpu", x0: int = 0) -> None:
        if num_classes < 1 or width < 1:
            raise CdkdValueError(f"blender needs num_classes and width >= 1, got {num_classes}, {width}")
        self.num_classes, self.width, self.x0 = num_classes, width, x0
        self.device = torch.device(device)
        self.top = 0
        self._sum = self._w = self._valid = None

    def begin(self, top: int, height: int) -> None:
        """Start the row whose windows cover image rows ``[top, top + height)``."""
        shape = (height, self.width)
        self._sum = torch.zeros((self.num_classes, *shape), dtype=torch.float32, device=self.device)
        self._w = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self._valid = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.top = top

    def _place(self, window: TileWindow) -> tuple[slice, slice, slice]:
        """(band rows, band cols, window cols) of the part of ``window`` inside this blender's columns."""
        r0 = window.row - self.top
        if r0 < 0 or r0 + window.height > self._w.shape[0]:
            raise CdkdValueError(f"{window} lies outside the row {self.top}..{self.top + self._w.shape[0]}")
        c0, c1 = max(window.col, self.x0), min(window.col + window.width, self.x0 + self.width)
        if c0 >= c1:
            raise CdkdValueError(f"{window} lies outside columns {self.x0}..{self.x0 + self.width}")
        return (slice(r0, r0 + window.height), slice(c0 - self.x0, c1 - self.x0),
                slice(c0 - window.col, c1 - window.col))

    def add(self, window: TileWindow, logits: torch.Tensor, weights: torch.Tensor) -> None:
        """Add (K, h, w) ``logits`` weighted by (h, w) ``weights`` (both on the device) at ``window``."""
        rows, cols, own = self._place(window)
        weighted = logits[:, :, own] * weights[:, own]  # one rounding, as everywhere: no fused multiply-add
        self._sum[:, rows, cols] += weighted
        self._w[rows, cols] += weights[:, own]

    def add_valid(self, window: TileWindow, valid: torch.Tensor) -> None:
        """Mark the (h, w) ``valid`` pixels of ``window``, also for a window that was skipped (none valid)."""
        rows, cols, own = self._place(window)
        self._valid[rows, cols] |= valid[:, own]

    def partial(self) -> Partial:
        """This row's partial; the blender lets go of it (the next ``begin`` allocates afresh)."""
        p = Partial(self.top, self._sum, self._w, self._valid)
        self._sum = self._w = self._valid = None
        return p


def blended_logits(p: Partial) -> torch.Tensor:
    """(K, n, W) weighted-mean logits; 0 where no window contributed (only under skipped, all-invalid windows)."""
    w = p.weight_sum
    return torch.where(w > 0, p.logit_sum / torch.where(w > 0, w, 1.0), 0.0)


@dataclass(frozen=True)
class FinishedRows:
    """Final rows ``[top, top + n)`` as they are written: (n, W) uint8 class ids (``NODATA`` where invalid) and,
    when asked for, (n, W) uint8 confidence ``round(255 * max softmax)`` (``CONFIDENCE_NODATA`` where invalid)."""

    top: int
    classes: np.ndarray
    confidence: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return int(self.classes.shape[0])


def finish(p: Partial, probs: bool = False) -> FinishedRows:
    """Reduce a final partial to class ids (and confidence) on its device; only uint8 comes back to the CPU.

    The class is the argmax of the weighted *sums*: dividing every class's sum by the same positive weight cannot
    change their order, and skipping it saves a pass over K x n x W floats (rounding in the division could only
    tie two classes that the sums tell apart). Ties go to the first class, as with numpy's argmax.
    """
    classes = p.logit_sum.argmax(dim=0).to(torch.uint8)
    classes[~p.valid] = NODATA
    confidence = None
    if probs:
        logits = blended_logits(p)
        z = logits - logits.max(dim=0, keepdim=True).values
        top = 1.0 / torch.exp(z).sum(dim=0)  # the winning class's softmax: exp(0) / sum exp
        conf = torch.clamp(torch.round(255.0 * top), 1, 255).to(torch.uint8)
        conf[~p.valid] = CONFIDENCE_NODATA
        confidence = conf.cpu().numpy()
    return FinishedRows(p.top, classes.cpu().numpy(), confidence)
