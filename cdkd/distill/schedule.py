"""The loss-weight schedule of Mask-CDKD, driven by r = L_T_MAE / L_S_MAE.

Weights are (KD, T_MAE, S_MAE):

    stage 0 "early"   (0.2, 0.4,  0.4 )   both sides learn to reconstruct
    stage 1 "middle"  (0.6, 0.2,  0.2 )   once r < 0.85: the teacher reconstructs clearly better -> distil
    stage 2 "late"    (0.7, 0.15, 0.15)   once r >= 0.95 after the middle stage: the student has caught up

r is computed from exponential moving averages of the two MAE losses (bias-corrected like Adam's moments) so
single noisy batches do not flip the stage, and no transition happens during the first ``warmup`` updates.
Stages only move forward. ``mode="fixed"`` keeps ``fixed_weights`` throughout.
"""

from __future__ import annotations

import math
from typing import Any

STAGES: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("early", (0.2, 0.4, 0.4)),
    ("middle", (0.6, 0.2, 0.2)),
    ("late", (0.7, 0.15, 0.15)),
)
ENTER_MIDDLE_BELOW = 0.85
ENTER_LATE_AT = 0.95


class LossSchedule:
    """Call ``update(t_mae, s_mae)`` once per optimiser step; read ``weights``, ``stage_name`` and ``ratio``."""

    def __init__(
        self,
        mode: str = "dynamic",
        fixed_weights: tuple[float, float, float] = (0.6, 0.2, 0.2),
        ema_decay: float = 0.98,
        warmup: int = 20,
    ) -> None:
        if mode not in ("dynamic", "fixed"):
            raise ValueError(f"schedule must be 'dynamic' or 'fixed', got {mode!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.mode = mode
        self.fixed_weights = tuple(float(w) for w in fixed_weights)
        self.decay = ema_decay
        self.warmup = warmup
        self.updates = 0
        self.stage = 0
        self._ema_t = 0.0
        self._ema_s = 0.0

    @property
    def weights(self) -> tuple[float, float, float]:
        return self.fixed_weights if self.mode == "fixed" else STAGES[self.stage][1]  # type: ignore[return-value]

    @property
    def stage_name(self) -> str:
        return "fixed" if self.mode == "fixed" else STAGES[self.stage][0]

    @property
    def ratio(self) -> float:
        """r = EMA(L_T_MAE) / EMA(L_S_MAE); nan before the first update."""
        if self.updates == 0:
            return math.nan
        return self._ema_t / max(self._ema_s, 1e-12)  # bias corrections cancel in the ratio

    def update(self, t_mae: float, s_mae: float) -> str | None:
        """Feed one step's MAE losses; returns a message when the stage changed, else None."""
        if not (math.isfinite(t_mae) and math.isfinite(s_mae)):
            return None  # a non-finite step must not poison the averages that steer the whole run
        self.updates += 1
        self._ema_t = self.decay * self._ema_t + (1 - self.decay) * t_mae
        self._ema_s = self.decay * self._ema_s + (1 - self.decay) * s_mae
        if self.mode == "fixed" or self.updates <= self.warmup:
            return None
        r = self.ratio
        before = self.stage
        if self.stage == 0 and r < ENTER_MIDDLE_BELOW:
            self.stage = 1
        elif self.stage == 1 and r >= ENTER_LATE_AT:
            self.stage = 2
        if self.stage != before:
            return (
                f"schedule: stage {STAGES[before][0]} -> {STAGES[self.stage][0]} at r = {r:.3f}, "
                f"weights (KD, T_MAE, S_MAE) = {self.weights}"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "updates": self.updates,
            "stage": self.stage,
            "ema_t": self._ema_t,
            "ema_s": self._ema_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self.stage = int(state["updates"]), int(state["stage"])
        self._ema_t, self._ema_s = float(state["ema_t"]), float(state["ema_s"])
