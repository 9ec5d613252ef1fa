"""Run the user's ``cdkd`` as a child process and follow it: progress, messages, Cancel, errors, outputs.

This module runs inside QGIS's Python, which has no torch (and often no numpy of the right version), so it uses
the standard library only and never imports cdkd. It talks to cdkd through the command line:

- ``cdkd --progress-format json COMMAND ...`` writes JSON lines on stderr (``cdkd.progress``): ``progress``
  events become the progress bar, ``error`` the message of the failure, ``finish`` the outputs;
- Cancel sends the child SIGINT (CTRL_BREAK_EVENT on Windows, which cdkd treats as Ctrl-C), the same signal
  Ctrl-C sends in a terminal: cdkd finishes its batch, saves a checkpoint and exits with 130, so a later run
  with ``--resume`` continues where it stopped;
- a failure comes back as cdkd's own one-line message (``CdkdRunError``), a cancelled run as ``CdkdCanceledError``.

Which ``cdkd`` runs is found by ``find_cdkd``: ``$CDKD_EXECUTABLE``, else what ``cdkd qgis install`` recorded
in ``cdkd_processing.json`` beside this file, else ``cdkd`` on the PATH.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

CONFIG_NAME = "cdkd_processing.json"  # written by ``cdkd qgis install`` beside the plugin's files
ENV_EXECUTABLE = "CDKD_EXECUTABLE"
# Variables QGIS may set for its own Python, GDAL and PROJ (OSGeo4W, the macOS bundle); the user's cdkd has its
# own, so these are not passed on unless ``cdkd qgis install`` recorded the installing shell's values.
FOREIGN_ENV = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "GDAL_DATA", "GDAL_DRIVER_PATH", "PROJ_LIB", "PROJ_DATA")
INTERRUPTED_EXIT = 130  # cdkd's exit code after Ctrl-C
POLL_SECONDS = 0.1  # how often Cancel is looked at while cdkd runs
STOP_GRACE_SECONDS = 300.0  # after Cancel, the time cdkd gets to save its checkpoint before it is killed
TAIL_LINES = 20  # stderr lines kept to explain a crash that printed no ``Error:`` line


class CdkdRunError(Exception):
    """cdkd stopped with an error; the message is cdkd's own line (or the end of what it printed)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class CdkdCanceledError(CdkdRunError):
    """The run was cancelled; where the command can resume, cdkd saved a checkpoint first."""


@dataclass(frozen=True)
class CdkdCommand:
    """How to start cdkd: ``argv`` (the executable, or ``python -m cli.main``) and variables to set for it."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    source: str = ""  # where it was found, for messages

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` (QGIS's environment) without QGIS's own Python/GDAL/PROJ settings, plus ``env``."""
        env = {k: v for k, v in base.items() if k not in FOREIGN_ENV}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed, not when a pipe buffer fills
        env["PYTHONIOENCODING"] = "utf-8"
        return env


def config_path(plugin_dir: Path | None = None) -> Path:
    return Path(plugin_dir or Path(__file__).resolve().parent) / CONFIG_NAME


def find_cdkd(plugin_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> CdkdCommand:
    """The cdkd to run: ``$CDKD_EXECUTABLE``, else the one ``cdkd qgis install`` recorded, else ``cdkd`` on PATH."""
    environ = os.environ if environ is None else environ
    given = environ.get(ENV_EXECUTABLE)
    if given:
        return CdkdCommand((given,), source=f"${ENV_EXECUTABLE}")
    path = config_path(plugin_dir)
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            argv = tuple(str(a) for a in recorded["command"])
            env = {str(k): str(v) for k, v in recorded.get("env", {}).items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CdkdRunError(f"{path}: unreadable ({e}); run `cdkd qgis install` again") from None
        if argv:
            return CdkdCommand(argv, env, source=str(path))
    found = shutil.which("cdkd")
    if found:
        return CdkdCommand((found,), source="PATH")
    raise CdkdRunError(
        "cdkd not found: run `cdkd qgis install` in the environment where cdkd is installed (it "
        f"records which cdkd to call), or set {ENV_EXECUTABLE} to the cdkd executable"
    )


class Listener:
    """What a run reports, as it happens. The QGIS algorithms forward these to ``QgsProcessingFeedback``; this
    base ignores everything and is never cancelled."""

    def is_canceled(self) -> bool:
        return False

    def progress(self, percent: float, text: str) -> None:
        """``percent`` (0..100) of the current stage ``text`` (the scene's name, ``vectorize``...)."""

    def info(self, text: str) -> None:
        """A line of cdkd's report (stdout) or a notice on stderr."""

    def warning(self, text: str) -> None:
        """A ``Warning: ...`` line."""

    def command(self, text: str) -> None:
        """The command line about to run."""


@dataclass
class RunResult:
    """A finished run: the files cdkd said it wrote (``finish`` event) and what it printed on stdout."""

    outputs: list[str]
    stdout: list[str]
    returncode: int
    canceled: bool = False  # Cancel came too late: cdkd had finished


def run_cdkd(
    args: Sequence[str],
    listener: Listener | None = None,
    command: CdkdCommand | None = None,
    poll: float = POLL_SECONDS,
    grace: float = STOP_GRACE_SECONDS,
) -> RunResult:
    """Run ``cdkd --progress-format json ARGS...`` and follow it until it exits (see the module docstring).

    Raises ``CdkdRunError`` with cdkd's one-line error (non-zero exit), ``CdkdCanceledError`` after Cancel.
    """
    command = command or find_cdkd()
    listener = listener or Listener()
    argv = [*command.argv, "--progress-format", "json", *args]
    listener.command(" ".join(_quote(a) for a in argv))
    extra: dict[str, Any] = {}
    if os.name == "nt":  # a process group of its own, so CTRL_BREAK_EVENT reaches cdkd and not QGIS
        extra["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=command.environment(os.environ),
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **extra,
        )
    except OSError as e:
        raise CdkdRunError(
            f"cannot start cdkd ({argv[0]}, from {command.source}): {e.strerror or e}; run `cdkd qgis "
            "install` again from the environment that has cdkd"
        ) from None
    return _Follower(proc, listener, poll, grace).follow()


class _Follower:
    """Reads a running cdkd's two streams in threads and handles each line in the caller's thread."""

    def __init__(self, proc: subprocess.Popen, listener: Listener, poll: float, grace: float) -> None:
        self.proc, self.listener, self.poll, self.grace = proc, listener, poll, grace
        self.lines: queue.Queue = queue.Queue()
        self.outputs: list[str] = []
        self.stdout: list[str] = []
        self.tail: list[str] = []
        self.error: str | None = None
        self.error_line: str | None = None
        self.interrupted: str | None = None
        self.canceled_at: float | None = None

    def follow(self) -> RunResult:
        pumps = [
            threading.Thread(target=self._pump, args=(name, stream), daemon=True)
            for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))
        ]
        for pump in pumps:
            pump.start()
        open_streams = len(pumps)
        try:
            while open_streams:
                try:
                    name, line = self.lines.get(timeout=self.poll)
                except queue.Empty:
                    pass
                else:
                    if line is None:
                        open_streams -= 1
                    else:
                        self._handle(name, line.rstrip("\r\n"))
                self._watch_cancel()
            code = self.proc.wait()
        except BaseException:
            # QGIS itself is going away (or a listener raised): do not leave cdkd running without a reader
            self._stop(force=True)
            raise
        return self._result(code)

    def _pump(self, name: str, stream: Any) -> None:
        for line in stream:
            self.lines.put((name, line))
        stream.close()
        self.lines.put((name, None))

    # ------------------------------------------------------------------------------------------------ lines

    def _handle(self, stream: str, line: str) -> None:
        if stream == "stdout":
            self.stdout.append(line)
            self.listener.info(line)
            return
        event = _event(line)
        if event is None:
            self._stderr_text(line)
            return
        kind = event.get("event")
        if kind == "progress":
            fraction = event.get("fraction")
            if isinstance(fraction, (int, float)):
                self.listener.progress(100.0 * float(fraction), str(event.get("desc") or ""))
        elif kind == "finish":
            self.outputs = [str(p) for p in event.get("outputs") or []]
        elif kind == "error":
            self.error = str(event.get("message") or "")
        elif kind == "interrupted":
            self.interrupted = str(event.get("message") or "Interrupted.")
        elif kind == "start":
            self.listener.info(f"cdkd {event.get('cdkd_version', '?')} started (process {event.get('pid', '?')})")

    def _stderr_text(self, line: str) -> None:
        if not line.strip():
            return
        self.tail = (self.tail + [line])[-TAIL_LINES:]
        if line.startswith("Error: "):
            self.error_line = line[len("Error: ") :]
        elif line.startswith("Warning: "):
            self.listener.warning(line[len("Warning: ") :])
        elif not line.startswith("Interrupted"):
            self.listener.info(line)

    # ------------------------------------------------------------------------------------------------ cancel

    def _watch_cancel(self) -> None:
        if self.canceled_at is None:
            if self.proc.poll() is None and self.listener.is_canceled():
                self.canceled_at = time.monotonic()
                self.listener.info("Cancel: asking cdkd to save a checkpoint and stop")
                self._stop(force=False)
        elif self.proc.poll() is None and time.monotonic() - self.canceled_at > self.grace:
            self.listener.warning(f"cdkd did not stop within {self.grace:.0f} s of Cancel; killing it")
            self._stop(force=True)

    def _stop(self, force: bool) -> None:
        if self.proc.poll() is not None:
            return
        try:
            if force:
                self.proc.kill()
            elif os.name == "nt":
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            else:
                self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: cdkd checkpoints, then exits
        except OSError:
            pass  # it exited in between

    # ------------------------------------------------------------------------------------------------ result

    def _result(self, code: int) -> RunResult:
        if code == 0:
            return RunResult(self.outputs, self.stdout, code, canceled=self.canceled_at is not None)
        message = self.error or self.error_line
        if self.canceled_at is not None or code == INTERRUPTED_EXIT or self.interrupted:
            raise CdkdCanceledError(self.interrupted or message or "cdkd was stopped before it finished", code)
        if not message:
            message = "\n".join(self.tail) or f"cdkd exited with code {code} and printed no error"
        raise CdkdRunError(message, code)


def _event(line: str) -> dict | None:
    """A cdkd JSON event line as a dict, or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _quote(arg: str) -> str:
    return f'"{arg}"' if not arg or any(c.isspace() for c in arg) else arg
