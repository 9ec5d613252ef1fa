"""A run folder: its file layout, the never-overwrite rule, JSON-lines metrics and checkpoint discovery.

Shared by every long job (``distill``, ``finetune``): each writes ``config.yaml``, ``metrics.jsonl``,
``report.json``, ``checkpoints/`` and one artifact (``student.pt``, ``segmenter.pt``) into its folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdkd.errors import CheckpointError, ConfigError, OutputExistsError
from cdkd.utils.atomic import atomic_write_text
from cdkd.utils.checkpoint import list_checkpoints, load_checkpoint


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

    def _files(self) -> list[Path]:
        return [self.artifact, self.config, self.metrics, self.report, self.checkpoints]

    def check(self, resume: bool, overwrite: bool, checkpoint_format: str) -> dict[str, Any] | None:
        """Refuse to clobber an earlier run; for ``resume``, return the newest checkpoint. Writes nothing."""
        if resume:
            ckpts = list_checkpoints(self.checkpoints)
            if not ckpts:
                raise CheckpointError(f"{self.root}: nothing to resume (no checkpoint in {self.checkpoints})")
            return load_checkpoint(ckpts[-1], checkpoint_format)
        existing = [p.name for p in self._files() if p.exists()]
        if existing and not overwrite:
            raise OutputExistsError(f"{self.root}: already holds a {self.kind} ({', '.join(existing)}); "
                                    "pass --resume to continue it or --overwrite to start again")
        return None

    def reset(self) -> None:
        """Remove an earlier run's files (``--overwrite``); call once all checks passed.

        The folder itself is not created here but by the first file the run writes (``config.yaml``, through
        ``atomic_path``), so a run that fails while setting up (an unreadable SAM checkpoint, say) leaves no
        empty run folder behind.
        """
        for p in self._files():
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def write_metrics(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop metric lines written after the checkpoint, so each step is logged once."""
        if not self.metrics.exists():
            return
        lines = [ln for ln in self.metrics.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        atomic_write_text(self.metrics, "".join(ln + "\n" for ln in keep))

    def write_report(self, report: dict[str, Any]) -> None:
        atomic_write_text(self.report, json.dumps(report, indent=2))


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
