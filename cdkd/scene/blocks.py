"""One scene across a dask cluster: blocks of window rows on the workers, their seams merged, one COG here.

The window rows of the plan are cut into blocks (``plan_blocks``). A worker runs a block exactly as the local
engine runs a scene (``pipeline.blend_rows`` into a ``PlanBlender``), with two differences: the rows its first
window row shares with the block above are handed out as its *head* instead of being finished, and what its last
row leaves for the block below (its carry) is its *tail*. A seam task adds the upper block's tail and the lower
block's head (``rowblend.merge_seam``), the last step of the canonical order, so the assembled raster is bitwise the
one the local engine writes: no tolerance is needed. No window runs twice.

Workers write their finished rows as chunk files into ``OUT.partial/`` (the scene and that folder must be on
storage every worker and this process reach, as the scene must be for the workers to read it) and a small marker
per block once everything of it is on disk; this process then streams the chunks in order into the same writer as
the local engine (overviews, COG, legend, report). A task whose marker exists returns at once, so a worker that
dies costs only the blocks it was running (dask runs them again elsewhere), and ``--resume`` after a failed or
interrupted run redoes only the blocks without a marker.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np
import rasterio
from rasterio.transform import Affine

from cdkd.data.classraster import check_num_classes
from cdkd.data.gdal import raster_path
from cdkd.data.stats import NormStats
from cdkd.errors import CdkdValueError, CheckpointError, DataError
from cdkd.inference.rowblend import FinishedRows, Partial, PlanBlender, merge_seam
from cdkd.inference.runtimes import RuntimeSpec, runtime_for
from cdkd.inference.tiler import plan_rows
from cdkd.scene.cluster import connect, register_runtime, worker_runtime
from cdkd.scene.core.areas import ClassAreaTally
from cdkd.scene.core.options import SegmentOptions, cache_budget, resolve_margin, resolve_tiling
from cdkd.scene.core.pipeline import (
    RowCounts,
    StageTimes,
    WeightCache,
    blend_rows,
    prefetcher_for,
)
from cdkd.scene.core.report import (
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
    fingerprint,
    load_state,
    output_paths,
)
from cdkd.scene.core.source import SceneSource
from cdkd.scene.core.writer import (
    SceneWriter,
    chunk_name,
    chunk_transform,
    class_layers,
    read_chunk,
    write_chunk,
)
from cdkd.utils.atomic import atomic_path, atomic_write_text

DEFAULT_BLOCK_ROWS = 4  # window rows per block: 4 x 960 px rows at 1024 px tiles


@dataclass(frozen=True)
class Block:
    """Window rows ``[start, stop)`` of the plan; ``head``/``tail``: a block above/below shares rows with it."""

    index: int
    start: int
    stop: int
    head: bool
    tail: bool


def plan_blocks(tops: Sequence[int], row_height: int, rows_per_block: int) -> list[Block]:
    """Blocks of about ``rows_per_block`` window rows.

    A block may start at window row ``r`` only if no other row of it reaches the rows it shares with the rows
    above (``tops[r + 1] >= tops[r - 1] + row_height``): then its head is one row's partial and tail + head is the
    canonical sum. That holds for every row when the overlap is at most half a tile; otherwise (and before a
    shifted last row that overlaps more) the cut moves down a row.
    """
    if rows_per_block < 1:
        raise CdkdValueError(f"rows per block must be at least 1, got {rows_per_block}")
    n = len(tops)
    allowed = [r for r in range(1, n) if r + 1 >= n or tops[r + 1] >= tops[r - 1] + row_height]
    cuts, at = [], 0
    for r in allowed:
        if r >= at + rows_per_block:
            cuts.append(r)
            at = r
    bounds = [0, *cuts, n]
    return [Block(i, a, b, head=i > 0, tail=i < len(bounds) - 2) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


@dataclass(frozen=True)
class _Job:
    """What a worker needs to run blocks of one scene (pickled once per task; small)."""

    scene: str
    partial: str
    in_chans: int
    norm: dict[str, Any]  # resolved on the client: "scene" statistics are computed once, not per block
    bands: tuple[int, ...]
    tile: int
    overlap: int
    margin: int  # the plan's edge margin (tiler.edge_margin)
    options: SegmentOptions
    transform: tuple[float, ...]  # the scene's, GDAL order: chunk files are georeferenced (writer.chunk_transform)


def _marker(partial: Path, kind: str, index: int) -> Path:
    return partial / "blocks" / f"{kind}_{index:05d}.json"


def _write_rows(partial: Path, rows: FinishedRows, transform: Affine) -> tuple[int, int]:
    at = chunk_transform(transform, 0, rows.top)
    # a scene's rows carry classes (only evaluation's carry logits alone)
    write_chunk(partial / "classes" / chunk_name(0, rows.top), cast(np.ndarray, rows.classes), at)
    if rows.confidence is not None:
        write_chunk(partial / "confidence" / chunk_name(0, rows.top), rows.confidence, at)
    return rows.top, rows.rows


def _save_partials(path: Path, **partials: Partial | None) -> None:
    arrays: dict[str, Any] = {
        f"{name}.{k}": v for name, p in partials.items() if p is not None for k, v in p.state().items()
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _load_partial(path: Path, name: str) -> Partial | None:
    with np.load(path) as data:
        state = {k[len(name) + 1 :]: data[k] for k in data.files if k.startswith(name + ".")}
    return Partial.from_state(state) if state else None


def run_block(job: _Job, block: Block) -> dict[str, Any]:
    """A dask task: blend one block with this worker's runtime; write its chunks, head/tail and marker."""
    partial = Path(job.partial)
    marker = _marker(partial, "block", block.index)
    if marker.is_file():  # done by an earlier attempt (a worker that died after it, or a resumed run)
        return json.loads(marker.read_text())
    runtime, address = worker_runtime()
    meta, options, times, counts = runtime.meta, job.options, StageTimes(), RowCounts()
    start = time.perf_counter()
    norm = NormStats.from_dict(job.norm)
    with (
        SceneSource(job.scene, job.in_chans, norm, job.bands, "model", assets=job.options.assets) as source,
        rasterio.Env(GDAL_CACHEMAX=cache_budget(source.info, job.tile)),
    ):
        info = source.info
        plan = plan_rows(info.height, info.width, job.tile, job.overlap, job.margin)
        blender = PlanBlender(
            meta.num_classes,
            [r[0].row for r in plan],
            [w.col for w in plan[0]],
            plan[0][0].shape,
            (info.height, info.width),
            runtime.blend_device,
            probs=options.probs,
            head=block.head,
            backend=options.blend_backend,
        )
        prefetcher = prefetcher_for(
            source.read_normalized,
            job.tile,
            options,
            blender.device,
            times,
            stage=getattr(runtime, "takes_tensors", False),
        )
        weights = WeightCache(info.height, info.width, job.overlap, blender.device, job.margin)
        chunks, head = [], None
        try:
            for _, row_head, finished in blend_rows(
                plan,
                block.start,
                block.stop,
                prefetcher,
                runtime.forward,
                blender,
                weights,
                options.batch_size,
                times,
                counts,
            ):
                head = head or row_head
                if finished is not None:
                    chunks.append(_write_rows(partial, finished, info.transform))
        finally:
            prefetcher.close()
    _save_partials(
        partial / "blocks" / f"block_{block.index:05d}.npz", head=head, tail=blender.carry if block.tail else None
    )
    result = {
        "block": asdict(block),
        "chunks": chunks,
        "tiles_run": counts.run,
        "tiles_skipped": counts.skipped,
        "worker": address,
        "seconds": time.perf_counter() - start,
        "stages": times.to_dict(),
        "blend": blender.backend,
    }
    atomic_write_text(marker, json.dumps(result))
    return result


def run_seam(job: _Job, upper: int, *done: Any) -> dict[str, Any]:
    """A dask task after blocks ``upper`` and ``upper + 1`` (``done``: their results, only to order the tasks):
    the rows they share, finished."""
    partial = job.partial
    partial_dir = Path(partial)
    marker = _marker(partial_dir, "seam", upper)
    if marker.is_file():
        return json.loads(marker.read_text())
    tail = _load_partial(partial_dir / "blocks" / f"block_{upper:05d}.npz", "tail")
    head = _load_partial(partial_dir / "blocks" / f"block_{upper + 1:05d}.npz", "head")
    if (tail is None) != (head is None):
        raise CheckpointError(
            f"{partial}: blocks {upper} and {upper + 1} disagree about the rows they share; run again with --overwrite"
        )
    chunks = (
        []
        if tail is None
        else [
            _write_rows(
                partial_dir, merge_seam(tail, cast(Partial, head), job.options.probs), Affine.from_gdal(*job.transform)
            )
        ]
    )
    result = {"seam": upper, "chunks": chunks}
    atomic_write_text(marker, json.dumps(result))
    return result


def segment_scene_on_cluster(
    scene: str | Path,
    spec: RuntimeSpec,
    out: str | Path,
    scheduler: Any,
    options: SegmentOptions = SegmentOptions(),
    rows_per_block: int = DEFAULT_BLOCK_ROWS,
    log: Any = None,
) -> SceneReport:
    """Segment one ``scene`` on the dask cluster at ``scheduler`` (address or ``distributed.Client``), in blocks of
    ``rows_per_block`` window rows, into the COG ``out``: the same file ``segment_scene`` writes. Each worker opens
    ``spec`` once. Errors as ``segment_scene``."""
    scene, out = raster_path(scene), Path(out)
    start = time.perf_counter()
    meta = spec.meta()
    check_num_classes(meta.classes)
    kind = runtime_for(spec.model, spec.runtime)
    tile, overlap = resolve_tiling(meta, options, fixed_tile=kind != "torch", runtime=kind)
    margin = resolve_margin(options, tile)
    check_outputs(scene, out, options)
    final, conf, report_path, partial = output_paths(out)
    kind_runtime = _SpecRuntime(spec, meta, kind)
    with (
        SceneSource(scene, meta.in_chans, meta.norm, options.bands, options.stats, assets=options.assets) as source,
        claimed(partial, out, options.resume),
    ):
        announce_bands(source, log or log_stderr)
        info = source.info
        plan = plan_rows(info.height, info.width, tile, overlap, margin)
        blocks = plan_blocks([r[0].row for r in plan], plan[0][0].height, rows_per_block)
        expected = {
            **fingerprint(scene, kind_runtime, source, tile, overlap, options.probs, margin),
            "blocks": rows_per_block,
        }
        # a STAC scene's workers stack the assets chosen here (the norm they get may not say the model's bands)
        assets = tuple(a.key for a in source.stac.assets) if source.stac is not None else None
        job = _Job(
            str(scene),
            str(partial),
            meta.in_chans,
            source.norm.to_dict(),
            source.bands,
            tile,
            overlap,
            margin,
            SegmentOptions(**dict(asdict(options), progress=False, assets=assets)),
            info.transform.to_gdal(),
        )
        if options.resume:
            load_state(partial, expected)
        else:
            (partial / "blocks").mkdir(parents=True)
            atomic_write_text(
                partial / "state.json", json.dumps({"format": STATE_FORMAT, "fingerprint": expected, "mode": "blocks"})
            )
        results = _run_blocks(job, blocks, spec, scheduler, sum(len(r) for r in plan), options)
        counts = RowCounts(sum(r.get("tiles_run", 0) for r in results), sum(r.get("tiles_skipped", 0) for r in results))
        times = StageTimes()
        for r in results:
            for stage, seconds in r.get("stages", {}).items():
                times.add(stage, seconds)
        tally = ClassAreaTally(meta.num_classes, info.crs, info.transform, info.width, info.height)
        _assemble(partial, info, meta.classes, options.probs, results, tally, times, final, conf)
        totals = RunTotals(
            sum(len(r) for r in plan),
            counts,
            tally,
            time.perf_counter() - start,
            0,
            info.width * info.height,
            times.to_dict(),
            ",".join(sorted({r["blend"] for r in results if r.get("blend")})) or None,
        )
        outputs = (final, conf if options.probs else None)
        report = build_report(scene, outputs, kind_runtime, source, (tile, overlap, margin), options, totals)
        report = SceneReport(
            **{
                **report.to_dict(),
                "classes": report.classes,
                "runtime_options": {
                    **report.runtime_options,
                    "cluster": str(scheduler),
                    "blocks": len(blocks),
                    "rows_per_block": rows_per_block,
                    "workers": sorted({r["worker"] for r in results if "worker" in r}),
                },
            }
        )
        atomic_write_text(report_path, json.dumps(report.to_dict(), indent=2))
        shutil.rmtree(partial)
    return report


def _run_blocks(
    job: _Job, blocks: list[Block], spec: RuntimeSpec, scheduler: Any, total_tiles: int, options: SegmentOptions
) -> list[dict[str, Any]]:
    """Every block and seam on the cluster; their results, blocks first."""
    from distributed import Client, as_completed

    client = connect(scheduler)
    owned = not isinstance(scheduler, Client)
    progress = TileProgress(total_tiles, 0, options.progress, Path(job.scene).name)
    try:
        register_runtime(client, spec)
        futures = [client.submit(run_block, job, b, pure=False, key=f"cdkd-block-{b.index}-{id(job)}") for b in blocks]
        seams = [
            client.submit(run_seam, job, i, futures[i], futures[i + 1], pure=False, key=f"cdkd-seam-{i}-{id(job)}")
            for i in range(len(blocks) - 1)
        ]
        for future in as_completed(futures):
            result = future.result()  # a block's CdkdError (a corrupt window, say) is raised here as it was there
            progress.update(result["tiles_run"] + result["tiles_skipped"])
        return client.gather(futures) + client.gather(seams)
    finally:
        progress.close()
        if owned:
            client.close()


def _assemble(
    partial: Path,
    info: Any,
    schema: Any,
    probs: bool,
    results: list[dict[str, Any]],
    tally: ClassAreaTally,
    times: StageTimes,
    final: Path,
    conf: Path,
) -> None:
    """Stream the workers' chunks in order into the local engine's writer: overviews, COG, legend."""
    chunks = sorted((top, rows) for r in results for top, rows in r["chunks"])
    at = 0
    for top, rows in chunks:
        if top != at:
            raise CheckpointError(
                f"{partial}: rows {at}..{top} are missing from the workers' results; run again with --resume"
            )
        at = top + rows
    if at != info.height:
        raise CheckpointError(f"{partial}: rows {at}..{info.height} are missing; run again with --resume")
    writer = SceneWriter(
        partial,
        info,
        class_layers(schema, probs),
        times,
        on_rows=lambda rows: tally.add(rows.top, cast(np.ndarray, rows.classes)),
        threaded=False,
    )
    for top, _ in chunks:
        classes = read_chunk(partial / "classes" / chunk_name(0, top))
        confidence = read_chunk(partial / "confidence" / chunk_name(0, top)) if probs else None
        writer.put(FinishedRows(top, classes, confidence), on_disk=True)
    writer.close()
    if int(tally.pixels.sum()) == 0:
        (partial / "state.json").unlink(missing_ok=True)  # nothing to resume: the folder goes too
        raise DataError(f"{info.path}: has no valid pixel (every pixel is nodata or masked); nothing to segment")
    writer.finish({"classes": final, "confidence": conf})


@dataclass(frozen=True)
class _SpecRuntime:
    """What the report needs of a runtime, for a model that runs on the workers, not here."""

    spec: RuntimeSpec
    meta: Any
    name: str

    @property
    def path(self) -> str:
        return self.spec.model

    @property
    def device(self) -> str:
        return f"cluster ({self.spec.device})"

    @property
    def blend_device(self) -> str:
        """The workers' device as far as it is known here (``auto`` resolves on each worker)."""
        return "cpu" if self.spec.device in ("auto", "cpu") else self.spec.device

    @property
    def options(self) -> dict[str, Any]:
        return {"device": self.spec.device, "amp": self.spec.amp, "threads": self.spec.threads}
