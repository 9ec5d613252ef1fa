"""Options and helpers shared by several commands (defined once, as rasterio's ``rio/options.py`` does)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import typer

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class Choice(str, enum.Enum):
    """A fixed-choice option: ``--help`` lists the values and click refuses any other one (exit 2) before the
    command runs. The values mirror the library's own constants (tests/test_cli.py checks they agree); they are
    spelled out here because importing those modules would import torch and slow every ``cdkd --help``."""

    def __str__(self) -> str:
        return self.value


class Runtime(Choice):  # cdkd.inference.runtimes.RUNTIMES
    torch = "torch"
    onnx = "onnx"
    tensorrt = "tensorrt"


class Amp(Choice):  # cdkd.inference.runtimes / cdkd.train.optim AMP_MODES
    auto = "auto"
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


class CudaGraph(Choice):  # cdkd.inference.runtimes.GRAPH_MODES
    auto = "auto"
    on = "on"
    off = "off"


class Stats(Choice):  # cdkd.scene.core.source.STATS_MODES
    model = "model"
    scene = "scene"


class OnError(Choice):  # cdkd.scene.batch.ON_ERROR
    fail = "fail"
    skip = "skip"


class DataFormat(Choice):  # cdkd.data.labeled.FORMATS + cdkd.data.coco.INSTANCE_FORMATS
    dubai = "dubai"
    deepglobe = "deepglobe"
    loveda = "loveda"
    isprs = "isprs"
    openearthmap = "openearthmap"
    folder = "folder"
    coco = "coco"
    geo = "geo"


class Task(Choice):  # cdkd.artifacts.TASKS
    semantic = "semantic"
    instance = "instance"


class Head(Choice):  # cdkd.models.upernet.HEADS
    upernet = "upernet"
    linear = "linear"


class LrSchedule(Choice):  # cdkd.train.optim.LR_SCHEDULES
    cosine = "cosine"
    poly = "poly"


class ExportFormat(Choice):  # cli.export
    onnx = "onnx"
    tensorrt = "tensorrt"


class CalibMethod(Choice):  # cdkd.export.quantize.CALIB_METHODS
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class Adapter(Choice):  # cdkd.models.mmoa.MMoA
    multi = "multi"
    single = "single"


class Fusion(Choice):  # cdkd.models.mmoa.MMoA
    gate = "gate"
    add = "add"


class Direction(Choice):  # cdkd.distill.objective
    bi = "bi"
    uni = "uni"


class Schedule(Choice):  # cdkd.distill.schedule
    dynamic = "dynamic"
    fixed = "fixed"


class ProgressFormat(Choice):  # cdkd.progress.FORMATS
    bar = "bar"
    json = "json"
    none = "none"


def value(choice: Optional[Choice]) -> Optional[str]:
    """The plain text of a choice (None stays None), for configs and library calls."""
    return None if choice is None else choice.value


TRAIN = "Training"

config_opt = typer.Option(None, "--config", help="YAML configuration; flags override it.")
resume_opt = typer.Option(False, "--resume", help="Continue the newest checkpoint in --out.")
overwrite_opt = typer.Option(False, "--overwrite", help="Replace earlier results in --out.")
progress_opt = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")
tensorboard_opt = typer.Option(
    None,
    "--tensorboard/--no-tensorboard",
    rich_help_panel=TRAIN,
    help="Also write TensorBoard events to OUT/tensorboard/ (pip install tensorboard).",
)
device_opt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=TRAIN)
workers_opt = typer.Option(None, "--workers", help="Data loader processes.", rich_help_panel=TRAIN)
batch_opt = typer.Option(None, "--batch-size", help="Images per micro-batch.", rich_help_panel=TRAIN)
steps_opt = typer.Option(None, "--steps", help="Optimiser steps.", rich_help_panel=TRAIN)
epochs_opt = typer.Option(None, "--epochs", help="Passes over the image files.", rich_help_panel=TRAIN)
lr_opt = typer.Option(None, "--lr", help="Peak learning rate.", rich_help_panel=TRAIN)
amp_opt = typer.Option(None, "--amp", help="Mixed precision on CUDA (auto = bf16; none on CPU).", rich_help_panel=TRAIN)
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
