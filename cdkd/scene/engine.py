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

import json
import shutil
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import rasterio

from cdkd.data.classraster import check_num_classes
from cdkd.data.gdal import raster_path
from cdkd.errors import CdkdValueError, DataError
from cdkd.inference.rowblend import Partial, PlanBlender, blend_backend
from cdkd.inference.runtimes import Runtime
from cdkd.inference.tiler import plan_rows
from cdkd.scene.core.areas import ClassAreaTally
from cdkd.scene.core.options import (
    SegmentOptions,
    cache_budget,
    check_buffers,
    resolve_margin,
    resolve_tiling,
)
from cdkd.scene.core.pipeline import (
    RowCounts,
    StageTimes,
    WeightCache,
    blend_rows,
    prefetcher_for,
)
from cdkd.scene.core.report import (
    Log,
    RunTotals,
    SceneReport,
    TileProgress,
    announce_bands,
    build_report,
    log_stderr,
)
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
from cdkd.scene.core.writer import SceneWriter, class_layers
from cdkd.utils.atomic import atomic_write_text

__all__ = ["SegmentOptions", "segment_scene"]


def segment_scene(
    scene: str | Path,
    runtime: Runtime,
    out: str | Path,
    options: SegmentOptions = SegmentOptions(),
    log: Log | None = None,
) -> SceneReport:
    """Segment ``scene`` (a path, GDAL virtual path or URL) with ``runtime`` into the COG ``out`` (and
    ``OUT_confidence.tif`` with ``probs``); ``log`` gets one-line notices (default: stderr).

    Raises DataError/CdkdIOError for a scene that cannot be used (see ``SceneSource``) or holds no valid pixel,
    OutputExistsError for outputs in the way (``overwrite``), CheckpointError for a ``resume`` that does not
    match the interrupted run, KeyboardInterrupt after saving a checkpoint on Ctrl-C.

    The class raster is the semantic task's output; an instance model's objects are written by
    ``cdkd.scene.instances.segment_instances`` (``cdkd.tasks.task_of_model(path).segment_scene`` picks).
    """
    if runtime.meta.task != "semantic":
        raise CdkdValueError(
            f"{runtime.path}: a model of the {runtime.meta.task} task makes no class raster; map it "
            "through its task (cdkd.tasks.task_of_model(path).segment_scene)"
        )
    scene, out = raster_path(scene), Path(out)
    start = time.perf_counter()
    check_num_classes(runtime.meta.classes)
    tile, overlap = resolve_tiling(runtime.meta, options, runtime.fixed_tile, runtime.name)
    margin = resolve_margin(options, tile)
    blend = blend_backend(runtime.blend_device, options.blend_backend)  # one that cannot run is refused first
    check_outputs(scene, out, options)
    meta = runtime.meta
    final, _, report_path, partial = output_paths(out)
    with (
        SceneSource(scene, meta.in_chans, meta.norm, options.bands, options.stats, assets=options.assets) as source,
        rasterio.Env(GDAL_CACHEMAX=cache_budget(source.info, tile)),
    ):
        check_buffers(source.info, meta, tile, options.batch_size)
        announce_bands(source, log or log_stderr)
        run = _LocalRun(scene, source, runtime, out, options, tile, overlap, margin)
        run.blend = blend
        with claimed(partial, out, options.resume):
            run.execute()
            report = run.report(time.perf_counter() - start)
            atomic_write_text(report_path, json.dumps(report.to_dict(), indent=2))
            shutil.rmtree(partial)
    return report


class _LocalRun:
    """One scene in this process: the three stages, checkpoints, and the numbers for the report."""

    def __init__(
        self,
        scene: str | Path,
        source: SceneSource,
        runtime: Runtime,
        out: Path,
        options: SegmentOptions,
        tile: int,
        overlap: int,
        margin: int,
    ) -> None:
        self.scene, self.source, self.runtime, self.out, self.options = scene, source, runtime, out, options
        self.tile, self.overlap, self.margin, self.info = tile, overlap, margin, source.info
        self.plan = plan_rows(self.info.height, self.info.width, tile, overlap, margin)
        self.partial = output_paths(out)[3]
        self.fingerprint = fingerprint(scene, runtime, source, tile, overlap, options.probs, margin)
        self.times, self.counts = StageTimes(), RowCounts()
        self.tally = ClassAreaTally(
            runtime.meta.num_classes, self.info.crs, self.info.transform, self.info.width, self.info.height
        )
        self.rows_done = self.resumed_from = 0
        self.sequence = 0
        self.blend: str | None = None  # the blend backend, for the report

    # ------------------------------------------------------------------------------------------------ run

    def execute(self) -> None:
        options, info = self.options, self.info
        state = self._load() if options.resume else None
        writer = SceneWriter(
            self.partial,
            info,
            class_layers(self.runtime.meta.classes, options.probs),
            self.times,
            on_rows=lambda rows: self.tally.add(rows.top, cast(np.ndarray, rows.classes)),
        )
        blender = self.blender()
        if state is not None:
            blender.carry = self._restore(state, writer)
        prefetcher = prefetcher_for(
            self.source.read_normalized,
            self.tile,
            options,
            blender.device,
            self.times,
            stage=getattr(self.runtime, "takes_tensors", False),
        )
        weights = WeightCache(info.height, info.width, self.overlap, blender.device, self.margin)
        total = sum(len(r) for r in self.plan)
        progress = TileProgress(
            total, sum(len(r) for r in self.plan[: self.rows_done]), options.progress, Path(str(self.scene)).name
        )
        last_checkpoint = time.monotonic()
        try:
            with deferred_sigint() as interrupted:
                rows = blend_rows(
                    self.plan,
                    self.rows_done,
                    len(self.plan),
                    prefetcher,
                    self.runtime.forward,
                    blender,
                    weights,
                    options.batch_size,
                    self.times,
                    self.counts,
                    interrupted,
                )
                for index, _, finished in rows:
                    if finished is not None:
                        writer.put(finished)
                    self.rows_done = index + 1
                    progress.update(len(self.plan[index]))
                    if interrupted():
                        break
                    if (
                        self.rows_done < len(self.plan)
                        and time.monotonic() - last_checkpoint >= options.checkpoint_seconds
                    ):
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
        return PlanBlender(
            self.runtime.meta.num_classes,
            [row[0].row for row in plan],
            [w.col for w in plan[0]],
            plan[0][0].shape,
            (info.height, info.width),
            self.runtime.blend_device,
            probs=self.options.probs,
            backend=self.options.blend_backend,
        )

    # ------------------------------------------------------------------------------------------------ state

    def _checkpoint(self, writer: SceneWriter, carry: Partial | None) -> None:
        """Queue a checkpoint: the writer saves it once every finished row before it is on disk."""
        self.sequence += 1
        engine = {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "rows_done": self.rows_done,
            "tiles_run": self.counts.run,
            "tiles_skipped": self.counts.skipped,
            "sequence": self.sequence,
        }
        arrays = {} if carry is None else {f"carry.{k}": v for k, v in carry.state().items()}
        tally = self.tally

        def save(writer_meta: dict[str, Any], writer_arrays: dict[str, np.ndarray]) -> None:
            save_state(
                self.partial, {**engine, "writer": writer_meta, "tally": tally.state()}, {**arrays, **writer_arrays}
            )

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
        carry = {k[len("carry.") :]: v for k, v in arrays.items() if k.startswith("carry.")}
        return Partial.from_state(carry, self.runtime.blend_device) if carry else None

    # ------------------------------------------------------------------------------------------------ report

    def report(self, seconds: float) -> SceneReport:
        info, runtime, options = self.info, self.runtime, self.options
        final, conf, _, _ = output_paths(self.out)
        tops = [row[0].row for row in self.plan]
        first = max(0, tops[self.resumed_from]) if self.resumed_from < len(tops) else info.height
        pixels_run = (info.height - first) * info.width
        totals = RunTotals(
            sum(len(r) for r in self.plan),
            self.counts,
            self.tally,
            seconds,
            self.resumed_from,
            pixels_run,
            self.times.to_dict(),
            self.blend,
        )
        outputs = (final, conf if options.probs else None)
        return build_report(
            self.scene, outputs, runtime, self.source, (self.tile, self.overlap, self.margin), options, totals
        )
