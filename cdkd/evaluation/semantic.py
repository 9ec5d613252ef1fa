"""Evaluation of a segmenter on whole labeled images: ``evaluate(...)`` is what ``cdkd evaluate`` calls.

Every image is covered by overlapping sliding windows (the same tiler as the scene engine), logits are blended
with a smooth weight window, and the argmax is compared with the mask; the ignore index is skipped everywhere.
The network runs in any runtime of ``cdkd.inference.runtimes`` (``segmenter.pt`` in PyTorch, an exported ``.onnx``
in ONNX Runtime, a TensorRT engine), plugged into the same windows and blending (``sliding.runtime_predict``).
With PyTorch the encoder's and the decoder's time are measured while evaluating (``StageTimer``), so the report
says what share of the cost the decoder is.
Outputs: ``metrics.json``, ``metrics.md`` (the table also printed) and ``confusion.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch

from cdkd.artifacts import InferenceMeta
from cdkd.data.classes import ClassSchema
from cdkd.data.labelcheck import check_labels
from cdkd.data.labeled import find_pairs, read_pair, schema_for
from cdkd.errors import CdkdValueError, DataError, OutputExistsError
from cdkd.evaluation.metrics import MetricAccumulator, SegMetrics
from cdkd.inference.runtimes import open_runtime
from cdkd.inference.sliding import Predict, runtime_predict, sliding_window_logits
from cdkd.inference.tiler import edge_margin
from cdkd.progress import track
from cdkd.utils.atomic import atomic_path, atomic_write_text
from cdkd.utils.paths import check_writable

if TYPE_CHECKING:
    from cdkd.data.labeled import LabeledPair
    from cdkd.models.upernet import Segmenter


@dataclass(frozen=True)
class EvalCost:
    """Where an evaluation's time went. ``encoder_s``/``decoder_s``: the network's two parts, measured while
    evaluating (PyTorch only; None when the runtime runs the network as one graph)."""

    runtime: str
    device: str
    seconds: float  # the whole evaluation: reading, windows, network, blending, metrics
    megapixels: float  # labelled image pixels evaluated
    encoder_s: float | None = None
    decoder_s: float | None = None

    @property
    def decoder_share(self) -> float | None:
        """The decoder's share of the network's time (0..1), or None if not measured."""
        if self.encoder_s is None or self.decoder_s is None or self.encoder_s + self.decoder_s <= 0:
            return None
        return self.decoder_s / (self.encoder_s + self.decoder_s)

    def to_dict(self) -> dict[str, Any]:
        return dict(
            asdict(self),
            decoder_share=self.decoder_share,
            mpx_per_s=self.megapixels / self.seconds if self.seconds > 0 else None,
        )

    def summary(self) -> str:
        line = (
            f"{self.megapixels:.1f} Mpx in {self.seconds:.1f} s ({self.megapixels / max(self.seconds, 1e-9):.2f}"
            f" Mpx/s) with {self.runtime} on {self.device}"
        )
        share = self.decoder_share
        if share is None:
            return line + "; encoder/decoder split not measured (the runtime runs the network as one graph)"
        return (
            line + f"; network time: encoder {self.encoder_s:.1f} s, decoder {self.decoder_s:.1f} s "
            f"({100 * share:.0f} % decoder)"
        )


class StageTimer:
    """Wall time spent in a ``Segmenter``'s encoder and in its decoder (neck + head + upsampling), measured by
    forward hooks while the model runs, so evaluation pays no extra forward pass. On CUDA each boundary
    synchronises the device (kernels are asynchronous; without it the split would be meaningless)."""

    def __init__(self, model: Segmenter) -> None:
        self.encoder_s = self.decoder_s = 0.0
        cuda = any(p.is_cuda for p in model.parameters())
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)
        self._t0 = self._t1 = 0.0
        self._handles = [
            model.register_forward_pre_hook(self._start),
            model.neck.register_forward_pre_hook(self._split),  # the encoder's features are done
            model.register_forward_hook(self._stop),
        ]

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    def _start(self, *_: Any) -> None:
        self._t0 = self._now()

    def _split(self, *_: Any) -> None:
        self._t1 = self._now()
        self.encoder_s += self._t1 - self._t0

    def _stop(self, *_: Any) -> None:
        self.decoder_s += self._now() - self._t1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass(frozen=True)
class EvalOutputs:
    metrics: SegMetrics
    json_path: Path
    markdown_path: Path
    confusion_path: Path
    cost: EvalCost | None = None

    def summary(self) -> str:
        """The console summary: the metrics table, what the evaluation cost, and the files written."""
        lines = [self.metrics.markdown_table()]
        if self.cost is not None:
            lines.append(f"\nevaluated {self.cost.summary()}")
            share = self.cost.decoder_share
            if share is not None and share > 0.5:
                lines.append(
                    "the decoder costs more than the encoder: cdkd finetune --decoder-channels 128 (or "
                    "256) trains a narrower one"
                )
        lines.append(f"wrote {self.json_path}, {self.markdown_path}, {self.confusion_path}")
        return "\n".join(lines)


def check_schema_matches(model_schema: ClassSchema, data_schema: ClassSchema, source: str) -> None:
    """The data's classes must be the model's: same ids in the same order (names may differ only in case)."""
    a = [n.lower() for n in model_schema.names]
    b = [n.lower() for n in data_schema.names]
    if a != b or model_schema.ignore_index != data_schema.ignore_index:
        raise DataError(
            f"{source}: the data's classes {b} (ignore {data_schema.ignore_index}) do not match the "
            f"model's {a} (ignore {model_schema.ignore_index}); evaluate with the class file the model "
            "was trained with"
        )


def predict_image(
    predict: Predict,
    meta: InferenceMeta,
    pixels: np.ndarray,
    batch_size: int = 4,
    overlap: int | None = None,
    edge_context: int | None = None,
) -> np.ndarray:
    """Class ids (H, W) for one raw image (C, H, W): normalised with the model's statistics, sliding windows
    with the scene engine's edge margin (``edge_context``, see ``tiler.edge_margin``).

    ``predict``: (B, C, T, T) normalised tiles -> (B, K, T, T) logits, e.g. ``runtime_predict(open_runtime(...))``.
    """
    image = torch.from_numpy(meta.norm.normalize(pixels))
    # Constant 0 padding (the dataset mean after normalisation) is what training used for small images.
    logits = sliding_window_logits(
        predict,
        image,
        meta.tile_size,
        meta.overlap if overlap is None else overlap,
        meta.num_classes,
        batch_size=batch_size,
        pad_mode="constant",
        edge_context=edge_context,
    )
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
    runtime: str | None = None,
    amp: str = "none",
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EvalOutputs:
    """mIoU, OA, mF1, per-class IoU/F1 and the confusion matrix of a model on the pairs in ``data``.

    ``segmenter``: ``segmenter.pt``, an exported ``model.onnx`` or a TensorRT engine; ``runtime`` (torch, onnx,
    tensorrt) defaults to the one its suffix names. ``amp`` applies to PyTorch on CUDA (default none: the
    metrics of the float32 model). ``threads``: ONNX Runtime CPU threads.
    """
    out = Path(out_dir)
    outputs = [out / "metrics.json", out / "metrics.md", out / "confusion.png"]
    if not overwrite and any(p.exists() for p in outputs):
        raise OutputExistsError(f"{out}: already holds evaluation results; pass --overwrite to replace them")
    check_writable(out, f"{out}: cannot write the evaluation")
    rt = open_runtime(segmenter, runtime, device=device, amp=amp, threads=threads)
    meta = rt.meta
    if meta.task == "instance":
        raise CdkdValueError(f"{segmenter}: is an instance model; evaluate it with --task instance (COCO AP)")
    if overlap is not None and not 0 <= overlap < meta.tile_size:
        raise CdkdValueError(f"overlap {overlap} must be >= 0 and smaller than the tile size {meta.tile_size}")
    schema = schema_for(fmt, classes)
    check_schema_matches(meta.classes, schema, str(classes or fmt))
    pairs = find_pairs(data, fmt, split)
    check_labels(pairs, schema, fmt)
    acc = MetricAccumulator(schema.num_classes, schema.ignore_index, class_names=schema.names)
    iterator: Iterable[LabeledPair] = pairs
    if progress:
        iterator = track(pairs, desc="evaluate", unit="image")
    model = getattr(rt, "model", None)
    timer = StageTimer(model) if model is not None and hasattr(model, "neck") else None
    predict, pixels_seen, t0 = runtime_predict(rt), 0, time.perf_counter()
    try:
        for pair in iterator:
            pixels, label = read_pair(pair, schema, meta.norm.bands)
            acc.update(predict_image(predict, meta, pixels, batch_size, overlap), label)
            pixels_seen += label.size
    finally:
        if timer is not None:
            timer.remove()
    cost = EvalCost(
        rt.name,
        rt.device,
        time.perf_counter() - t0,
        pixels_seen / 1e6,
        timer.encoder_s if timer else None,
        timer.decoder_s if timer else None,
    )
    metrics = acc.compute()
    out.mkdir(parents=True, exist_ok=True)
    report = dict(
        metrics.to_dict(),
        segmenter=str(segmenter),
        data=str(data),
        format=fmt,
        images=len(pairs),
        tile_size=meta.tile_size,
        overlap=meta.overlap if overlap is None else overlap,
        edge_context=edge_margin(meta.tile_size),  # predict_image's default (tiler.edge_margin)
        cost=cost.to_dict(),
    )
    atomic_write_text(outputs[0], json.dumps(report, indent=2))
    atomic_write_text(outputs[1], metrics.markdown_table() + "\n")
    with atomic_path(outputs[2]) as tmp:
        metrics.plot_confusion(tmp)
    return EvalOutputs(metrics, outputs[0], outputs[1], outputs[2], cost=cost)
