"""The scene engine: one raster of any size in, a seamless georeferenced class raster (COG) out, in flat memory.

``segment_scene`` runs the window plan (``tiler.plan_rows``) through three overlapping stages:

1. read + normalise: background threads read windows ahead of the model (``pipeline.TilePrefetcher``); windows
   without a valid pixel are skipped;
2. model + blend + reduce: batches run through the runtime, and the logits are blended and reduced to uint8 class
   ids (and confidence) on the runtime's device (``rowblend``), row of windows by row of windows, so memory is one
   row's sums (K x tile x W) whatever the scene's height, and only uint8 leaves a GPU;
3. write: finished rows become chunk files with their overviews in a writer thread, and one multi-threaded GDAL
   pass writes the COG at the end (``writer``).

Output pixels are nodata exactly where the input is invalid (GDAL's dataset mask). The state needed to continue
(the blended sums the next row still adds to, the writer's progress, counts) is checkpointed in ``OUT.partial/``
every ``checkpoint_seconds`` and on Ctrl-C, so ``resume=True`` continues an interrupted scene from the last
checkpoint; the result is bitwise the one an uninterrupted run gives. ``cdkd.scene.blocks`` splits a scene into
blocks of window rows for a dask cluster with the same stages.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import rasterio

import cdkd
from cdkd.artifacts import InferenceMeta
from cdkd.config import PATCH_SIZE, bounded, check_ranges
from cdkd.data.gdal import is_virtual_path, raster_path
from cdkd.errors import CdkdValueError, CheckpointError, DataError, OutputExistsError
from cdkd.progress import progress_bar
from cdkd.scene.areas import ClassAreaTally
from cdkd.scene.classraster import check_num_classes
from cdkd.scene.pipeline import RowCounts, StageTimes, WeightCache, blend_rows, prefetcher_for, reader_threads
from cdkd.scene.rowblend import Partial, PlanBlender
from cdkd.scene.runtimes import Runtime
from cdkd.scene.source import SceneInfo, SceneSource
from cdkd.scene.tiler import PAD_MODES, plan_rows
from cdkd.scene.writer import SceneWriter, class_layers, load_arrays, save_state
from cdkd.utils.atomic import atomic_write_text
from cdkd.utils.memory import check_fits
from cdkd.utils.paths import check_writable, file_sha256
from cdkd.utils.runlock import LOCK_NAME, RunLock, holder, in_use_error

STATE_FORMAT = "cdkd.scene-state/2"
OUTPUT_SUFFIXES = (".tif", ".tiff")

Log = Callable[[str], None]


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment a scene; ``None`` sizes mean the model's own."""

    tile_size: int | None = bounded(None, ge=PATCH_SIZE, le=16384, flag="--tile-size")
    overlap: int | None = bounded(None, ge=0, flag="--overlap")
    batch_size: int = bounded(4, ge=1, le=4096, flag="--batch-size")
    bands: tuple[int, ...] | None = bounded(None, ge=1, flag="--bands")
    stats: str = "model"  # "model": the statistics stored with the model; "scene": computed from this scene
    probs: bool = False  # also write a uint8 confidence raster (max softmax x 255)
    pad_mode: str = "reflect"  # padding of scenes smaller than one tile
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    checkpoint_seconds: float = bounded(30.0, ge=0)  # least time between checkpoints (--resume restarts there)
    read_threads: int | None = bounded(None, ge=0, le=256, flag="--read-threads")  # None: pipeline.reader_threads
    min_score: float | None = bounded(None, ge=0, le=1, flag="--min-score")  # instances: weaker ones dropped (0.5)
    assets: tuple[str, ...] | None = None  # STAC items: asset keys stacked as the bands (None: by the model's bands)


@dataclass(frozen=True)
class ClassArea:
    pixels: int
    area_m2: float  # ground area (cdkd.scene.areas), as every report and attribute table holds areas
    fraction: float  # of the valid pixels


@dataclass(frozen=True)
class SceneReport:
    """What ``segment_scene`` did; also written as ``OUT.json``. Enough to reproduce the run."""

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
    tiles_run: int  # over the whole scene, earlier runs of a resumed scene included
    tiles_skipped: int  # windows without a valid pixel
    valid_pixels: int
    area_m2: float  # ground area of the valid pixels
    seconds: float  # this run
    mpx_per_s: float  # scene pixels this run covered (valid or not) per second of this run
    resumed_from_row: int  # window rows already done when this run started (0 for a fresh run)
    pixels_this_run: int = 0
    bands: list[int] = field(default_factory=list)  # 1-based scene bands fed to the model, in order
    scene_bands: int = 0  # bands the scene has
    stats: dict[str, Any] = field(default_factory=dict)  # normalisation: mode ("model"/"scene"), mean, std, dtype
    model: dict[str, Any] = field(default_factory=dict)  # path, sha256, arch, head
    runtime_options: dict[str, Any] = field(default_factory=dict)  # amp, threads, provider, read threads
    cdkd_version: str = ""
    stages: dict[str, float] = field(default_factory=dict)  # seconds each stage was busy (pipeline.StageTimes)
    classes: dict[str, ClassArea] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_paths(out: Path) -> tuple[Path, Path, Path, Path]:
    """(class raster, confidence raster, report JSON, partial-work folder) for the output ``out``."""
    out = Path(out)
    return (out, out.with_name(f"{out.stem}_confidence{out.suffix}"), out.with_suffix(".json"),
            out.with_name(out.name + ".partial"))


def resolve_tiling(meta: InferenceMeta, options: SegmentOptions, fixed_tile: bool = False,
                   runtime: str = "torch") -> tuple[int, int]:
    """(tile, overlap) for ``options`` with a model described by ``meta``; ``fixed_tile``: the model (an ONNX or
    TensorRT export) takes its own tile size only."""
    check_ranges(options)
    tile = meta.tile_size if options.tile_size is None else int(options.tile_size)
    overlap = meta.overlap if options.overlap is None else int(options.overlap)
    if tile <= 0 or tile % PATCH_SIZE:
        raise CdkdValueError(f"tile size {tile} is not a positive multiple of the patch size {PATCH_SIZE}")
    if tile != meta.tile_size and fixed_tile:
        raise CdkdValueError(f"the {runtime} model was built for {meta.tile_size} px tiles and cannot take "
                             f"--tile-size {tile}; export it again at that size or use the segmenter.pt")
    if not 0 <= overlap < tile:
        raise CdkdValueError(f"overlap {overlap} must be >= 0 and smaller than the tile size {tile}")
    if options.batch_size < 1:
        raise CdkdValueError(f"batch size must be at least 1, got {options.batch_size}")
    if options.pad_mode not in PAD_MODES:
        raise CdkdValueError(f"unknown pad mode {options.pad_mode!r}; choose one of {', '.join(PAD_MODES)}")
    if options.read_threads is not None and options.read_threads < 0:
        raise CdkdValueError(f"read threads must be >= 0, got {options.read_threads}")
    return tile, overlap


def model_sha256(runtime: Runtime) -> str:
    """SHA-256 of the runtime's model file (cached: engines can be hundreds of MB)."""
    return file_sha256(runtime.path)


def fingerprint(scene: str | Path, runtime: Runtime, source: SceneSource, tile: int, overlap: int,
                probs: bool) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption: the scene's identity, the model's
    weights (the file's SHA-256, not only its metadata: two models with the same classes and tile size give other
    maps), how it runs (runtime, autocast) and every option that changes the output."""
    if source.stac is not None:
        identity = source.stac.identity()  # the item's href and id, and every asset's href
    elif is_virtual_path(scene):
        identity: dict[str, Any] = {"scene": str(scene)}  # GDAL alone can stat it; the header facts stand in
    else:
        st = Path(scene).stat()
        identity = {"scene": str(Path(scene).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    info = source.info
    return {**identity, "shape": [info.height, info.width, info.count], "model": model_sha256(runtime),
            "runtime": runtime.name, "amp": runtime.options.get("amp"), "tile": tile, "overlap": overlap,
            "bands": list(source.bands), "norm": source.norm.to_dict(), "probs": probs}


def check_outputs(scene: str | Path, out: Path, options: SegmentOptions, suffixes: tuple[str, ...] = OUTPUT_SUFFIXES,
                  kind: str = "the class raster is a GeoTIFF (COG)") -> None:
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
                raise CdkdValueError(f"{path}: the output would replace the scene being segmented; choose another "
                                     "output")
    live = holder(partial)
    if live is not None:
        raise in_use_error(partial, live, out)
    check_writable(out.parent, f"{out}: cannot write the output")
    resumable = (partial / "state.json").is_file()
    if options.resume:
        if resumable:
            return
        if partial.exists():
            raise CheckpointError(f"{out}: the interrupted run in {partial} stopped before its first checkpoint, so "
                                  "there is nothing to resume; pass --overwrite (not --resume) to start again")
        if final.exists():
            raise CheckpointError(f"{out}: is complete (no interrupted run to resume); pass --overwrite (not "
                                  "--resume) to make it again")
        raise CheckpointError(f"{out}: nothing to resume (no interrupted run in {partial}); run without --resume")
    existing = [p.name for p in (final, conf, report, partial) if p.exists()]
    if existing and not options.overwrite:
        if resumable:
            raise OutputExistsError(f"{out}: an interrupted run is in the way ({', '.join(existing)}); pass --resume "
                                    "to continue it or --overwrite to start again")
        raise OutputExistsError(f"{out}: existing output is in the way ({', '.join(existing)}); pass --overwrite to "
                                "replace it")


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


class TileProgress:
    """Progress over windows (a bar with tiles/s and ETA, or JSON lines: ``cdkd.progress``), or nothing."""

    def __init__(self, total: int, initial: int, enabled: bool, name: str) -> None:
        self.bar = progress_bar(total, initial=initial, desc=name, unit="tile", enabled=enabled)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


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


def cache_budget(info: SceneInfo, tile: int) -> int:
    """GDAL block cache in bytes: two bands of input blocks across the scene, at least 64 MB.

    GDAL's default (5% of RAM) would keep every decoded block of a large scene, so memory would creep up with
    the scene's height; the windows of one row of tiles and the next need no more than this.
    """
    need = 2 * (tile + 512) * info.width * info.count * np.dtype(info.dtype).itemsize
    return max(64 * 2**20, need)


def check_buffers(info: SceneInfo, meta: InferenceMeta, tile: int, batch_size: int) -> None:
    """Refuse a tile size or batch whose buffers cannot fit before any work: one row of windows' blended logits
    (K x tile x width), a batch of tiles and of their logits, all float32 (the model's activations come on top)."""
    k = meta.num_classes
    need = 4 * (k * tile * info.width + batch_size * (meta.in_chans + k) * tile * tile)
    check_fits(need, f"{info.path}: tiles of {tile} px in batches of {batch_size}",
               "use a smaller --tile-size or --batch-size")


def announce_bands(source: SceneSource, log: Log) -> None:
    """Say once which scene bands the model reads when that is not simply all of them in order."""
    info, bands = source.info, source.bands
    if source.stac is not None:
        log(source.stac.describe())
    if bands != tuple(range(1, info.count + 1)):
        log(f"{info.path}: the model reads band(s) {','.join(map(str, bands))} of the scene's {info.count} "
            "(choose others with --bands)")


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def segment_scene(scene: str | Path, runtime: Runtime, out: str | Path,
                  options: SegmentOptions = SegmentOptions(), log: Log | None = None) -> SceneReport:
    """Segment ``scene`` (a path, GDAL virtual path or URL) with ``runtime`` into the COG ``out`` (and
    ``OUT_confidence.tif`` with ``probs``); ``log`` gets one-line notices (default: stderr).

    Raises DataError/CdkdIOError for a scene that cannot be used (see ``SceneSource``) or holds no valid pixel,
    OutputExistsError for outputs in the way (``overwrite``), CheckpointError for a ``resume`` that does not
    match the interrupted run, KeyboardInterrupt after saving a checkpoint on Ctrl-C.

    An instance model (``runtime.meta.task == "instance"``) writes polygons instead: ``cdkd.scene.instances``.
    """
    if runtime.meta.task == "instance":
        from cdkd.scene.instances import segment_instances

        return segment_instances(scene, runtime, out, options, log)  # type: ignore[return-value]
    scene, out = raster_path(scene), Path(out)
    start = time.perf_counter()
    check_num_classes(runtime.meta.classes)
    tile, overlap = resolve_tiling(runtime.meta, options, runtime.fixed_tile, runtime.name)
    check_outputs(scene, out, options)
    meta = runtime.meta
    final, _, report_path, partial = output_paths(out)
    with SceneSource(scene, meta.in_chans, meta.norm, options.bands, options.stats,
                     assets=options.assets) as source, \
            rasterio.Env(GDAL_CACHEMAX=cache_budget(source.info, tile)):
        check_buffers(source.info, meta, tile, options.batch_size)
        announce_bands(source, log or log_stderr)
        run = _LocalRun(scene, source, runtime, out, options, tile, overlap)
        with claimed(partial, out, options.resume):
            run.execute()
            report = run.report(time.perf_counter() - start)
            atomic_write_text(report_path, json.dumps(report.to_dict(), indent=2))
            shutil.rmtree(partial)
    return report


class _LocalRun:
    """One scene in this process: the three stages, checkpoints, and the numbers for the report."""

    def __init__(self, scene: str | Path, source: SceneSource, runtime: Runtime, out: Path, options: SegmentOptions,
                 tile: int, overlap: int) -> None:
        self.scene, self.source, self.runtime, self.out, self.options = scene, source, runtime, out, options
        self.tile, self.overlap, self.info = tile, overlap, source.info
        self.plan = plan_rows(self.info.height, self.info.width, tile, overlap)
        self.partial = output_paths(out)[3]
        self.fingerprint = fingerprint(scene, runtime, source, tile, overlap, options.probs)
        self.times, self.counts = StageTimes(), RowCounts()
        self.tally = ClassAreaTally(runtime.meta.num_classes, self.info.crs, self.info.transform,
                                    self.info.width, self.info.height)
        self.rows_done = self.resumed_from = 0
        self.sequence = 0

    # ------------------------------------------------------------------------------------------------ run

    def execute(self) -> None:
        options, info = self.options, self.info
        state = self._load() if options.resume else None
        writer = SceneWriter(self.partial, info, class_layers(self.runtime.meta.classes, options.probs), self.times,
                             on_rows=lambda rows: self.tally.add(rows.top, rows.classes))
        blender = self.blender()
        if state is not None:
            blender.carry = self._restore(state, writer)
        prefetcher = prefetcher_for(self.source.read_normalized, self.tile, options, blender.device, self.times,
                                    stage=getattr(self.runtime, "takes_tensors", False))
        weights = WeightCache(info.height, info.width, self.overlap, blender.device)
        total = sum(len(r) for r in self.plan)
        progress = TileProgress(total, sum(len(r) for r in self.plan[: self.rows_done]), options.progress,
                             Path(str(self.scene)).name)
        last_checkpoint = time.monotonic()
        try:
            with deferred_sigint() as interrupted:
                rows = blend_rows(self.plan, self.rows_done, len(self.plan), prefetcher, self.runtime.forward,
                                  blender, weights, options.batch_size, self.times, self.counts, interrupted)
                for index, _, finished in rows:
                    if finished is not None:
                        writer.put(finished)
                    self.rows_done = index + 1
                    progress.update(len(self.plan[index]))
                    if interrupted():
                        break
                    if self.rows_done < len(self.plan) and \
                            time.monotonic() - last_checkpoint >= options.checkpoint_seconds:
                        self._checkpoint(writer, blender.carry)
                        last_checkpoint = time.monotonic()
                if self.rows_done < len(self.plan):  # stopped early: by Ctrl-C
                    self._checkpoint(writer, blender.carry)
                    writer.close()
                    raise KeyboardInterrupt
            writer.close()
        finally:
            progress.close()
            prefetcher.close()
            writer.close()
        if int(self.tally.pixels.sum()) == 0:
            (self.partial / "state.json").unlink(missing_ok=True)  # nothing to resume: the folder goes too
            raise DataError(f"{self.scene}: has no valid pixel (every pixel is nodata or masked); nothing to segment")
        final, conf, _, _ = output_paths(self.out)
        writer.finish({"classes": final, "confidence": conf})

    def blender(self) -> PlanBlender:
        info, plan = self.info, self.plan
        return PlanBlender(self.runtime.meta.num_classes, [row[0].row for row in plan], [w.col for w in plan[0]],
                           plan[0][0].shape, (info.height, info.width), self.runtime.blend_device,
                           probs=self.options.probs)

    # ------------------------------------------------------------------------------------------------ state

    def _checkpoint(self, writer: SceneWriter, carry: Partial | None) -> None:
        """Queue a checkpoint: the writer saves it once every finished row before it is on disk."""
        self.sequence += 1
        engine = {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "rows_done": self.rows_done,
                  "tiles_run": self.counts.run, "tiles_skipped": self.counts.skipped, "sequence": self.sequence}
        arrays = {} if carry is None else {f"carry.{k}": v for k, v in carry.state().items()}
        tally = self.tally

        def save(writer_meta: dict[str, Any], writer_arrays: dict[str, np.ndarray]) -> None:
            save_state(self.partial, {**engine, "writer": writer_meta, "tally": tally.state()},
                       {**arrays, **writer_arrays})

        writer.checkpoint(save)

    def _load(self) -> dict[str, Any]:
        return load_state(self.partial, self.fingerprint)

    def _restore(self, state: dict[str, Any], writer: SceneWriter) -> Partial | None:
        arrays = load_arrays(self.partial, state)
        writer.restore(state["writer"], arrays)
        info = self.info
        self.tally = ClassAreaTally.from_state(state["tally"], info.crs, info.transform, info.width, info.height)
        self.rows_done = self.resumed_from = int(state["rows_done"])
        self.counts.run, self.counts.skipped = int(state["tiles_run"]), int(state["tiles_skipped"])
        self.sequence = int(state["sequence"])
        carry = {k[len("carry."):]: v for k, v in arrays.items() if k.startswith("carry.")}
        return Partial.from_state(carry, self.runtime.blend_device) if carry else None

    # ------------------------------------------------------------------------------------------------ report

    def report(self, seconds: float) -> SceneReport:
        info, runtime, options = self.info, self.runtime, self.options
        final, conf, _, _ = output_paths(self.out)
        tops = [row[0].row for row in self.plan]
        first = tops[self.resumed_from] if self.resumed_from < len(tops) else info.height
        pixels_run = (info.height - first) * info.width
        return build_report(
            scene=self.scene, final=final, conf=conf if options.probs else None, runtime=runtime, info=info,
            tile=self.tile, overlap=self.overlap, options=options, tiles=sum(len(r) for r in self.plan),
            counts=self.counts, tally=self.tally, seconds=seconds, resumed_from=self.resumed_from,
            pixels_run=pixels_run, bands=self.source.bands, norm=self.source.norm, stages=self.times.to_dict())


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
        raise CheckpointError(f"{partial}: cannot resume: {', '.join(changed)} differ from the interrupted run's "
                              f"({diffs}); resume with the same inputs and options, or pass --overwrite to start "
                              "again")
    return state


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}"
    return text if len(text) <= 60 else text[:57] + "..."


def provenance(runtime: Any, options: SegmentOptions, norm: Any, device: str) -> dict[str, Any]:
    """The report fields that reproduce a run (any task): statistics, model file and hash, runtime options with
    the reader threads used on ``device``, cdkd version."""
    meta = runtime.meta
    return {"stats": {"mode": options.stats, "mean": list(norm.mean), "std": list(norm.std), "dtype": norm.dtype},
            "model": {"path": runtime.path, "sha256": model_sha256(runtime), "arch": meta.arch, "head": meta.head},
            "runtime_options": {**runtime.options, "read_threads": reader_threads(options.read_threads, device)},
            "cdkd_version": cdkd.__version__}


def build_report(*, scene: str | Path, final: Path, conf: Path | None, runtime: Runtime, info: SceneInfo, tile: int,
                 overlap: int, options: SegmentOptions, tiles: int, counts: RowCounts, tally: Any, seconds: float,
                 resumed_from: int, pixels_run: int, bands: tuple[int, ...], norm: Any,
                 stages: dict[str, float]) -> SceneReport:
    """The report of one scene, local or on a cluster."""
    valid = int(tally.pixels.sum())
    areas = np.asarray(tally.area_m2, dtype=np.float64)
    classes = {c.name: ClassArea(int(n), round(float(a), 2), float(n) / valid)
               for c, n, a in zip(runtime.meta.classes.classes, tally.pixels, areas)}
    return SceneReport(
        scene=str(scene), output=str(final), confidence=str(conf) if conf else None, runtime=runtime.name,
        device=runtime.device, crs=info.crs.to_string(), width=info.width, height=info.height, tile_size=tile,
        overlap=overlap, batch_size=options.batch_size, tiles=tiles, tiles_run=counts.run,
        tiles_skipped=counts.skipped, valid_pixels=valid, area_m2=round(float(areas.sum()), 2), seconds=seconds,
        mpx_per_s=pixels_run / 1e6 / max(seconds, 1e-9), resumed_from_row=resumed_from, pixels_this_run=pixels_run,
        bands=list(bands), scene_bands=info.count, **provenance(runtime, options, norm, runtime.blend_device),
        stages=stages, classes=classes)
