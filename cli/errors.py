"""Library errors become one clean line and an exit code at the CLI's edge (rasterio's ``rio`` does the same)."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import typer

from cdkd.errors import CdkdError, CdkdValueError
from cdkd.progress import emit


@contextlib.contextmanager
def cli_errors(resumable: bool = False) -> Iterator[None]:
    """Print ``Error: ...`` for cdkd's own errors and exit 2 for bad values, 1 for everything else cdkd raises.

    ``resumable``: the command has ``--resume``, so an interrupted run says how to continue it.

    Only ``CdkdError`` is caught: anything else is a bug and keeps its traceback. (Never catch bare
    ``Exception`` here: typer's ``Exit`` is an exception too and must pass through.)
    """
    try:
        yield
    except CdkdError as e:
        code = 2 if isinstance(e, CdkdValueError) else 1
        print(f"Error: {e}", file=sys.stderr)
        emit("error", message=str(e), exit_code=code)
        raise typer.Exit(code) from None
    except KeyboardInterrupt:
        hint = "; rerun with --resume to continue from the last checkpoint" if resumable else ""
        print(f"Interrupted{hint}.", file=sys.stderr)
        emit("interrupted", message=f"Interrupted{hint}.", resumable=resumable)
        raise typer.Exit(130) from None
    except MemoryError:  # numpy's _ArrayMemoryError, torch's CUDA OutOfMemoryError (a RuntimeError too: below)
        _out_of_memory()
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        _out_of_memory()


def is_out_of_memory(e: BaseException) -> bool:
    """torch's allocation failures: ``torch.OutOfMemoryError`` on CUDA, a RuntimeError from the CPU allocator."""
    return (
        type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e) or "DefaultCPUAllocator" in str(e)
    )


def _out_of_memory() -> None:
    print(
        "Error: out of memory; use a smaller --tile-size or --batch-size (or --grad-accum for training)",
        file=sys.stderr,
    )
    raise typer.Exit(1) from None
