"""The recipe interface: what a distillation method supplies to the one trainer (``cdkd.distill.trainer``).

A recipe owns everything that is specific to its method; the trainer owns everything that is not (the data
files and normalisation, the student's construction, optimiser and LR schedule, AMP, gradient accumulation,
clipping, DDP, checkpoints and exact ``--resume``, ``metrics.jsonl``, ``report.json``, ``student.pt``).

+-------------------------+---------------------------------------------------------------------------------------+
| ``name``, ``section``   | registry key (``--recipe NAME``) and the ``DistillConfig`` field holding its settings |
| ``terms``               | names of its loss terms, in order: metric columns, ``report.json``'s ``final_losses`` |
| ``validate()``          | cheap user-facing checks of its settings, before any heavy work (CdkdValueError)      |
| ``build_teacher()``     | its teacher (called first, under the run's seed, so a random teacher is reproducible) |
| ``build(teacher, stu)`` | the objective: ONE ``nn.Module`` holding teacher, student and every head, so one       |
|                         | optimiser (its ``requires_grad`` parameters) and one DDP wrapper cover it.            |
|                         | ``forward(batch, knobs) -> {term: unweighted scalar loss}``; ``.student`` is saved     |
| ``dataset(rasters, s)`` | the training items: ``image`` (C, T, T) and ``valid`` (T, T) + its per-sample draws   |
|                         | (masks, corruption orders, seeds): a pure function of the sample number               |
| ``control()``           | a :class:`LossControl`: term weights and the ``knobs`` its forward reads, updated     |
|                         | after every step from rank-averaged losses; its ``state_dict`` goes in checkpoints    |
| ``provenance()``        | what ``student.pt`` records about the method                                         |
+-------------------------+---------------------------------------------------------------------------------------+

Frozen weights (the teacher's) are not checkpointed: a resumed run rebuilds them from their file (or the seed)
and the trainer compares a checksum of every frozen parameter of the objective.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from cdkd.config import DistillConfig, to_dict
from cdkd.data.files import RasterInfo
from cdkd.data.stats import NormStats

__all__ = ["Event", "FixedWeights", "LossControl", "Recipe", "frozen_fingerprint"]


@dataclass(frozen=True)
class Event:
    """Something a ``LossControl`` decided during a step: one log line and one ``metrics.jsonl`` record."""

    message: str
    record: dict[str, Any]  # written as {"step": ..., **record}; should hold "event": <kind>


class LossControl(ABC):
    """Per-step state of a recipe: the weight of each loss term and the knobs its forward reads (e.g. corruption
    ratios), updated from the step's losses. Everything that changes here must be in ``state_dict``."""

    @property
    def stage(self) -> str:
        """A short name for the current regime (``report.json``, progress bar)."""
        return "fixed"

    @abstractmethod
    def weights(self) -> dict[str, float]:
        """Weight of every loss term for the next step (keys: the recipe's ``terms``)."""

    def knobs(self) -> dict[str, float]:
        """Values the objective's forward reads in the next step; logged with the step that used them."""
        return {}

    def update(self, losses: Mapping[str, float]) -> Event | None:
        """Feed one optimiser step's unweighted losses (averaged over micro-batches and ranks)."""
        return None

    def log_fields(self) -> dict[str, Any]:
        """Extra columns for ``metrics.jsonl`` after ``update``."""
        return {"stage": self.stage}

    def summary(self) -> dict[str, Any]:
        """Extra keys for ``report.json`` at the end of the run."""
        return self.log_fields()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


class FixedWeights(LossControl):
    """Constant weights, no knobs: the control of a recipe without a schedule."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self._weights = {k: float(v) for k, v in weights.items()}

    def weights(self) -> dict[str, float]:
        return dict(self._weights)


class Recipe(ABC):
    """One distillation method; see the module docstring for the contract. Subclasses are registered by
    ``name`` in ``cdkd.distill.recipes.RECIPES``."""

    name: ClassVar[str]
    section: ClassVar[str]
    terms: ClassVar[tuple[str, ...]]
    # True: the student reads every band of the data (the teacher's input is formed from them); False: the student
    # and the teacher read the same three bands, red, green and blue where the files say which they are
    every_band: ClassVar[bool] = False

    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        # The data's normalisation statistics (with the bands' wavelengths when known), set by the trainer before
        # ``build``: for recipes whose objective depends on the data's bands (hyperkd's spectral alignment).
        self.stats: NormStats | None = None

    @property
    def settings(self) -> Any:
        """This recipe's own configuration section."""
        return getattr(self.cfg, self.section)

    def validate(self) -> None:
        """User-facing checks of the recipe's settings (raise ``CdkdValueError``); nothing heavy."""
        return None

    @abstractmethod
    def build_teacher(self) -> nn.Module:
        """The teacher, built from ``cfg.teacher``."""

    @abstractmethod
    def build(self, teacher: nn.Module, student: nn.Module) -> nn.Module:
        """The objective module around ``teacher`` and ``student`` (exposes ``.teacher`` and ``.student``)."""

    def dataset(self, rasters: Sequence[RasterInfo], stats: NormStats) -> Dataset:
        """Training items; the default is plain tiles (``image``, ``valid``) without per-sample draws."""
        from cdkd.data import UnlabeledTiles

        d = self.cfg.data
        return UnlabeledTiles(rasters, stats, d.tile_size, augment=d.augment, seed=self.cfg.train.seed)

    @abstractmethod
    def control(self) -> LossControl:
        """A fresh control (weights, knobs) for a run starting at step 0; resume loads its state."""

    def provenance(self) -> dict[str, Any]:
        """What ``student.pt`` records about the method: its name and settings."""
        return {"recipe": self.name, "objective": to_dict(self.settings)}


def frozen_fingerprint(model: nn.Module) -> float:
    """A cheap checksum (sum of |w| in float64) of the parameters that do not train: a resumed run must have
    rebuilt the same frozen teacher."""
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in model.parameters() if not p.requires_grad))
