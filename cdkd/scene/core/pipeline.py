"""The engine's front half as stages: read + normalise (background threads) -> model -> blend on the device.

``model_outputs`` runs the model over a range of window rows of the plan, ``blend_rows`` blends its outputs into
finished rows (``rowblend.PlanBlender``):

- reads run ahead of the model in ``read_threads`` threads (``TilePrefetcher``: each thread its own GDAL handle,
  results in plan order, at most ``depth`` tiles ahead, so memory stays bounded);
- tiles are batched across row boundaries (a GPU gets full batches even when a row's tile count is not a multiple
  of the batch size), windows without a valid pixel are skipped;
- the model's output stays on the runtime's device (``Runtime.forward``) and is blended there.

Every stage adds its busy time to a ``StageTimes``, so a run reports where its time went.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from cdkd.inference.blend import neighbours, window_weights
from cdkd.inference.rowblend import FinishedRows, Partial, PlanBlender
from cdkd.inference.tiler import TileWindow, pad_to_tile

Reader = Callable[[TileWindow], "tuple[np.ndarray, np.ndarray]"]  # window -> (x (C, h, w) float32, valid (h, w))


@dataclass
class StageTimes:
    """Seconds each stage was busy. Reads run in threads, so ``read`` can exceed the wall time; ``wait_read`` is
    the time the model stage sat idle waiting for tiles (0 when reading keeps up). On CUDA the model and blend
    kernels run asynchronously: their split is approximate, their sum is not."""

    read: float = 0.0
    wait_read: float = 0.0
    model: float = 0.0
    blend: float = 0.0
    write: float = 0.0
    finish: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            setattr(self, stage, getattr(self, stage) + seconds)

    def to_dict(self) -> dict[str, float]:
        return {f.name: round(getattr(self, f.name), 3) for f in fields(self) if not f.name.startswith("_")}


@dataclass(frozen=True)
class Tile:
    """One read window: ``x`` (C, T, T) float32 normalised and padded to the tile, or None when no pixel is valid;
    ``valid`` (h, w) bool. Numpy arrays, or pinned torch tensors when the prefetcher stages them for a GPU."""

    row: int  # index of its window row in the plan
    last_in_row: bool
    window: TileWindow
    x: Any
    valid: Any


class TilePrefetcher:
    """Reads windows in ``threads`` background threads, handing them out in order, at most ``depth`` ahead.

    ``threads=0`` reads in the calling thread (a plain, sequential reference). ``stage_on`` a CUDA device: the
    reader threads also copy each tile into pinned memory, and ``stack`` assembles batches on that device with
    asynchronous copies, so the thread that feeds the GPU copies no pixels itself (two 100 MB host copies per batch
    of eight 1024 px tiles cost that thread more than the GPU's time for the batch).
    """

    def __init__(
        self,
        read: Reader,
        tile: int,
        pad_mode: str,
        threads: int,
        depth: int,
        times: StageTimes,
        stage_on: str | torch.device | None = None,
    ) -> None:
        self.read, self.tile, self.pad_mode, self.depth, self.times = read, tile, pad_mode, max(1, depth), times
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cdkd-read") if threads > 0 else None
        device = torch.device(stage_on) if stage_on is not None else None
        self.stage_on = device if device is not None and device.type == "cuda" else None
        self._batch: np.ndarray | None = None

    def stack(self, xs: Sequence[Any]) -> Any:
        """A batch of tiles: numpy on the host (in one buffer reused from batch to batch: a fresh 50-100 MB array
        costs more in page faults than the copy itself; the model is done with a batch when ``forward`` returns),
        or a tensor on ``stage_on``."""
        if self.stage_on is None:
            shape = (len(xs), *xs[0].shape)
            if (
                self._batch is None
                or self._batch.shape[1:] != shape[1:]
                or len(self._batch) < len(xs)
                or self._batch.dtype != xs[0].dtype
            ):
                self._batch = np.empty(shape, xs[0].dtype)
            return np.stack(xs, out=self._batch[: len(xs)])
        batch = torch.empty((len(xs), *xs[0].shape), dtype=xs[0].dtype, device=self.stage_on)
        for i, x in enumerate(xs):
            batch[i].copy_(x, non_blocking=True)
        return batch

    def _load(self, row: int, last: bool, window: TileWindow) -> Tile:
        start = time.perf_counter()
        x: np.ndarray | torch.Tensor | None
        valid: np.ndarray | torch.Tensor
        x, valid = self.read(window)
        if not valid.any():
            x = None
        elif x.shape[1:] != (self.tile, self.tile):
            x, _ = pad_to_tile(x, self.tile, mode=self.pad_mode)
        if self.stage_on is not None:
            x = None if x is None else torch.from_numpy(x).pin_memory()
            valid = torch.from_numpy(valid).pin_memory()
        self.times.add("read", time.perf_counter() - start)
        return Tile(row, last, window, x, valid)

    def map(self, items: Iterable[tuple[int, bool, TileWindow]]) -> Iterator[Tile]:
        if self._pool is None:
            for item in items:
                yield self._load(*item)
            return
        ahead: deque[Future] = deque()
        items = iter(items)
        try:
            for item in items:
                ahead.append(self._pool.submit(self._load, *item))
                if len(ahead) >= self.depth:
                    yield self._wait(ahead.popleft())
            while ahead:
                yield self._wait(ahead.popleft())
        finally:
            for f in ahead:
                f.cancel()

    def _wait(self, future: Future) -> Tile:
        start = time.perf_counter()
        tile = future.result()
        self.times.add("wait_read", time.perf_counter() - start)
        return tile

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def reader_threads(requested: int | None, device: str | torch.device) -> int:
    """Reader threads: as asked, else 2 beside a model on the CPU (it needs the cores) and up to 6 feeding a GPU
    (decoding and normalising a 1024 px RGB tile takes ~25 ms: two threads feed at most ~80 tiles/s)."""
    if requested is not None:
        return requested
    if torch.device(device).type == "cpu":
        return 2
    return max(2, min(6, (os.cpu_count() or 2) - 2))


def prefetcher_for(
    read: Reader, tile: int, options: Any, device: str | torch.device, times: StageTimes, stage: bool = False
) -> TilePrefetcher:
    """The prefetcher of a run with ``options`` (``pad_mode``, ``read_threads``, ``batch_size``): enough tiles in
    flight to fill two batches while every thread reads; ``stage``: batches assembled on ``device`` (for a
    runtime whose ``forward`` takes tensors there, ``Runtime.takes_tensors``)."""
    threads = reader_threads(options.read_threads, device)
    return TilePrefetcher(
        read,
        tile,
        options.pad_mode,
        threads,
        depth=2 * options.batch_size + threads,
        times=times,
        stage_on=device if stage else None,
    )


class WeightCache:
    """``window_weights`` as tensors on the device: a plan has at most nine distinct ones (first, middle and last
    window along each axis), so each is built once."""

    def __init__(self, height: int, width: int, overlap: int, device: torch.device, margin: int = 0) -> None:
        self.height, self.width, self.overlap, self.device, self.margin = height, width, overlap, device, margin
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, w: TileWindow) -> torch.Tensor:
        key = (
            *neighbours(w.row, w.height, self.height, self.margin),
            w.height,
            *neighbours(w.col, w.width, self.width, self.margin),
            w.width,
        )
        if key not in self._cache:
            weights = window_weights(w, self.height, self.width, self.overlap, margin=self.margin)
            self._cache[key] = torch.from_numpy(weights).to(self.device)
        return self._cache[key]


@dataclass
class RowCounts:
    """Windows run through the model and windows skipped (no valid pixel)."""

    run: int = 0
    skipped: int = 0


def model_outputs(
    rows: Sequence[Sequence[TileWindow]],
    start: int,
    stop: int,
    prefetcher: TilePrefetcher,
    forward: Callable[[np.ndarray], Any],
    batch_size: int,
    times: StageTimes,
    counts: RowCounts,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[Tile, Any]]:
    """``(tile, model output or None)`` for every window of rows ``start..stop-1``, in plan order.

    Tiles are batched across row boundaries (a skipped tile, without a valid pixel, gets None and never reaches
    the model); each tile is handed out as soon as it and every tile before it are done. ``forward`` maps a
    (B, C, T, T) float32 batch to B outputs (a tensor or a list). ``should_stop`` is polled between batches; when
    it turns true the generator returns early, having handed out a prefix of the plan.
    """
    items = ((i, j == len(rows[i]) - 1, w) for i in range(start, stop) for j, w in enumerate(rows[i]))
    events: deque[list[Any]] = deque()  # [tile, output or None], in plan order
    pending: list[list[Any]] = []  # events waiting for the model

    def run_pending() -> None:
        if not pending:
            return
        t0 = time.perf_counter()
        outputs = forward(prefetcher.stack([ev[0].x for ev in pending]))
        times.add("model", time.perf_counter() - t0)
        for ev, out in zip(pending, outputs):
            ev[1] = out
        pending.clear()

    def drain() -> Iterator[tuple[Tile, Any]]:
        # Counted as handed out, not as run: a batch runs tiles of the next row too, and a checkpoint taken after
        # a row must count only the rows it holds (a resumed run runs the others again).
        while events and (events[0][0].x is None or events[0][1] is not None):
            tile, out = events.popleft()
            if out is None:
                counts.skipped += 1
            else:
                counts.run += 1
            yield tile, out

    for tile in prefetcher.map(items):
        event = [tile, None]
        events.append(event)
        if tile.x is not None:
            pending.append(event)
        if len(pending) >= batch_size:
            run_pending()
        yield from drain()
        if should_stop() and not pending:
            return
    run_pending()
    yield from drain()


def blend_rows(
    rows: Sequence[Sequence[TileWindow]],
    start: int,
    stop: int,
    prefetcher: TilePrefetcher,
    forward: Callable[[np.ndarray], torch.Tensor],
    blender: PlanBlender,
    weights: WeightCache,
    batch_size: int,
    times: StageTimes,
    counts: RowCounts,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[int, Partial | None, FinishedRows | None]]:
    """``(row index, head, finished rows)`` for window rows ``start..stop-1`` of ``rows``, in order (see
    ``PlanBlender.end``): ``model_outputs`` blended on ``blender.device`` (``forward`` returns logits there).

    A finished row is handed out before the next row starts: its results are final once it is yielded.
    """
    for tile, logits in model_outputs(rows, start, stop, prefetcher, forward, batch_size, times, counts, should_stop):
        t0 = time.perf_counter()
        w = tile.window
        if w.col == rows[tile.row][0].col:
            blender.begin(tile.row)
        if logits is None:
            blender.add(w, None, None, tile.valid)
        else:
            h, wd = w.shape  # crop the padding of scenes smaller than the tile
            blender.add(w, logits[:, :h, :wd], weights(w), tile.valid)
        out = blender.end(tile.row) if tile.last_in_row else None
        times.add("blend", time.perf_counter() - t0)
        if out is not None:
            yield (tile.row, *out)
