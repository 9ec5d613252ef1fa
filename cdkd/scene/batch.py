"""Many scenes: in this process one after another, or on an existing dask.distributed cluster.

Locally one runtime serves every scene (a model loads once). On a cluster (``scheduler="tcp://host:port"``) each
scene is one task, and each worker opens the model once (``cluster``); one large scene is better split across
the workers with ``blocks.segment_scene_on_cluster``. A scene that fails is reported with its one-line error and,
with ``on_error="skip"``, the others go on; with ``"fail"`` the remaining scenes are cancelled.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cdkd.data.gdal import is_virtual_path
from cdkd.data.stac import is_stac, stac_refs, stac_stem
from cdkd.errors import CdkdError, CdkdValueError, DataError
from cdkd.inference.runtimes import RuntimeSpec
from cdkd.scene.cluster import connect, register_runtime, worker_runtime
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.core.report import SceneReport
from cdkd.scene.engine import segment_scene
from cdkd.utils.atomic import atomic_write_text
from cdkd.utils.paths import check_writable

ON_ERROR = ("fail", "skip")
REPORT_NAME = "segment_report.json"


@dataclass(frozen=True)
class SceneResult:
    scene: str
    output: str
    ok: bool
    error: str | None = None
    report: dict[str, Any] | None = None
    worker: str = "local"  # the dask worker's address on a cluster


@dataclass(frozen=True)
class BatchReport:
    scenes: list[SceneResult] = field(default_factory=list)
    seconds: float = 0.0
    scheduler: str = "local"

    @property
    def failed(self) -> list[SceneResult]:
        return [r for r in self.scenes if not r.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler,
            "seconds": self.seconds,
            "scenes": [asdict(r) for r in self.scenes],
            "succeeded": sum(r.ok for r in self.scenes),
            "failed": len(self.failed),
        }


SCENE_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2")


def expand_scenes(paths: Sequence[str | Path]) -> list[str | Path]:
    """Scenes to segment: files as given, and each folder replaced by its scene files (sorted, not recursive,
    hidden files left out: a folder of outputs or partial work below it is never taken for input). GDAL virtual
    paths and URLs are kept as they are; a STAC Item or ItemCollection gives ``REF#ITEM_ID`` for each item."""
    scenes: list[str | Path] = []
    for p in paths:
        if is_stac(p):
            scenes.extend(stac_refs(p))
            continue
        if is_virtual_path(p):
            scenes.append(str(p))
            continue
        p = Path(p)
        if not p.is_dir():
            scenes.append(p)
            continue
        found = sorted(
            f for f in p.iterdir() if f.suffix.lower() in SCENE_SUFFIXES and f.is_file() and not f.name.startswith(".")
        )
        if not found:
            raise DataError(f"{p}: no scene in this folder (looked for {', '.join('*' + s for s in SCENE_SUFFIXES)})")
        scenes.extend(found)
    return scenes


def scene_stem(scene: str | Path) -> str:
    """The name an output takes from its scene: ``a/b.tif`` -> ``b``; ``https://host/x/b.tif?sig=..`` -> ``b``;
    a STAC item's id for ``items.json#ID``."""
    if is_stac(scene):
        return stac_stem(scene)
    name = str(scene).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return Path(name).stem


def plan_outputs(scenes: Sequence[str | Path], out_dir: str | Path) -> list[tuple[str | Path, Path]]:
    """(scene, OUT_DIR/<stem>.tif) pairs; two scenes with one stem would write one file, so that is refused."""
    pairs: list[tuple[str | Path, Path]] = []
    seen: dict[Path, str | Path] = {}
    for s in scenes:
        out = Path(out_dir) / f"{scene_stem(s)}.tif"
        if out in seen:
            raise CdkdValueError(f"{s} and {seen[out]} would both be written to {out}; rename one or run them apart")
        seen[out] = s
        pairs.append((s, out))
    if not pairs:
        raise CdkdValueError("no scene given")
    return pairs


def _result(scene: str | Path, out: Path, run: Callable[[], SceneReport], worker: str = "local") -> SceneResult:
    try:
        return SceneResult(str(scene), str(out), True, report=run().to_dict(), worker=worker)
    except CdkdError as e:  # bad input: reported per scene; programming errors still propagate
        return SceneResult(str(scene), str(out), False, error=str(e), worker=worker)


def _segment_on_worker(scene: str, out: str, options: SegmentOptions) -> SceneResult:
    """A dask task: segment one scene with the runtime this worker's plugin opened."""
    runtime, address = worker_runtime()
    return _result(scene, Path(out), lambda: segment_scene(scene, runtime, out, options), address)


def segment_many(
    scenes: Sequence[str | Path],
    out_dir: str | Path,
    spec: RuntimeSpec,
    options: SegmentOptions = SegmentOptions(),
    scheduler: str | None = None,
    on_error: str = "fail",
) -> BatchReport:
    """Segment every scene into ``out_dir/<stem>.tif``; writes ``out_dir/segment_report.json``.

    ``scheduler=None`` runs here, one scene after another; an address runs the scenes on that dask cluster.
    Never raises for a scene's bad input: see ``BatchReport.failed``.
    """
    if on_error not in ON_ERROR:
        raise CdkdValueError(f"unknown --on-error {on_error!r}; choose one of {', '.join(ON_ERROR)}")
    pairs = plan_outputs(scenes, out_dir)
    check_writable(out_dir, f"{out_dir}: cannot write the outputs")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if scheduler is None:
        results = _run_local(pairs, spec, options, on_error)
    else:
        results = _run_cluster(pairs, spec, options, scheduler, on_error)
    report = BatchReport(results, time.perf_counter() - start, scheduler or "local")
    atomic_write_text(Path(out_dir) / REPORT_NAME, json.dumps(report.to_dict(), indent=2))
    return report


def _run_local(
    pairs: list[tuple[str | Path, Path]], spec: RuntimeSpec, options: SegmentOptions, on_error: str
) -> list[SceneResult]:
    runtime = spec.open()
    results: list[SceneResult] = []
    for scene, out in pairs:

        def run(s: str | Path = scene, o: Path = out) -> SceneReport:
            return segment_scene(s, runtime, o, options)

        results.append(_result(scene, out, run))
        if not results[-1].ok and on_error == "fail":
            break
    return results


def _run_cluster(
    pairs: list[tuple[str | Path, Path]], spec: RuntimeSpec, options: SegmentOptions, scheduler: str, on_error: str
) -> list[SceneResult]:
    client = connect(scheduler)
    from distributed import as_completed

    options = SegmentOptions(**dict(asdict(options), progress=False))  # workers have no terminal
    with client:
        register_runtime(client, spec)
        futures = {client.submit(_segment_on_worker, str(s), str(o), options, pure=False): (s, o) for s, o in pairs}
        done: dict[str | Path, SceneResult] = {}
        for future in as_completed(futures):
            scene, out = futures[future]
            try:
                result = future.result()
            except Exception as e:  # a crash on the worker (not bad input): still one scene's failure
                result = SceneResult(str(scene), str(out), False, error=f"{type(e).__name__}: {e}")
            done[scene] = result
            if not result.ok and on_error == "fail":
                for f in futures:
                    f.cancel()
                break
    return [done[s] for s, _ in pairs if s in done]
