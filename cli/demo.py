"""``cdkd demo``: the whole pipeline on CPU in a few minutes, on data made in code; no downloads, no SAM weights."""

from __future__ import annotations

from pathlib import Path

import typer

from cli import options as o
from cli.errors import cli_errors


def demo_command(
    out: Path = typer.Option(Path("cdkd_demo"), "--out", help="Folder for the demo's data and outputs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo in --out."),
    progress: bool = o.progress_opt,
) -> None:
    """Distil, fine-tune, export to ONNX, segment a scene with ONNX Runtime and vectorise it, all in one go.

    Example: cdkd demo --out cdkd_demo
    """
    with cli_errors():
        from cdkd.demo.pipeline import EXPLAIN, run_demo

        result = run_demo(out, overwrite=overwrite, progress=progress, log=lambda m: typer.echo(m, err=True))
        typer.echo(f"\ncdkd demo finished in {result.seconds:.0f} s. Outputs:")
        for key, path in result.outputs.items():
            typer.echo(f"  {str(path):<48} {EXPLAIN[key]}")
        typer.echo(
            f"\nThe map agrees with the scene's true classes on {100 * result.agreement:.1f} % of its valid "
            "pixels (synthetic data: colours and textures separate the classes)."
        )
        typer.echo(
            "Real use needs a SAM checkpoint (see README: SAM checkpoints) and real imagery: "
            "cdkd distill --data TILES/ --teacher-checkpoint sam_vit_l_0b3195.pth, then cdkd finetune, "
            "cdkd export, cdkd segment and cdkd vectorize."
        )
