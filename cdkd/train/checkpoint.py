"""Training checkpoints: save, find the newest, load, restore trainable weights and RNG states.

A checkpoint holds what changes during training: trainable weights (frozen weights come from their own file;
the caller checks them by a fingerprint), optimiser, LR scheduler, step, RNG states and whatever else the job
adds (loss schedule, normalisation, resolved configuration). Files are written atomically; the newest ``keep``
are kept. ``format`` tags which job wrote a file, so one job never resumes another's checkpoint.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cdkd.errors import CheckpointError
from cdkd.utils.atomic import atomic_torch_save

_NAME = re.compile(r"step_(\d+)\.pt$")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries of parameters that train (plus buffers), leaving out frozen parameters."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, payload: dict[str, Any], fmt: str, keep: int = 2) -> Path:
    """Write ``folder/step_XXXXXXX.pt`` tagged ``fmt`` and delete all but the newest ``keep`` checkpoints."""
    path = folder / f"step_{step:07d}.pt"
    atomic_torch_save(dict(payload, format=fmt, step=step), path)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, fmt: str) -> dict[str, Any]:
    try:
        # RNG states hold numpy objects, so this is a full unpickle: only load checkpoints you wrote yourself.
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file raises pickle, zip or runtime errors
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path}: not a {fmt} checkpoint (found {found})")
    return blob


def restore_model(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load trainable weights; every trainable entry must be present and match."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); was the run's configuration changed?"
        )
