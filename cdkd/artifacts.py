"""``student.pt``: the distilled student with everything a later stage needs, in one file.

Contents (a plain dict, loadable with ``torch.load(weights_only=True)``):

    format        "cdkd.student"          version   1
    arch          registry name           arch_args builder arguments (img_size, in_chans, overrides)
    state_dict    student weights         norm      NormStats.to_dict(): bands, per-band mean/std, dtype
    provenance    teacher (variant, checkpoint, sha256, random or not), data, steps, cdkd version, time

Nothing else has to be kept in sync by hand: ``load_student`` rebuilds the network from ``arch``/``arch_args``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cdkd.data.stats import NormStats
from cdkd.errors import CheckpointError
from cdkd.models.student import build_student
from cdkd.utils.atomic import atomic_torch_save

STUDENT_FORMAT = "cdkd.student"
STUDENT_VERSION = 1


@dataclass(frozen=True)
class StudentInfo:
    """What ``student.pt`` says about its network, besides the weights."""

    arch: str
    arch_args: dict[str, Any]
    norm: NormStats
    provenance: dict[str, Any]

    @property
    def in_chans(self) -> int:
        return int(self.arch_args.get("in_chans", 3))

    @property
    def tile_size(self) -> int:
        return int(self.arch_args.get("img_size", 1024))


def save_student(path: str | Path, student: nn.Module, info: StudentInfo) -> None:
    """Write ``student.pt`` atomically (a temporary name renamed when complete)."""
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    atomic_torch_save(
        {"format": STUDENT_FORMAT, "version": STUDENT_VERSION, "arch": info.arch, "arch_args": info.arch_args,
         "state_dict": state, "norm": info.norm.to_dict(), "provenance": info.provenance},
        path,
    )


def load_student(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, StudentInfo]:
    """Rebuild the student in ``student.pt``; returns (model in eval mode, its info)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: student file not found (cdkd distill writes RUN_DIR/student.pt)")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file: pickle, zip, runtime errors
        raise CheckpointError(f"{path}: not a readable student file ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != STUDENT_FORMAT:
        raise CheckpointError(f"{path}: not a cdkd student file (expected format {STUDENT_FORMAT!r})")
    if int(blob.get("version", 0)) > STUDENT_VERSION:
        raise CheckpointError(f"{path}: student format version {blob['version']} is newer than this cdkd "
                              f"understands ({STUDENT_VERSION}); upgrade cdkd")
    info = StudentInfo(arch=blob["arch"], arch_args=dict(blob["arch_args"]), norm=NormStats.from_dict(blob["norm"]),
                       provenance=dict(blob.get("provenance", {})))
    model = build_student(info.arch, **info.arch_args)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match architecture {info.arch} "
                              f"({str(e).splitlines()[0]})") from None
    return model.eval(), info
