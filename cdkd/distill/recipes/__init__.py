"""Distillation recipes, chosen by name (``cdkd distill --recipe NAME``); one trainer runs any of them.

``RECIPES`` maps each name to its class (see :mod:`cdkd.distill.recipes.base` for the contract):

- ``mask-cdkd`` (default): SAM + MMoA teacher, feature alignment at three depth pairs + masked reconstruction
  for both sides, r-driven loss weights (:mod:`.mask_cdkd`);
- ``rs4d``: frozen SAM's image embedding distilled with an L1 loss into a student fed noised and masked patches,
  optionally with ratios that rise as the loss falls (:mod:`.rs4d`);
- ``hyperkd``: a student reading every band, taught by a frozen RGB SAM through spectral-range alignment, with
  teacher-feature-guided masking and a spectral-angle term beside the pixel reconstruction (:mod:`.hyperkd`).

A new recipe is a subclass of :class:`~cdkd.distill.recipes.base.Recipe`, a settings dataclass in
``cdkd.config`` (a ``DistillConfig`` field named by its ``section``) and one line here.
"""

from __future__ import annotations

from cdkd.config import DistillConfig
from cdkd.distill.recipes.base import Event, FixedWeights, LossControl, Recipe, frozen_fingerprint
from cdkd.distill.recipes.hyperkd import HyperKDRecipe
from cdkd.distill.recipes.mask_cdkd import MaskCDKDRecipe
from cdkd.distill.recipes.rs4d import RS4DRecipe
from cdkd.errors import CdkdValueError

RECIPES: dict[str, type[Recipe]] = {"mask-cdkd": MaskCDKDRecipe, "rs4d": RS4DRecipe, "hyperkd": HyperKDRecipe}


def build_recipe(cfg: DistillConfig) -> Recipe:
    """The recipe ``cfg.recipe`` names, bound to ``cfg``; an unknown name is a CdkdValueError listing them."""
    if cfg.recipe not in RECIPES:
        raise CdkdValueError(f"unknown recipe {cfg.recipe!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[cfg.recipe](cfg)


__all__ = ["RECIPES", "Event", "FixedWeights", "LossControl", "Recipe", "build_recipe", "frozen_fingerprint"]
