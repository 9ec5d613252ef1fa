"""Exclusive runs: a lock that a live process holds on its run folder (``OUT.tif.partial/``, a training run).

The lock is an advisory ``flock`` on ``FOLDER/run.lock``, held for as long as the process lives: the kernel drops
it when the process ends in any way (kill -9 included), so a lock file whose lock nobody holds is a dead run's,
stale by construction, and is taken over without asking. The file's text names the holder (pid, host, start
time, command) so a refusal can say who is at work. On Windows ``msvcrt.locking`` on the file's first byte does
the same (also released by the system when the process ends).

A second process is refused while the first lives, whatever its flags: ``--overwrite`` replaces finished or dead
work, never a live run's.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from cdkd.errors import CdkdIOError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

LOCK_NAME = "run.lock"


class RunInUseError(CdkdIOError):
    """Another live process holds the run folder's lock."""


def lock_path(folder: str | Path) -> Path:
    return Path(folder) / LOCK_NAME


def holder(folder: str | Path) -> dict[str, Any] | None:
    """The live process holding ``folder``'s lock (its pid, host, start time), or None when no live one does.

    Reads only: a free lock is not taken.
    """
    path = lock_path(folder)
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if not _try_lock(fd):
            return _read(path) or {"pid": "?", "host": "?"}
        _unlock(fd)
        return None
    finally:
        os.close(fd)


def describe(info: dict[str, Any]) -> str:
    started = info.get("started")
    since = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{since}"


def in_use_error(folder: str | Path, info: dict[str, Any], what: str | Path) -> RunInUseError:
    return RunInUseError(
        f"{what}: another cdkd run is writing it ({describe(info)}; its lock is {lock_path(folder)}); "
        "wait for it to finish or stop it first"
    )


class RunLock:
    """``with RunLock(folder, what):`` holds ``folder``'s lock, creating the folder; ``what`` names the output in
    a refusal (``RunInUseError``)."""

    def __init__(self, folder: str | Path, what: str | Path) -> None:
        self.folder, self.what = Path(folder), str(what)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = lock_path(self.folder)
        for _ in range(5):  # the file can be replaced between open and flock (a run that just ended removed it)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._lock(fd, path)
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                self._write(fd)
                return self
            os.close(fd)
        raise RunInUseError(f"{self.what}: cannot take the lock {path} (it keeps changing); is another run starting?")

    def _lock(self, fd: int, path: Path) -> None:
        if not _try_lock(fd):
            raise in_use_error(self.folder, _read(path) or {}, self.what)

    def _write(self, fd: int) -> None:
        text = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "command": " ".join(sys.argv[:1] + sys.argv[1:8]),
            }
        )
        os.ftruncate(fd, 1)  # the first byte is the one msvcrt locks; the text follows on a new line
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"\n" + text.encode())

    def release(self, remove: bool = False) -> None:
        """Let go; ``remove`` also deletes the lock file (the run folder is going away)."""
        if self._fd is None:
            return
        if remove:
            lock_path(self.folder).unlink(missing_ok=True)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text().strip() or "{}")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _try_lock(fd: int) -> bool:
    """Take ``fd``'s exclusive lock without waiting; False when a live process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
