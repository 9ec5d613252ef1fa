"""Options and helpers shared by several commands (defined once, as rasterio's ``rio/options.py`` does)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer

T = TypeVar("T")


class Choice(str, enum.Enum):
    """A fixed-choice option: ``--help`` lists the values and click refuses any other one (exit 2) before the
    command runs. The values mirror the library's own constants (tests/test_cli.py checks they agree); they are
    spelled out here because importing those modules would import torch and slow every ``cdkd --help``."""

    def __str__(self) -> str:
        return self.value


def _choice(name: str, values: tuple[str, ...]) -> type[Choice]:
    return Choice(name, [(v, v) for v in values])  # type: ignore[return-value]


Runtime = _choice("Runtime", ("torch", "onnx", "tensorrt"))  # cdkd.scene.runtimes.RUNTIMES
Amp = _choice("Amp", ("auto", "none", "bf16", "fp16"))  # cdkd.scene.runtimes / cdkd.train.optim AMP_MODES
Stats = _choice("Stats", ("model", "scene"))  # cdkd.scene.source.STATS_MODES
OnError = _choice("OnError", ("fail", "skip"))  # cdkd.scene.batch.ON_ERROR
DataFormat = _choice("DataFormat", ("dubai", "deepglobe", "loveda", "isprs", "openearthmap", "folder",  # FORMATS
                                    "coco", "geo"))  # + cdkd.data.coco.INSTANCE_FORMATS (--task instance)
Task = _choice("Task", ("semantic", "instance"))  # cdkd.artifacts.TASKS
Head = _choice("Head", ("upernet", "linear"))  # cdkd.models.upernet.HEADS
LrSchedule = _choice("LrSchedule", ("cosine", "poly"))  # cdkd.train.optim.LR_SCHEDULES
ExportFormat = _choice("ExportFormat", ("onnx", "tensorrt"))  # cli.export.FORMATS
CalibMethod = _choice("CalibMethod", ("minmax", "entropy", "percentile"))  # cdkd.export.quantize.CALIB_METHODS
Adapter = _choice("Adapter", ("multi", "single"))  # cdkd.models.mmoa.MMoA
Fusion = _choice("Fusion", ("gate", "add"))
Direction = _choice("Direction", ("bi", "uni"))  # cdkd.distill.objective
Schedule = _choice("Schedule", ("dynamic", "fixed"))  # cdkd.distill.schedule
ProgressFormat = _choice("ProgressFormat", ("bar", "json", "none"))  # cdkd.progress.FORMATS


def value(choice: Optional[Choice]) -> Optional[str]:
    """The plain text of a choice (None stays None), for configs and library calls."""
    return None if choice is None else choice.value

TRAIN = "Training"

config_opt = typer.Option(None, "--config", help="YAML configuration; flags override it.")
resume_opt = typer.Option(False, "--resume", help="Continue the newest checkpoint in --out.")
overwrite_opt = typer.Option(False, "--overwrite", help="Replace earlier results in --out.")
progress_opt = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")
tensorboard_opt = typer.Option(None, "--tensorboard/--no-tensorboard", rich_help_panel=TRAIN,
                               help="Also write TensorBoard events to OUT/tensorboard/ (pip install tensorboard).")
device_opt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=TRAIN)
workers_opt = typer.Option(None, "--workers", help="Data loader processes.", rich_help_panel=TRAIN)
batch_opt = typer.Option(None, "--batch-size", help="Images per micro-batch.", rich_help_panel=TRAIN)
steps_opt = typer.Option(None, "--steps", help="Optimiser steps.", rich_help_panel=TRAIN)
epochs_opt = typer.Option(None, "--epochs", help="Passes over the image files.", rich_help_panel=TRAIN)
lr_opt = typer.Option(None, "--lr", help="Peak learning rate.", rich_help_panel=TRAIN)
amp_opt = typer.Option(None, "--amp", help="Mixed precision on CUDA (auto = bf16; none on CPU).",
                       rich_help_panel=TRAIN)
seed_opt = typer.Option(None, "--seed", help="Makes runs repeatable.", rich_help_panel=TRAIN)
tile_opt = typer.Option(None, "--tile-size", help="Tile size in px, a multiple of 16.")


def ints(text: Optional[str], name: str) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None


def floats(text: Optional[str], n: int, name: str) -> Optional[tuple[float, ...]]:
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        values = ()
    if len(values) != n:
        raise typer.BadParameter(f"{name} must be {n} comma-separated numbers, got {text!r}")
    return values


def words(text: Optional[str]) -> Optional[tuple[str, ...]]:
    return tuple(w for w in text.replace(",", " ").split()) if text else None


def resolve_config(cls: type[T], config: Optional[Path], run_config: Optional[Path], overrides: dict[str, Any]) -> T:
    """Defaults < ``config`` file (or, when resuming without one, the run's own ``run_config``) < ``overrides``.

    ``overrides`` holds only what the user gave (see ``given``): a None there means "set to None".
    """
    from cdkd.config import apply_overrides, check_ranges, load_config

    base = config if config is not None else (run_config if run_config is not None and run_config.is_file() else None)
    cfg = load_config(cls, base) if base is not None else cls()
    cfg = apply_overrides(cfg, overrides)
    check_ranges(cfg)
    return cfg


def given(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags the user actually passed (typer leaves the others at None)."""
    return {k: v for k, v in flags.items() if v is not None}
