"""Global sample numbers for step-based, resumable, multi-process training.

Micro-step ``m`` of a run with ``world_size`` ranks of ``batch_size`` samples covers the global sample numbers
``m * world_size * batch_size + [0, world_size * batch_size)``; rank ``r`` takes its contiguous slice of
``batch_size``. Because ``UnlabeledTiles`` makes an item a pure function of its sample number, one process with
batch ``2B`` sees exactly the samples of two ranks with batch ``B``, and a run resumed at micro-step ``m``
continues the very stream it left.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator, TypeVar

from torch.utils.data import Sampler

from cdkd.errors import CdkdError, CdkdValueError

T = TypeVar("T")


class StepSampler(Sampler[int]):
    """Yields this rank's global sample numbers, micro-step after micro-step.

    Args:
        batch_size: samples per rank per micro-step (the DataLoader's batch size).
        world_size: number of ranks (processes) training together.
        rank: this process's rank, 0 <= rank < world_size.
        start_micro_step: first micro-step to yield (resume point).
        num_micro_steps: total micro-steps of the run counted from 0, so micro-steps
            ``start_micro_step .. num_micro_steps - 1`` are yielded; None = never stop.
    """

    def __init__(
        self,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        start_micro_step: int = 0,
        num_micro_steps: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise CdkdValueError(f"batch size must be at least 1, got {batch_size}")
        if world_size < 1:
            raise CdkdValueError(f"world size must be at least 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise CdkdValueError(f"rank {rank} is outside 0..{world_size - 1} (world size {world_size})")
        if start_micro_step < 0:
            raise CdkdValueError(f"start micro-step must be >= 0, got {start_micro_step}")
        if num_micro_steps is not None and num_micro_steps < 0:
            raise CdkdValueError(f"number of micro-steps must be >= 0, got {num_micro_steps}")
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.start_micro_step = int(start_micro_step)
        self.num_micro_steps = None if num_micro_steps is None else int(num_micro_steps)

    def _micro_steps(self) -> Iterator[int]:
        if self.num_micro_steps is None:
            return itertools.count(self.start_micro_step)
        return iter(range(self.start_micro_step, self.num_micro_steps))

    def __iter__(self) -> Iterator[int]:
        per_step = self.world_size * self.batch_size
        for m in self._micro_steps():
            first = m * per_step + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        if self.num_micro_steps is None:
            # DataLoader calls len() only for progress/bookkeeping; an infinite stream has none to give
            raise TypeError("StepSampler with num_micro_steps=None is infinite and has no length")
        return max(0, self.num_micro_steps - self.start_micro_step) * self.batch_size


def batches(loader: Iterable[T]) -> Iterator[T]:
    """``loader``'s batches; a cdkd error raised in a DataLoader worker process comes back as the same one-line
    error it was there (torch re-raises it with the worker's whole traceback folded into the message)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except CdkdError as e:
            raise type(e)(worker_message(str(e))) from None
        yield batch


def worker_message(text: str) -> str:
    """The original message of an exception torch re-raised from a worker ("Caught DataError in DataLoader worker
    process 0.\\nOriginal Traceback ... \\ncdkd.errors.DataError: <message>"); other text unchanged."""
    if not text.startswith("Caught ") or "Traceback" not in text:
        return text
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    head, sep, message = last.partition(": ")
    return message if sep and " " not in head else last
