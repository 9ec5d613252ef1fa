"""``cdkd evaluate``: mIoU, OA, mF1 and a confusion matrix of a segmenter on labeled images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli import options as o
from cli.errors import cli_errors


def evaluate_command(
    segmenter: Path = typer.Argument(..., help="segmenter.pt written by cdkd finetune."),
    data: Path = typer.Option(..., "--data", help="Labeled dataset root."),
    fmt: str = typer.Option(..., "--format", help="dubai, deepglobe, loveda, isprs, openearthmap or folder."),
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, metrics.md and confusion.png."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class file (YAML) for --format folder."),
    split: Optional[str] = typer.Option(None, "--split", help="Comma-separated folder patterns, e.g. 'tile[7-8]'."),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="Sliding-window overlap in px (default: the "
                                          "segmenter's)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Tiles per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    overwrite: bool = o.overwrite_opt,
    progress: bool = o.progress_opt,
) -> None:
    """Evaluate a segmenter on whole images with overlapping sliding windows; prints the metrics table.

    Example: cdkd evaluate runs/seg/segmenter.pt --data dubai/ --format dubai --split 'tile[7-8]' --out runs/seg/eval
    """
    with cli_errors():
        from cdkd.finetune.evaluate import evaluate

        res = evaluate(segmenter, data, fmt, out, classes=classes, split=o.words(split), overlap=overlap,
                       batch_size=batch_size, device=device, overwrite=overwrite, progress=progress)
        typer.echo(res.metrics.markdown_table())
        typer.echo(f"\nwrote {res.json_path}, {res.markdown_path}, {res.confusion_path}")
