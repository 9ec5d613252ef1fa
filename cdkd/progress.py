"""Progress of long work, reported one way everywhere: a tqdm bar for people, JSON lines for programs.

Every long loop in cdkd (scene tiles, training steps, vectorisation strips, evaluation images) reports through
``progress_bar`` or ``track``; what the user sees depends on the progress format, chosen once per process:

- ``bar`` (default): tqdm's bar on stderr (rate and ETA);
- ``json``: one JSON object per line on stderr, for programs that run cdkd as a subprocess (the QGIS provider,
  schedulers, notebooks): they read the lines instead of scraping a terminal bar;
- ``none``: nothing.

The format comes from ``set_progress_format`` (``cdkd --progress-format json ...``) or the environment variable
``CDKD_PROGRESS``; being an environment variable, it reaches child processes (torchrun ranks, dask workers on
this machine) too.

JSON events, each a line ``{"event": NAME, ...}`` on stderr (``emit``):

- ``start``: ``command``, ``argv``, ``cdkd_version``, ``pid`` (the CLI, before the command runs);
- ``progress``: ``desc`` (what is counted: the scene's file name, ``distill``, ``vectorize``...), ``done``,
  ``total``, ``unit`` (``tile``, ``step``, ``strip``, ``image``), ``fraction`` (0..1 or null without a total),
  and the bar's postfix fields (``loss``, ...) as numbers where they are numbers. At most one every
  ``JSON_INTERVAL`` seconds per bar, plus the first and the last;
- ``finish``: ``outputs``, the files the command wrote (the CLI, after success);
- ``error``: ``message`` (the same one line as ``Error: ...``), ``exit_code``;
- ``interrupted``: ``resumable``, ``message`` (Ctrl-C or SIGINT; a checkpoint was saved where the command
  has ``--resume``).

Lines that are not JSON (warnings, ``Error: ...``) can still appear on stderr; readers skip them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

from cdkd.errors import CdkdValueError

ENV = "CDKD_PROGRESS"
FORMATS = ("bar", "json", "none")
JSON_INTERVAL = 0.5  # seconds between progress lines of one bar: enough for a progress bar, little to parse

T = TypeVar("T")
_command = {"finished": False}  # one command per process (or per CliRunner call, which starts it afresh)


def progress_format() -> str:
    """The current format: ``CDKD_PROGRESS`` (``bar`` when unset)."""
    value = os.environ.get(ENV, "").strip().lower() or "bar"
    if value not in FORMATS:
        raise CdkdValueError(f"{ENV}={value!r} is not a progress format; choose one of {', '.join(FORMATS)}")
    return value


def set_progress_format(fmt: str) -> None:
    """Choose ``bar``, ``json`` or ``none`` for this process and the processes it starts."""
    if fmt not in FORMATS:
        raise CdkdValueError(f"unknown progress format {fmt!r}; choose one of {', '.join(FORMATS)}")
    os.environ[ENV] = fmt


def emit(event: str, **fields: Any) -> None:
    """Write the event as one JSON line on stderr when the format is ``json``; otherwise do nothing."""
    if progress_format() != "json":
        return
    record = {"event": event, **{k: _json_value(v) for k, v in fields.items()}}
    print(json.dumps(record, default=str), file=sys.stderr, flush=True)


def command_started(command: str | None, **fields: Any) -> None:
    """The ``start`` event of a command (the CLI calls it once per command, before the command runs)."""
    _command["finished"] = False
    emit("start", command=command, **fields)


def finish(outputs: Iterable[Any]) -> None:
    """The ``finish`` event: the command succeeded and wrote ``outputs`` (paths; None entries are dropped)."""
    _command["finished"] = True
    emit("finish", outputs=[str(p) for p in outputs if p is not None])


def finished() -> bool:
    """Whether the current command has sent its ``finish`` event."""
    return _command["finished"]


class Progress:
    """A progress report over a known (or unknown) number of units. This base reports nothing."""

    def update(self, n: int = 1) -> None:
        """``n`` more units are done."""

    def set_postfix(self, **fields: Any) -> None:
        """Figures to show beside the count (tqdm's ``set_postfix``): ``loss="0.123"``, ``img_s=12.5``."""

    def close(self) -> None:
        """The work stopped (done or not); the last state is reported."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Bar(Progress):
    """tqdm's bar on stderr."""

    def __init__(self, total: int | None, initial: int, desc: str, unit: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **fields: Any) -> None:
        self.bar.set_postfix(**fields)

    def close(self) -> None:
        self.bar.close()


class _JsonLines(Progress):
    """``progress`` events on stderr, throttled to one per ``JSON_INTERVAL`` seconds (and the first and last).

    A bar whose figures are set after each update (the trainers: ``update(1)``, then ``set_postfix(loss=...)``)
    reports from ``set_postfix``, so an event carries the figures of the step it counts.
    """

    def __init__(self, total: int | None, initial: int, desc: str, unit: str) -> None:
        self.total, self.done, self.desc, self.unit = total, initial, desc, unit
        self.fields: dict[str, Any] = {}
        self.last = -float("inf")
        self.reported: int | None = None
        self.pending = self.closed = False
        self._report()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.fields:
            self.pending = True  # the figures of this update come next
        else:
            self._report_when_due()

    def set_postfix(self, **fields: Any) -> None:
        self.fields = {k: _number(v) for k, v in fields.items()}
        if self.pending:
            self.pending = False
            self._report_when_due()

    def close(self) -> None:
        if not self.closed and self.reported != self.done:
            self._report()
        self.closed = True

    def _report_when_due(self) -> None:
        if time.monotonic() - self.last >= JSON_INTERVAL or (self.total is not None and self.done >= self.total):
            self._report()

    def _report(self) -> None:
        fraction = None if not self.total else min(self.done / self.total, 1.0)
        emit(
            "progress",
            desc=self.desc,
            done=self.done,
            total=self.total,
            unit=self.unit,
            fraction=fraction,
            **self.fields,
        )
        self.last, self.reported = time.monotonic(), self.done


def progress_bar(total: int | None, *, desc: str, unit: str, initial: int = 0, enabled: bool = True) -> Progress:
    """A progress report of ``total`` ``unit``s (``initial`` already done, e.g. by a resumed run), shown as the
    current format says; ``enabled=False`` (``--no-progress``) reports nothing whatever the format."""
    fmt = progress_format()
    if not enabled or fmt == "none":
        return Progress()
    if fmt == "json":
        return _JsonLines(total, initial, desc, unit)
    return _Bar(total, initial, desc, unit)


def track(items: Iterable[T], *, desc: str, unit: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items``, reporting each one done (tqdm's ``tqdm(iterable)``); ``total`` defaults to ``len``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(total, desc=desc, unit=unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)


def _number(value: Any) -> Any:
    """A postfix value as a number where it reads as one (bars get ``f"{loss:.3f}"``, programs want 0.123)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _json_value(value: Any) -> Any:
    """NaN and infinities as null: JSON has neither, and a diverged loss must not break the reader."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


__all__ = [
    "ENV",
    "FORMATS",
    "Progress",
    "command_started",
    "emit",
    "finish",
    "finished",
    "progress_bar",
    "progress_format",
    "set_progress_format",
    "track",
]
