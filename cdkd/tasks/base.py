"""The contract of a task: what a model predicts, and everything that follows from it.

A task is chosen once, from the registry (``cdkd.tasks.task_named``, or ``task_of_model`` for a model file), and
the shared code calls its hooks: the fine-tuning loop asks it for its data, model, per-micro-batch objective and
artifact; ``cdkd segment``, ``cdkd export`` and ``cdkd evaluate`` ask ``task_of_model`` once which task a model
file holds, and then its runtime, its scene output, its exporter and its evaluation. In the spirit of torchgeo's
``BaseTask`` and the distillation ``Recipe``: a second task is a second subclass, never an ``if`` in the shared
code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from cdkd.artifacts import StudentInfo
from cdkd.config import FinetuneConfig
from cdkd.data.classes import ClassSchema
from cdkd.data.stats import NormStats
from cdkd.errors import CdkdValueError
from cdkd.inference.runtimes import RuntimeSpec
from cdkd.scene.core.options import SegmentOptions
from cdkd.train.loop import Objective

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainingData:
    """A task's labeled data as the fine-tuning loop needs it: the classes, the normalisation the model trains (and
    later runs) with, what the run reads (``files``: its identity), how many samples an epoch has, a phrase for
    the log, and the task's own record of the data (``items``: pairs, COCO images...)."""

    schema: ClassSchema
    norm: NormStats
    files: list[str]
    samples: int
    describe: str
    items: Any


class Task(ABC):
    """One kind of prediction; subclasses are registered by ``name`` in ``cdkd.tasks``."""

    name: ClassVar[str]
    artifact_name: ClassVar[str]  # what fine-tuning writes into its run folder
    formats: ClassVar[tuple[str, ...]]  # labeled-data layouts it trains and evaluates on

    # --------------------------------------------------------------------------------------------- fine-tuning

    def check(self, cfg: FinetuneConfig) -> None:  # noqa: B027 (optional hook: nothing to check by default)
        """User-facing checks of ``cfg`` for this task, before anything is read."""

    @abstractmethod
    def training_data(self, cfg: FinetuneConfig, student: StudentInfo, log: Log) -> TrainingData:
        """The labeled data ``cfg.data`` names, checked (labels are read once here, not when first sampled)."""

    @abstractmethod
    def build(self, student: nn.Module, schema: ClassSchema, cfg: FinetuneConfig) -> nn.Module:
        """The task's model on ``student`` (frozen unless ``cfg.head.unfreeze``)."""

    @abstractmethod
    def describe(self, cfg: FinetuneConfig, student: StudentInfo) -> str:
        """What is trained, for the log: ``a upernet head on vit_s``."""

    @abstractmethod
    def dataset(self, data: TrainingData, tile: int, cfg: FinetuneConfig) -> tuple[Dataset, Callable | None]:
        """Training tiles and their collate function (None: the default)."""

    @abstractmethod
    def objective(self, model: nn.Module, data: TrainingData, cfg: FinetuneConfig, device: torch.device) -> Objective:
        """What the training loop minimises (``cdkd.train.loop.Objective``)."""

    @abstractmethod
    def save(
        self, path: Path, model: nn.Module, student: StudentInfo, schema: ClassSchema, tile: int, overlap: int
    ) -> None:
        """The artifact (``artifact_name``), everything inference needs in one file."""

    def report(self, data: TrainingData) -> dict[str, Any]:
        """This task's fields of the run's ``report.json``."""
        return {}

    # ----------------------------------------------------------------------------------------------- inference

    runtimes: ClassVar[tuple[str, ...]]  # the runtimes (``cdkd.inference.runtimes.RUNTIMES``) its models run in

    def check_runtime(self, model: str | Path, kind: str) -> None:
        """A CdkdValueError when this task's models do not run in the runtime ``kind``."""
        if kind not in self.runtimes:
            raise CdkdValueError(f"{model}: {self.name} models run in {' or '.join(self.runtimes)}, not {kind}")

    @abstractmethod
    def open_runtime(self, spec: RuntimeSpec) -> Any:
        """The model ``spec`` names, ready to run on tiles (a ``cdkd.inference.runtimes.Runtime`` of this task)."""

    def check_scene_job(self, model: str, *, many: bool, cluster: bool, preview: bool) -> None:  # noqa: B027
        """User-facing checks of a ``cdkd segment`` job before anything is read: ``many`` scenes (``--out-dir``),
        on a dask ``cluster``, with a ``preview``."""

    @abstractmethod
    def segment_scene(
        self, scene: str | Path, runtime: Any, out: str | Path, options: SegmentOptions, log: Log | None = None
    ) -> Any:
        """The task's output for one scene (a report with ``summary()``, ``outputs()`` and ``to_dict()``)."""

    @abstractmethod
    def export_onnx(self, model: str | Path, out: str | Path, **options: Any) -> Any:
        """The model as one self-describing ONNX file, checked against PyTorch (``cdkd export``'s options)."""

    @abstractmethod
    def evaluate(self, model: str | Path, data: str | Path, out: str | Path, fmt: str, **options: Any) -> Any:
        """Metrics of the model on labeled data (a result with ``summary()``), written under ``out``."""
