"""TensorBoard event files of a training run (``--tensorboard``, ``train.tensorboard``): each ``metrics.jsonl``
row as scalars, tagged ``<panel>/<column>`` by the panels of ``curves.png``, and events as text.

Events go to ``RUN/tensorboard/``. A resumed session writes a new event file into the same folder, opened with
``purge_step`` = the first step it logs: TensorBoard then drops what the interrupted session logged after its
last checkpoint (those steps run again), so every step appears once. A session that finds no event files yet (the
run's first, or the first with ``--tensorboard``) writes the rows already in ``metrics.jsonl`` first.

Needs the ``tensorboard`` package (``pip install tensorboard``); torch's ``SummaryWriter`` writes the files.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from cdkd.errors import CdkdValueError
from cdkd.train.curves import panel_of
from cdkd.train.history import is_number, read_metrics

NOT_SCALARS = ("step", "time")


def require_tensorboard() -> None:
    """Raise a one-line error naming the package when ``tensorboard`` is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise CdkdValueError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or pip install 'cdkd[tensorboard]')"
        )


def has_events(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("events.out.tfevents.*"))


class TensorBoardLog:
    """The TensorBoard writer of one training session, resuming at step ``start`` (0: a fresh run)."""

    def __init__(self, folder: str | Path, start: int, metrics: str | Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(folder)
        earlier = has_events(folder)
        # Rows are logged at step done = step + 1, so a session resumed at `start` logs from start + 1 on.
        self.writer = SummaryWriter(str(folder), purge_step=start + 1 if earlier and start else None)
        if not earlier:
            for row in read_metrics(Path(metrics)):
                if is_number(row.get("step")) and row["step"] <= start:
                    self.write(row)

    def write(self, row: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` row: its numbers as scalars at its step (an event row as text)."""
        step, walltime = int(row["step"]), row.get("time")
        if "event" in row:
            text = json.dumps({k: v for k, v in row.items() if k not in ("step", "time")})
            self.writer.add_text(f"events/{row['event']}", text, step, walltime=walltime)
            return
        for key, value in row.items():
            if key not in NOT_SCALARS and is_number(value):
                self.writer.add_scalar(f"{panel_of(key).name}/{key}", value, step, walltime=walltime)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
