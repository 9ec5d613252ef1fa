"""The contract of a task: what a model predicts, and everything that follows from it.

A task is chosen once, from the registry (``cdkd.tasks.task_named``, or ``task_of`` for a model's metadata), and
the shared code calls its hooks: the fine-tuning loop asks it for its data, model, per-micro-batch objective and
artifact. In the spirit of torchgeo's ``BaseTask`` and the distillation ``Recipe``: a second task is a second
subclass, never an ``if`` in the shared code.
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

    def check(self, cfg: FinetuneConfig) -> None:
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
    def objective(self, model: nn.Module, data: TrainingData, cfg: FinetuneConfig, device: torch.device
                  ) -> Objective:
        """What the training loop minimises (``cdkd.train.loop.Objective``)."""

    @abstractmethod
    def save(self, path: Path, model: nn.Module, student: StudentInfo, schema: ClassSchema, tile: int,
             overlap: int) -> None:
        """The artifact (``artifact_name``), everything inference needs in one file."""

    def report(self, data: TrainingData) -> dict[str, Any]:
        """This task's fields of the run's ``report.json``."""
        return {}
