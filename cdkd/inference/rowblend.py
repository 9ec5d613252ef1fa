"""Blending tile logits one row of windows at a time, on the runtime's device, in one canonical order.

Every path that blends (the streaming scene engine, a scene split across a cluster, ``cdkd.predict`` over dask
chunks, in-memory evaluation) sums a pixel's weighted logits ``logits * weight`` in the same order: first across
the windows of one window row, left to right (the row's *partial*), then the row partials top to bottom. Each
term is the same float32 product wherever it is computed, and a sum of two terms does not depend on their order,
so every path gives bitwise the same blended logits, whether it holds the whole scene, a band of rows or a block
with halos. (Summing windows one by one in plan order would not: float addition is not associative, and a block
that starts mid-scene cannot know the earlier terms.)

Most of a window is covered by that window alone, where its weight is exactly 1 (``blend.window_weights``): there
the canonical sum is the window's own logits, bitwise, so ``PlanBlender`` reduces them to class ids straight away
and accumulates only the *frame* that neighbouring windows share. Its row of sums (K x tile x W float32 on the
device) is touched only in the frames, and the *carry* (the sums of the rows above over the pixel rows the next
window row still covers, normally ``overlap`` rows) is all that passes from row to row. Memory grows with the
scene's width, never its height, and only uint8 class ids (and confidence) leave the device.

On a GPU the arrays are torch tensors, and ``blend_triton``'s kernels do a window's work in one launch and a
finished row's reduction in another (the torch form's few kernels per frame piece cost the thread that feeds the GPU
more than the GPU's time). On the CPU they are numpy arrays (a CPU runtime's torch logits are viewed
without a copy): numpy's kernels are single-threaded and release the GIL, so the reader and writer threads run
beside them, while torch's intra-op threads competed with those threads for the cores and ran 3-5x slower here.
Float32 products, sums, comparisons and maxima are exact in both, so the class ids do not depend on the choice.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from cdkd.data.classraster import CONFIDENCE_NODATA, NODATA
from cdkd.errors import CdkdValueError
from cdkd.inference.tiler import TileWindow

OUTPUTS = ("classes", "logits")


@dataclass(frozen=True)
class Partial:
    """Weighted sums over image rows ``[top, top + rows)`` and the blender's columns that are not final yet.

    ``logit_sum`` (K, n, W) float32, ``weight_sum`` (n, W) float32 and ``valid`` (n, W) bool, on one device.
    """

    top: int
    logit_sum: Any
    weight_sum: Any
    valid: Any

    @property
    def rows(self) -> int:
        return int(self.weight_sum.shape[0])

    @property
    def bottom(self) -> int:
        return self.top + self.rows

    def state(self) -> dict[str, np.ndarray]:
        """CPU numpy copies, for a checkpoint or another process (``from_state`` restores them)."""
        return {
            "top": np.asarray(self.top),
            "logit_sum": to_numpy(self.logit_sum),
            "weight_sum": to_numpy(self.weight_sum),
            "valid": to_numpy(self.valid),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> Partial:
        arrays = _Arrays(device)
        return cls(
            int(state["top"]),
            arrays.put(np.asarray(state["logit_sum"])),
            arrays.put(np.asarray(state["weight_sum"])),
            arrays.put(np.asarray(state["valid"])),
        )


class FinishedRows:
    """Final rows ``[top, top + n)``: (n, W) uint8 class ids (``NODATA`` where invalid) and, when asked for, (n, W)
    uint8 confidence ``round(255 * max softmax)`` (``CONFIDENCE_NODATA`` where invalid); or, for evaluation,
    (K, n, W) float32 blended ``logits`` (0 where no window contributed).

    On a GPU the arrays are still being copied to (pinned) host memory when the rows are handed out: ``ready`` is
    the CUDA event of that copy, and reading ``classes`` or ``confidence`` waits for it, in the reading thread only
    (the writer's), so the thread that feeds the GPU never waits for it.
    """

    def __init__(
        self,
        top: int,
        classes: np.ndarray | None,
        confidence: np.ndarray | None = None,
        logits: Any = None,
        ready: Any = None,
    ) -> None:
        self.top, self.logits = top, logits
        self._classes, self._confidence, self._ready = classes, confidence, ready

    def _wait(self) -> None:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None

    @property
    def classes(self) -> np.ndarray | None:
        self._wait()
        return self._classes

    @property
    def confidence(self) -> np.ndarray | None:
        self._wait()
        return self._confidence

    @property
    def rows(self) -> int:
        return int(self._classes.shape[0] if self._classes is not None else self.logits.shape[1])

    def __getstate__(self) -> dict[str, Any]:
        self._wait()
        return self.__dict__


Array = Any  # a numpy array on the CPU, a torch tensor on a GPU


def fill_where(a: Array, mask: Array, value: int) -> None:
    """``a[mask] = value`` in place; on torch without boolean indexing, which waits for the GPU (``nonzero``)."""
    if isinstance(a, np.ndarray):
        a[mask] = value
    else:
        a.masked_fill_(mask, value)


def first_argmax(x: Array, out: Array | None = None, scratch: ArgmaxScratch | None = None) -> Array:
    """(K, ...) -> (...) uint8 index of the largest value along axis 0, the first one on ties (numpy's rule),
    written into ``out`` when given (a view of the row's output, say).

    A pass per class; torch's own ``argmax(dim=0)`` reduces across memory strides and was ~5x slower (numpy's
    ``argmax(axis=0)`` ~1.4x). Numpy: ``scratch`` holds the running maximum and comparison between calls.
    """
    index: np.ndarray | torch.Tensor  # one name for both paths
    if isinstance(x, np.ndarray):
        shape = x.shape[1:]
        best, better = (
            scratch.views(shape) if scratch is not None else (np.empty(shape, x.dtype), np.empty(shape, bool))
        )
        index = np.empty(shape, dtype=np.uint8) if out is None else out
        np.copyto(best, x[0])
        index[...] = 0
        for k in range(1, x.shape[0]):
            np.greater(x[k], best, out=better)  # strictly greater: an equal later class does not win
            np.maximum(best, x[k], out=best)
            np.putmask(index, better, k)
        return index
    peak = x[0].clone()
    index = torch.zeros(peak.shape, dtype=torch.uint8, device=x.device) if out is None else out.zero_()
    for k in range(1, x.shape[0]):
        better = x[k] > peak
        peak = torch.maximum(peak, x[k])
        index.masked_fill_(better, k)
    return index


class ArgmaxScratch:
    """``first_argmax``'s working arrays for regions up to ``shape``, reused from call to call."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.best, self.better = np.empty(shape, np.float32), np.empty(shape, bool)

    def views(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        region = tuple(slice(0, n) for n in shape)
        return self.best[region], self.better[region]


def confidence(logits: Array) -> Array:
    """(K, ...) blended logits -> (...) uint8 ``round(255 * max softmax)``, at least 1."""
    if isinstance(logits, np.ndarray):
        z = logits - logits.max(axis=0, keepdims=True)
        top = 1.0 / np.exp(z).sum(axis=0)  # the winning class's softmax: exp(0) / sum exp
        return np.clip(np.rint(255.0 * top), 1, 255).astype(np.uint8)
    z = logits - logits.max(dim=0, keepdim=True).values
    top = 1.0 / torch.exp(z).sum(dim=0)
    return torch.clamp(torch.round(255.0 * top), 1, 255).to(torch.uint8)


def blended(logit_sum: Array, weight_sum: Array) -> Array:
    """Weighted-mean logits; 0 where no window contributed (only under skipped, all-invalid windows)."""
    if isinstance(logit_sum, np.ndarray):
        out = np.zeros_like(logit_sum)
        np.divide(logit_sum, weight_sum, out=out, where=np.broadcast_to(weight_sum > 0, logit_sum.shape))
        return out
    has = weight_sum > 0
    return torch.where(has, logit_sum / torch.where(has, weight_sum, 1.0), 0.0)


def add_weighted(dst: Array, logits: Array, weights: Array, scratch: np.ndarray | None = None) -> None:
    """``dst += logits * weights``, rounding the product and the sum once each (no fused multiply-add: every path
    must round alike). ``scratch``: a numpy buffer at least ``dst``'s shape for the product (a fresh temporary of
    megabytes costs its page faults each time)."""
    if isinstance(dst, np.ndarray):
        product = None if scratch is None else scratch[tuple(slice(0, n) for n in dst.shape)]
        np.add(dst, np.multiply(logits, weights, out=product), out=dst)
    else:
        dst += logits * weights


BACKENDS = ("auto", "numpy", "torch", "triton")


def check_backend(backend: str) -> None:
    """Refuse a blend backend that is not one of ``BACKENDS`` (before any device is known)."""
    if backend not in BACKENDS:
        raise CdkdValueError(f"unknown blend backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def blend_backend(device: str | torch.device, backend: str = "auto") -> str:
    """The blender's backend on ``device``: ``backend``, or for "auto" numpy on the CPU, the Triton kernels
    (``blend_triton``) on a CUDA GPU that Triton supports where triton is importable, torch otherwise. "triton"
    on the CPU needs Triton's interpreter (``TRITON_INTERPRET=1`` before triton is imported): how its tests run
    without a GPU."""
    check_backend(backend)
    kind = torch.device(device).type
    if backend == "numpy" and kind != "cpu":
        raise CdkdValueError(f"the numpy blend backend runs on the CPU only, not on {device}")
    if backend == "triton" and kind != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise CdkdValueError(
            f"the triton blend backend runs on a CUDA GPU, not on {device} (or in Triton's interpreter, "
            "TRITON_INTERPRET=1); use auto, numpy or torch"
        )
    if backend != "auto":
        return backend
    if kind == "cpu":
        return "numpy"
    if kind == "cuda" and importlib.util.find_spec("triton") is not None and _triton_capable(torch.device(device)):
        return "triton"
    return "torch"


TRITON_MIN_CAPABILITY = (7, 5)  # Triton's oldest supported NVIDIA architecture (Turing)


def _triton_capable(device: torch.device) -> bool:
    """Whether Triton compiles for this GPU (an older card keeps the torch blend rather than failing mid-scene)."""
    return tuple(torch.cuda.get_device_capability(device)) >= TRITON_MIN_CAPABILITY


class _Arrays:
    """Allocation and transfer for the blender's device: numpy arrays for the numpy backend, torch tensors for the
    others (``backend="torch"`` on the CPU: the GPU's code path, testable without a GPU)."""

    def __init__(self, device: str | torch.device, backend: str = "auto") -> None:
        self.device = torch.device(device)
        self.backend = blend_backend(self.device, backend)
        self.numpy = self.backend == "numpy"

    def empty(self, shape: tuple[int, ...], dtype: str) -> Array:
        if self.numpy:
            return np.empty(shape, dtype=dtype)
        return torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Array:
        a = self.empty(shape, dtype)
        a[...] = 0
        return a

    def put(self, x: Any) -> Array:
        """A tensor or array onto the device (no copy when it is there already)."""
        if self.numpy:
            return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return to_device(torch.as_tensor(x), self.device)

    def host(self, a: Array) -> tuple[np.ndarray, Any]:
        """``(array, event)``: a copy of ``a`` on the host; from a GPU an asynchronous copy into pinned memory,
        complete once ``event`` is (None: complete now)."""
        if isinstance(a, np.ndarray):
            return a.copy(), None
        if a.device.type != "cuda":
            return a.cpu().numpy().copy(), None
        out = torch.empty(a.shape, dtype=a.dtype, pin_memory=True)
        out.copy_(a, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(a.device))
        return out.numpy(), event

    @staticmethod
    def copy(a: Array) -> Array:
        return a.copy() if isinstance(a, np.ndarray) else a.clone()


def to_numpy(a: Array) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.cpu().numpy()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` without making the host wait: a pageable host -> GPU copy waits for all the work queued
    on the GPU first, so host tensors go through pinned memory (torch's caching host allocator keeps the staging
    block until the copy is done)."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def exclusive(offsets: Sequence[int], index: int, length: int, size: int) -> tuple[int, int]:
    """``[start, stop)`` of window ``index`` along one axis that no other window of the plan covers.

    Windows along an axis all have ``length`` px and sorted offsets, so only the two neighbours can reach in (a
    window two steps away reaches no further than the neighbour between). Empty when neighbours meet or cross.
    """
    start = offsets[index]
    lo = max(start, offsets[index - 1] + length) if index > 0 else start
    hi = min(start + length, offsets[index + 1]) if index + 1 < len(offsets) else min(start + length, size)
    return lo, max(lo, hi)


def _clip(a: int, b: int, lo: int, hi: int) -> tuple[int, int]:
    """``[a, b)`` clipped to ``[lo, hi)``; an empty result keeps start == stop."""
    a = min(max(a, lo), hi)
    return a, max(a, min(b, hi))


def _intervals_outside(inside: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """The parts of ``[start, stop)`` not in any of the sorted, disjoint ``inside`` intervals."""
    out, at = [], start
    for a, b in sorted(inside):
        if a > at:
            out.append((at, min(a, stop)))
        at = max(at, b)
    if at < stop:
        out.append((at, stop))
    return [(a, b) for a, b in out if a < b]


class PlanBlender:
    """The blend of a window plan's rows ``start..`` over image columns ``[x0, x1)``, one window row at a time.

    ``row_tops``/``col_offsets``: the plan's window offsets (``tiler.grid_offsets``), ``window``: its (h, w),
    ``image``: (H, W). Per row: ``begin(i)``, then ``add`` for every window of the row in plan order (``logits``
    None for a skipped window), then ``end(i)`` -> ``(head, finished)``. ``carry`` is what the next row adds to
    (set it to resume). ``head=True``: the block starts below a window row it does not see, so the first row's
    rows that the row above also covers are handed out as a ``Partial`` head instead of being finished.
    ``output="logits"`` gives blended logits instead of class ids (evaluation). ``backend``: see ``blend_backend``.
    """

    def __init__(
        self,
        num_classes: int,
        row_tops: Sequence[int],
        col_offsets: Sequence[int],
        window: tuple[int, int],
        image: tuple[int, int],
        device: str | torch.device = "cpu",
        x_range: tuple[int, int] | None = None,
        probs: bool = False,
        head: bool = False,
        carry: Partial | None = None,
        output: str = "classes",
        backend: str = "auto",
    ) -> None:
        if output not in OUTPUTS:
            raise CdkdValueError(f"unknown blender output {output!r}; choose one of {', '.join(OUTPUTS)}")
        self.num_classes, self.row_tops, self.col_offsets = num_classes, list(row_tops), list(col_offsets)
        self.win_h, self.win_w = window
        self.height, self.width = image
        self.x0, self.x1 = x_range or (0, self.width)
        self._arrays = _Arrays(device, backend)
        self.device, self.probs, self.output = self._arrays.device, probs, output
        self.head, self.carry = head, carry
        cols = [exclusive(self.col_offsets, j, self.win_w, self.width) for j in range(len(self.col_offsets))]
        self._col_excl = {c: _clip(a, b, self.x0, self.x1) for c, (a, b) in zip(self.col_offsets, cols)}
        inside = [(a, b) for a, b in self._col_excl.values() if a < b]
        self._shared_cols = _intervals_outside(inside, self.x0, self.x1)  # columns that need the sums
        shape, new = (self.win_h, self.x1 - self.x0), self._arrays.empty
        self._sum = new((num_classes, *shape), "float32")
        self._w, self._valid = new(shape, "float32"), new(shape, "bool")
        self._direct = new(shape, "uint8")  # the row's output: class ids
        self._direct_conf = new(shape, "uint8") if probs else None
        self._direct_logits = new((num_classes, *shape), "float32") if output == "logits" else None
        self._scratch = np.empty((num_classes, self.win_h, self.win_w), np.float32) if self._arrays.numpy else None
        self._argmax = ArgmaxScratch((self.win_h, max(self.win_w, self.x1 - self.x0))) if self._arrays.numpy else None
        self.top, self._rows = 0, (0, 0)
        # the Triton kernels: one launch per window and one per finished row, in place of a few kernels per frame
        # piece (blend_triton); for class ids only (evaluation's blended logits take the torch form)
        self.backend = "torch" if self._arrays.backend == "triton" and output != "classes" else self._arrays.backend
        self._shared_mask = None
        if self.backend == "triton":
            self._shared_mask = torch.zeros(self.x1 - self.x0, dtype=torch.uint8, device=self.device)
            for a, b in self._shared_cols:
                self._shared_mask[a - self.x0 : b - self.x0] = 1
        # the row's buffers as the kernels take them (the same arrays for every row)
        self._buffers = {
            "sum": self._sum,
            "weights": self._w,
            "valid": self._valid,
            "classes": self._direct,
            "confidence": self._direct_conf,
        }

    # ------------------------------------------------------------------------------------------------ a row

    def begin(self, index: int) -> None:
        """Start window row ``index``: clear the frames its windows will add to."""
        self.top = self.row_tops[index]
        # a plan with an edge margin has windows reaching past the image: only their part inside it is blended
        self._rows = _clip(*exclusive(self.row_tops, index, self.win_h, self.height), 0, self.height)
        if self.backend == "triton":  # three fills, not three per frame piece: the frames are most of the row
            for t in (self._sum, self._w, self._valid):
                t.zero_()
            return
        e0, e1 = (r - self.top for r in self._rows)
        for t in (self._sum, self._w, self._valid):
            t[..., :e0, :] = 0
            t[..., e1:, :] = 0
            for a, b in self._shared_cols:
                t[..., e0:e1, a - self.x0 : b - self.x0] = 0

    def add(self, window: TileWindow, logits: Any, weights: Any, valid: Any) -> None:
        """Window ``window`` of the current row: (K, h, w) ``logits`` and (h, w) ``weights`` (tensors or arrays,
        moved to the device), or None for a skipped window (no valid pixel); (h, w) bool ``valid``."""
        put = self._arrays.put
        logits = None if logits is None else put(logits)
        weights = None if weights is None else put(weights)
        valid = put(valid)
        c0, c1 = max(window.col, self.x0), min(window.col + window.width, self.x1)
        if c0 >= c1:
            raise CdkdValueError(f"{window} lies outside columns {self.x0}..{self.x1}")
        r0, r1 = self._rows
        ec0, ec1 = self._col_excl[window.col]
        if self.backend == "triton":
            from cdkd.inference import blend_triton

            blend_triton.add_window(
                logits,
                weights,
                valid.contiguous(),
                self._buffers,
                (window.row, window.col, window.height, window.width),
                (self.top, self.x0),
                (self.height, c0, c1),
                (r0, r1, ec0, ec1),
            )
            return
        # the frame: the window's rows above and below the exclusive rows, and its shared columns between them
        frame = [
            (max(window.row, 0), r0, c0, c1),
            (r1, min(window.row + window.height, self.height), c0, c1),
            (r0, r1, c0, max(c0, ec0)),
            (r0, r1, min(c1, ec1), c1),
        ]
        for a, b, c, d in frame:
            if a < b and c < d:
                self._add_block(window, logits, weights, valid, a, b, c, d)
        if r0 < r1 and ec0 < ec1:
            self._set_direct(window, logits, valid, r0, r1, ec0, ec1)

    def _add_block(
        self, window: TileWindow, logits: Any, weights: Any, valid: Any, a: int, b: int, c: int, d: int
    ) -> None:
        own = (slice(a - window.row, b - window.row), slice(c - window.col, d - window.col))
        band = (slice(a - self.top, b - self.top), slice(c - self.x0, d - self.x0))
        self._valid[band] |= valid[own]
        if logits is None:
            return
        w = weights[own]
        add_weighted(self._sum[(slice(None), *band)], logits[(slice(None), *own)], w, self._scratch)
        self._w[band] += w

    def _set_direct(self, window: TileWindow, logits: Any, valid: Any, a: int, b: int, c: int, d: int) -> None:
        """The exclusive part: weight exactly 1 and no other window, so the blend is the window's own logits."""
        own = (slice(a - window.row, b - window.row), slice(c - window.col, d - window.col))
        band = (slice(a - self.top, b - self.top), slice(c - self.x0, d - self.x0))
        if self._direct_logits is not None:
            self._direct_logits[(slice(None), *band)] = 0.0 if logits is None else logits[(slice(None), *own)]
        if logits is None:
            self._direct[band] = NODATA
            if self._direct_conf is not None:
                self._direct_conf[band] = CONFIDENCE_NODATA
            return
        part, invalid = logits[(slice(None), *own)], ~valid[own]
        fill_where(first_argmax(part, out=self._direct[band], scratch=self._argmax), invalid, NODATA)
        if self._direct_conf is not None:
            conf = confidence(part)
            fill_where(conf, invalid, CONFIDENCE_NODATA)
            self._direct_conf[band] = conf

    def end(self, index: int) -> tuple[Partial | None, FinishedRows | None]:
        """Close window row ``index``: (head or None, its final rows or None). The carry moves on."""
        top = max(self.top, 0)  # the row's image rows: windows of an edge margin reach past the image
        bottom = min(self.top + self.win_h, self.height)
        if self.carry is not None:  # the rows above, added last: carry + row partial, a sum of two terms
            n = self.carry.rows
            if self.carry.top != top or n > bottom - top:
                raise CdkdValueError(f"carry rows {self.carry.top}..{self.carry.bottom} do not start row {top}")
            rows = slice(top - self.top, top - self.top + n)
            self._sum[:, rows] += self.carry.logit_sum
            self._w[rows] += self.carry.weight_sum
            self._valid[rows] |= self.carry.valid
        start = top
        head = None
        if self.head:
            head_stop = self._rows[0] if self._rows[0] > top else top
            head, start, self.head = self._partial(top, head_stop), head_stop, False
        stop = self.row_tops[index + 1] if index + 1 < len(self.row_tops) else self.height
        stop = max(min(stop, bottom), start)
        finished = self._finish(start, stop) if start < stop else None
        self.carry = self._partial(stop, bottom) if stop < bottom else None
        return head, finished

    def _partial(self, a: int, b: int) -> Partial | None:
        if a >= b:
            return None
        rows, copy = slice(a - self.top, b - self.top), self._arrays.copy
        return Partial(a, copy(self._sum[:, rows]), copy(self._w[rows]), copy(self._valid[rows]))

    def _finish(self, a: int, b: int) -> FinishedRows:
        """Final rows ``[a, b)``: the exclusive parts are done; reduce the sums everywhere else."""
        e0, e1 = self._rows
        m0, m1 = max(a, e0), min(b, e1)  # rows where exclusive parts exist
        regions = []
        if m0 >= m1:
            regions.append((a, b, self.x0, self.x1))
        else:
            regions += [(a, m0, self.x0, self.x1), (m1, b, self.x0, self.x1)]
            regions += [(m0, m1, c, d) for c, d in self._shared_cols]
        rows = slice(a - self.top, b - self.top)
        if self.output == "logits":
            assert self._direct_logits is not None  # kept whenever the output is logits
            out = (
                self._arrays.copy(self._direct_logits[:, rows])
                if m0 < m1
                else self._arrays.zeros((self.num_classes, b - a, self.x1 - self.x0), "float32")
            )
            for r0, r1, c0, c1 in regions:
                if r0 < r1 and c0 < c1:
                    band = (slice(r0 - self.top, r1 - self.top), slice(c0 - self.x0, c1 - self.x0))
                    out[(slice(None), slice(r0 - a, r1 - a), band[1])] = blended(
                        self._sum[(slice(None), *band)], self._w[band]
                    )
            return FinishedRows(a, None, logits=out)
        if self.backend == "triton":
            from cdkd.inference import blend_triton

            assert self._shared_mask is not None  # built with the triton backend
            done = (m0 - self.top, m1 - self.top)
            blend_triton.reduce_rows(self._buffers, self._shared_mask, (a - self.top, b - self.top), done)
        else:
            for r0, r1, c0, c1 in regions:
                if r0 < r1 and c0 < c1:
                    self._reduce(r0, r1, c0, c1)
        classes, ready = self._arrays.host(self._direct[rows])
        conf = self._arrays.host(self._direct_conf[rows])[0] if self._direct_conf is not None else None
        if ready is not None and conf is not None:  # one event after both copies
            ready.record(torch.cuda.current_stream(self.device))
        return FinishedRows(a, classes, conf, ready=ready)

    def _reduce(self, r0: int, r1: int, c0: int, c1: int) -> None:
        """Class ids (and confidence) of a region from its sums, into the row's output."""
        band = (slice(r0 - self.top, r1 - self.top), slice(c0 - self.x0, c1 - self.x0))
        sums = self._sum[(slice(None), *band)]
        invalid = ~self._valid[band]
        # the argmax of the sums: dividing all by one positive weight keeps the order
        fill_where(first_argmax(sums, out=self._direct[band], scratch=self._argmax), invalid, NODATA)
        if self._direct_conf is not None:
            conf = confidence(blended(sums, self._w[band]))
            fill_where(conf, invalid, CONFIDENCE_NODATA)
            self._direct_conf[band] = conf


def merge_seam(tail: Partial, head: Partial, probs: bool = False) -> FinishedRows:
    """The rows two blocks share: the upper block's tail (its carry) plus the lower block's head, reduced.

    ``tail + head`` is the canonical order's last step for these rows (the carry first, then the row partial)."""
    if (tail.top, tail.rows) != (head.top, head.rows):
        raise CdkdValueError(f"seam rows differ: tail {tail.top}..{tail.bottom}, head {head.top}..{head.bottom}")
    sums = tail.logit_sum + head.logit_sum
    weights = tail.weight_sum + head.weight_sum
    valid = tail.valid | head.valid
    classes = first_argmax(sums)
    fill_where(classes, ~valid, NODATA)
    conf = None
    if probs:
        c = confidence(blended(sums, weights))
        fill_where(c, ~valid, CONFIDENCE_NODATA)
        conf = to_numpy(c)
    return FinishedRows(tail.top, to_numpy(classes), conf)
