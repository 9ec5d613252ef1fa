"""Tasks: what a model predicts, each a strategy (``cdkd.tasks.base.Task``) chosen once from this registry.

* ``semantic``: land-cover classes per pixel (``segmenter.pt``: a UPerNet or linear head; class rasters);
* ``instance``: objects (``detector.pt``: Mask R-CNN; one polygon per object).

Tasks load when first asked for, so that choosing one does not import the other's dependencies.
"""

from __future__ import annotations

from importlib import import_module

from cdkd.errors import CdkdValueError
from cdkd.tasks.base import Task, TrainingData

TASK_NAMES = ("semantic", "instance")
_MODULES = {"semantic": ("cdkd.tasks.semantic", "SemanticTask"), "instance": ("cdkd.tasks.instance", "InstanceTask")}


def task_named(name: str) -> Task:
    """The task ``name``; a CdkdValueError naming the known ones otherwise."""
    if name not in _MODULES:
        raise CdkdValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    module, cls = _MODULES[name]
    return getattr(import_module(module), cls)()


__all__ = ["TASK_NAMES", "Task", "TrainingData", "task_named"]
