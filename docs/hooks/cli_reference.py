"""mkdocs hook: the command-line reference, rendered from the Typer app at build time (never copied by hand).

A page line ``<!-- cdkd-cli: NAME -->`` becomes the reference of ``cdkd NAME``: usage, description, examples,
arguments and every option grouped by its help panel, with defaults and choices as ``--help`` gives them; the
panels get ``###`` headings, or the level written after the name (``<!-- cdkd-cli: NAME #### -->``).
``<!-- cdkd-cli: all -->`` becomes the whole app (global options, then every command under its own heading).
Outside mkdocs the marker is an HTML comment, so the Markdown still reads cleanly on a code host.

Runs in the mkdocs process: the repository root (where ``mkdocs.yml`` lives) goes first on ``sys.path`` so the
checkout's ``cli`` and ``cdkd`` are rendered, not an installed copy. ``cli.main`` imports no torch (commands
import their heavy dependencies inside their bodies), so this costs a fraction of a second.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

_MARKER = re.compile(r"^<!--\s*cdkd-cli:\s*([\w-]+)(?:\s+(#{2,6}))?\s*-->\s*$", re.MULTILINE)
# An example line in a command's help: "cdkd ...", optionally after a label ("Example: cdkd ...") and with a
# parenthesised remark at its end ("cdkd export ... (on the target GPU);").
_EXAMPLE = re.compile(r"^\s*(?:(?P<label>[A-Za-z][\w -]*):\s*)?(?P<cmd>cdkd\s.*?)\s*;?\s*$")
_REMARK = re.compile(r"^(?P<cmd>.*?)\s+\((?P<remark>[^()]*)\)\.?$")
_ESCAPED = "\\`*_[]|#"


def _app_command() -> Any:
    """The click command behind ``cdkd`` (typer's own conversion, as ``cdkd --help`` uses it)."""
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    import typer

    from cli.main import app

    return typer.main.get_command(app)


def _text(value: str) -> str:
    """Help text as literal Markdown: no emphasis from ``*.tif``, no tags from ``<stem>``, no cell breaks."""
    for ch in _ESCAPED:
        value = value.replace(ch, "\\" + ch)
    return value.replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _code(value: str) -> str:
    """An inline code span (Python-Markdown's tables do not split cells at pipes inside code spans)."""
    return "`" + value + "`"


def _help_blocks(help_text: str) -> list[str]:
    """A command's help as Markdown: prose paragraphs, and the example command lines as one bash block."""
    out: list[str] = []
    examples: list[str] = []
    for paragraph in re.split(r"\n\s*\n", help_text.strip()):
        prose: list[str] = []
        for line in paragraph.splitlines():
            match = _EXAMPLE.match(line)
            if match is None:
                if line.strip().rstrip(":") not in ("Example", "Examples"):
                    prose.append(line.strip())
                continue
            cmd, label = match["cmd"], match["label"]
            if label and label not in ("Example", "Examples"):
                examples.append(f"# {label}")
            remark = _REMARK.match(cmd)
            examples.append(f"{remark['cmd']}   # {remark['remark']}" if remark else cmd)
        if prose:
            out.append(_text(" ".join(prose)))
    if examples:
        out.append("Examples:\n\n```bash\n" + "\n".join(examples) + "\n```")
    return out


def _usage(name: str, command: Any) -> str:
    parts = ["cdkd", name, "[OPTIONS]"] if name else ["cdkd", "[OPTIONS]", "COMMAND [ARGS]..."]
    for param in command.params:
        if param.param_type_name != "argument":
            continue
        arg = param.name.upper() + ("..." if param.nargs == -1 else "")
        parts.append(arg if param.required else f"[{arg}]")
    return " ".join(parts)


def _split_extra(help_record: str) -> tuple[str, list[str]]:
    """click's ``"help  [default: x; required]"`` as the help and its bracketed notes."""
    match = re.match(r"^(?P<help>.*?)(?:  |^)\[(?P<extra>[^\[\]]*)\]$", help_record, re.DOTALL)
    if match is None:
        return help_record.strip(), []
    return match["help"].strip(), [e.strip() for e in match["extra"].split(";") if e.strip()]


def _param_rows(command: Any, ctx: Any) -> tuple[list[str], dict[str, list[str]]]:
    """Argument rows, and option rows by help panel (typer's ``rich_help_panel``, default "Options")."""
    arguments: list[str] = []
    panels: dict[str, list[str]] = {}
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        if param.param_type_name == "argument":
            notes = ["required"] if param.required else []
            help_text = _text(getattr(param, "help", None) or "")
            name = param.name.upper() + ("..." if param.nargs == -1 else "")
            arguments.append(f"| {_code(name)} | {help_text}{_notes(notes)} |")
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        opts, help_record = record
        help_text, extra = _split_extra(help_record)
        default = next((e.split(":", 1)[1].strip() for e in extra if e.startswith("default:")), "")
        notes = [e for e in extra if not e.startswith("default:")]
        row = f"| {_code(opts)} | {_text(help_text)}{_notes(notes)} | {_code(default) if default else ''} |"
        panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(row)
    return arguments, panels


def _notes(notes: list[str]) -> str:
    return (" *(" + _text("; ".join(notes)) + ")*") if notes else ""


def render_command(name: str, command: Any, parent_ctx: Any, heading: str = "###") -> str:
    """The reference of one command: usage, help, arguments and options (``heading`` for its sub-headings)."""
    import click

    ctx = click.Context(command, info_name=name, parent=parent_ctx)
    blocks = [f"```text\n{_usage(name, command)}\n```"]
    blocks += _help_blocks(command.help or "")
    arguments, panels = _param_rows(command, ctx)
    if arguments:
        blocks.append(f"{heading} Arguments\n\n| argument | description |\n|---|---|\n" + "\n".join(arguments))
    # typer's --help order: the default panel first, then the named panels in the order they first appear
    for panel, rows in sorted(panels.items(), key=lambda item: item[0] != "Options"):
        blocks.append(f"{heading} {panel}\n\n| option | description | default |\n|---|---|---|\n" + "\n".join(rows))
    return "\n\n".join(blocks)


def render(which: str, heading: str = "###") -> str:
    """``which``: a command's name, or ``all`` for the whole app; ``heading``: the panels' heading level."""
    import click

    group = _app_command()
    root_ctx = click.Context(group, info_name="cdkd")
    if which != "all":
        if which not in group.commands:
            raise ValueError(f"<!-- cdkd-cli: {which} -->: cdkd has no such command "
                             f"(commands: {', '.join(group.commands)})")
        return render_command(which, group.commands[which], root_ctx, heading)
    parts = [render_command("", group, None, heading="###").replace("### Options", "### Global options", 1)]
    for name, command in group.commands.items():
        if getattr(command, "hidden", False):
            continue
        parts.append(f"## cdkd {name} {{#cdkd-{name}}}\n\n" + render_command(name, command, root_ctx))
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:  # noqa: ARG001 (mkdocs' signature)
    """Replace every marker in a page by the rendered reference."""
    return _MARKER.sub(lambda m: render(m.group(1), m.group(2) or "###"), markdown)
