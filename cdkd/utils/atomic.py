"""Atomic file output: write to a temporary name in the same folder, then rename.

A crash or Ctrl-C leaves either the old file or the new one, never half a file (``os.replace`` is atomic on
POSIX and Windows when source and target are on the same file system, hence the temporary in the same folder).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds, delete it if not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary keeps the real suffix last: writers that pick a format from it (matplotlib, GDAL) still work.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file owner-only (0600); an output should get the permissions open() would give it
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch  # here, not at the top: raster and vector outputs should not pay for importing torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
