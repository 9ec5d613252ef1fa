"""What a scene run tells: progress over windows, one-line notices, and the report it writes as ``OUT.json``."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

import cdkd
from cdkd.progress import progress_bar
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.core.pipeline import RowCounts, reader_threads
from cdkd.scene.core.runstate import model_sha256
from cdkd.scene.core.source import SceneSource

if TYPE_CHECKING:
    from cdkd.inference.runtimes import RuntimeInfo

__all__ = [
    "ClassArea",
    "Log",
    "SceneReport",
    "TileProgress",
    "announce_bands",
    "build_report",
    "log_stderr",
    "provenance",
]


@dataclass(frozen=True)
class ClassArea:
    pixels: int
    area_m2: float  # ground area (cdkd.scene.core.areas), as every report and attribute table holds areas
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
    edge_context: int = 0  # px of reflected context past the scene's edge (tiler.edge_margin)
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

    def outputs(self) -> list[Path]:
        """The files the run wrote: the class raster, its confidence raster (``probs``) and the report."""
        return [Path(p) for p in (self.output, self.confidence) if p] + [Path(self.output).with_suffix(".json")]

    def summary(self) -> str:
        return scene_summary(self.to_dict())


def scene_summary(report: dict[str, Any]) -> str:
    """The console summary of a scene report (``SceneReport.to_dict()``, or as read back from ``OUT.json``): size,
    tiles, valid area, speed, and each class's share and ground area in one readable unit."""
    from cdkd.units import area_unit, format_area

    lines = [
        f"{report['scene']} -> {report['output']}: {report['width']}x{report['height']} px, "
        f"{report['tiles_run']} of {report['tiles']} tiles run, {format_area(report['area_m2'])} valid, "
        f"{report['seconds']:.1f} s ({report['mpx_per_s']:.2f} Mpx/s, {report['runtime']} on "
        f"{report['device']})"
    ]
    unit = area_unit([report["area_m2"]])
    lines += [
        f"  {name:<20} {100 * c['fraction']:6.2f} %  {format_area(c['area_m2'], unit):>14}"
        for name, c in report["classes"].items()
    ]
    return "\n".join(lines)


class TileProgress:
    """Progress over windows (a bar with tiles/s and ETA, or JSON lines: ``cdkd.progress``), or nothing."""

    def __init__(self, total: int, initial: int, enabled: bool, name: str) -> None:
        self.bar = progress_bar(total, initial=initial, desc=name, unit="tile", enabled=enabled)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def announce_bands(source: SceneSource, log: Log) -> None:
    """Say once which scene bands the model reads when that is not simply all of them in order."""
    info, bands = source.info, source.bands
    if source.stac is not None:
        log(source.stac.describe())
    if bands != tuple(range(1, info.count + 1)):
        log(
            f"{info.path}: the model reads band(s) {','.join(map(str, bands))} of the scene's {info.count} "
            "(choose others with --bands)"
        )


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def provenance(runtime: Any, options: SegmentOptions, norm: Any, device: str) -> dict[str, Any]:
    """The report fields that reproduce a run (any task): statistics, model file and hash, runtime options with
    the reader threads used on ``device``, cdkd version."""
    meta = runtime.meta
    return {
        "stats": {"mode": options.stats, "mean": list(norm.mean), "std": list(norm.std), "dtype": norm.dtype},
        "model": {"path": runtime.path, "sha256": model_sha256(runtime), "arch": meta.arch, "head": meta.head},
        "runtime_options": {**runtime.options, "read_threads": reader_threads(options.read_threads, device)},
        "cdkd_version": cdkd.__version__,
    }


def _with_blend(fields: dict[str, Any], blend: str | None) -> dict[str, Any]:
    """``provenance`` of a class raster, whose runtime options also say how the device blended (``blend``: the
    backend, or the workers' backends; None: not known)."""
    if blend is None:
        return fields
    return {**fields, "runtime_options": {**fields["runtime_options"], "blend": blend}}


@dataclass(frozen=True)
class RunTotals:
    """What one scene run counted, local or on a cluster: windows planned and run, class pixels and ground areas
    (``ClassAreaTally``), time, and where a resumed run started."""

    tiles: int
    counts: RowCounts
    tally: Any
    seconds: float
    resumed_from: int  # window rows done before this run
    pixels_run: int  # scene pixels this run covered
    stages: dict[str, float]  # seconds each stage was busy
    blend: str | None = None  # the blend backend (rowblend.blend_backend) that ran, the workers' joined by ","


def build_report(
    scene: str | Path,
    outputs: tuple[Path, Path | None],
    runtime: RuntimeInfo,
    source: SceneSource,
    tiling: tuple[int, ...],
    options: SegmentOptions,
    totals: RunTotals,
) -> SceneReport:
    """The report of one scene: ``outputs`` (class raster, confidence raster or None) written with ``runtime`` from
    ``source`` in ``tiling`` (tile, overlap[, edge margin]) windows, and the ``totals`` of the run."""
    info, (final, conf), (tile, overlap, *rest) = source.info, outputs, tiling
    tally, counts = totals.tally, totals.counts
    valid = int(tally.pixels.sum())
    areas = np.asarray(tally.area_m2, dtype=np.float64)
    classes = {
        c.name: ClassArea(int(n), round(float(a), 2), float(n) / valid)
        for c, n, a in zip(runtime.meta.classes.classes, tally.pixels, areas)
    }
    return SceneReport(
        scene=str(scene),
        output=str(final),
        confidence=str(conf) if conf else None,
        runtime=runtime.name,
        device=runtime.device,
        crs=info.crs.to_string(),
        width=info.width,
        height=info.height,
        tile_size=tile,
        overlap=overlap,
        batch_size=options.batch_size,
        tiles=totals.tiles,
        tiles_run=counts.run,
        tiles_skipped=counts.skipped,
        valid_pixels=valid,
        area_m2=round(float(areas.sum()), 2),
        seconds=totals.seconds,
        mpx_per_s=totals.pixels_run / 1e6 / max(totals.seconds, 1e-9),
        resumed_from_row=totals.resumed_from,
        pixels_this_run=totals.pixels_run,
        edge_context=rest[0] if rest else 0,
        bands=list(source.bands),
        scene_bands=info.count,
        **_with_blend(provenance(runtime, options, source.norm, runtime.blend_device), totals.blend),
        stages=totals.stages,
        classes=classes,
    )


Log = Callable[[str], None]
