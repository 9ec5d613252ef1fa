"""Tasks: what a model predicts, each a strategy (``cdkd.tasks.base.Task``) chosen once from this registry.

* ``semantic``: land-cover classes per pixel (``segmenter.pt``: a UPerNet or linear head; class rasters);
* ``instance``: objects (``detector.pt``: Mask R-CNN; one polygon per object).

Tasks load when first asked for, so that choosing one does not import the other's dependencies.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

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


def task_of_model(path: str | Path, runtime: str | None = None) -> Task:
    """The task of the model file ``path``, as the file says: a ``detector.pt`` or an ONNX export of one is an
    instance model; a ``segmenter.pt``, its ONNX export or a TensorRT engine a semantic one. ``runtime`` as
    ``--runtime`` (default: by suffix). Asked once per command; the strategy does the rest."""
    from cdkd.artifacts import DETECTOR_FORMAT, artifact_format
    from cdkd.inference.runtimes import read_onnx_meta, runtime_for

    kind = runtime_for(path, runtime)
    name = "semantic"
    if kind == "torch" and artifact_format(path) == DETECTOR_FORMAT:
        name = "instance"
    elif kind == "onnx" and Path(path).is_file():
        name = read_onnx_meta(path).task
    return task_named(name)


__all__ = ["TASK_NAMES", "Task", "TrainingData", "task_named", "task_of_model"]
