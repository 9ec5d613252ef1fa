"""A training run's history as ``metrics.jsonl`` holds it: step rows and events, read from a file that may be
unfinished (one row, or a last line cut in half by a killed process).

Rows are what ``cdkd.train.rundir.RunDir.write_metrics`` writes: ``{"step": n, "lr": ..., "loss": ..., <terms>,
"images_per_s": ..., "time": <unix seconds>}``; an event (a stage change of mask-cdkd's schedule, rs4d's
reference loss) is a row with an ``"event"`` key, written at the step it happened.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

# Events drawn as vertical lines, and the label each gets (mask-cdkd logs a stage change, rs4d the step its
# reference loss was fixed; rs4d's frequent "ratios" events are visible as the corruption curve itself).
MARKED_EVENTS = ("stage", "reference")
RECENT_ROWS = 20  # throughput: median of the newest rows (the first steps also time warm-up and data loading)
PAUSE_FACTOR, PAUSE_SLACK_S = 5.0, 120.0  # elapsed: a gap this much longer than usual is a pause between sessions


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class History:
    rows: tuple[dict[str, Any], ...]  # step rows by step, each step once (the last one written wins)
    events: tuple[dict[str, Any], ...]  # event rows in the order written

    @classmethod
    def read(cls, path: str | Path) -> History:
        """The history in ``path`` (empty when it does not exist)."""
        rows: dict[int, dict[str, Any]] = {}
        events = []
        for row in read_metrics(Path(path)):
            step: Any = row.get("step")
            if not is_number(step):
                continue
            if "event" in row:
                events.append(row)
            else:
                rows[int(step)] = row
        return cls(tuple(rows[s] for s in sorted(rows)), tuple(events))

    @property
    def step(self) -> int:
        """The newest step logged (0 before the first)."""
        return int(self.rows[-1]["step"]) if self.rows else 0

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    @cached_property
    def table(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every column that holds a number in some row (in the order first seen): (steps, values) of the rows
        where it is a finite number, float64. One pass over the rows: 10k rows must stay cheap to draw."""
        cols: dict[str, tuple[list, list]] = {}
        for row in self.rows:
            step = row["step"]
            for key, value in row.items():
                if type(value) in (float, int) and math.isfinite(value):
                    xs, ys = cols.setdefault(key, ([], []))
                    xs.append(step)
                    ys.append(value)
        return {k: (np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)) for k, (xs, ys) in cols.items()}

    def columns(self) -> list[str]:
        """Every column that holds a number in some row, in the order first seen."""
        return list(self.table)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of column ``key``: the rows where it is a finite number, float64."""
        return self.table.get(key, (np.zeros(0), np.zeros(0)))

    def marks(self) -> list[tuple[int, str]]:
        """(step, label) of the events drawn as vertical lines: a stage change is labelled by the new stage."""
        return [
            (int(e["step"]), str(e.get("stage", e["event"])) if e["event"] == "stage" else str(e["event"]))
            for e in self.events
            if e["event"] in MARKED_EVENTS
        ]

    def images_per_s(self) -> float | None:
        """The median throughput of the newest rows."""
        _, values = self.series("images_per_s")
        return float(np.median(values[-RECENT_ROWS:])) if len(values) else None

    def elapsed(self) -> float | None:
        """Seconds of training so far, from the rows' ``time``: the sum of the gaps between rows, where a gap much
        longer than the run's usual seconds per step (the run was stopped and later resumed) counts as the usual
        time for its steps. None before two rows carry a time (runs logged before rows had one)."""
        pairs = [(row["step"], row["time"]) for row in self.rows if is_number(row.get("time"))]
        if len(pairs) < 2:
            return None  # one row: no rate to tell how long its steps took
        steps, times = (np.asarray(v, dtype=np.float64) for v in zip(*pairs))
        d_step, d_time = np.diff(steps), np.diff(times)
        per_step = float(np.median(d_time / np.maximum(d_step, 1)))
        usual = np.maximum(d_step, 1) * max(per_step, 0.0)
        pause = d_time > PAUSE_FACTOR * usual + PAUSE_SLACK_S
        gaps = np.where(pause, usual, np.maximum(d_time, 0.0))
        # the first row's own step(s) took time too: count them at the usual rate
        return float(gaps.sum() + steps[0] * max(per_step, 0.0))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (none when it does not exist). A line that is not a JSON object is left
    out: the last line of a run killed while writing it."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
