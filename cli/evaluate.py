"""``cdkd evaluate``: mIoU, OA, mF1 and a confusion matrix of a segmenter on labeled images; COCO AP (boxes and
masks) of a detector. The model file says which (``cdkd.tasks.task_of_model``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli import options as o
from cli.errors import cli_errors

RUN = "Runtime"


def evaluate_command(
    segmenter: Path = typer.Argument(..., help="segmenter.pt from cdkd finetune, or model.onnx from cdkd export."),
    data: Path = typer.Option(..., "--data", help="Labeled dataset root."),
    fmt: o.DataFormat = typer.Option(..., "--format", help="Dataset layout (coco, geo: --task instance)."),
    task: Optional[o.Task] = typer.Option(
        None,
        "--task",
        help="semantic: mIoU of a segmenter; instance: COCO AP "
        "of a detector (default: the model's task; given, it must match).",
    ),
    labels: Optional[Path] = typer.Option(None, "--labels", help="--format geo: the scene's footprints."),
    class_field: Optional[str] = typer.Option(
        None, "--class-field", help="--format geo: the attribute naming each footprint's class."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, metrics.md and confusion.png."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class file (YAML) for --format folder."),
    split: Optional[str] = typer.Option(None, "--split", help="Comma-separated folder patterns, e.g. 'tile[7-8]'."),
    overlap: Optional[int] = typer.Option(
        None, "--overlap", help="Sliding-window overlap in px (default: the segmenter's)."
    ),
    batch_size: int = typer.Option(4, "--batch-size", help="Tiles per forward pass."),
    runtime: Optional[o.Runtime] = typer.Option(
        None, "--runtime", help="Default: from the model file's suffix (.pt: torch, .onnx: onnx).", rich_help_panel=RUN
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=RUN),
    amp: o.Amp = typer.Option(
        o.Amp.none,
        "--amp",
        help="Autocast for a segmenter.pt on CUDA, or bf16 on CPUs with AVX-512 BF16/AMX (none: float32 metrics).",
        rich_help_panel=RUN,
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="ONNX Runtime CPU threads (default: one per physical core).", rich_help_panel=RUN
    ),
    overwrite: bool = o.overwrite_opt,
    progress: bool = o.progress_opt,
) -> None:
    """Evaluate a segmenter on whole images with overlapping sliding windows; prints the metrics table.

    Examples:
      cdkd evaluate runs/seg/segmenter.pt --data dubai/ --format dubai --split 'tile[7-8]' --out runs/seg/eval
      cdkd evaluate model.onnx --data dubai/ --format dubai --split 'tile[7-8]' --out runs/seg/eval_onnx
      cdkd evaluate runs/det/detector.pt --task instance --data nwpu/ --format coco --split '*[268].jpg' --out ev
    """
    with cli_errors():
        from cdkd.errors import CdkdValueError
        from cdkd.tasks import task_of_model

        strategy = task_of_model(segmenter, o.value(runtime))
        if task is not None and task.value != strategy.name:
            raise CdkdValueError(f"{segmenter}: a model of the {strategy.name} task, not {task.value}; drop --task")
        res = strategy.evaluate(
            segmenter,
            data,
            out,
            fmt.value,
            split=o.words(split),
            labels=labels,
            class_field=class_field,
            classes=classes,
            overlap=overlap,
            batch_size=batch_size,
            device=device,
            runtime=o.value(runtime),
            amp=amp.value,
            threads=threads,
            overwrite=overwrite,
            progress=progress,
        )
        typer.echo(res.summary())
