"""``cdkd distill``: Mask-CDKD distillation of a SAM teacher into a ViT-S student from unlabeled tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from cli.errors import cli_errors

_DIRECT = "Teacher"
_OBJ = "Objective"
_TRAIN = "Training"


def _floats(text: str, n: int, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise typer.BadParameter(f"{name} must be {n} numbers, got {text!r}") from None
    if len(values) != n:
        raise typer.BadParameter(f"{name} must be {n} numbers, got {text!r}")
    return values


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None


def distill_command(
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of unlabeled images (searched recursively)."),
    out: Path = typer.Option(..., "--out", help="Run folder: student.pt, checkpoints/, metrics.jsonl, config.yaml."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML configuration; flags override it."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="SAM encoder: vit_b, vit_l (default) or vit_h.",
                                          rich_help_panel=_DIRECT),
    teacher_checkpoint: Optional[Path] = typer.Option(None, "--teacher-checkpoint",
                                                      help="Official SAM checkpoint (.pth) or encoder state dict.",
                                                      rich_help_panel=_DIRECT),
    random_teacher: bool = typer.Option(False, "--random-teacher",
                                        help="Random SAM weights: tests and smoke runs only.", rich_help_panel=_DIRECT),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="multi (default) or single.", rich_help_panel=_DIRECT),
    fusion: Optional[str] = typer.Option(None, "--fusion", help="gate (default) or add.", rich_help_panel=_DIRECT),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                                      help="Recompute teacher blocks in backward to save memory.",
                                                      rich_help_panel=_DIRECT),
    student: Optional[str] = typer.Option(None, "--student", help="vit_s (default) or vit_s_win."),
    in_chans: Optional[int] = typer.Option(None, "--in-chans", help="Input bands of the student (default 3)."),
    bands: Optional[str] = typer.Option(None, "--bands", help="1-based bands to read, e.g. 3,2,1."),
    tile_size: Optional[int] = typer.Option(None, "--tile-size", help="Training tile in px, a multiple of 16."),
    direction: Optional[str] = typer.Option(None, "--direction", help="bi (default) or uni.", rich_help_panel=_OBJ),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="dynamic (default) or fixed.", rich_help_panel=_OBJ),
    weights: Optional[str] = typer.Option(None, "--weights", help="KD,T_MAE,S_MAE weights for --schedule fixed.",
                                          rich_help_panel=_OBJ),
    mask_ratio: Optional[float] = typer.Option(None, "--mask-ratio", help="Masked patch fraction (0.75).",
                                               rich_help_panel=_OBJ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per device per micro-batch.",
                                             rich_help_panel=_TRAIN),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per step.", rich_help_panel=_TRAIN),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default 1000).", rich_help_panel=_TRAIN),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the image files.", rich_help_panel=_TRAIN),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (1e-5).", rich_help_panel=_TRAIN),
    amp: Optional[str] = typer.Option(None, "--amp", help="auto, bf16, fp16 or none.", rich_help_panel=_TRAIN),
    seed: Optional[int] = typer.Option(None, "--seed", help="Makes runs repeatable.", rich_help_panel=_TRAIN),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", rich_help_panel=_TRAIN),
    log_every: Optional[int] = typer.Option(None, "--log-every", rich_help_panel=_TRAIN),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=_TRAIN),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data loader processes.", rich_help_panel=_TRAIN),
    resume: bool = typer.Option(False, "--resume", help="Continue the newest checkpoint in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Distil a SAM teacher into a small student from unlabeled tiles (Mask-CDKD).

    Example: cdkd distill --data luojia/ --out runs/vitl --teacher vit_l --teacher-checkpoint sam_vit_l_0b3195.pth
    """
    overrides: dict[str, Any] = {
        "data.root": str(data) if data is not None else None,
        "data.bands": _ints(bands, "--bands") if bands else None,
        "data.tile_size": tile_size,
        "data.num_workers": workers,
        "teacher.variant": teacher,
        "teacher.checkpoint": str(teacher_checkpoint) if teacher_checkpoint is not None else None,
        "teacher.random_init": True if random_teacher else None,
        "teacher.adapter": adapter,
        "teacher.fusion": fusion,
        "teacher.grad_checkpointing": grad_checkpointing,
        "student.arch": student,
        "student.in_chans": in_chans,
        "objective.direction": direction,
        "objective.schedule": schedule,
        "objective.fixed_weights": _floats(weights, 3, "--weights") if weights else None,
        "objective.mask_ratio": mask_ratio,
        "train.batch_size": batch_size,
        "train.grad_accum": grad_accum,
        "train.steps": steps,
        "train.epochs": epochs,
        "train.lr": lr,
        "train.amp": amp,
        "train.seed": seed,
        "train.checkpoint_every": checkpoint_every,
        "train.log_every": log_every,
        "train.device": device,
    }
    if random_teacher and teacher_checkpoint is not None:
        raise typer.BadParameter("--random-teacher and --teacher-checkpoint exclude each other")
    with cli_errors():
        from cdkd.config import DistillConfig, apply_overrides, load_config
        from cdkd.distill.trainer import RunPaths, distill
        from cdkd.errors import ConfigError

        base_file = config
        if base_file is None and resume and RunPaths(out).config.is_file():
            base_file = RunPaths(out).config  # resuming: the run's own resolved config is the base
        cfg = load_config(DistillConfig, base_file) if base_file else DistillConfig()
        given = {k: v for k, v in overrides.items() if v is not None}
        if teacher_checkpoint is not None and not random_teacher:
            given["teacher.random_init"] = False
        if random_teacher:
            given["teacher.checkpoint"] = None  # a checkpoint from --config must not contradict the flag
        if weights and schedule is None:
            given["objective.schedule"] = "fixed"
        cfg = apply_overrides(cfg, given)
        if not cfg.data.root:
            raise ConfigError("no training data: pass --data DIR (or data.root in --config)")
        result = distill(cfg, out, resume=resume, overwrite=overwrite, progress=progress)
        typer.echo(f"student: {result.student_path}  ({result.steps} steps, stage {result.stage}, "
                   f"{result.seconds:.0f} s)")
