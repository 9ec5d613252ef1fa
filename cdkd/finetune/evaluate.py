"""Evaluation of a segmenter on whole labeled images: ``evaluate(...)`` is what ``cdkd evaluate`` calls.

Every image is covered by overlapping sliding windows (the same tiler as the scene engine), logits are blended
with a smooth weight window, and the argmax is compared with the mask; the ignore index is skipped everywhere.
Outputs: ``metrics.json``, ``metrics.md`` (the table also printed) and ``confusion.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cdkd.artifacts import SegmenterInfo, load_segmenter
from cdkd.data.classes import ClassSchema
from cdkd.data.labeled import find_pairs, read_pair, schema_for
from cdkd.errors import CdkdValueError, DataError, OutputExistsError
from cdkd.finetune.metrics import MetricAccumulator, SegMetrics
from cdkd.scene.sliding import sliding_window_logits
from cdkd.utils.atomic import atomic_path, atomic_write_text
from cdkd.utils.distributed import DistContext, resolve_device


@dataclass(frozen=True)
class EvalOutputs:
    metrics: SegMetrics
    json_path: Path
    markdown_path: Path
    confusion_path: Path


def check_schema_matches(model_schema: ClassSchema, data_schema: ClassSchema, source: str) -> None:
    """The data's classes must be the model's: same ids in the same order (names may differ only in case)."""
    a = [n.lower() for n in model_schema.names]
    b = [n.lower() for n in data_schema.names]
    if a != b or model_schema.ignore_index != data_schema.ignore_index:
        raise DataError(f"{source}: the data's classes {b} (ignore {data_schema.ignore_index}) do not match the "
                        f"model's {a} (ignore {model_schema.ignore_index}); evaluate with the class file the model "
                        "was trained with")


def predict_image(model: torch.nn.Module, info: SegmenterInfo, pixels: np.ndarray, device: torch.device,
                  batch_size: int = 4, overlap: int | None = None) -> np.ndarray:
    """Class ids (H, W) for one raw image (C, H, W): normalised with the model's statistics, sliding windows."""
    image = torch.from_numpy(info.norm.normalize(pixels))

    def predict(batch: torch.Tensor) -> torch.Tensor:
        return model(batch.to(device)).float().cpu()

    # Constant 0 padding (the dataset mean after normalisation) is what training used for small images.
    logits = sliding_window_logits(predict, image, info.tile_size, info.overlap if overlap is None else overlap,
                                   info.classes.num_classes, batch_size=batch_size, pad_mode="constant")
    return logits.argmax(0).numpy()


def evaluate(
    segmenter: str | Path,
    data: str | Path,
    fmt: str,
    out_dir: str | Path,
    *,
    classes: str | Path | None = None,
    split: Sequence[str] | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> EvalOutputs:
    """mIoU, OA, mF1, per-class IoU/F1 and the confusion matrix of ``segmenter`` on the pairs in ``data``."""
    out = Path(out_dir)
    outputs = [out / "metrics.json", out / "metrics.md", out / "confusion.png"]
    if not overwrite and any(p.exists() for p in outputs):
        raise OutputExistsError(f"{out}: already holds evaluation results; pass --overwrite to replace them")
    model, info = load_segmenter(segmenter)
    if overlap is not None and not 0 <= overlap < info.tile_size:
        raise CdkdValueError(f"overlap {overlap} must be >= 0 and smaller than the tile size {info.tile_size}")
    schema = schema_for(fmt, classes)
    check_schema_matches(info.classes, schema, str(classes or fmt))
    pairs = find_pairs(data, fmt, split)
    dev = resolve_device(device, DistContext())
    model = model.to(dev)
    acc = MetricAccumulator(schema.num_classes, schema.ignore_index, class_names=schema.names)
    iterator = pairs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(pairs, desc="evaluate", unit="image", dynamic_ncols=True)
    for pair in iterator:
        pixels, label = read_pair(pair, schema, info.norm.bands)
        acc.update(predict_image(model, info, pixels, dev, batch_size, overlap), label)
    metrics = acc.compute()
    out.mkdir(parents=True, exist_ok=True)
    report = dict(metrics.to_dict(), segmenter=str(segmenter), data=str(data), format=fmt, images=len(pairs),
                  tile_size=info.tile_size, overlap=info.overlap if overlap is None else overlap)
    atomic_write_text(outputs[0], json.dumps(report, indent=2))
    atomic_write_text(outputs[1], metrics.markdown_table() + "\n")
    with atomic_path(outputs[2]) as tmp:
        metrics.plot_confusion(tmp)
    return EvalOutputs(metrics, *outputs)
