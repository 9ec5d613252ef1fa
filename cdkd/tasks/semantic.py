"""The semantic task: land-cover classes for every pixel.

Fine-tuning trains a UPerNet (or linear) head on the student (``cdkd.models.upernet.Segmenter``, frozen encoder
unless ``--unfreeze``: the DINOv2 protocol of the paper) from random crops of labeled pairs, with cross-entropy
that honours the ignore index (optionally class-balanced), and writes ``segmenter.pt``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cdkd.artifacts import SegmenterInfo, StudentInfo, save_segmenter
from cdkd.config import FinetuneConfig
from cdkd.data.classes import ClassSchema
from cdkd.data.labelcheck import check_labels
from cdkd.data.labeled import FORMATS, LabeledTiles, class_frequencies, find_pairs, schema_for
from cdkd.errors import CdkdValueError
from cdkd.inference.runtimes import RUNTIMES, Runtime, RuntimeSpec, runtime_for
from cdkd.models.upernet import HEADS, Segmenter
from cdkd.scene.core.options import SegmentOptions
from cdkd.tasks.base import Log, Task, TrainingData
from cdkd.train.loop import StepLog

__all__ = ["SemanticObjective", "SemanticTask", "class_weights"]


def class_weights(freq: np.ndarray) -> torch.Tensor:
    """Inverse square-root frequency weights, mean 1; classes absent from the data get weight 0."""
    w = np.where(freq > 0, 1.0 / np.sqrt(np.maximum(freq, 1)), 0.0)
    return torch.tensor(w / max(w[w > 0].mean(), 1e-12), dtype=torch.float32)


class SemanticTask(Task):
    name = "semantic"
    artifact_name = "segmenter.pt"
    formats = FORMATS

    def check(self, cfg: FinetuneConfig) -> None:
        if cfg.data.format not in FORMATS:
            raise CdkdValueError(
                f"unknown format {cfg.data.format!r}; choose one of {', '.join(FORMATS)} (instance "
                "formats coco and geo go with --task instance)"
            )
        if cfg.head.type not in HEADS:
            raise CdkdValueError(f"head must be one of {', '.join(HEADS)}, got {cfg.head.type!r}")
        if cfg.head.type == "upernet" and cfg.head.norm == "bn" and cfg.train.batch_size < 2:
            # BatchNorm after the 1x1 pyramid pooling sees one value per channel at batch 1 and cannot train
            raise CdkdValueError(
                "--batch-size 1 cannot train the UPerNet's BatchNorm (its 1x1 pyramid pooling has "
                "one value per channel); use --batch-size 2 or more (with --grad-accum to save "
                "memory), or head.norm: gn in --config"
            )

    def training_data(self, cfg: FinetuneConfig, student: StudentInfo, log: Log) -> TrainingData:
        schema = schema_for(cfg.data.format, cfg.data.classes)
        pairs = find_pairs(cfg.data.root, cfg.data.format, cfg.data.split)
        check_labels(pairs, schema, cfg.data.format, log)
        files = [f for pair in pairs for f in (pair.image, pair.mask)]
        return TrainingData(schema, student.norm, files, len(pairs), f"{len(pairs)} pairs", pairs)

    def build(self, student: nn.Module, schema: ClassSchema, cfg: FinetuneConfig) -> nn.Module:
        return Segmenter(
            student,
            num_classes=schema.num_classes,
            head=cfg.head.type,
            layers=cfg.head.layers,
            channels=cfg.head.channels,
            freeze_encoder=not cfg.head.unfreeze,
            norm=cfg.head.norm,
        )

    def describe(self, cfg: FinetuneConfig, student: StudentInfo) -> str:
        return f"a {cfg.head.type} head on {student.arch}"

    def dataset(self, data: TrainingData, tile: int, cfg: FinetuneConfig) -> tuple[Any, Callable | None]:
        return LabeledTiles(
            data.items, data.schema, data.norm, tile, augment=cfg.data.augment, seed=cfg.train.seed
        ), None

    def objective(
        self, model: nn.Module, data: TrainingData, cfg: FinetuneConfig, device: torch.device
    ) -> SemanticObjective:
        weight = (
            class_weights(class_frequencies(data.items, data.schema)).to(device) if cfg.head.class_balanced else None
        )
        return SemanticObjective(model, data.schema.ignore_index, weight, device)

    def save(
        self, path: Path, model: nn.Module, student: StudentInfo, schema: ClassSchema, tile: int, overlap: int
    ) -> None:
        segmenter = cast(Segmenter, model)  # this task's model
        info = SegmenterInfo(student=student, head=segmenter.config(), classes=schema, tile_size=tile, overlap=overlap)
        save_segmenter(path, segmenter, info)

    def report(self, data: TrainingData) -> dict[str, Any]:
        return {"pairs": data.samples}

    # ----------------------------------------------------------------------------------------------- inference

    runtimes = RUNTIMES

    def open_runtime(self, spec: RuntimeSpec) -> Runtime:
        self.check_runtime(spec.model, runtime_for(spec.model, spec.runtime))
        return spec.open()

    def segment_scene(
        self, scene: str | Path, runtime: Any, out: str | Path, options: SegmentOptions, log: Log | None = None
    ) -> Any:
        from cdkd.scene.engine import segment_scene

        return segment_scene(scene, runtime, out, options, log)

    def export_onnx(self, model: str | Path, out: str | Path, **options: Any) -> Any:
        from cdkd.export.onnx import export_onnx

        return export_onnx(model, out, **options)

    def evaluate(self, model: str | Path, data: str | Path, out: str | Path, fmt: str, **options: Any) -> Any:
        from cdkd.evaluation.semantic import evaluate

        given = [k for k in ("labels", "class_field") if options.pop(k, None) is not None]
        if given:
            raise CdkdValueError(
                f"{model}: a segmenter is evaluated on image/mask pairs; "
                f"{', '.join('--' + k.replace('_', '-') for k in given)} go with instance data"
            )
        return evaluate(model, data, fmt, out, **options)


class SemanticObjective:
    """Cross-entropy over the pixels that are not ignored; the step logs its pixel accuracy."""

    def __init__(self, model: nn.Module, ignore_index: int, weight: torch.Tensor | None, device: torch.device) -> None:
        self.model, self.ignore, self.weight, self.device = model, ignore_index, weight, device

    def begin_step(self) -> None:
        pass

    def micro(
        self, batch: dict, autocast: Callable[[], contextlib.AbstractContextManager]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        with autocast():
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels, weight=self.weight, ignore_index=self.ignore)
        if not torch.isfinite(loss):  # a crop that is all ignore pixels: nothing to learn from
            loss = logits.sum() * 0.0
        keep = labels != self.ignore
        return loss, {
            "loss": float(loss.detach()),
            "correct": int((logits.argmax(1)[keep] == labels[keep]).sum()),
            "counted": int(keep.sum()),
        }

    def end_step(self, parts: dict[str, Any]) -> StepLog:
        acc = parts["correct"] / max(parts["counted"], 1e-12)
        return StepLog(
            parts["loss"],
            {"loss": parts["loss"], "pixel_acc": acc},
            shown={"loss": f"{parts['loss']:.3f}", "acc": f"{acc:.3f}"},
        )
