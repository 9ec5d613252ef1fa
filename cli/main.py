"""The ``cdkd`` command line: one small module per command; each parses, calls ``cdkd`` and prints."""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import typer

from cli import demo, distill, evaluate, export, finetune, report, segment, vectorize

app = typer.Typer(
    name="cdkd",
    help="Distil SAM into a small land-cover model (Mask-CDKD) and map satellite scenes with it.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish and PowerShell
    pretty_exceptions_enable=False,
)
app.command("distill", no_args_is_help=True)(distill.distill_command)
app.command("finetune", no_args_is_help=True)(finetune.finetune_command)
app.command("evaluate", no_args_is_help=True)(evaluate.evaluate_command)
app.command("export", no_args_is_help=True)(export.export_command)
app.command("segment", no_args_is_help=True)(segment.segment_command)
app.command("vectorize", no_args_is_help=True)(vectorize.vectorize_command)
app.command("report", no_args_is_help=True)(report.report_command)
app.command("demo")(demo.demo_command)


def _print_version(given: bool) -> None:
    if given:
        import cdkd

        typer.echo(f"cdkd {cdkd.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_print_version, is_eager=True,
                                           help="Print the cdkd version and exit."),
) -> None:
    """cdkd: Mask-CDKD distillation, land-cover fine-tuning, export and scene mapping."""
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings as one readable line on stderr; the source line Python would add means nothing to a user."""
    print(f"Warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    app()
