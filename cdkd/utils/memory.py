"""Memory a job will need, checked against what the machine has before the job starts."""

from __future__ import annotations

import os

from cdkd.errors import CdkdValueError


def available_bytes() -> int | None:
    """Memory available to new allocations (Linux ``MemAvailable``; elsewhere physical memory), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(need: int, what: str, fix: str) -> None:
    """CdkdValueError when ``need`` bytes are more than the machine has available: ``what`` says for what,
    ``fix`` which option to change. Only the certain failures are refused: the estimate is a lower bound."""
    have = available_bytes()
    if have is not None and need > have:
        raise CdkdValueError(
            f"{what} need at least {need / 2**30:.1f} GiB of memory, more than the "
            f"{have / 2**30:.1f} GiB available; {fix}"
        )
