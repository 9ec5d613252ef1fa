"""A scene run's state on disk: the output's files, the lock a live run holds, the fingerprint a ``--resume`` must
match, and the checkpoint it continues from.

Everything an interrupted run leaves lives in ``OUT.partial/``: ``run.lock`` (``cdkd.utils.runlock``: held while
a process works in the folder), ``state.json`` (format, fingerprint, rows done, counts, the writer's progress)
and the arrays it names (``state_<n>.npz``), beside the chunk files the writer made. A checkpoint is saved by
``save_state`` and read back by ``load_state`` / ``load_arrays``; ``check_outputs`` refuses, before any work,
whatever is in the way and says what the next command will accept; ``claimed`` holds the folder's lock for the
run and clears what a fresh run must not find.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from cdkd.data.gdal import is_virtual_path
from cdkd.errors import CdkdIOError, CdkdValueError, CheckpointError, OutputExistsError
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.core.source import SceneSource
from cdkd.utils.atomic import atomic_path
from cdkd.utils.paths import check_writable, file_sha256
from cdkd.utils.runlock import LOCK_NAME, RunLock, holder, in_use_error

if TYPE_CHECKING:
    from cdkd.inference.runtimes import RuntimeInfo

__all__ = [
    "OUTPUT_SUFFIXES",
    "STATE_FORMAT",
    "check_outputs",
    "claimed",
    "deferred_sigint",
    "fingerprint",
    "load_arrays",
    "load_state",
    "model_sha256",
    "output_paths",
    "save_state",
]


STATE_FORMAT = "cdkd.scene-state/2"


OUTPUT_SUFFIXES = (".tif", ".tiff")


def output_paths(out: Path) -> tuple[Path, Path, Path, Path]:
    """(class raster, confidence raster, report JSON, partial-work folder) for the output ``out``."""
    out = Path(out)
    return (
        out,
        out.with_name(f"{out.stem}_confidence{out.suffix}"),
        out.with_suffix(".json"),
        out.with_name(out.name + ".partial"),
    )


def model_sha256(runtime: RuntimeInfo) -> str:
    """SHA-256 of the runtime's model file (cached: engines can be hundreds of MB)."""
    return file_sha256(runtime.path)


def fingerprint(
    scene: str | Path,
    runtime: RuntimeInfo,
    source: SceneSource,
    tile: int,
    overlap: int,
    probs: bool,
    margin: int = 0,
) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption: the scene's identity, the model's
    weights (the file's SHA-256, not only its metadata: two models with the same classes and tile size give other
    maps), how it runs (runtime, autocast) and every option that changes the output."""
    identity: dict[str, Any]
    if source.stac is not None:
        identity = source.stac.identity()  # the item's href and id, and every asset's href
    elif is_virtual_path(scene):
        identity = {"scene": str(scene)}  # GDAL alone can stat it; the header facts stand in
    else:
        st = Path(scene).stat()
        identity = {"scene": str(Path(scene).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    info = source.info
    return {
        **identity,
        "shape": [info.height, info.width, info.count],
        "model": model_sha256(runtime),
        "runtime": runtime.name,
        "amp": runtime.options.get("amp"),
        "tile": tile,
        "overlap": overlap,
        "edge_context": margin,
        "bands": list(source.bands),
        "norm": source.norm.to_dict(),
        "probs": probs,
    }


def check_outputs(
    scene: str | Path,
    out: Path,
    options: SegmentOptions,
    suffixes: tuple[str, ...] = OUTPUT_SUFFIXES,
    kind: str = "the class raster is a GeoTIFF (COG)",
) -> None:
    """Refuse, before any work, outputs that would replace the scene, do not end in one of ``suffixes``, are being
    written by another live run, or are in the way (``--overwrite``); a ``resume`` needs an interrupted run's
    checkpoint. Each refusal offers what the next command will accept."""
    if out.suffix.lower() not in suffixes:
        raise CdkdValueError(f"{out}: {kind}; give an output ending in {' or '.join(suffixes)}")
    final, conf, report, partial = output_paths(out)
    if not is_virtual_path(scene):
        target = Path(scene).resolve()
        for path in (final, conf, report):
            if path.resolve() == target:
                # the rename at the end would replace the scene while (or after) it is read: the input would be lost
                raise CdkdValueError(
                    f"{path}: the output would replace the scene being segmented; choose another output"
                )
    live = holder(partial)
    if live is not None:
        raise in_use_error(partial, live, out)
    check_writable(out.parent, f"{out}: cannot write the output")
    resumable = (partial / "state.json").is_file()
    if options.resume:
        if resumable:
            return
        if partial.exists():
            raise CheckpointError(
                f"{out}: the interrupted run in {partial} stopped before its first checkpoint, so "
                "there is nothing to resume; pass --overwrite (not --resume) to start again"
            )
        if final.exists():
            raise CheckpointError(
                f"{out}: is complete (no interrupted run to resume); pass --overwrite (not --resume) to make it again"
            )
        raise CheckpointError(f"{out}: nothing to resume (no interrupted run in {partial}); run without --resume")
    existing = [p.name for p in (final, conf, report, partial) if p.exists()]
    if existing and not options.overwrite:
        if resumable:
            raise OutputExistsError(
                f"{out}: an interrupted run is in the way ({', '.join(existing)}); pass --resume "
                "to continue it or --overwrite to start again"
            )
        raise OutputExistsError(
            f"{out}: existing output is in the way ({', '.join(existing)}); pass --overwrite to replace it"
        )


@contextlib.contextmanager
def claimed(partial: Path, out: Path, resume: bool) -> Iterator[RunLock]:
    """Hold ``partial``'s lock for the block (refusing a live run's folder). A fresh run starts from an empty
    folder; one that fails before its first checkpoint takes the folder with it, since nothing in it could be
    resumed (and it would only stand in the way of the next run)."""
    lock = RunLock(partial, out).acquire()
    try:
        if not resume:
            for entry in partial.iterdir():
                if entry.name != LOCK_NAME:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        yield lock
    except BaseException:
        if not (partial / "state.json").is_file():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        lock.release(remove=not partial.exists())


@contextlib.contextmanager
def deferred_sigint() -> Iterator[Callable[[], bool]]:
    """Yields ``interrupted()``. The first Ctrl-C only sets it: the engine finishes its batch, saves a checkpoint
    and then raises KeyboardInterrupt, so ``--resume`` works even before the first timed checkpoint. A second
    Ctrl-C interrupts at once. (Only the main thread receives signals; elsewhere nothing is installed.)"""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hit = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if hit.is_set():
            raise KeyboardInterrupt
        hit.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield hit.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def load_state(partial: Path, expected: dict[str, Any]) -> dict[str, Any]:
    try:
        state = json.loads((partial / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{partial}: unreadable resume state ({e}); run again with --overwrite") from None
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{partial}: not a resume state of this cdkd version; run again with --overwrite")
    old = state["fingerprint"]
    changed = sorted(k for k in set(old) | set(expected) if old.get(k) != expected.get(k))
    if changed:
        diffs = "; ".join(f"{k}: {_short(old.get(k))} then, {_short(expected.get(k))} now" for k in changed[:3])
        raise CheckpointError(
            f"{partial}: cannot resume: {', '.join(changed)} differ from the interrupted run's "
            f"({diffs}); resume with the same inputs and options, or pass --overwrite to start "
            "again"
        )
    return state


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}"
    return text if len(text) <= 60 else text[:57] + "..."


def save_state(partial: Path, state: dict[str, Any], arrays: dict[str, Any]) -> None:
    """``state.json`` and the arrays it names (``state_<n>.npz``): arrays first, then the JSON that points at them,
    so a crash between the two leaves the previous, consistent pair."""
    n = int(state.get("sequence", 0))
    npz = partial / f"state_{n}.npz"
    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    state = dict(state, arrays=npz.name)
    with atomic_path(partial / "state.json") as tmp:
        tmp.write_text(json.dumps(state))
    for old in partial.glob("state_*.npz"):
        if old.name != npz.name:
            old.unlink(missing_ok=True)


def load_arrays(partial: Path, state: dict[str, Any]) -> dict[str, np.ndarray]:
    path = partial / state["arrays"]
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError) as e:
        raise CdkdIOError(f"{path}: unreadable resume state ({e}); run again with --overwrite") from None
