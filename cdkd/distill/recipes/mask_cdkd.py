"""Recipe ``mask-cdkd`` (the default): Mask-CDKD as before, through the recipe interface.

The objective is :class:`cdkd.distill.objective.MaskCDKD` (SAM + MMoA teacher, student, two MAE heads, KD
projectors), the weights come from the r-driven :class:`cdkd.distill.schedule.LossSchedule`, and the 75 % masks
are drawn in the data pipeline from each tile's own generator. State-dict keys, checkpoint contents, metrics and
the random streams are those of the trainer before recipes existed, so earlier runs resume unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence, cast

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from cdkd.data.files import RasterInfo
from cdkd.data.stats import NormStats
from cdkd.distill.objective import MaskCDKD
from cdkd.distill.recipes.base import Event, LossControl, Recipe
from cdkd.distill.schedule import LossSchedule
from cdkd.errors import CdkdValueError

if TYPE_CHECKING:
    from cdkd.models.teacher import MMoATeacher

TERMS = ("kd", "t_mae", "s_mae")


class MaskCDKDObjective(MaskCDKD):
    """``MaskCDKD`` taking the trainer's batch dict (``image``, ``mask``, ``valid``); same weights and keys."""

    def forward(  # type: ignore[override]
        self, batch: Mapping[str, torch.Tensor], knobs: Mapping[str, float] | None = None
    ) -> dict[str, torch.Tensor]:
        losses = super().forward(batch["image"], batch["mask"], batch["valid"])
        return {"kd": losses.kd, "t_mae": losses.t_mae, "s_mae": losses.s_mae}


class MaskCDKDControl(LossControl):
    """The r-driven three-stage weight schedule as a ``LossControl`` (its state dict is the schedule's)."""

    def __init__(self, schedule: LossSchedule) -> None:
        self.schedule = schedule

    @property
    def stage(self) -> str:
        return self.schedule.stage_name

    def weights(self) -> dict[str, float]:
        return dict(zip(TERMS, self.schedule.weights))

    def update(self, losses: Mapping[str, float]) -> Event | None:
        message = self.schedule.update(losses["t_mae"], losses["s_mae"])
        if message is None:
            return None
        return Event(
            message,
            {
                "event": "stage",
                "stage": self.stage,
                "ratio": self.schedule.ratio,
                "weights": list(self.schedule.weights),
            },
        )

    def log_fields(self) -> dict[str, Any]:
        return {"ratio": self.schedule.ratio, "stage": self.stage}

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(dict(state))


class MaskCDKDRecipe(Recipe):
    name = "mask-cdkd"
    section = "objective"
    terms = TERMS

    def validate(self) -> None:
        o = self.settings  # each setting's own range: config.check_ranges
        if o.schedule not in ("dynamic", "fixed"):
            raise CdkdValueError(f"schedule must be 'dynamic' or 'fixed', got {o.schedule!r}")

    def build_teacher(self) -> nn.Module:
        from cdkd.models.teacher import build_teacher

        return build_teacher(self.cfg.teacher)

    def build(self, teacher: nn.Module, student: nn.Module) -> nn.Module:
        # the teacher build_teacher made; in_chans settled with the bands (cdkd.distill.bands) before building
        return MaskCDKDObjective(
            cast("MMoATeacher", teacher), student, self.settings, in_chans=cast(int, self.cfg.student.in_chans)
        )

    def dataset(self, rasters: Sequence[RasterInfo], stats: NormStats) -> Dataset:
        from cdkd.data import UnlabeledTiles
        from cdkd.models.mae import PatchMasker

        d = self.cfg.data
        return UnlabeledTiles(
            rasters,
            stats,
            d.tile_size,
            augment=d.augment,
            seed=self.cfg.train.seed,
            mask_fn=PatchMasker(d.tile_size, self.settings.mask_ratio),
        )

    def control(self) -> LossControl:
        o = self.settings
        return MaskCDKDControl(LossSchedule(o.schedule, o.fixed_weights, o.ema_decay, o.schedule_warmup))
