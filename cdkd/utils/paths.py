"""Files as inputs and outputs: a file's identity (SHA-256, cached), a folder's contents as one digest, and
whether an output folder can be written, checked before any work."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

from cdkd.errors import CdkdIOError


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes; computed once per (path, size, modification time) in a process, since models
    and engines can be hundreds of MB and a run asks more than once."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(files: Iterable[str | Path], root: str | Path | None = None) -> str:
    """One digest of a set of files: their paths (relative to ``root``, so a moved data folder is the same data)
    and sizes, in sorted order. Cheap (no file is read), and it changes when a file is added, removed, renamed
    or rewritten to another size."""
    base = Path(root).resolve() if root is not None else None
    items = []
    for f in files:
        p = Path(f).resolve()
        name = p.relative_to(base).as_posix() if base is not None and p.is_relative_to(base) else p.as_posix()
        try:
            size = p.stat().st_size
        except OSError:
            size = -1
        items.append(f"{name}\t{size}")
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()


def check_writable(folder: str | Path, what: str) -> None:
    """Raise ``CdkdIOError("{what}: ...")`` unless files can be created in ``folder`` (or, when it does not exist
    yet, in its nearest existing parent, where it would be created). Writes nothing that stays."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise CdkdIOError(f"{what}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CdkdIOError(f"{what}: the folder {probe} is not writable (permission denied); choose another output")
    try:  # os.access does not know about read-only mounts or full disks
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise CdkdIOError(f"{what}: cannot create files in {probe} ({e.strerror or e})") from None
