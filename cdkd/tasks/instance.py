"""The instance task: objects, one polygon each.

Fine-tuning trains a Mask R-CNN on the student (``cdkd.models.instance.Detector``: a ViTDet-style simple feature
pyramid feeding torchvision's Mask R-CNN; frozen encoder unless ``--unfreeze``) from a COCO file and its images
or a georeferenced scene with vector footprints (``read_data``), on windows placed around objects
(``InstanceTiles``), with the sum of Mask R-CNN's five losses, each logged; it writes ``detector.pt``.

Normalisation: the student's statistics when the images are of its pixel type and have its bands; otherwise
(``training_norm``: a 16-bit panchromatic scene under a student distilled on 8-bit RGB) statistics computed once
from the training images, band 1 repeated for a single-band image, which ``detector.pt`` then carries.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, cast

import torch
import torch.nn as nn

from cdkd.artifacts import DetectorInfo, StudentInfo, save_detector
from cdkd.config import FinetuneConfig, LabeledDataConfig
from cdkd.data.classes import ClassSchema
from cdkd.data.coco import INSTANCE_FORMATS, InstanceData, read_coco
from cdkd.data.instance_tiles import InstanceTiles, collate_instances
from cdkd.data.stats import NormStats
from cdkd.errors import CdkdValueError, DataError
from cdkd.inference.runtimes import RuntimeSpec, runtime_for
from cdkd.models.instance import Detector
from cdkd.scene.core.options import SegmentOptions
from cdkd.tasks.base import Log, Task, TrainingData
from cdkd.train.loop import StepLog

LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def check_format(fmt: str) -> str:
    if fmt not in INSTANCE_FORMATS:
        raise CdkdValueError(
            f"format {fmt!r} is not an instance format; with --task instance choose one of "
            f"{', '.join(INSTANCE_FORMATS)} (coco: a COCO JSON and its images; geo: a GeoTIFF and "
            "its vector footprints)"
        )
    return fmt


def read_data(cfg: LabeledDataConfig, log: Callable[[str], None] | None = None) -> InstanceData:
    """The training (or evaluation) objects that ``cfg`` names (``format`` coco or geo)."""
    check_format(cfg.format)
    if cfg.format == "coco":
        return read_coco(cfg.root, cfg.split)
    from cdkd.data.vector_labels import read_geo

    schema = ClassSchema.load(cfg.classes) if cfg.classes else None
    return read_geo(cfg.root, cfg.labels, class_field=cfg.class_field, schema=schema, split=cfg.split, log=log)


def training_norm(data: InstanceData, norm: NormStats, in_chans: int, log: Callable[[str], None]) -> NormStats:
    """The normalisation the detector trains (and later runs) with; see the module docstring."""
    from cdkd.data.files import RasterInfo, reading
    from cdkd.data.stats import compute_stats

    infos = []
    for im in data.images:
        with reading(im.path) as src:
            infos.append(RasterInfo(im.path, src.width, src.height, src.count, src.dtypes[0]))
    if all(i.dtype == norm.dtype and i.count >= max(norm.bands) for i in infos):
        return norm
    count = min(i.count for i in infos)
    bands = (
        norm.bands if count >= max(norm.bands) else ((1,) * in_chans if count == 1 else tuple(range(1, in_chans + 1)))
    )
    if max(bands) > count:
        raise DataError(f"{infos[0].path}: has {count} band(s) but the student takes {in_chans}")
    stats = compute_stats(infos, bands, n_samples=64, window=512)
    log(
        f"the training images are {infos[0].dtype} with {count} band(s), the student's statistics are for "
        f"{norm.dtype} bands {list(norm.bands)}: normalising with statistics of the training images (bands "
        f"{list(bands)}), stored in detector.pt"
    )
    return stats


def build_detector(student: nn.Module, num_classes: int, cfg: FinetuneConfig) -> Detector:
    """``cfg.instance``'s detector on ``student`` (frozen unless ``cfg.head.unfreeze``)."""
    c = cfg.instance
    return Detector(
        student,
        num_classes,
        layer=c.layer,
        channels=c.channels,
        freeze_encoder=not cfg.head.unfreeze,
        anchor_sizes=c.anchor_sizes,
        box_batch_size_per_image=c.box_batch_size_per_image,
        detections_per_image=c.detections_per_image,
    )


def tiles(data: InstanceData, norm: NormStats, tile: int, cfg: FinetuneConfig) -> InstanceTiles:
    return InstanceTiles(
        data, norm, tile, augment=cfg.data.augment, seed=cfg.train.seed, object_bias=cfg.instance.object_bias
    )


def save(path: Path, model: Detector, student: StudentInfo, schema: ClassSchema, tile: int, overlap: int) -> None:
    save_detector(
        path, model, DetectorInfo(student=student, head=model.config(), classes=schema, tile_size=tile, overlap=overlap)
    )


class InstanceTask(Task):
    name = "instance"
    artifact_name = "detector.pt"
    formats = INSTANCE_FORMATS

    def check(self, cfg: FinetuneConfig) -> None:
        check_format(cfg.data.format)

    def training_data(self, cfg: FinetuneConfig, student: StudentInfo, log: Log) -> TrainingData:
        data = read_data(cfg.data, log)
        norm = training_norm(data, student.norm, student.in_chans, log)
        return TrainingData(
            data.schema,
            norm,
            [im.path for im in data.images],
            len(data.images),
            f"{len(data.images)} images, {data.num_objects} objects",
            data,
        )

    def build(self, student: nn.Module, schema: ClassSchema, cfg: FinetuneConfig) -> nn.Module:
        return build_detector(student, schema.num_classes, cfg)

    def describe(self, cfg: FinetuneConfig, student: StudentInfo) -> str:
        return f"a Mask R-CNN on {student.arch}"

    def dataset(self, data: TrainingData, tile: int, cfg: FinetuneConfig) -> tuple[Any, Callable | None]:
        return tiles(data.items, data.norm, tile, cfg), collate_instances

    def objective(
        self, model: nn.Module, data: TrainingData, cfg: FinetuneConfig, device: torch.device
    ) -> InstanceObjective:
        return InstanceObjective(model, device, cfg.train.batch_size)

    def save(
        self, path: Path, model: nn.Module, student: StudentInfo, schema: ClassSchema, tile: int, overlap: int
    ) -> None:
        save(path, cast(Detector, model), student, schema, tile, overlap)  # this task's model

    def report(self, data: TrainingData) -> dict[str, Any]:
        return {"images": data.samples}

    # ----------------------------------------------------------------------------------------------- inference

    runtimes = ("torch", "onnx")

    def check_runtime(self, model: str | Path, kind: str) -> None:
        if kind == "tensorrt":
            raise CdkdValueError(
                f"{model}: instance models (Mask R-CNN) do not build TensorRT engines here (NMS, "
                "RoIAlign and a variable number of detections); run the .onnx in ONNX Runtime"
            )
        super().check_runtime(model, kind)

    def open_runtime(self, spec: RuntimeSpec) -> Any:
        from cdkd.inference.detector_runtimes import open_detector

        kind = runtime_for(spec.model, spec.runtime)
        self.check_runtime(spec.model, kind)
        return open_detector(spec.model, kind, device=spec.device, amp=spec.amp, threads=spec.threads)

    def check_scene_job(self, model: str, *, many: bool, cluster: bool, preview: bool) -> None:
        if many or cluster or preview:
            raise CdkdValueError(
                f"{model}: an instance model segments one scene at a time, here: give --out "
                "FILE.gpkg (no --out-dir, --scheduler or --preview)"
            )

    def segment_scene(
        self, scene: str | Path, runtime: Any, out: str | Path, options: SegmentOptions, log: Log | None = None
    ) -> Any:
        from cdkd.scene.instances import segment_instances

        return segment_instances(scene, runtime, out, options, log)

    def export_onnx(self, model: str | Path, out: str | Path, **options: Any) -> Any:
        from cdkd.export.detector_onnx import export_detector_onnx

        return export_detector_onnx(model, out, **options)

    def evaluate(self, model: str | Path, data: str | Path, out: str | Path, fmt: str, **options: Any) -> Any:
        from cdkd.evaluation.instance import evaluate_instances

        return evaluate_instances(model, data, out, fmt=fmt, **options)


class InstanceObjective:
    """Mask R-CNN's five losses (torchvision computes them in training mode), summed; each is logged, with the
    objects per training tile."""

    def __init__(self, model: nn.Module, device: torch.device, batch_size: int) -> None:
        self.model, self.device, self.batch_size = model, device, batch_size

    def begin_step(self) -> None:
        pass

    def micro(
        self, batch: dict, autocast: Callable[[], contextlib.AbstractContextManager]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["image"].to(self.device, non_blocking=True)
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
        with autocast():
            losses = self.model(list(images.unbind(0)), targets)
        loss = sum(v.float() for v in losses.values())
        parts = {k: float(v.detach()) for k, v in losses.items()}
        parts["loss"] = float(loss.detach())
        parts["objects"] = sum(len(t["labels"]) for t in targets)
        return loss, parts

    def end_step(self, parts: dict[str, Any]) -> StepLog:
        row = {
            "loss": parts["loss"],
            **{k: parts[k] for k in LOSSES if k in parts},
            "objects_per_tile": parts.get("objects", 0) / self.batch_size,
        }
        return StepLog(
            parts["loss"],
            row,
            shown={"loss": f"{parts['loss']:.3f}", "mask": f"{parts.get('loss_mask', float('nan')):.3f}"},
        )


__all__ = [
    "LOSSES",
    "InstanceObjective",
    "InstanceTask",
    "build_detector",
    "check_format",
    "read_data",
    "save",
    "tiles",
    "training_norm",
]
