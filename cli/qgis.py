"""``cdkd qgis install`` / ``cdkd qgis zip``: the QGIS Processing provider, into a QGIS profile or a ZIP."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.errors import cli_errors

app = typer.Typer(
    help="The cdkd Processing provider for QGIS (Segment scene, Vectorize classes, Segment objects, "
    "Segment and vectorize): install it into a QGIS profile or pack it as a ZIP.",
    no_args_is_help=True,
)

config_path_opt = typer.Option(
    None,
    "--config-path",
    help="QGIS settings folder holding profiles/ (default: "
    "$QGIS_CUSTOM_CONFIG_PATH, else QGIS's own: ~/.local/share/QGIS/QGIS3 on Linux, "
    "~/Library/Application Support/QGIS/QGIS3 on macOS, %APPDATA%\\QGIS\\QGIS3 on "
    "Windows).",
)
executable_opt = typer.Option(None, "--executable", help="The cdkd executable QGIS should run (default: this one).")


@app.command("install")
def install_command(
    profile: str = typer.Option("default", "--profile", help="QGIS user profile to install into."),
    config_path: Optional[Path] = config_path_opt,
    executable: Optional[Path] = executable_opt,
    enable: bool = typer.Option(
        True,
        "--enable/--no-enable",
        help="Enable the plugin in the profile's settings (QGIS and qgis_process load it without the plugin manager).",
    ),
) -> None:
    """Copy the plugin into a QGIS profile and record which cdkd it runs; restart QGIS to load it.

    Examples:
      cdkd qgis install
      cdkd qgis install --profile work
      qgis_process run cdkd:segment -- INPUT=scene.tif MODEL=segmenter.pt OUTPUT=classes.tif
    """
    with cli_errors():
        from cdkd.qgis import install_plugin

        command = (str(executable.absolute()),) if executable is not None else None
        result = install_plugin(profile, config_path, command=command, enable=enable)
        typer.echo(f"installed the cdkd Processing provider in {result.plugin_dir}")
        typer.echo(f"  runs: {' '.join(result.command)}  (recorded in {result.config_file})")
        if result.settings is not None:
            typer.echo(f"  enabled in {result.settings}")
        typer.echo("Restart QGIS: the algorithms are in the Processing Toolbox under cdkd.")


@app.command("zip")
def zip_command(
    out: Path = typer.Argument(..., help="The ZIP to write, e.g. cdkd_processing.zip."),
    executable: Optional[Path] = executable_opt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing ZIP."),
) -> None:
    """Pack the plugin for QGIS's Plugins > Manage and Install Plugins > Install from ZIP.

    The ZIP names this cdkd (or --executable); on another machine set CDKD_EXECUTABLE or run cdkd qgis install there.
    """
    with cli_errors():
        from cdkd.progress import finish
        from cdkd.qgis import zip_plugin

        command = (str(executable.absolute()),) if executable is not None else None
        typer.echo(f"wrote {zip_plugin(out, command=command, overwrite=overwrite)}")
        finish([out])
