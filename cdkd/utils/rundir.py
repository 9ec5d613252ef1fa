"""A run folder: its file layout, the never-overwrite rule, JSON-lines metrics and checkpoint discovery.

Shared by every long job (``distill``, ``finetune``): each writes ``config.yaml``, ``metrics.jsonl``,
``report.json``, ``checkpoints/`` and one artifact (``student.pt``, ``segmenter.pt``) into its folder, and
``curves.png`` (``cdkd.train.curves``) at each checkpoint and at the end; ``tensorboard/`` with ``--tensorboard``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cdkd.errors import CheckpointError, ConfigError, OutputExistsError
from cdkd.utils.atomic import atomic_write_text
from cdkd.utils.checkpoint import list_checkpoints, load_checkpoint
from cdkd.utils.paths import check_writable
from cdkd.utils.runlock import RunLock, holder, in_use_error


@dataclass(frozen=True)
class RunDir:
    root: Path
    artifact_name: str  # e.g. "student.pt"
    kind: str = "run"  # for messages: "distillation run"
    # What a session keeps open while it lasts (its total steps, the TensorBoard writer); not part of the value.
    _live: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def artifact(self) -> Path:
        return self.root / self.artifact_name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def _files(self) -> list[Path]:
        return [self.artifact, self.config, self.metrics, self.report, self.checkpoints, self.curves,
                self.tensorboard]

    def check(self, resume: bool, overwrite: bool, checkpoint_format: str) -> dict[str, Any] | None:
        """Refuse a folder another live run holds, one that cannot be written, or an earlier run's (unless
        ``overwrite``); for ``resume``, return the newest checkpoint. Writes nothing. Each refusal offers what the
        next command will accept."""
        live = holder(self.root)
        if live is not None:
            raise in_use_error(self.root, live, self.root)
        check_writable(self.root, f"{self.root}: cannot write the {self.kind}")
        existing = [p.name for p in self._files() if p.exists()]
        ckpts = list_checkpoints(self.checkpoints)
        if resume:
            if not ckpts:
                if existing:
                    raise CheckpointError(f"{self.root}: nothing to resume (no checkpoint in {self.checkpoints}); "
                                          "pass --overwrite (not --resume) to start again")
                raise CheckpointError(f"{self.root}: nothing to resume (no {self.kind} there); run without --resume")
            return load_checkpoint(ckpts[-1], checkpoint_format)
        if existing and not overwrite:
            hint = ("pass --resume to continue it or --overwrite to start again" if ckpts else
                    "pass --overwrite to start again")
            raise OutputExistsError(f"{self.root}: already holds a {self.kind} ({', '.join(existing)}); {hint}")
        return None

    def reset(self) -> None:
        """Remove an earlier run's files (``--overwrite``); call once all checks passed, holding the lock."""
        for p in self._files():
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    @contextmanager
    def session(self, fresh: bool, main: bool = True, *, start: int = 0, steps: int | None = None,
                tensorboard: bool = False) -> Iterator[None]:
        """The run's time in its folder: the folder's lock is held (by the main process of a DDP job), a ``fresh``
        run starts from an empty folder, and a fresh run that ends before its first checkpoint (bad data found in
        the first batches, a Ctrl-C) leaves nothing behind: neither its files nor a folder it created, which would
        only stand in the way of the next run.

        ``start``: the step the session resumes from; ``steps``: the run's total (for ``curves.png``);
        ``tensorboard``: every metrics row also goes to ``tensorboard/`` (``cdkd.train.tensorboard``)."""
        if not main:
            yield
            return
        created = not self.root.exists()
        lock = RunLock(self.root, self.root).acquire()
        try:
            if fresh:
                self.reset()
            self._live["steps"] = steps
            if tensorboard:
                from cdkd.train.tensorboard import TensorBoardLog  # here: tensorboard is optional

                self._live["tensorboard"] = TensorBoardLog(self.tensorboard, start, self.metrics)
            yield
        except BaseException:
            self._close_tensorboard()  # before its folder may be removed
            if fresh and not list_checkpoints(self.checkpoints):
                self.reset()
                lock.release(remove=True)
                if created and not any(self.root.iterdir()):
                    self.root.rmdir()
            raise
        finally:
            self._close_tensorboard()
            lock.release(remove=True)

    def _close_tensorboard(self) -> None:
        board = self._live.pop("tensorboard", None)
        if board is not None:
            board.close()

    def write_metrics(self, record: dict[str, Any]) -> None:
        """Append one row (with the wall-clock ``time`` it was written, which gives a run's elapsed time)."""
        self.root.mkdir(parents=True, exist_ok=True)
        record = {**record, "time": round(time.time(), 3)}
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        board = self._live.get("tensorboard")
        if board is not None:
            board.write(record)

    def last_metrics(self) -> dict[str, Any]:
        """The newest row of ``metrics.jsonl`` that logs a step's losses (``{}`` when there is none)."""
        for row in reversed(read_metrics(self.metrics)):
            if "loss" in row:
                return row
        return {}

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop metric lines written after the checkpoint, so each step is logged once (and a last
        line cut in half by a killed process)."""
        if not self.metrics.exists():
            return
        keep = [row for row in read_metrics(self.metrics) if row.get("step", 0) <= step]
        atomic_write_text(self.metrics, "".join(json.dumps(row) + "\n" for row in keep))

    def draw_curves(self) -> None:
        """``curves.png`` from the metrics so far (at each checkpoint and at the end; main process only). A
        picture that cannot be drawn is a warning: it must never end a training run."""
        from cdkd.train.summary import write_curves  # here: matplotlib is imported only to draw

        try:
            write_curves(self.root, total=self._live.get("steps"))
        except Exception as e:  # noqa: BLE001 (whatever went wrong, the run's own outputs come first)
            warnings.warn(f"{self.curves}: not drawn ({type(e).__name__}: {e})", stacklevel=2)
        board = self._live.get("tensorboard")
        if board is not None:
            board.flush()

    def write_report(self, report: dict[str, Any]) -> None:
        """``report.json``; a value that is not a finite number is written as null, never as NaN (which is not
        JSON, and which a report should not claim as a result). The final ``curves.png`` follows it."""
        atomic_write_text(self.report, json.dumps(finite(report), indent=2, allow_nan=False))
        self.draw_curves()


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


def check_identity(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    """A resumed run must read the same inputs as the interrupted one: the same data (by content, so a moved
    folder is still the same data), teacher, student, class file... ``saved``/``now`` map a name to a digest."""
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        diffs = "; ".join(f"{k}: {_short(saved.get(k))} then, {_short(now.get(k))} now" for k in changed[:3])
        raise CheckpointError(f"{where}: cannot resume: {', '.join(changed)} differ from what the interrupted run "
                              f"read ({diffs}); give the run's own inputs, or pass --overwrite to start again")


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 else text


def check_resumable(saved: dict[str, Any], now: dict[str, Any], allowed: set[str], where: Path) -> None:
    """A resumed run must use its own configuration, except for the dotted keys in ``allowed``."""
    a, b = _flatten(saved), _flatten(now)
    changed = sorted(k for k in a if k not in allowed and a[k] != b.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {a[k]!r} -> {b.get(k)!r}" for k in changed[:4])
        raise ConfigError(f"{where}: cannot resume with a different configuration ({diffs}); "
                          "resume with the run's own config.yaml")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
