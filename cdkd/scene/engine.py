"""The scene engine: one GeoTIFF of any size in, a seamless georeferenced class raster (COG) out, in flat memory.

``segment_scene`` walks the window plan row by row (``tiler.plan_rows``): it reads each window
(``source.SceneSource``: the model's bands and normalisation, nodata filled with the mean), skips windows without
a valid pixel, runs the rest through the runtime in batches, blends overlapping logits with the cosine window
(``blend.RowBandAccumulator``) and streams every row band that no later window touches to the output
(``writer.RasterWriter``). Output pixels are nodata exactly where the input is invalid (GDAL's dataset mask).

Memory is one band of ``tile`` rows across the scene (K x tile x W float32 sums) plus one batch of tiles: it grows
with the scene's width, never with its height. The working files and the band's partial
sums are checkpointed in ``OUT.partial/`` (every ``checkpoint_seconds``), so ``resume=True`` continues an
interrupted scene from the row after the last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import rasterio

from cdkd.config import PATCH_SIZE
from cdkd.errors import CdkdValueError, CheckpointError, DataError, OutputExistsError
from cdkd.scene.blend import RowBandAccumulator, blend_weights
from cdkd.scene.classraster import NODATA, check_num_classes, to_class_raster
from cdkd.scene.runtimes import Runtime
from cdkd.scene.source import SceneInfo, SceneSource
from cdkd.scene.tiler import PAD_MODES, TileWindow, pad_to_tile, plan_rows
from cdkd.scene.writer import CONFIDENCE_NODATA, RasterWriter, confidence_raster
from cdkd.utils.atomic import atomic_write_text

STATE_FORMAT = "cdkd.scene-state"
MAX_UNWRITTEN_BYTES = 32 * 2**20  # finished rows held between checkpoints before they are written regardless


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment a scene; ``None`` sizes mean the model's own."""

    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int = 4
    bands: tuple[int, ...] | None = None
    stats: str = "model"  # "model": the statistics stored with the model; "scene": computed from this scene
    probs: bool = False  # also write a uint8 confidence raster (max softmax x 255)
    pad_mode: str = "reflect"  # padding of scenes smaller than one tile
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    checkpoint_seconds: float = 30.0  # least time between checkpoints (--resume restarts from the last one)


@dataclass(frozen=True)
class ClassArea:
    pixels: int
    area_km2: float
    fraction: float  # of the valid pixels


@dataclass(frozen=True)
class SceneReport:
    """What ``segment_scene`` did; also written as ``OUT.json``."""

    scene: str
    output: str
    confidence: str | None
    runtime: str
    device: str
    crs: str
    width: int
    height: int
    tile_size: int
    overlap: int
    batch_size: int
    tiles: int
    tiles_run: int
    tiles_skipped: int  # windows without a valid pixel
    valid_pixels: int
    area_km2: float
    seconds: float
    mpx_per_s: float  # scene pixels (valid or not) per second of this run
    resumed_from_row: int  # window rows already done when this run started (0 for a fresh run)
    classes: dict[str, ClassArea] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_paths(out: Path) -> tuple[Path, Path, Path, Path]:
    """(class raster, confidence raster, report JSON, partial-work folder) for the output ``out``."""
    out = Path(out)
    return (out, out.with_name(f"{out.stem}_confidence{out.suffix}"), out.with_suffix(".json"),
            out.with_name(out.name + ".partial"))


def _resolve_tiling(runtime: Runtime, options: SegmentOptions) -> tuple[int, int]:
    meta = runtime.meta
    tile = meta.tile_size if options.tile_size is None else int(options.tile_size)
    overlap = meta.overlap if options.overlap is None else int(options.overlap)
    if tile <= 0 or tile % PATCH_SIZE:
        raise CdkdValueError(f"tile size {tile} is not a positive multiple of the patch size {PATCH_SIZE}")
    if tile != meta.tile_size and runtime.fixed_tile:
        raise CdkdValueError(f"the {runtime.name} model was built for {meta.tile_size} px tiles and cannot take "
                             f"--tile-size {tile}; export it again at that size or use the segmenter.pt")
    if not 0 <= overlap < tile:
        raise CdkdValueError(f"overlap {overlap} must be >= 0 and smaller than the tile size {tile}")
    if options.batch_size < 1:
        raise CdkdValueError(f"batch size must be at least 1, got {options.batch_size}")
    if options.pad_mode not in PAD_MODES:
        raise CdkdValueError(f"unknown pad mode {options.pad_mode!r}; choose one of {', '.join(PAD_MODES)}")
    return tile, overlap


def _fingerprint(scene: Path, runtime: Runtime, source: SceneSource, tile: int, overlap: int,
                 probs: bool) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption."""
    st = scene.stat()
    model = hashlib.sha256(runtime.meta.to_json().encode()).hexdigest()[:16]
    return {"scene": str(scene.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "model": model,
            "tile": tile, "overlap": overlap, "bands": list(source.bands), "norm": source.norm.to_dict(),
            "probs": probs}


class _Progress:
    """tqdm over windows (tiles/s and ETA), or nothing."""

    def __init__(self, total: int, initial: int, enabled: bool, name: str) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, unit="tile", dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_outputs(scene: Path, out: Path, options: SegmentOptions) -> None:
    final, conf, report, partial = output_paths(out)
    target = scene.resolve()
    for path in (final, conf, report):
        if path.resolve() == target:
            # the rename at the end would replace the scene while (or after) it is read: the input would be lost
            raise CdkdValueError(f"{path}: the output would replace the scene being segmented; choose another output")
    if options.resume:
        if not (partial / "state.json").is_file():
            raise CheckpointError(f"{out}: nothing to resume (no interrupted run in {partial})")
        return
    existing = [p.name for p in (final, conf, report, partial) if p.exists()]
    if existing and not options.overwrite:
        what = "an interrupted run" if partial.exists() and not final.exists() else "existing output"
        raise OutputExistsError(f"{out}: {what} is in the way ({', '.join(existing)}); pass --overwrite to replace "
                                "it" + (" or --resume to continue" if partial.exists() else ""))


class _Counts:
    """Per-class pixel counts of the rows written so far."""

    def __init__(self, num_classes: int, counts: Sequence[int] | None = None) -> None:
        self.counts = np.zeros(num_classes, dtype=np.int64) if counts is None else np.asarray(counts, np.int64)

    def add(self, classes: np.ndarray, valid: np.ndarray) -> None:
        self.counts += np.bincount(classes[valid].ravel(), minlength=len(self.counts))[: len(self.counts)]


def segment_scene(scene: str | Path, runtime: Runtime, out: str | Path,
                  options: SegmentOptions = SegmentOptions()) -> SceneReport:
    """Segment ``scene`` with ``runtime`` into the COG ``out`` (and ``OUT_confidence.tif`` with ``probs``).

    Raises DataError/CdkdIOError for a scene that cannot be used (see ``SceneSource``) or holds no valid pixel,
    OutputExistsError for outputs in the way (``overwrite``), CheckpointError for a ``resume`` that does not
    match the interrupted run.
    """
    scene, out = Path(scene), Path(out)
    start = time.perf_counter()
    meta = runtime.meta
    check_num_classes(meta.classes)
    tile, overlap = _resolve_tiling(runtime, options)
    _check_outputs(scene, out, options)
    final, conf_path, report_path, partial = output_paths(out)
    with SceneSource(scene, meta.in_chans, meta.norm, options.bands, options.stats) as source, \
            rasterio.Env(GDAL_CACHEMAX=_cache_budget(source.info, tile)):
        info = source.info
        fingerprint = _fingerprint(scene, runtime, source, tile, overlap, options.probs)
        rows = plan_rows(info.height, info.width, tile, overlap)
        state = _load_state(partial, fingerprint) if options.resume else None
        if state is None:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        done_rows = state["rows_done"] if state else 0
        band = (RowBandAccumulator.from_state(dict(np.load(partial / "band.npz"))) if state else
                RowBandAccumulator(meta.num_classes, min(tile, info.height), info.width))
        counts = _Counts(meta.num_classes, state["counts"] if state else None)
        tiles = [state["tiles_run"], state["tiles_skipped"]] if state else [0, 0]
        writers = [RasterWriter(partial / "classes.tif", info, NODATA, meta.classes, resume=state is not None)]
        if options.probs:
            writers.append(RasterWriter(partial / "confidence.tif", info, CONFIDENCE_NODATA, None,
                                        resume=state is not None))
        weights = blend_weights(tile, overlap)
        total = sum(len(r) for r in rows)
        progress = _Progress(total, sum(len(r) for r in rows[:done_rows]), options.progress, scene.name)
        finished = _FinishedRows(writers)
        last_checkpoint = time.monotonic()
        try:
            for i in range(done_rows, len(rows)):
                ran, skip = _run_row(rows[i], source, runtime, band, weights, tile, options)
                tiles[0], tiles[1] = tiles[0] + ran, tiles[1] + skip
                next_top = rows[i + 1][0].row if i + 1 < len(rows) else info.height
                top = band.top
                logits, valid = band.pop(next_top)
                classes = to_class_raster(logits.argmax(axis=0), valid)
                counts.add(classes, valid)
                finished.add(top, classes, confidence_raster(logits, valid) if options.probs else None)
                progress.update(len(rows[i]))
                due = time.monotonic() - last_checkpoint >= options.checkpoint_seconds
                if i + 1 == len(rows) or due or finished.nbytes > MAX_UNWRITTEN_BYTES:
                    finished.flush()
                    _save_state(partial, band, fingerprint, i + 1, counts, *tiles)
                    last_checkpoint = time.monotonic()
        finally:
            progress.close()
            for w in writers:
                w.close()
        valid_pixels = int(counts.counts.sum())
        if valid_pixels == 0:
            shutil.rmtree(partial)
            raise DataError(f"{scene}: has no valid pixel (every pixel is nodata or masked); nothing to segment")
        writers[0].finish(final)
        if options.probs:
            writers[1].finish(conf_path)
        seconds = time.perf_counter() - start
        report = _report(scene, final, conf_path if options.probs else None, runtime, info, tile, overlap, options,
                         total, *tiles, counts, seconds, done_rows)
        atomic_write_text(report_path, json.dumps(report.to_dict(), indent=2))
        shutil.rmtree(partial)
    return report


class _FinishedRows:
    """Final rows kept in memory (uint8: small) between checkpoints, then written and flushed together.

    The working GeoTIFF is touched only at a checkpoint, so after a crash it is exactly as the last checkpoint
    left it: nothing half-written for ``--resume`` to trip over.
    """

    def __init__(self, writers: list[RasterWriter]) -> None:
        self.writers = writers
        self.rows: list[tuple[int, list[np.ndarray]]] = []
        self.nbytes = 0

    def add(self, top: int, classes: np.ndarray, confidence: np.ndarray | None) -> None:
        arrays = [classes] if confidence is None else [classes, confidence]
        self.rows.append((top, arrays))
        self.nbytes += sum(a.nbytes for a in arrays)

    def flush(self) -> None:
        for top, arrays in self.rows:
            for writer, values in zip(self.writers, arrays):
                writer.write(top, values)
        for writer in self.writers:
            writer.checkpoint()
        self.rows, self.nbytes = [], 0


def _cache_budget(info: SceneInfo, tile: int) -> int:
    """GDAL block cache in bytes: two bands of input blocks across the scene, at least 64 MB.

    GDAL's default (5% of RAM) would keep every decoded block of a large scene, so memory would creep up with
    the scene's height; the windows of one row of tiles and the next need no more than this. (Set once the scene
    is open: by then only its two small probe windows have been read.)
    """
    need = 2 * (tile + 512) * info.width * info.count * np.dtype(info.dtype).itemsize
    return max(64 * 2**20, need)


def _run_row(windows: Sequence[TileWindow], source: SceneSource, runtime: Runtime, band: RowBandAccumulator,
             weights: np.ndarray, tile: int, options: SegmentOptions) -> tuple[int, int]:
    """Predict one row of windows into ``band``; returns (windows run, windows skipped as all-invalid)."""
    pending: list[tuple[TileWindow, np.ndarray]] = []
    ran = skipped = 0

    def flush() -> None:
        batch = np.stack([x for _, x in pending])
        logits = runtime(batch)
        for (window, _), tile_logits in zip(pending, logits):
            h, w = window.shape  # crop the padding of scenes smaller than the tile
            band.add(window, tile_logits[:, :h, :w], weights[:h, :w])
        pending.clear()

    for window in windows:
        x, valid = source.read_normalized(window)
        band.add_valid(window, valid)
        if not valid.any():
            skipped += 1
            continue
        if x.shape[1:] != (tile, tile):
            x, _ = pad_to_tile(x, tile, mode=options.pad_mode)
        pending.append((window, x))
        ran += 1
        if len(pending) == options.batch_size:
            flush()
    if pending:
        flush()
    return ran, skipped


def _save_state(partial: Path, band: RowBandAccumulator, fingerprint: dict[str, Any], rows_done: int,
                counts: _Counts, tiles_run: int, skipped: int) -> None:
    """Band sums first, then the state that points at them: a crash between the two redoes one row."""
    tmp = partial / "band.tmp.npz"
    np.savez(tmp, **band.state())
    os.replace(tmp, partial / "band.npz")
    state = {"format": STATE_FORMAT, "fingerprint": fingerprint, "rows_done": rows_done,
             "counts": counts.counts.tolist(), "tiles_run": tiles_run, "tiles_skipped": skipped}
    atomic_write_text(partial / "state.json", json.dumps(state))


def _load_state(partial: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    try:
        state = json.loads((partial / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{partial}: unreadable resume state ({e}); run again with --overwrite") from None
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{partial}: not a cdkd scene state; run again with --overwrite")
    old = state["fingerprint"]
    changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if changed:
        raise CheckpointError(f"{partial}: cannot resume: {', '.join(changed)} changed since the interrupted run; "
                              "run again with --overwrite")
    return state


def _report(scene: Path, final: Path, conf: Path | None, runtime: Runtime, info: Any, tile: int, overlap: int,
            options: SegmentOptions, total: int, tiles_run: int, skipped: int, counts: _Counts, seconds: float,
            resumed_from: int) -> SceneReport:
    pixel_km2 = info.pixel_area_m2 / 1e6
    valid = int(counts.counts.sum())
    classes = {c.name: ClassArea(int(n), float(n) * pixel_km2, float(n) / valid)
               for c, n in zip(runtime.meta.classes.classes, counts.counts)}
    return SceneReport(
        scene=str(scene), output=str(final), confidence=str(conf) if conf else None, runtime=runtime.name,
        device=runtime.device, crs=info.crs.to_string(), width=info.width, height=info.height, tile_size=tile,
        overlap=overlap, batch_size=options.batch_size, tiles=total, tiles_run=tiles_run, tiles_skipped=skipped,
        valid_pixels=valid, area_km2=valid * pixel_km2, seconds=seconds,
        mpx_per_s=info.width * info.height / 1e6 / max(seconds, 1e-9), resumed_from_row=resumed_from,
        classes=classes)
