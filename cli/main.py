"""The ``cdkd`` command line: one small module per command; each parses, calls ``cdkd`` and prints."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import Any, Optional

import typer

import cdkd
from cli import demo, distill, evaluate, export, finetune, qgis, report, segment, vectorize
from cli import options as o


def _finished(*_: Any, **__: Any) -> None:
    """After any command that succeeded: the ``finish`` event, unless the command sent it with its outputs."""
    from cdkd.progress import finish, finished

    if not finished():
        finish([])


app = typer.Typer(
    name="cdkd",
    help="Distil SAM into a small land-cover model (Mask-CDKD) and map satellite scenes with it.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish and PowerShell
    pretty_exceptions_enable=False,
    result_callback=_finished,
)
app.command("distill", no_args_is_help=True)(distill.distill_command)
app.command("finetune", no_args_is_help=True)(finetune.finetune_command)
app.command("evaluate", no_args_is_help=True)(evaluate.evaluate_command)
app.command("export", no_args_is_help=True)(export.export_command)
app.command("segment", no_args_is_help=True)(segment.segment_command)
app.command("vectorize", no_args_is_help=True)(vectorize.vectorize_command)
app.command("report", no_args_is_help=True)(report.report_command)
app.command("demo")(demo.demo_command)
app.add_typer(qgis.app, name="qgis")


def _print_version(given: bool) -> None:
    if given:
        typer.echo(f"cdkd {cdkd.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_print_version, is_eager=True, help="Print the cdkd version and exit."
    ),
    progress_format: o.ProgressFormat = typer.Option(
        o.ProgressFormat.bar,
        "--progress-format",
        envvar="CDKD_PROGRESS",
        case_sensitive=False,
        help="bar: a progress bar; json: JSON lines on stderr (progress, start, finish with the outputs, error), "
        "for programs that run cdkd, such as the QGIS provider; none: no progress.",
    ),
) -> None:
    """cdkd: Mask-CDKD distillation, land-cover fine-tuning, export and scene mapping."""
    warnings.showwarning = _show_warning
    from cdkd import progress

    if progress_format.value != progress.progress_format():  # the flag; its envvar is already in the environment
        progress.set_progress_format(progress_format.value)  # child processes (torchrun ranks) report alike
    if progress_format.value == "json":
        _break_as_interrupt()
    progress.command_started(ctx.invoked_subcommand, argv=sys.argv[1:], cdkd_version=cdkd.__version__, pid=os.getpid())


def _break_as_interrupt() -> None:
    """On Windows a parent can send a console process CTRL_BREAK_EVENT but no Ctrl-C of its own; treat it as
    Ctrl-C, so a program that stops cdkd (the QGIS provider's Cancel) gets the same checkpoint."""
    if hasattr(signal, "SIGBREAK"):
        signal.signal(signal.SIGBREAK, lambda signum, frame: signal.raise_signal(signal.SIGINT))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings as one readable line on stderr; the source line Python would add means nothing to a user."""
    print(f"Warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    app()
