"""The one training loop: distillation recipes and fine-tuning tasks both run on it.

A job supplies an ``Objective``, what it trains for one micro-batch at a time, and the loop does the rest, the
same for every job: ``grad_accum`` micro-batches per optimiser step under autocast (no gradient all-reduce but on
the last under DDP), the fp16 ``GradScaler``, gradient clipping over the trainable parameters, the optimiser and
LR-schedule steps, a ``metrics.jsonl`` row every ``log_every`` steps (and TensorBoard's, with
``train.tensorboard``), the progress bar, and a checkpoint every ``checkpoint_every`` steps and at the last one,
with ``curves.png`` redrawn beside it. ``run`` returns the last step's log.

An objective's micro-batch returns the loss to back-propagate and its parts: float32 tensors (loss terms, averaged
over the micro-batches in float32 and then over the ranks) or plain numbers (counts, averaged in float64); its
``end_step`` turns the averaged parts into the step's log.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch
import torch.nn as nn

from cdkd.config import TrainConfig
from cdkd.progress import progress_bar
from cdkd.train.checkpoint import save_checkpoint
from cdkd.train.distributed import DistContext
from cdkd.train.optim import autocast_dtype
from cdkd.train.rundir import RunDir

__all__ = ["Objective", "StepLog", "TrainLoop"]


@dataclass
class StepLog:
    """What one optimiser step logs: ``loss`` (its total), ``row`` (the fields of its ``metrics.jsonl`` row beside
    step, lr and images/s), ``shown`` (the progress bar's figures) and ``events`` (rows logged at once, with their
    message, e.g. a schedule's stage change)."""

    loss: float
    row: dict[str, Any]
    shown: dict[str, str] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


class Objective(Protocol):
    """What a job trains for (see the module docstring)."""

    def begin_step(self) -> None:
        """Before a step's micro-batches (a recipe reads its loss weights and knobs here)."""

    def micro(
        self, batch: Any, autocast: Callable[[], contextlib.AbstractContextManager]
    ) -> tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]:
        """The loss of one micro-batch (its forward under ``autocast()``) and its parts."""

    def end_step(self, parts: dict[str, torch.Tensor | float]) -> StepLog:
        """The step's log from its parts, averaged over micro-batches and ranks."""


class TrainLoop:
    """``train``'s loop over ``model`` (``net``: the same model, DDP-wrapped when ``ctx`` is) with ``optimizer`` and
    ``scheduler``; ``checkpoint(step)`` returns a checkpoint's payload; ``images_per_step`` counts every rank's."""

    def __init__(
        self,
        train: TrainConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
        paths: RunDir,
        checkpoint: Callable[[int], dict[str, Any]],
        checkpoint_format: str,
        *,
        net: nn.Module | None = None,
        ctx: DistContext | None = None,
        name: str = "train",
        progress: bool = True,
        log: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        self.train, self.model, self.net = train, model, net if net is not None else model
        self.optimizer, self.scheduler, self.device, self.paths = optimizer, scheduler, device, paths
        self.payload, self.format, self.name, self.progress, self.log = (
            checkpoint,
            checkpoint_format,
            name,
            progress,
            log,
        )
        self.ctx = ctx if ctx is not None else DistContext()
        self.amp_dtype = autocast_dtype(train.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.images_per_step = train.batch_size * train.grad_accum * self.ctx.world_size
        self.steps: int | None = None
        self._board: Any = None

    # ------------------------------------------------------------------------------------------------- the run

    def run(self, objective: Objective, batches: Iterator[Any], start: int, steps: int) -> StepLog | None:
        """Optimiser steps ``start .. steps - 1`` over ``batches``; the last step's log (None when none ran)."""
        cfg = self.train
        self.steps = steps
        bar = progress_bar(
            steps, initial=start, desc=self.name, unit="step", enabled=self.progress and self.ctx.is_main
        )
        last = None
        self.model.train()
        tick = time.perf_counter()
        with self._tensorboard(start):
            for step in range(start, steps):
                last = self.step(objective, batches)
                self.scheduler.step()
                now = time.perf_counter()
                speed = self.images_per_step / max(now - tick, 1e-9)
                tick = now
                done = step + 1
                for message, record in last.events:
                    self.log(message)
                    self.record({"step": done, **record})
                if done % cfg.log_every == 0 or done == steps:
                    self.record(
                        {"step": done, "lr": self.scheduler.get_last_lr()[0], **last.row, "images_per_s": speed}
                    )
                bar.update(1)
                bar.set_postfix(**last.shown, img_s=f"{speed:.1f}")
                if done % cfg.checkpoint_every == 0 or done == steps:
                    self.checkpoint(done)
        bar.close()
        return last

    def step(self, objective: Objective, batches: Iterator[Any]) -> StepLog:
        """One optimiser step over ``grad_accum`` micro-batches."""
        accum = self.train.grad_accum
        objective.begin_step()
        sums: dict[str, Any] = {}
        for micro in range(accum):
            # Skip the gradient all-reduce on all but the last micro-batch of the step.
            sync = (
                contextlib.nullcontext()
                if micro == accum - 1 or not hasattr(self.net, "no_sync")
                else self.net.no_sync()  # type: ignore[operator]  # DistributedDataParallel's context manager
            )
            with sync:
                loss, parts = objective.micro(next(batches), self.autocast)
                self.scaler.scale(loss / accum).backward()
            for key, value in parts.items():
                value = value.detach().float().cpu() / accum if isinstance(value, torch.Tensor) else value / accum
                sums[key] = sums[key] + value if key in sums else value
        if self.train.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.train.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return objective.end_step(self._over_ranks(sums))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for a micro-batch's forward (``train.amp`` on this device)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _over_ranks(self, sums: dict[str, Any]) -> dict[str, Any]:
        """Tensor parts averaged over the ranks in one all-reduce (every rank then steers by the same numbers)."""
        keys = [k for k, v in sums.items() if isinstance(v, torch.Tensor)]
        if not keys or not self.ctx.enabled:
            return sums
        mean = self.ctx.mean(torch.stack([sums[k] for k in keys]))
        return {**sums, **dict(zip(keys, mean.unbind(0)))}

    # ------------------------------------------------------------------------------------------- the record

    def record(self, row: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` row (main process), and TensorBoard's."""
        if not self.ctx.is_main:
            return
        self.paths.write_metrics(row)
        if self._board is not None:
            self._board.write(row)

    def checkpoint(self, step: int) -> None:
        """A checkpoint of ``step`` (main process), then ``curves.png`` redrawn."""
        if not self.ctx.is_main:
            return
        save_checkpoint(self.paths.checkpoints, step, self.payload(step), self.format)
        self.draw_curves()

    def draw_curves(self) -> None:
        """``curves.png`` from the metrics so far (main process only). A picture that cannot be drawn is a
        warning: it must never end a training run."""
        if not self.ctx.is_main:
            return
        from cdkd.train.summary import write_curves  # here: matplotlib is imported only to draw

        try:
            write_curves(self.paths.root, total=self.steps)
        except Exception as e:  # noqa: BLE001 (whatever went wrong, the run's own outputs come first)
            warnings.warn(f"{self.paths.curves}: not drawn ({type(e).__name__}: {e})", stacklevel=2)
        if self._board is not None:
            self._board.flush()

    def finish(self, report: dict[str, Any]) -> None:
        """``report.json`` and the final ``curves.png`` (main process)."""
        if not self.ctx.is_main:
            return
        self.paths.write_report(report)
        self.draw_curves()

    @contextlib.contextmanager
    def _tensorboard(self, start: int) -> Iterator[None]:
        """TensorBoard's writer for this session (``train.tensorboard``, main process), closed at its end."""
        if not (self.train.tensorboard and self.ctx.is_main):
            yield
            return
        from cdkd.train.tensorboard import TensorBoardLog  # here: tensorboard is optional

        self._board = TensorBoardLog(self.paths.tensorboard, start, self.paths.metrics)
        try:
            yield
        finally:
            self._board.close()
            self._board = None
