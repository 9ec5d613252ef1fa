"""Artifacts: ``student.pt`` and ``segmenter.pt``, each carrying everything a later stage needs, in one file.

``student.pt`` (a plain dict, loadable with ``torch.load(weights_only=True)``):

    format        "cdkd.student"          version   1
    arch          registry name           arch_args builder arguments (img_size, in_chans, overrides)
    state_dict    student weights         norm      NormStats.to_dict(): bands, per-band mean/std, dtype
    provenance    teacher (variant, checkpoint, sha256, random or not), data, steps, cdkd version, time

``segmenter.pt`` adds to the student: ``head`` (decoder configuration), ``classes`` (ids, names, colours,
ignore index), ``tile_size`` and ``overlap`` for inference, and the whole segmenter's weights.

``detector.pt`` is the same for instance segmentation: the student, ``head`` (the ``Detector``'s configuration:
simple feature pyramid + Mask R-CNN), object ``classes``, ``tile_size``, ``overlap`` and the detector's weights.

Nothing else has to be kept in sync by hand: the loaders rebuild the networks from what the file says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn as nn

from cdkd.data.classes import ClassSchema
from cdkd.data.stats import NormStats
from cdkd.errors import CheckpointError
from cdkd.models.student import build_student
from cdkd.models.upernet import Segmenter
from cdkd.utils.atomic import atomic_torch_save

if TYPE_CHECKING:
    from cdkd.models.instance import Detector

InfoT = TypeVar("InfoT", bound="SegmenterInfo")  # an artifact's info class: segmenter or detector

STUDENT_FORMAT = "cdkd.student"
STUDENT_VERSION = 1
SEGMENTER_FORMAT = "cdkd.segmenter"
SEGMENTER_VERSION = 1
DETECTOR_FORMAT = "cdkd.detector"
DETECTOR_VERSION = 1
TASKS = ("semantic", "instance")  # what a model predicts: class rasters (segmenter.pt) or objects (detector.pt)


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
        {
            "format": STUDENT_FORMAT,
            "version": STUDENT_VERSION,
            "arch": info.arch,
            "arch_args": info.arch_args,
            "state_dict": state,
            "norm": info.norm.to_dict(),
            "provenance": info.provenance,
        },
        path,
    )


# What each cdkd file format is, for messages that name what a wrong file is and where the right one comes from.
KINDS = {
    STUDENT_FORMAT: "a distilled student (student.pt)",
    SEGMENTER_FORMAT: "a land-cover segmenter (segmenter.pt)",
    DETECTOR_FORMAT: "an instance detector (detector.pt)",
    "cdkd.distill-checkpoint": "a distillation training checkpoint (RUN_DIR/checkpoints/step_*.pt), not a model: "
    "the run's student.pt is written when it ends (cdkd distill --resume finishes it)",
    "cdkd.finetune-checkpoint": "a fine-tuning training checkpoint (RUN_DIR/checkpoints/step_*.pt), not a model: "
    "the run's segmenter.pt is written when it ends (cdkd finetune --resume finishes it)",
}


def _read_artifact(path: Path, fmt: str, version: int, what: str, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file not found ({hint})")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file: pickle, zip, runtime errors
        found = _sniff_format(path)
        if found in KINDS:
            raise CheckpointError(f"{path}: is {KINDS[found]}; give a {what} file ({hint})") from None
        raise CheckpointError(f"{path}: not a readable {what} file ({type(e).__name__})") from None
    found = blob.get("format") if isinstance(blob, dict) else None
    if found != fmt:
        kind = f"is {KINDS[found]}, not" if found in KINDS else "not"
        raise CheckpointError(f"{path}: {kind} a cdkd {what} file (expected format {fmt!r}; {hint})")
    if int(blob.get("version", 0)) > version:
        raise CheckpointError(
            f"{path}: {what} format version {blob['version']} is newer than this cdkd "
            f"understands ({version}); upgrade cdkd"
        )
    return blob


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match architecture {arch} ({str(e).splitlines()[0]})") from None


def load_student(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, StudentInfo]:
    """Rebuild the student in ``student.pt``; returns (model in eval mode, its info)."""
    path = Path(path)
    blob = _read_artifact(path, STUDENT_FORMAT, STUDENT_VERSION, "student", "cdkd distill writes RUN_DIR/student.pt")
    info = StudentInfo(
        arch=blob["arch"],
        arch_args=dict(blob["arch_args"]),
        norm=NormStats.from_dict(blob["norm"]),
        provenance=dict(blob.get("provenance", {})),
    )
    model = build_student(info.arch, **info.arch_args)
    _load_weights(model, blob["state_dict"], path, info.arch)
    return model.to(map_location).eval(), info


@dataclass(frozen=True)
class SegmenterInfo:
    """What ``segmenter.pt`` says besides the weights: the student it stands on, classes, inference settings."""

    student: StudentInfo
    head: dict[str, Any]
    classes: ClassSchema
    tile_size: int
    overlap: int

    @property
    def norm(self) -> NormStats:
        return self.student.norm

    @property
    def in_chans(self) -> int:
        return self.student.in_chans

    def inference_meta(self) -> InferenceMeta:
        """What a runtime needs besides the network (embedded in exported ONNX models and engine sidecars)."""
        return InferenceMeta(
            classes=self.classes,
            norm=self.norm,
            tile_size=self.tile_size,
            overlap=self.overlap,
            in_chans=self.in_chans,
            arch=self.student.arch,
            head=str(self.head.get("head", "?")),
        )


INFERENCE_META_FORMAT = "cdkd.inference"
ONNX_METADATA_KEY = "cdkd.inference"  # key of InferenceMeta.to_json() in an exported model's ONNX metadata_props


def engine_sidecar(engine: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``: a TensorRT engine cannot hold metadata, so it sits beside it."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


@dataclass(frozen=True)
class InferenceMeta:
    """Everything the scene engine needs to run a segmenter of any runtime (PyTorch, ONNX, TensorRT).

    The network maps (B, in_chans, tile_size, tile_size) float32 inputs, normalised with ``norm``, to
    (B, K, tile_size, tile_size) logits, K = ``classes.num_classes`` (``task`` "semantic"), or to objects: boxes,
    scores, classes and masks per tile (``task`` "instance", ``cdkd.scene.instances``). ``overlap`` is the default
    window overlap.
    ``to_json``/``from_json`` give the one serialised form (ONNX ``metadata_props`` and ``.engine.json`` sidecars).
    """

    classes: ClassSchema
    norm: NormStats
    tile_size: int
    overlap: int
    in_chans: int
    arch: str = "?"
    head: str = "?"
    task: str = "semantic"

    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": INFERENCE_META_FORMAT,
            "version": 1,
            "classes": self.classes.to_dict(),
            "norm": self.norm.to_dict(),
            "tile_size": self.tile_size,
            "overlap": self.overlap,
            "in_chans": self.in_chans,
            "arch": self.arch,
            "head": self.head,
        }
        if self.task != "semantic":  # absent means semantic: metadata written before tasks existed reads the same
            d["task"] = self.task
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str, source: str = "model metadata") -> InferenceMeta:
        """Parse ``to_json`` output; anything else is a CheckpointError naming ``source``."""
        try:
            d = json.loads(text)
            if d.get("format") != INFERENCE_META_FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {INFERENCE_META_FORMAT!r}")
            task = str(d.get("task", "semantic"))
            if task not in TASKS:
                raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}; a newer cdkd wrote it")
            return cls(
                classes=ClassSchema.from_dict(d["classes"]),
                norm=NormStats.from_dict(d["norm"]),
                tile_size=int(d["tile_size"]),
                overlap=int(d["overlap"]),
                in_chans=int(d["in_chans"]),
                arch=str(d.get("arch", "?")),
                head=str(d.get("head", "?")),
                task=task,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{source}: no usable cdkd inference metadata ({e})") from None


def _save_with_head(path: str | Path, fmt: str, version: int, model: nn.Module, info: SegmenterInfo) -> None:
    """A student + head artifact (``segmenter.pt``, ``detector.pt``), written atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    st = info.student
    atomic_torch_save(
        {
            "format": fmt,
            "version": version,
            "student": {"arch": st.arch, "arch_args": st.arch_args, "provenance": st.provenance},
            "head": info.head,
            "state_dict": state,
            "classes": info.classes.to_dict(),
            "norm": st.norm.to_dict(),
            "tile_size": info.tile_size,
            "overlap": info.overlap,
        },
        path,
    )


def _head_info(blob: dict[str, Any], cls: type[InfoT]) -> InfoT:
    """The info of a student + head artifact read by ``_read_artifact``."""
    st = blob["student"]
    student = StudentInfo(
        arch=st["arch"],
        arch_args=dict(st["arch_args"]),
        norm=NormStats.from_dict(blob["norm"]),
        provenance=dict(st.get("provenance", {})),
    )
    return cls(
        student=student,
        head=dict(blob["head"]),
        classes=ClassSchema.from_dict(blob["classes"]),
        tile_size=int(blob["tile_size"]),
        overlap=int(blob["overlap"]),
    )


def save_segmenter(path: str | Path, segmenter: Segmenter, info: SegmenterInfo) -> None:
    """Write ``segmenter.pt`` atomically."""
    _save_with_head(path, SEGMENTER_FORMAT, SEGMENTER_VERSION, segmenter, info)


def load_segmenter(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Segmenter, SegmenterInfo]:
    """Rebuild the segmenter in ``segmenter.pt``; returns (model in eval mode, its info)."""
    path = Path(path)
    blob = _read_artifact(
        path, SEGMENTER_FORMAT, SEGMENTER_VERSION, "segmenter", "cdkd finetune writes RUN_DIR/segmenter.pt"
    )
    info = _head_info(blob, SegmenterInfo)
    student = info.student
    model = Segmenter(build_student(student.arch, **student.arch_args), **info.head)
    _load_weights(model, blob["state_dict"], path, f"{student.arch} + {info.head.get('head', '?')}")
    return model.to(map_location).eval(), info


@dataclass(frozen=True)
class DetectorInfo(SegmenterInfo):
    """What ``detector.pt`` says besides the weights: the student, the detector's configuration (``head``:
    ``Detector.config()``), object classes and inference settings."""

    def inference_meta(self) -> InferenceMeta:
        return replace(super().inference_meta(), head="maskrcnn", task="instance")


def save_detector(path: str | Path, detector: nn.Module, info: DetectorInfo) -> None:
    """Write ``detector.pt`` atomically."""
    _save_with_head(path, DETECTOR_FORMAT, DETECTOR_VERSION, detector, info)


def load_detector(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Detector, DetectorInfo]:
    """Rebuild the detector in ``detector.pt``; returns (``cdkd.models.instance.Detector`` in eval mode, its info)."""
    from cdkd.models.instance import Detector

    path = Path(path)
    blob = _read_artifact(
        path, DETECTOR_FORMAT, DETECTOR_VERSION, "detector", "cdkd finetune --task instance writes RUN_DIR/detector.pt"
    )
    info = _head_info(blob, DetectorInfo)
    student = info.student
    model = Detector(build_student(student.arch, **student.arch_args), **info.head)
    _load_weights(model, blob["state_dict"], path, f"{student.arch} + Mask R-CNN")
    return model.to(map_location).eval(), info


def artifact_format(path: str | Path) -> str | None:
    """The ``format`` tag of a cdkd ``.pt`` file (``cdkd.segmenter``, ``cdkd.detector``, a training checkpoint's
    ...), or None when the file is not one. Memory-mapped: the weights are not read."""
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any unreadable file: the loader that follows names the problem
        return _sniff_format(Path(path))
    return blob.get("format") if isinstance(blob, dict) else None


def _sniff_format(path: Path) -> str | None:
    """The cdkd format tag in a torch file that cannot be loaded with ``weights_only`` (training checkpoints hold
    RNG states, which only a full unpickle restores), found in its pickle's bytes without unpickling anything."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            data = z.read(name) if name else b""
    except (OSError, zipfile.BadZipFile, KeyError):
        return None
    return next((fmt for fmt in KINDS if fmt.encode() in data), None)
