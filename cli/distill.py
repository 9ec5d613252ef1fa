"""``cdkd distill``: distillation of a SAM teacher into a small student from unlabeled tiles, by recipe
(``mask-cdkd``, the default, ``rs4d`` or ``hyperkd``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from cli import options as o
from cli.errors import cli_errors

_DIRECT = "Teacher"
_OBJ = "Objective"
_RS4D = "RS4D (--recipe rs4d)"
_HYPERKD = "HyperKD (--recipe hyperkd)"
_TRAIN = o.TRAIN


def distill_command(
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of unlabeled images (searched recursively)."),
    out: Path = typer.Option(..., "--out", help="Run folder: student.pt, checkpoints/, metrics.jsonl, config.yaml."),
    config: Optional[Path] = o.config_opt,
    recipe: Optional[str] = typer.Option(
        None,
        "--recipe",
        help="mask-cdkd (default: SAM + MMoA, KD + MAE), rs4d (L1 to SAM's "
        "image embedding, noised and masked student input) or hyperkd "
        "(every band; RGB teacher through spectral alignment).",
    ),
    teacher: Optional[str] = typer.Option(
        None, "--teacher", help="SAM encoder: vit_b, vit_l (default) or vit_h.", rich_help_panel=_DIRECT
    ),
    teacher_checkpoint: Optional[Path] = typer.Option(
        None,
        "--teacher-checkpoint",
        help="Official SAM checkpoint (.pth) or encoder state dict.",
        rich_help_panel=_DIRECT,
    ),
    random_teacher: bool = typer.Option(
        False, "--random-teacher", help="Random SAM weights: tests and smoke runs only.", rich_help_panel=_DIRECT
    ),
    adapter: Optional[o.Adapter] = typer.Option(
        None, "--adapter", help="Teacher adapters (default multi).", rich_help_panel=_DIRECT
    ),
    fusion: Optional[o.Fusion] = typer.Option(None, "--fusion", help="Default gate.", rich_help_panel=_DIRECT),
    grad_checkpointing: Optional[bool] = typer.Option(
        None,
        "--grad-checkpointing/--no-grad-checkpointing",
        help="Recompute teacher blocks in backward to save memory.",
        rich_help_panel=_DIRECT,
    ),
    student: Optional[str] = typer.Option(
        None, "--student", help="vit_s (default), vit_s_win, or rsmamba_s|b|l|h (state-space)."
    ),
    in_chans: Optional[int] = typer.Option(
        None,
        "--in-chans",
        help="Input bands of the student (default: 3, red, green and blue where the "
        "files say which; every band with --recipe hyperkd).",
    ),
    bands: Optional[str] = typer.Option(None, "--bands", help="1-based bands to read, e.g. 3,2,1."),
    wavelengths: Optional[str] = typer.Option(
        None,
        "--wavelengths",
        help="What the file bands measure: a sensor preset (sentinel2, "
        "sentinel2_l2a, naip, worldview3, enmap) or centres in nm, "
        "e.g. 443:20,490:65 (default: the files' band metadata).",
    ),
    tile_size: Optional[int] = o.tile_opt,
    direction: Optional[o.Direction] = typer.Option(None, "--direction", help="Default bi.", rich_help_panel=_OBJ),
    schedule: Optional[o.Schedule] = typer.Option(None, "--schedule", help="Default dynamic.", rich_help_panel=_OBJ),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="KD,T_MAE,S_MAE weights for --schedule fixed.", rich_help_panel=_OBJ
    ),
    mask_ratio: Optional[float] = typer.Option(
        None,
        "--mask-ratio",
        help="Masked patch fraction (mask-cdkd 0.75, rs4d 0.2, hyperkd 0.75).",
        rich_help_panel=_OBJ,
    ),
    noise_ratio: Optional[float] = typer.Option(
        None, "--noise-ratio", help="Fraction of patches given Gaussian noise (0.2).", rich_help_panel=_RS4D
    ),
    adaptive_ratios: Optional[bool] = typer.Option(
        None,
        "--adaptive-ratios/--fixed-ratios",
        help="Raise noise and mask ratios as the loss falls.",
        rich_help_panel=_RS4D,
    ),
    guided_ratio: Optional[float] = typer.Option(
        None,
        "--guided-ratio",
        help="Share of the masking probability that follows the teacher's feature saliency, the rest uniform (0.5).",
        rich_help_panel=_HYPERKD,
    ),
    batch_size: Optional[int] = o.batch_opt,
    grad_accum: Optional[int] = typer.Option(
        None, "--grad-accum", help="Micro-batches per step.", rich_help_panel=_TRAIN
    ),
    steps: Optional[int] = o.steps_opt,
    epochs: Optional[float] = o.epochs_opt,
    lr: Optional[float] = o.lr_opt,
    amp: Optional[o.Amp] = o.amp_opt,
    seed: Optional[int] = o.seed_opt,
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", rich_help_panel=_TRAIN),
    log_every: Optional[int] = typer.Option(None, "--log-every", rich_help_panel=_TRAIN),
    tensorboard: Optional[bool] = o.tensorboard_opt,
    device: Optional[str] = o.device_opt,
    workers: Optional[int] = o.workers_opt,
    resume: bool = o.resume_opt,
    overwrite: bool = o.overwrite_opt,
    progress: bool = o.progress_opt,
) -> None:
    """Distil a SAM teacher into a small student from unlabeled tiles (Mask-CDKD or RS4D).

    Example: cdkd distill --data luojia/ --out runs/vitl --teacher vit_l --teacher-checkpoint sam_vit_l_0b3195.pth

    RS4D: cdkd distill --recipe rs4d --noise-ratio 0.2 --mask-ratio 0.2 --student rsmamba_s --teacher vit_b ...

    HyperKD: cdkd distill --recipe hyperkd --data s2/ --in-chans 12 --wavelengths sentinel2_l2a --teacher vit_b ...
    """
    overrides: dict[str, Any] = {
        "recipe": recipe,
        "data.root": str(data) if data is not None else None,
        "data.bands": o.ints(bands, "--bands"),
        "data.wavelengths": wavelengths,
        "data.tile_size": tile_size,
        "data.num_workers": workers,
        "teacher.variant": teacher,
        "teacher.checkpoint": str(teacher_checkpoint) if teacher_checkpoint is not None else None,
        "teacher.random_init": True if random_teacher else None,
        "teacher.adapter": o.value(adapter),
        "teacher.fusion": o.value(fusion),
        "teacher.grad_checkpointing": grad_checkpointing,
        "student.arch": student,
        "student.in_chans": in_chans,
        "objective.direction": o.value(direction),
        "objective.schedule": o.value(schedule),
        "objective.fixed_weights": o.floats(weights, 3, "--weights"),
        "train.batch_size": batch_size,
        "train.grad_accum": grad_accum,
        "train.steps": steps,
        "train.epochs": epochs,
        "train.lr": lr,
        "train.amp": o.value(amp),
        "train.seed": seed,
        "train.checkpoint_every": checkpoint_every,
        "train.log_every": log_every,
        "train.tensorboard": tensorboard,
        "train.device": device,
    }
    if random_teacher and teacher_checkpoint is not None:
        raise typer.BadParameter("--random-teacher and --teacher-checkpoint exclude each other")
    with cli_errors(resumable=True):
        from cdkd.config import DistillConfig
        from cdkd.distill.trainer import distill, run_dir
        from cdkd.errors import ConfigError

        flags = o.given(overrides)
        if teacher_checkpoint is not None:
            flags["teacher.random_init"] = False
        if random_teacher:
            flags["teacher.checkpoint"] = None  # a checkpoint from --config must not contradict the flag
        if weights and schedule is None:
            flags["objective.schedule"] = "fixed"
        cfg = o.resolve_config(DistillConfig, config, run_dir(out).config if resume else None, flags)
        cfg = _recipe_flags(cfg, mask_ratio, noise_ratio, adaptive_ratios, guided_ratio)
        if not cfg.data.root:
            raise ConfigError("no training data: pass --data DIR (or data.root in --config)")
        result = distill(cfg, out, resume=resume, overwrite=overwrite, progress=progress)
        typer.echo(
            f"student: {result.student_path}  ({result.recipe}, {result.steps} steps, stage {result.stage}, "
            f"{result.seconds:.0f} s)"
        )
        _print_alignment(run_dir(out).report)


def _print_alignment(report: Path) -> None:
    """HyperKD's spectral alignment (teacher channel <- student bands), from the run's report.json."""
    import json

    table = json.loads(report.read_text()).get("alignment", {}).get("table") if report.is_file() else None
    if table:
        typer.echo("spectral alignment (teacher channel <- student bands):")
        for line in table:
            typer.echo(f"  {line}")


def _recipe_flags(
    cfg: Any,
    mask_ratio: Optional[float],
    noise_ratio: Optional[float],
    adaptive: Optional[bool],
    guided_ratio: Optional[float] = None,
) -> Any:
    """Flags whose section depends on the recipe (known only once the config file is read)."""
    from cdkd.config import apply_overrides
    from cdkd.errors import CdkdValueError

    flags: dict[str, Any] = {}
    if guided_ratio is not None and cfg.recipe != "hyperkd":
        raise CdkdValueError(f"--guided-ratio belongs to --recipe hyperkd, not {cfg.recipe}")
    if cfg.recipe == "rs4d":
        flags = {"rs4d.mask_ratio": mask_ratio, "rs4d.noise_ratio": noise_ratio, "rs4d.adaptive": adaptive}
    elif cfg.recipe == "hyperkd":
        if noise_ratio is not None or adaptive is not None:
            raise CdkdValueError("--noise-ratio and --adaptive-ratios belong to --recipe rs4d, not hyperkd")
        flags = {"hyperkd.mask_ratio": mask_ratio, "hyperkd.guided_ratio": guided_ratio}
    else:
        if noise_ratio is not None or adaptive is not None:
            raise CdkdValueError(f"--noise-ratio and --adaptive-ratios belong to --recipe rs4d, not {cfg.recipe}")
        flags = {"objective.mask_ratio": mask_ratio}
    flags = o.given(flags)
    return apply_overrides(cfg, flags) if flags else cfg
