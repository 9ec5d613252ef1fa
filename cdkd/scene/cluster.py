"""Connecting to a dask.distributed cluster and opening the model once per worker.

Both ways cdkd uses a cluster (many scenes, one task each: ``batch``; one scene in blocks of window rows:
``blocks``) send workers a ``RuntimeSpec`` (a path pickles; a model may not) and let a worker plugin open it
when the worker starts, so each worker loads the model once however many tasks it runs, and a worker that
replaces a dead one loads it again by itself.
"""

from __future__ import annotations

from typing import Any

from cdkd.errors import CdkdValueError
from cdkd.inference.runtimes import Runtime, RuntimeSpec

PLUGIN_NAME = "cdkd-runtime"


def connect(scheduler: Any) -> Any:
    """A ``distributed.Client`` for ``scheduler`` (an address like ``tcp://host:8786``, or a Client as it is)."""
    try:
        from distributed import Client
    except ImportError:
        raise CdkdValueError("--scheduler needs dask.distributed (pip install 'dask[distributed]')") from None
    if isinstance(scheduler, Client):
        return scheduler
    try:
        return Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise CdkdValueError(f"cannot reach the dask scheduler at {scheduler} ({e})") from None


def register_runtime(client: Any, spec: RuntimeSpec) -> None:
    """Open ``spec`` on every worker, now and on workers that join later."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class RuntimePlugin(WorkerPlugin):
        name = PLUGIN_NAME

        def __init__(self, spec: RuntimeSpec) -> None:
            self.spec = spec
            self.runtime: Runtime | None = None

        def setup(self, worker: Any) -> None:
            self.runtime = self.spec.open()

    client.register_plugin(RuntimePlugin(spec))


def worker_runtime() -> tuple[Runtime, str]:
    """(this worker's runtime, this worker's address), inside a task."""
    from distributed import get_worker

    worker = get_worker()
    plugin: Any = worker.plugins[PLUGIN_NAME]  # the RuntimePlugin that register_runtime put there
    return plugin.runtime, worker.address
