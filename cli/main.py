"""The ``cdkd`` command line: one small module per command; each parses, calls ``cdkd`` and prints."""

from __future__ import annotations

import typer

from cli import distill

app = typer.Typer(
    name="cdkd",
    help="Distil SAM into a small land-cover model (Mask-CDKD) and map satellite scenes with it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("distill", no_args_is_help=True)(distill.distill_command)


@app.callback()
def _main() -> None:
    """cdkd: Mask-CDKD distillation, land-cover fine-tuning, export and scene mapping."""


if __name__ == "__main__":
    app()
