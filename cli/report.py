"""``cdkd report RUN``: the curves and summary of a training run (distill or finetune), finished or not."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli import options as o
from cli.errors import cli_errors


def report_command(
    run: Path = typer.Argument(..., help="Run folder of cdkd distill or cdkd finetune (their --out)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Write the picture here (.png, .pdf or .svg) instead of RUN/curves.png."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    overwrite: bool = o.overwrite_opt,
) -> None:
    """Re-draw a run's curves.png and print its summary: steps, losses, stage, throughput, checkpoints.

    Works on a run that is still going or was stopped as well as on a finished one.

    Example: cdkd report runs/vitl            cdkd report runs/seg --json --out seg.png
    """
    with cli_errors():
        from cdkd.train.summary import write_curves

        summary = write_curves(run, out, overwrite=overwrite or out is None)
        if as_json:
            typer.echo(summary.to_json())
        else:
            typer.echo("\n".join(summary.lines()))
