"""``cdkd finetune``: train a UPerNet (or linear) decoder on a frozen distilled student, or (``--task instance``) a
Mask R-CNN on it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli import options as o
from cli.errors import cli_errors

_DATA = "Data"
_HEAD = "Decoder"


def finetune_command(
    student: Optional[Path] = typer.Option(None, "--student", help="student.pt written by cdkd distill."),
    task: Optional[o.Task] = typer.Option(
        None,
        "--task",
        help="semantic: land-cover classes (segmenter.pt); instance: objects as polygons, Mask R-CNN (detector.pt).",
    ),
    data: Optional[Path] = typer.Option(None, "--data", help="Labeled dataset root.", rich_help_panel=_DATA),
    fmt: Optional[o.DataFormat] = typer.Option(
        None, "--format", help="Dataset layout (coco, geo: --task instance).", rich_help_panel=_DATA
    ),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="--format geo: the scene's footprints (GeoJSON, GeoPackage, ...).", rich_help_panel=_DATA
    ),
    class_field: Optional[str] = typer.Option(
        None,
        "--class-field",
        help="--format geo: the footprints' attribute naming their class (default: one class).",
        rich_help_panel=_DATA,
    ),
    classes: Optional[Path] = typer.Option(
        None, "--classes", help="Class file (YAML); required for --format folder.", rich_help_panel=_DATA
    ),
    split: Optional[str] = typer.Option(
        None,
        "--split",
        help="Comma-separated folder patterns to train on, e.g. 'tile[1-6]' or train.",
        rich_help_panel=_DATA,
    ),
    out: Path = typer.Option(..., "--out", help="Run folder: segmenter.pt, checkpoints/, metrics.jsonl, config.yaml."),
    config: Optional[Path] = o.config_opt,
    tile_size: Optional[int] = o.tile_opt,
    head: Optional[o.Head] = typer.Option(None, "--head", help="Decoder (default upernet).", rich_help_panel=_HEAD),
    decoder_channels: Optional[int] = typer.Option(
        None,
        "--decoder-channels",
        help="UPerNet width (default 512; "
        "--task instance: pyramid and mask head, default 256); "
        "narrower trains and evaluates faster.",
        rich_help_panel=_HEAD,
    ),
    unfreeze: Optional[bool] = typer.Option(
        None, "--unfreeze/--freeze", help="Train the student too.", rich_help_panel=_HEAD
    ),
    class_balanced: Optional[bool] = typer.Option(
        None,
        "--class-balanced/--no-class-balanced",
        help="Weight the loss by inverse sqrt class frequency.",
        rich_help_panel=_HEAD,
    ),
    lr_schedule: Optional[o.LrSchedule] = typer.Option(
        None, "--lr-schedule", help="Decay after warm-up (default poly).", rich_help_panel=o.TRAIN
    ),
    batch_size: Optional[int] = o.batch_opt,
    steps: Optional[int] = o.steps_opt,
    epochs: Optional[float] = o.epochs_opt,
    lr: Optional[float] = o.lr_opt,
    amp: Optional[o.Amp] = o.amp_opt,
    seed: Optional[int] = o.seed_opt,
    device: Optional[str] = o.device_opt,
    workers: Optional[int] = o.workers_opt,
    tensorboard: Optional[bool] = o.tensorboard_opt,
    resume: bool = o.resume_opt,
    overwrite: bool = o.overwrite_opt,
    progress: bool = o.progress_opt,
) -> None:
    """Train a land-cover decoder on the frozen student (30 epochs, AdamW 1e-4, poly decay by default).

    Examples:
      cdkd finetune --student runs/vitl/student.pt --data dubai/ --format dubai --split 'tile[1-6]' --out runs/seg
      cdkd finetune --task instance --student student.pt --data nwpu/ --format coco --out runs/det
      cdkd finetune --task instance --student student.pt --data scene.tif --labels buildings.gpkg --format geo --out r
    """
    flags = o.given(
        {
            "student": str(student) if student is not None else None,
            "task": o.value(task),
            "data.labels": str(labels) if labels is not None else None,
            "data.class_field": class_field,
            "data.root": str(data) if data is not None else None,
            "data.format": o.value(fmt),
            "data.classes": str(classes) if classes is not None else None,
            "data.split": o.words(split),
            "data.tile_size": tile_size,
            "data.num_workers": workers,
            "head.type": o.value(head),
            "head.unfreeze": unfreeze,
            "head.class_balanced": class_balanced,
            "train.lr_schedule": o.value(lr_schedule),
            "train.batch_size": batch_size,
            "train.steps": steps,
            "train.epochs": epochs,
            "train.lr": lr,
            "train.amp": o.value(amp),
            "train.seed": seed,
            "train.device": device,
            "train.tensorboard": tensorboard,
        }
    )
    with cli_errors(resumable=True):
        from cdkd.config import FinetuneConfig, apply_overrides
        from cdkd.errors import ConfigError
        from cdkd.finetune.trainer import finetune, run_dir

        cfg = o.resolve_config(FinetuneConfig, config, run_dir(out).config if resume else None, flags)
        if decoder_channels is not None:  # the task (flag or file) decides which decoder the width is for
            key = "instance.channels" if cfg.task == "instance" else "head.channels"
            cfg = apply_overrides(cfg, {key: decoder_channels})
        if not cfg.student:
            raise ConfigError("no student: pass --student RUN/student.pt (or student in --config)")
        if not cfg.data.root:
            raise ConfigError("no labeled data: pass --data DIR --format F (or data.root in --config)")
        result = finetune(cfg, out, resume=resume, overwrite=overwrite, progress=progress)
        what = "detector" if result.task == "instance" else "segmenter"
        typer.echo(
            f"{what}: {result.segmenter_path}  ({result.steps} steps, final loss {result.loss:.3f}, "
            f"{result.seconds:.0f} s)"
        )
