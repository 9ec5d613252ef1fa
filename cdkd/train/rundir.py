"""A run folder: its file layout, the never-overwrite rule, JSON-lines metrics and checkpoint discovery.

Shared by every long job (``distill``, ``finetune``): each writes ``config.yaml``, ``metrics.jsonl``,
``report.json``, ``checkpoints/`` and one artifact (``student.pt``, ``segmenter.pt``) into its folder, and
``curves.png`` (``cdkd.train.curves``) at each checkpoint and at the end; ``tensorboard/`` with ``--tensorboard``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Set
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cdkd.errors import CheckpointError, ConfigError, OutputExistsError
from cdkd.train.checkpoint import list_checkpoints, load_checkpoint
from cdkd.train.history import finite, read_metrics
from cdkd.utils.atomic import atomic_write_text
from cdkd.utils.paths import check_writable
from cdkd.utils.runlock import RunLock, holder, in_use_error


@dataclass(frozen=True)
class RunDir:
    root: Path
    artifact_name: str  # e.g. "student.pt"
    kind: str = "run"  # for messages: "distillation run"

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
        return [self.artifact, self.config, self.metrics, self.report, self.checkpoints, self.curves, self.tensorboard]

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
                    raise CheckpointError(
                        f"{self.root}: nothing to resume (no checkpoint in {self.checkpoints}); "
                        "pass --overwrite (not --resume) to start again"
                    )
                raise CheckpointError(f"{self.root}: nothing to resume (no {self.kind} there); run without --resume")
            return load_checkpoint(ckpts[-1], checkpoint_format)
        if existing and not overwrite:
            hint = (
                "pass --resume to continue it or --overwrite to start again"
                if ckpts
                else "pass --overwrite to start again"
            )
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
    def session(self, fresh: bool, main: bool = True) -> Iterator[None]:
        """The run's time in its folder: the folder's lock is held (by the main process of a DDP job), a ``fresh``
        run starts from an empty folder, and a fresh run that ends before its first checkpoint (bad data found in
        the first batches, a Ctrl-C) leaves nothing behind: neither its files nor a folder it created, which would
        only stand in the way of the next run."""
        if not main:
            yield
            return
        created = not self.root.exists()
        lock = RunLock(self.root, self.root).acquire()
        try:
            if fresh:
                self.reset()
            yield
        except BaseException:
            if fresh and not list_checkpoints(self.checkpoints):
                self.reset()
                lock.release(remove=True)
                if created and not any(self.root.iterdir()):
                    self.root.rmdir()
            raise
        finally:
            lock.release(remove=True)

    def write_metrics(self, record: dict[str, Any]) -> None:
        """Append one row (with the wall-clock ``time`` it was written, which gives a run's elapsed time)."""
        self.root.mkdir(parents=True, exist_ok=True)
        record = {**record, "time": round(time.time(), 3)}
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

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

    def write_report(self, report: dict[str, Any]) -> None:
        """``report.json``; a value that is not a finite number is written as null, never as NaN (which is not
        JSON, and which a report should not claim as a result)."""
        atomic_write_text(self.report, json.dumps(finite(report), indent=2, allow_nan=False))


def check_identity(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    """A resumed run must read the same inputs as the interrupted one: the same data (by content, so a moved
    folder is still the same data), teacher, student, class file... ``saved``/``now`` map a name to a digest."""
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        diffs = "; ".join(f"{k}: {_short(saved.get(k))} then, {_short(now.get(k))} now" for k in changed[:3])
        raise CheckpointError(
            f"{where}: cannot resume: {', '.join(changed)} differ from what the interrupted run "
            f"read ({diffs}); give the run's own inputs, or pass --overwrite to start again"
        )


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 else text


# Settings any resumed training run may change: they do not alter the trajectory (steps and epochs only extend
# it). Each job adds its own (``cdkd.distill.trainer``, ``cdkd.finetune.trainer``).
RESUMABLE_TRAINING_KEYS = frozenset(
    {
        "train.steps",
        "train.epochs",
        "train.checkpoint_every",
        "train.log_every",
        "train.device",
        "train.tensorboard",
        "data.num_workers",
        "data.root",
    }
)


def check_resumable(saved: dict[str, Any], now: dict[str, Any], allowed: Set[str], where: Path) -> None:
    """A resumed run must use its own configuration, except for the dotted keys in ``allowed``."""
    a, b = _flatten(saved), _flatten(now)
    changed = sorted(k for k in a if k not in allowed and a[k] != b.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {a[k]!r} -> {b.get(k)!r}" for k in changed[:4])
        raise ConfigError(
            f"{where}: cannot resume with a different configuration ({diffs}); resume with the run's own config.yaml"
        )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
