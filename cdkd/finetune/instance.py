"""The instance-segmentation task of ``cdkd.finetune.trainer.finetune`` (``FinetuneConfig.task == "instance"``).

What differs from the semantic task, and nothing else: the data (``read_data``: a COCO file and its images, or a
georeferenced scene with vector footprints), the model (``build_detector``: ``cdkd.models.instance.Detector``),
the loss of a micro-batch (``InstanceLoop._micro``: the sum of Mask R-CNN's five losses, each logged) and the
artifact (``save``: ``detector.pt``). The loop, optimiser, schedule, checkpoints and resume are the trainer's.

Normalisation: the student's statistics when the images are of its pixel type and have its bands; otherwise
(``training_norm``: a 16-bit panchromatic scene under a student distilled on 8-bit RGB) statistics computed once
from the training images, band 1 repeated for a single-band image, which ``detector.pt`` then carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from cdkd.artifacts import DetectorInfo, StudentInfo, save_detector
from cdkd.config import FinetuneConfig, LabeledDataConfig
from cdkd.data.classes import ClassSchema
from cdkd.data.coco import INSTANCE_FORMATS, InstanceData, read_coco
from cdkd.data.instance_tiles import InstanceTiles, collate_instances
from cdkd.data.stats import NormStats
from cdkd.errors import CdkdValueError, DataError
from cdkd.finetune.trainer import _Loop
from cdkd.models.instance import Detector

LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def check_format(fmt: str) -> str:
    if fmt not in INSTANCE_FORMATS:
        raise CdkdValueError(f"format {fmt!r} is not an instance format; with --task instance choose one of "
                             f"{', '.join(INSTANCE_FORMATS)} (coco: a COCO JSON and its images; geo: a GeoTIFF and "
                             "its vector footprints)")
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
    bands = norm.bands if count >= max(norm.bands) else ((1,) * in_chans if count == 1 else tuple(range(1, in_chans + 1)))
    if max(bands) > count:
        raise DataError(f"{infos[0].path}: has {count} band(s) but the student takes {in_chans}")
    stats = compute_stats(infos, bands, n_samples=64, window=512)
    log(f"the training images are {infos[0].dtype} with {count} band(s), the student's statistics are for "
        f"{norm.dtype} bands {list(norm.bands)}: normalising with statistics of the training images (bands "
        f"{list(bands)}), stored in detector.pt")
    return stats


def build_detector(student: nn.Module, num_classes: int, cfg: FinetuneConfig) -> Detector:
    """``cfg.instance``'s detector on ``student`` (frozen unless ``cfg.head.unfreeze``)."""
    c = cfg.instance
    return Detector(student, num_classes, layer=c.layer, channels=c.channels, freeze_encoder=not cfg.head.unfreeze,
                    anchor_sizes=c.anchor_sizes, box_batch_size_per_image=c.box_batch_size_per_image,
                    detections_per_image=c.detections_per_image)


def tiles(data: InstanceData, norm: NormStats, tile: int, cfg: FinetuneConfig) -> InstanceTiles:
    return InstanceTiles(data, norm, tile, augment=cfg.data.augment, seed=cfg.train.seed,
                         object_bias=cfg.instance.object_bias)


def save(path: Path, model: Detector, student: StudentInfo, schema: ClassSchema, tile: int, overlap: int) -> None:
    save_detector(path, model, DetectorInfo(student=student, head=model.config(), classes=schema, tile_size=tile,
                                            overlap=overlap))


class InstanceLoop(_Loop):
    """The fine-tuning loop with Mask R-CNN's losses (torchvision computes them in training mode)."""

    def _micro(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["image"].to(self.device, non_blocking=True)
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses = self.model(list(images.unbind(0)), targets)
        loss = sum(v.float() for v in losses.values())
        logs = {k: float(v.detach()) for k, v in losses.items()}
        logs["objects"] = sum(len(t["labels"]) for t in targets)
        logs["micro_batches"] = 1
        return loss, logs

    def _logs(self, counts: dict[str, float]) -> dict[str, float]:
        n = max(counts.get("micro_batches", 1), 1)
        out = {k: counts[k] / n for k in LOSSES if k in counts}
        out["objects_per_tile"] = counts.get("objects", 0) / (n * self.cfg.train.batch_size)
        return out

    def _postfix(self, logs: dict[str, float]) -> dict[str, str]:
        return {"mask": f"{logs.get('loss_mask', float('nan')):.3f}"}


__all__ = ["LOSSES", "InstanceLoop", "build_detector", "check_format", "collate_instances", "read_data", "save",
           "tiles"]
