"""The scene engine for instance models: a raster of any size in, one polygon per object (GeoPackage) out.

``segment_instances`` is what ``cdkd.scene.engine.segment_scene`` runs for a model whose ``meta.task`` is
"instance" (``detector.pt`` or its ONNX export). It drives the semantic engine's stages, not a copy of them:

1. read + normalise: ``SceneSource`` (checked scene, windowed thread-local reads, GDAL's validity) and
   ``pipeline.TilePrefetcher`` reading ahead in threads over ``tiler.plan_rows``; windows without a valid pixel
   are skipped;
2. detect: batches of tiles through the runtime's ``detect``; every detection above ``min_score`` keeps its box
   and its mask as a polygon in scene pixel coordinates (``objects.mask_polygon``), cut to the valid pixels;
3. merge: ``objects.ObjectMerger`` joins the pieces of an object that several overlapping windows saw (union by
   overlap where both windows see it), and hands out an object once no later window row can reach it;
4. write: finished objects go to chunk files in ``OUT.partial/`` at each checkpoint; at the end they are moved
   into the scene's CRS, measured (``area_m2``: geodesic ground area, ``cdkd.geodesy``) and written to the
   output in batches (GeoPackage with its QGIS style; ``.fgb`` and ``.parquet`` through ``cdkd.vector.formats``).

Checkpoints (``engine``'s ``save_state``/``load_state``/``fingerprint``, every ``checkpoint_seconds`` and on the
first Ctrl-C through ``deferred_sigint``) hold the window rows done, the merger's pending pieces and the chunks
written, so ``resume=True`` continues an interrupted scene and writes the objects an uninterrupted run writes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import rasterio
import shapely

from cdkd.data.gdal import raster_path
from cdkd.errors import CdkdValueError, DataError
from cdkd.inference.tiler import TileWindow, pad_to_tile, plan_rows
from cdkd.scene.core.options import SegmentOptions, cache_budget, resolve_tiling
from cdkd.scene.core.pipeline import (
    RowCounts,
    StageTimes,
    Tile,
    TilePrefetcher,
    model_outputs,
    prefetcher_for,
)
from cdkd.scene.core.report import TileProgress, announce_bands, log_stderr, provenance
from cdkd.scene.core.runstate import (
    STATE_FORMAT,
    check_outputs,
    claimed,
    deferred_sigint,
    fingerprint,
    load_arrays,
    load_state,
    output_paths,
    save_state,
)
from cdkd.scene.core.source import SceneSource
from cdkd.scene.objects import MERGE_IOU, Box, ObjectMerger, SceneObject, mask_polygon
from cdkd.utils.atomic import atomic_path, atomic_write_text

DEFAULT_MIN_SCORE = 0.5
VECTOR_OUTPUTS = (".gpkg", ".fgb", ".parquet")
WRITE_BATCH = 10_000  # features per append to the output

Log = Callable[[str], None]
Detect = Callable[[np.ndarray], list]  # (B, C, T, T) float32 -> [Detections] (cdkd.inference.detector_runtimes)


def check_min_score(min_score: float | None) -> float:
    score = DEFAULT_MIN_SCORE if min_score is None else float(min_score)
    if not 0.0 <= score <= 1.0:
        raise CdkdValueError(f"--min-score must be in [0, 1], got {score}")
    return score


def window_objects(
    det: Any,
    window: TileWindow,
    valid: np.ndarray | None,
    min_score: float,
) -> tuple[list[shapely.Polygon | None], list[int], list[float], list[Box]]:
    """(mask polygons in image px or None, class ids, scores, boxes in image px) of one window's ``Detections``
    scoring at least ``min_score``, in the order of ``ObjectMerger.add``'s arguments.

    Masks are cropped to the window (tiles of images smaller than the tile are padded) and to its valid pixels;
    boxes to the window.
    """
    polygons: list[shapely.Polygon | None] = []
    classes: list[int] = []
    scores: list[float] = []
    boxes: list[Box] = []
    h, w = window.shape
    for k in np.flatnonzero(det.scores >= min_score):
        mask = det.masks[k][:h, :w]
        if valid is not None:
            mask = mask & valid
        x0, y0, x1, y1 = np.clip(det.boxes[k], 0, [w, h, w, h]).tolist()
        if x1 <= x0 or y1 <= y0:  # a box wholly in the padding of a small scene
            continue
        polygons.append(mask_polygon(mask, window.row, window.col))
        classes.append(int(det.labels[k]))
        scores.append(float(det.scores[k]))
        boxes.append((x0 + window.col, y0 + window.row, x1 + window.col, y1 + window.row))
    return polygons, classes, scores, boxes


def detect_image(
    detect: Detect,
    image: np.ndarray,
    tile: int,
    overlap: int,
    *,
    valid: np.ndarray | None = None,
    batch_size: int = 4,
    min_score: float = 0.0,
    merge_iou: float = MERGE_IOU,
    pad_mode: str = "constant",
) -> list[SceneObject]:
    """The objects of a whole (C, H, W) float32 image held in memory (normalised), by the scene engine's rules:
    overlapping windows, pieces joined across them. Evaluation uses it; ``pad_mode`` "constant" (0, the mean)
    is what training used for images smaller than the tile."""
    plan = plan_rows(image.shape[1], image.shape[2], tile, overlap)
    windows = [w for row in plan for w in row]
    merger = ObjectMerger(merge_iou)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        tiles = [pad_to_tile(image[(slice(None), *w.slices)], tile, mode=pad_mode)[0] for w in chunk]
        for w, det in zip(chunk, detect(np.stack(tiles))):
            merger.add(w, *window_objects(det, w, None if valid is None else valid[w.slices], min_score))
    return merger.pop_final()


def detect_rows(
    rows: Sequence[Sequence[TileWindow]],
    start: int,
    stop: int,
    prefetcher: TilePrefetcher,
    detect: Detect,
    batch_size: int,
    times: StageTimes,
    counts: RowCounts,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[int, list[tuple[Tile, Any]]]]:
    """``(row index, [(tile, detections)])`` for window rows ``start..stop-1``, in order, from the engine's model
    stage (``pipeline.model_outputs``: batches across rows); tiles without a valid pixel are left out."""
    done: list[tuple[Tile, Any]] = []
    for tile, det in model_outputs(rows, start, stop, prefetcher, detect, batch_size, times, counts, should_stop):
        if det is not None:
            done.append((tile, det))
        if tile.last_in_row:
            yield tile.row, done
            done = []


@dataclass(frozen=True)
class ClassObjects:
    objects: int
    area_m2: float


@dataclass(frozen=True)
class InstanceReport:
    """What ``segment_instances`` did; also written as ``OUT.json`` (``SceneReport``'s conventions)."""

    scene: str
    output: str
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
    tiles_skipped: int
    seconds: float
    mpx_per_s: float
    resumed_from_row: int
    min_score: float
    merge_iou: float
    pieces: int  # detections above min_score over all windows (a cut object counts once per window)
    objects: int  # after joining pieces: the features written
    without_mask: int  # objects whose mask had no pixel above Mask R-CNN's 0.5 (not written: no polygon)
    bands: list[int] = field(default_factory=list)
    scene_bands: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    runtime_options: dict[str, Any] = field(default_factory=dict)
    cdkd_version: str = ""
    stages: dict[str, float] = field(default_factory=dict)
    classes: dict[str, ClassObjects] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def outputs(self) -> list[Path]:
        """The files the run wrote: the polygons and the report."""
        return [Path(self.output), Path(self.output).with_suffix(".json")]

    def summary(self) -> str:
        """The console summary: objects, detections, speed, and each class's objects and ground area."""
        from cdkd.units import area_unit, format_area

        lines = [
            f"{self.scene} -> {self.output}: {self.objects} objects (from {self.pieces} detections >= "
            f"{self.min_score} in {self.tiles_run} of {self.tiles} tiles), {self.seconds:.1f} s "
            f"({self.runtime} on {self.device})"
        ]
        unit = area_unit(c.area_m2 for c in self.classes.values())
        lines += [
            f"  {name:<20} {c.objects:7d} objects  {format_area(c.area_m2, unit):>14}"
            for name, c in self.classes.items()
        ]
        return "\n".join(lines)


def segment_instances(
    scene: str | Path,
    runtime: Any,
    out: str | Path,
    options: SegmentOptions = SegmentOptions(),
    log: Log | None = None,
    merge_iou: float = MERGE_IOU,
) -> InstanceReport:
    """Objects of ``scene`` (a path, GDAL virtual path or URL) found by the instance ``runtime``, written to
    ``out`` (.gpkg, .fgb or .parquet) as polygons with ``class_id``, ``class_name``, ``score`` and ``area_m2`` in
    the scene's CRS, plus ``OUT.json``. ``options.min_score`` (default 0.5) drops weaker detections.

    Raises what ``segment_scene`` raises (unusable scene, outputs in the way, a resume that does not match,
    KeyboardInterrupt after a checkpoint on Ctrl-C), and CdkdValueError for windows without overlap (objects cut
    by a border could not be joined).
    """
    scene, out = raster_path(scene), Path(out)
    start = time.perf_counter()
    tile, overlap = resolve_tiling(runtime.meta, options, runtime.fixed_tile, runtime.name)
    if overlap == 0:
        raise CdkdValueError(
            "instance segmentation needs overlapping windows (--overlap > 0): an object cut by a "
            "tile border is joined where two windows both see it"
        )
    if options.edge_context:  # not silently ignored: objects are joined across a plan without margin
        raise CdkdValueError(
            f"{runtime.path}: --edge-context applies to class rasters; an instance model's windows stay inside "
            "the scene (leave it out, or 0)"
        )
    min_score = check_min_score(options.min_score)
    check_outputs(scene, out, options, suffixes=VECTOR_OUTPUTS, kind="objects are written as vector polygons")
    _check_writable(out)
    meta = runtime.meta
    _, _, report_path, partial = output_paths(out)
    with (
        SceneSource(scene, meta.in_chans, meta.norm, options.bands, options.stats, assets=options.assets) as source,
        rasterio.Env(GDAL_CACHEMAX=cache_budget(source.info, tile)),
    ):
        announce_bands(source, log or log_stderr)
        run = _InstanceRun(scene, source, runtime, out, options, tile, overlap, min_score, merge_iou)
        with claimed(partial, out, options.resume):
            run.execute()
            report = run.report(time.perf_counter() - start)
            atomic_write_text(report_path, json.dumps(report.to_dict(), indent=2))
            shutil.rmtree(partial)
    return report


def _check_writable(out: Path) -> None:
    if out.suffix.lower() != ".gpkg":
        from cdkd.vector.formats import check_writable, output_format

        check_writable(output_format(out), out)


class _InstanceRun:
    """One scene in this process: the stages, checkpoints and the numbers for the report."""

    def __init__(
        self,
        scene: str | Path,
        source: SceneSource,
        runtime: Any,
        out: Path,
        options: SegmentOptions,
        tile: int,
        overlap: int,
        min_score: float,
        merge_iou: float,
    ) -> None:
        self.scene, self.source, self.runtime, self.out, self.options = scene, source, runtime, out, options
        self.tile, self.overlap, self.info = tile, overlap, source.info
        self.min_score, self.merge_iou = min_score, merge_iou
        self.plan = plan_rows(self.info.height, self.info.width, tile, overlap)
        self.partial = output_paths(out)[3]
        self.fingerprint = dict(
            fingerprint(scene, runtime, source, tile, overlap, False),
            task="instance",
            min_score=min_score,
            merge_iou=merge_iou,
        )
        self.times, self.counts = StageTimes(), RowCounts()
        self.merger = ObjectMerger(merge_iou)
        self.rows_done = self.resumed_from = self.sequence = self.pieces = 0
        self.chunks: list[str] = []  # chunk files of finished objects, in order
        self.finished: list[SceneObject] = []  # objects not yet in a chunk
        self.written = self.maskless = 0

    def execute(self) -> None:
        options = self.options
        state = load_state(self.partial, self.fingerprint) if options.resume else None
        if state is not None:
            self._restore(state)
        prefetcher = prefetcher_for(self.source.read_normalized, self.tile, options, self.runtime.device, self.times)
        progress = TileProgress(
            sum(len(r) for r in self.plan),
            sum(len(r) for r in self.plan[: self.rows_done]),
            options.progress,
            Path(str(self.scene)).name,
        )
        last_checkpoint = time.monotonic()
        try:
            with deferred_sigint() as interrupted:
                rows = detect_rows(
                    self.plan,
                    self.rows_done,
                    len(self.plan),
                    prefetcher,
                    self.runtime.detect,
                    options.batch_size,
                    self.times,
                    self.counts,
                    interrupted,
                )
                for index, results in rows:
                    t0 = time.perf_counter()
                    for tile, det in results:
                        found = window_objects(det, tile.window, tile.valid, self.min_score)
                        self.pieces += len(found[0])
                        self.merger.add(tile.window, *found)
                    nxt = self.plan[index + 1][0].row if index + 1 < len(self.plan) else math.inf
                    self._finish(self.merger.pop_final(nxt))
                    self.times.add("blend", time.perf_counter() - t0)
                    self.rows_done = index + 1
                    progress.update(len(self.plan[index]))
                    if interrupted():
                        break
                    if (
                        self.rows_done < len(self.plan)
                        and time.monotonic() - last_checkpoint >= options.checkpoint_seconds
                    ):
                        self._checkpoint()
                        last_checkpoint = time.monotonic()
                if self.rows_done < len(self.plan):  # stopped early: by Ctrl-C
                    self._checkpoint()
                    raise KeyboardInterrupt
        finally:
            progress.close()
            prefetcher.close()
        if self.counts.run == 0:
            (self.partial / "state.json").unlink(missing_ok=True)  # nothing to resume: the folder goes too
            raise DataError(f"{self.scene}: has no valid pixel (every pixel is nodata or masked); nothing to segment")
        self._finish(self.merger.pop_final())
        self._flush()
        t0 = time.perf_counter()
        self.class_totals = self._write()
        self.times.add("finish", time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------------ chunks

    def _finish(self, objects: list[SceneObject]) -> None:
        """Objects with a mask polygon go to the output; those whose mask had no pixel are only counted."""
        kept = [o for o in objects if o.polygon is not None]
        self.maskless += len(objects) - len(kept)
        self.finished += kept

    def _flush(self) -> None:
        """Finished objects into ``OUT.partial/objects_<n>.npz`` (WKB in pixel coordinates, class, score)."""
        if not self.finished:
            return
        t0 = time.perf_counter()
        name = f"objects_{len(self.chunks):06d}.npz"
        wkb = [shapely.to_wkb(o.polygon) for o in self.finished]
        with atomic_path(self.partial / name) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    wkb=np.frombuffer(b"".join(wkb), dtype=np.uint8),
                    wkb_ends=np.cumsum([len(w) for w in wkb], dtype=np.int64),
                    class_id=np.array([o.class_id for o in self.finished], dtype=np.int32),
                    score=np.array([o.score for o in self.finished], dtype=np.float64),
                )
        self.chunks.append(name)
        self.written += len(self.finished)
        self.finished = []
        self.times.add("write", time.perf_counter() - t0)

    def _chunk(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with np.load(self.partial / name) as data:
            buf, ends = data["wkb"].tobytes(), data["wkb_ends"].tolist()
            starts = [0] + ends[:-1]
            polygons = shapely.from_wkb([buf[s:e] for s, e in zip(starts, ends)])
            return np.asarray(polygons, dtype=object), data["class_id"], data["score"]

    # ------------------------------------------------------------------------------------------------ state

    def _checkpoint(self) -> None:
        self._flush()
        self.sequence += 1
        state = {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "rows_done": self.rows_done,
            "tiles_run": self.counts.run,
            "tiles_skipped": self.counts.skipped,
            "sequence": self.sequence,
            "chunks": self.chunks,
            "written": self.written,
            "pieces": self.pieces,
            "maskless": self.maskless,
        }
        save_state(self.partial, state, self.merger.state())

    def _restore(self, state: dict[str, Any]) -> None:
        self.merger = ObjectMerger.restore(load_arrays(self.partial, state), self.merge_iou)
        self.rows_done = self.resumed_from = int(state["rows_done"])
        self.counts.run, self.counts.skipped = int(state["tiles_run"]), int(state["tiles_skipped"])
        self.sequence, self.written, self.pieces = int(state["sequence"]), int(state["written"]), int(state["pieces"])
        self.maskless = int(state["maskless"])
        self.chunks = list(state["chunks"])
        for stale in self.partial.glob("objects_*.npz"):  # written after the last checkpoint: made again
            if stale.name not in self.chunks:
                stale.unlink()

    # ------------------------------------------------------------------------------------------------ output

    def _write(self) -> dict[int, tuple[int, float]]:
        """The output file from the chunks, a batch at a time; per class (objects, area m²)."""
        import pyogrio

        from cdkd.geodesy import geodesic_area_perimeter
        from cdkd.vector.gpkg import DATASET_OPTIONS as GPKG_OPTIONS
        from cdkd.vector.measure import to_crs
        from cdkd.vector.style import write_layer_styles

        info, schema = self.info, self.runtime.meta.classes
        names = np.array(schema.names, dtype=object)
        layer = self.out.stem
        staged = self.partial / f"{layer}.gpkg"
        staged.unlink(missing_ok=True)
        totals: dict[int, tuple[int, float]] = {}
        crs_wkt = info.crs.to_wkt()
        written = 0
        for name in self.chunks:
            polygons, class_id, score = self._chunk(name)
            for s in range(0, len(polygons), WRITE_BATCH):
                geoms = to_crs(polygons[s : s + WRITE_BATCH], info.transform)
                ids = class_id[s : s + WRITE_BATCH]
                area, _ = geodesic_area_perimeter(geoms, info.crs)
                fields = {
                    "class_id": ids.astype(np.int32),
                    "class_name": names[ids],
                    "score": np.round(score[s : s + WRITE_BATCH], 4),
                    "area_m2": np.round(area, 2),
                }
                pyogrio.raw.write(
                    staged,
                    shapely.to_wkb(geoms),
                    list(fields.values()),
                    list(fields),
                    layer=layer,
                    driver="GPKG",
                    geometry_type="Polygon",
                    crs=crs_wkt,
                    append=written > 0,
                    promote_to_multi=False,
                    layer_options={"SPATIAL_INDEX": "YES"} if not written else None,
                    dataset_options=None if written else GPKG_OPTIONS,
                )
                written += len(geoms)
                for c, a in zip(ids.tolist(), area.tolist()):
                    n, total = totals.get(c, (0, 0.0))
                    totals[c] = (n + 1, total + a)
        if not written:  # no object: an empty layer still says so, in the scene's CRS
            empty = {
                "class_id": np.zeros(0, np.int32),
                "class_name": np.zeros(0, object),
                "score": np.zeros(0),
                "area_m2": np.zeros(0),
            }
            pyogrio.raw.write(
                staged,
                np.zeros(0, object),
                list(empty.values()),
                list(empty),
                layer=layer,
                driver="GPKG",
                geometry_type="Polygon",
                crs=crs_wkt,
                dataset_options=GPKG_OPTIONS,
            )
        if self.out.suffix.lower() == ".gpkg":
            write_layer_styles(staged, [layer], schema)
            shutil.move(str(staged), self.out)
        else:
            from cdkd.vector.formats import convert, output_format

            with atomic_path(self.out) as tmp:
                convert(staged, layer, tmp, output_format(self.out))
        return totals

    # ------------------------------------------------------------------------------------------------ report

    def report(self, seconds: float) -> InstanceReport:
        info, runtime, meta = self.info, self.runtime, self.runtime.meta
        tops = [row[0].row for row in self.plan]
        first = tops[self.resumed_from] if self.resumed_from < len(tops) else info.height
        classes = {c.name: ClassObjects(*self.class_totals.get(c.id, (0, 0.0))) for c in meta.classes.classes}
        return InstanceReport(
            scene=str(self.scene),
            output=str(self.out),
            runtime=runtime.name,
            device=runtime.device,
            crs=info.crs.to_string(),
            width=info.width,
            height=info.height,
            tile_size=self.tile,
            overlap=self.overlap,
            batch_size=self.options.batch_size,
            tiles=sum(len(r) for r in self.plan),
            tiles_run=self.counts.run,
            tiles_skipped=self.counts.skipped,
            seconds=seconds,
            mpx_per_s=(info.height - first) * info.width / 1e6 / max(seconds, 1e-9),
            resumed_from_row=self.resumed_from,
            min_score=self.min_score,
            merge_iou=self.merge_iou,
            pieces=self.pieces,
            objects=self.written,
            without_mask=self.maskless,
            bands=list(self.source.bands),
            scene_bands=info.count,
            **provenance(runtime, self.options, self.source.norm, runtime.device),
            stages=self.times.to_dict(),
            classes=classes,
        )


__all__ = [
    "DEFAULT_MIN_SCORE",
    "VECTOR_OUTPUTS",
    "InstanceReport",
    "check_min_score",
    "detect_image",
    "detect_rows",
    "segment_instances",
    "window_objects",
]
