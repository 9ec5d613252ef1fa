"""Many scenes: in this process one after another, or on an existing dask.distributed cluster.

Locally one runtime serves every scene (a model loads once). On a cluster (``scheduler="tcp://host:port"``) a
worker plugin opens one runtime per worker when the worker joins, and each scene is one task, so a worker
loads the model once however many scenes it gets. A scene that fails is reported with its one-line error and,
with ``on_error="skip"``, the others go on; with ``"fail"`` the remaining scenes are cancelled.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cdkd.errors import CdkdError, CdkdValueError, DataError
from cdkd.scene.engine import SceneReport, SegmentOptions, segment_scene
from cdkd.scene.runtimes import open_runtime
from cdkd.utils.atomic import atomic_write_text

ON_ERROR = ("fail", "skip")
PLUGIN_NAME = "cdkd-runtime"
REPORT_NAME = "segment_report.json"


@dataclass(frozen=True)
class RuntimeSpec:
    """How to open a runtime: sent to dask workers instead of the model itself (a path pickles; a model may not)."""

    model: str
    runtime: str | None = None
    device: str = "auto"
    amp: str = "auto"
    threads: int | None = None

    def open(self) -> Any:
        return open_runtime(self.model, self.runtime, self.device, self.amp, self.threads)


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
        return {"scheduler": self.scheduler, "seconds": self.seconds, "scenes": [asdict(r) for r in self.scenes],
                "succeeded": sum(r.ok for r in self.scenes), "failed": len(self.failed)}


SCENE_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2")


def expand_scenes(paths: Sequence[str | Path]) -> list[Path]:
    """Scenes to segment: files as given, and each folder replaced by its scene files (sorted, not recursive,
    hidden files left out: a folder of outputs or partial work below it is never taken for input)."""
    scenes: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            scenes.append(p)
            continue
        found = sorted(f for f in p.iterdir()
                       if f.suffix.lower() in SCENE_SUFFIXES and f.is_file() and not f.name.startswith("."))
        if not found:
            raise DataError(f"{p}: no scene in this folder (looked for {', '.join('*' + s for s in SCENE_SUFFIXES)})")
        scenes.extend(found)
    return scenes


def plan_outputs(scenes: Sequence[str | Path], out_dir: str | Path) -> list[tuple[Path, Path]]:
    """(scene, OUT_DIR/<stem>.tif) pairs; two scenes with one stem would write one file, so that is refused."""
    pairs, seen = [], {}
    for s in scenes:
        s = Path(s)
        out = Path(out_dir) / f"{s.stem}.tif"
        if out in seen:
            raise CdkdValueError(f"{s} and {seen[out]} would both be written to {out}; rename one or run them apart")
        seen[out] = s
        pairs.append((s, out))
    if not pairs:
        raise CdkdValueError("no scene given")
    return pairs


def _result(scene: Path, out: Path, run: Callable[[], SceneReport], worker: str = "local") -> SceneResult:
    try:
        return SceneResult(str(scene), str(out), True, report=run().to_dict(), worker=worker)
    except CdkdError as e:  # bad input: reported per scene; programming errors still propagate
        return SceneResult(str(scene), str(out), False, error=str(e), worker=worker)


def _segment_on_worker(scene: str, out: str, options: SegmentOptions) -> SceneResult:
    """A dask task: segment one scene with the runtime this worker's plugin opened."""
    from distributed import get_worker

    worker = get_worker()
    runtime = worker.plugins[PLUGIN_NAME].runtime
    return _result(Path(scene), Path(out), lambda: segment_scene(scene, runtime, out, options), worker.address)


def _runtime_plugin(spec: RuntimeSpec) -> Any:
    from distributed.diagnostics.plugin import WorkerPlugin

    class RuntimePlugin(WorkerPlugin):
        """Opens the model once per worker, when the worker starts (or joins later)."""

        name = PLUGIN_NAME

        def __init__(self, spec: RuntimeSpec) -> None:
            self.spec = spec
            self.runtime = None

        def setup(self, worker: Any) -> None:
            self.runtime = self.spec.open()

    return RuntimePlugin(spec)


def segment_many(scenes: Sequence[str | Path], out_dir: str | Path, spec: RuntimeSpec,
                 options: SegmentOptions = SegmentOptions(), scheduler: str | None = None,
                 on_error: str = "fail") -> BatchReport:
    """Segment every scene into ``out_dir/<stem>.tif``; writes ``out_dir/segment_report.json``.

    ``scheduler=None`` runs here, one scene after another; an address runs the scenes on that dask cluster.
    Never raises for a scene's bad input: see ``BatchReport.failed``.
    """
    if on_error not in ON_ERROR:
        raise CdkdValueError(f"unknown --on-error {on_error!r}; choose one of {', '.join(ON_ERROR)}")
    pairs = plan_outputs(scenes, out_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if scheduler is None:
        results = _run_local(pairs, spec, options, on_error)
    else:
        results = _run_cluster(pairs, spec, options, scheduler, on_error)
    report = BatchReport(results, time.perf_counter() - start, scheduler or "local")
    atomic_write_text(Path(out_dir) / REPORT_NAME, json.dumps(report.to_dict(), indent=2))
    return report


def _run_local(pairs: list[tuple[Path, Path]], spec: RuntimeSpec, options: SegmentOptions,
               on_error: str) -> list[SceneResult]:
    runtime = spec.open()
    results = []
    for scene, out in pairs:
        results.append(_result(scene, out, lambda s=scene, o=out: segment_scene(s, runtime, o, options)))
        if not results[-1].ok and on_error == "fail":
            break
    return results


def _run_cluster(pairs: list[tuple[Path, Path]], spec: RuntimeSpec, options: SegmentOptions, scheduler: str,
                 on_error: str) -> list[SceneResult]:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise CdkdValueError("--scheduler needs dask.distributed (pip install 'dask[distributed]')") from None
    options = SegmentOptions(**dict(asdict(options), progress=False))  # workers have no terminal
    try:
        client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise CdkdValueError(f"cannot reach the dask scheduler at {scheduler} ({e})") from None
    with client:
        client.register_plugin(_runtime_plugin(spec))
        futures = {client.submit(_segment_on_worker, str(s), str(o), options, pure=False): (s, o) for s, o in pairs}
        done: dict[Path, SceneResult] = {}
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
