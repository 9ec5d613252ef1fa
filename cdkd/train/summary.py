"""What a training run folder says about itself, finished or not: its kind (distill or finetune), method, steps
done, last losses, stage, throughput, elapsed time, checkpoints and artifact; ``write_curves`` draws its picture.

Read from the files the trainers write (``config.yaml``, ``metrics.jsonl``, ``report.json``, ``checkpoints/``,
the artifact) and nothing else, so ``cdkd report`` works on a run that is still going, was stopped or finished,
and never imports torch's checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from cdkd.errors import CdkdIOError, CdkdValueError
from cdkd.train.checkpoint import list_checkpoints
from cdkd.train.curves import PANELS, draw_curves
from cdkd.train.history import History, finite, is_number
from cdkd.train.rundir import RunDir
from cdkd.utils.paths import check_writable
from cdkd.utils.runlock import describe, holder

# The artifact each kind of run ends with (the trainers' ``run_dir``): kind -> method -> file name.
ARTIFACTS: dict[str, dict[str | None, str]] = {
    "distill": {None: "student.pt"},
    "finetune": {"semantic": "segmenter.pt", "instance": "detector.pt"},
}
KINDS = {"distill": "distillation run", "finetune": "fine-tuning run"}
PICTURE_FORMATS = (".png", ".pdf", ".svg")
LOSS_PANELS = ("loss", "terms")


@dataclass(frozen=True)
class RunSummary:
    run: str
    kind: str  # distill | finetune
    method: str  # the recipe (distill: mask-cdkd, rs4d, hyperkd) or the task (finetune: semantic, instance)
    status: str  # finished | running | stopped
    step: int  # the newest step logged
    total: int | None  # the run's steps (None: given in epochs and not finished)
    losses: dict[str, float]  # the newest row's weighted loss and its terms, unweighted
    last: dict[str, Any]  # the newest row as logged
    stage: str | None
    ratio: float | None  # mask-cdkd's r
    images_per_s: float | None
    elapsed_s: float | None
    checkpoints: list[str]
    checkpoint_step: int | None  # where --resume would continue
    artifact: str
    artifact_present: bool
    curves: str | None = None
    holder: str | None = None  # the live process writing the run
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def title(self) -> str:
        parts = [f"{Path(self.run).name}: {self.kind} {self.method}", f"step {self.step} of {self.total or '?'}"]
        if self.stage:
            parts.append(f"stage {self.stage}")
        if self.images_per_s is not None:
            parts.append(f"{self.images_per_s:.3g} images/s")
        if self.elapsed_s is not None:
            parts.append(duration(self.elapsed_s))
        return " · ".join(parts + [self.status])

    def to_json(self) -> str:
        """The summary as JSON (a number that is not finite, as null)."""
        return json.dumps(finite(self.to_dict()), indent=2, allow_nan=False)

    def lines(self) -> list[str]:
        """The summary as a person reads it."""
        total = self.total if self.total is not None else "? (set in epochs)"
        rows = [
            ("run", self.run),
            ("kind", f"{self.kind} ({self.method}), {self.status}" + (f" by {self.holder}" if self.holder else "")),
            ("steps", f"{self.step} of {total}"),
        ]
        if self.losses:
            rows.append(("losses", ", ".join(f"{k} {v:.4g}" for k, v in self.losses.items())))
        if self.stage is not None or self.ratio is not None:
            rows.append(
                (
                    "stage",
                    ", ".join(filter(None, [self.stage, f"r {self.ratio:.3f}" if self.ratio is not None else None])),
                )
            )
        rows += [(key, f"{value:.4g}") for key, value in self.extra.items()]
        if self.images_per_s is not None:
            rows.append(("throughput", f"{self.images_per_s:.3g} images/s"))
        if self.elapsed_s is not None:
            rows.append(("elapsed", duration(self.elapsed_s)))
        newest = f" (newest: step {self.checkpoint_step})" if self.checkpoint_step is not None else ""
        rows.append(("checkpoints", f"{len(self.checkpoints)}{newest}"))
        rows.append(("artifact", f"{self.artifact} ({'present' if self.artifact_present else 'not written yet'})"))
        if self.curves:
            rows.append(("curves", self.curves))
        return [f"{key:<12}{value}" for key, value in rows]


def duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}  # report.json is written atomically; anything else is not cdkd's and says nothing
    return data if isinstance(data, dict) else {}


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CdkdIOError(f"{path}: not a readable run configuration ({str(e).splitlines()[0]})") from None
    return data if isinstance(data, dict) else {}


def identify(root: Path) -> tuple[str, str, RunDir]:
    """(kind, method, layout) of the run in ``root``, from its config.yaml (or report.json, or its artifact)."""
    if not root.is_dir():
        raise CdkdIOError(f"{root}: no such run folder; give the --out folder of a cdkd distill or finetune run")
    cfg, report = _read_config(root / "config.yaml"), _read_json(root / "report.json")
    if "recipe" in cfg or "student" in report:
        kind, method = "distill", str(cfg.get("recipe") or report.get("recipe") or "mask-cdkd")
    elif "task" in cfg or "head" in cfg or "segmenter" in report or "detector" in report:
        kind = "finetune"
        method = str(cfg.get("task") or report.get("task") or ("instance" if "detector" in report else "semantic"))
    elif (root / "student.pt").is_file():
        kind, method = "distill", "mask-cdkd"
    elif (root / "detector.pt").is_file() or (root / "segmenter.pt").is_file():
        kind, method = "finetune", "instance" if (root / "detector.pt").is_file() else "semantic"
    else:
        raise CdkdIOError(
            f"{root}: not a training run (no config.yaml, report.json or model of cdkd distill or "
            "finetune); give the --out folder of a run"
        )
    names = ARTIFACTS[kind]
    return kind, method, RunDir(root, names.get(method, names.get(None, "segmenter.pt")), KINDS[kind])


def summarize(run: str | Path, total: int | None = None) -> RunSummary:
    """The summary of the run in ``run``; ``total``: its steps where the caller knows them (a live trainer)."""
    return _summarize(Path(run), total)[0]


def _summarize(root: Path, total: int | None) -> tuple[RunSummary, History]:
    kind, method, paths = identify(root)
    history = History.read(paths.metrics)
    cfg, report = _read_config(paths.config), _read_json(paths.report)
    train: dict[str, Any] = cfg.get("train") or {}
    steps_cfg: Any = train.get("steps")
    if total is None:
        # config.yaml is rewritten by every session (a resume may ask for more steps than report.json's run had)
        steps: Any = int(steps_cfg) if is_number(steps_cfg) else report.get("steps")
        total = None if not is_number(steps) or steps < history.step else steps
    last = history.last
    loss_keys = [k for k in history.columns() if any(p.name in LOSS_PANELS and p.holds(k) for p in PANELS)]
    ckpts = list_checkpoints(paths.checkpoints)
    live = holder(root)
    done = total is not None and history.step >= total and paths.artifact.is_file()
    elapsed = history.elapsed()
    if elapsed is None and done and is_number(report.get("seconds")) and not report.get("resumed_from"):
        elapsed = float(report["seconds"])  # a run logged before rows carried their time
    summary = RunSummary(
        run=str(root),
        kind=kind,
        method=method,
        status="finished" if done else "running" if live else "stopped",
        step=history.step,
        total=total,
        losses={k: last[k] for k in loss_keys if is_number(last.get(k))},
        last=dict(last),
        stage=last.get("stage") if isinstance(last.get("stage"), str) else None,
        ratio=last["ratio"] if is_number(last.get("ratio")) else None,
        images_per_s=history.images_per_s(),
        elapsed_s=elapsed,
        checkpoints=[p.name for p in ckpts],
        checkpoint_step=int(ckpts[-1].stem.rsplit("_", 1)[-1]) if ckpts else None,
        artifact=str(paths.artifact),
        artifact_present=paths.artifact.is_file(),
        holder=describe(live) if live and not done else None,
        extra={k: last[k] for k in ("pixel_acc", "noise_ratio", "mask_ratio") if is_number(last.get(k))},
    )
    return summary, history


def write_curves(
    run: str | Path, out: str | Path | None = None, total: int | None = None, overwrite: bool = True
) -> RunSummary:
    """Draw the curves of the run in ``run`` into ``out`` (default ``RUN/curves.png``, which is always redrawn; any
    other file only with ``overwrite``); returns the run's summary."""
    summary, history = _summarize(Path(run), total)
    target = Path(out) if out is not None else Path(run) / "curves.png"
    if target.suffix.lower() not in PICTURE_FORMATS:
        raise CdkdValueError(f"{target}: the picture must end in {', '.join(PICTURE_FORMATS)}")
    if out is not None and target.exists() and not overwrite:
        raise CdkdIOError(f"{target} exists; pass --overwrite to replace it")
    if target.is_dir():
        raise CdkdIOError(f"{target} is a folder; give a file name ending in .png")
    check_writable(target.parent, f"{target}: cannot write the picture")
    draw_curves(history, target, summary.title())
    return replace(summary, curves=str(target))
