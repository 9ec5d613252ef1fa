"""ONNX export of a ``detector.pt`` (instance segmentation), checked against PyTorch before it is kept.

The graph maps ``image`` (1, C, T, T) float32, normalised with the model's statistics, to Mask R-CNN's outputs for
that tile: ``boxes`` (N, 4) x0, y0, x1, y1 px, ``labels`` (N,) int64 1..K, ``scores`` (N,) and ``masks``
(N, 1, T, T) float probabilities pasted into the tile; N varies per tile. The ``InferenceMeta`` JSON (task
"instance") is embedded as for segmenters, so ``cdkd segment --engine det.onnx`` and ``cdkd evaluate --task
instance det.onnx`` need nothing else (``cdkd.inference.detector_runtimes.OnnxDetectorRuntime``).

What exports and what does not, plainly:

- Exported with torch's TorchScript exporter (``dynamo=False``), the path torchvision tests its detection models
  with: the student, the simple feature pyramid, torchvision's anchors, RPN (with its NonMaxSuppression), RoIAlign,
  box and mask heads and the mask pasting (an ONNX ``Loop`` over detections) all export at opset 17 and run in ONNX
  Runtime with the same detections as PyTorch (``parity`` below).
- **Batch 1 only, fixed tile size.** torchvision's detection graph handles one image per run (its post-processing
  is per image); ONNX Runtime runs the tiles of a batch one after another. ``--dynamic-batch`` and ``--batch-size``
  above 1 are refused.
- **No TensorRT engine.** The graph's data-dependent parts (a variable number of proposals and detections,
  NonMaxSuppression, RoiAlign, the paste ``Loop``) are not what TensorRT's ONNX parser builds engines from without
  plugins; ``cdkd export --format tensorrt`` refuses a detector. Run the ONNX model in ONNX Runtime (CUDA provider
  on a GPU) or the ``detector.pt`` in PyTorch.
- torch's dynamo exporter (what segmenters use) is not used here: torchvision's detection models are not
  written for ``torch.export`` (data-dependent shapes throughout the RPN and RoI heads).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdkd.errors import CdkdError, CdkdValueError
from cdkd.utils.atomic import atomic_path, atomic_write_text

OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
DEFAULT_OPSET = 17
MIN_OPSET = 17  # LayerNormalization, in every ViT block


class DetectorParityError(CdkdError):
    """The exported detector does not find what the PyTorch detector finds."""


@dataclass(frozen=True)
class DetectorParity:
    """ONNX Runtime against PyTorch on ``tiles`` tiles: detections found by each, the largest score and box
    differences of the detections in order, and ``agreement``: the fraction of pixels whose object class (the
    class of the best-scored mask covering it, or none) is the same in both."""

    reference: str
    candidate: str
    detections: tuple[int, int]
    max_score_diff: float
    max_box_diff: float
    agreement: float
    tiles: int
    source: str
    synthetic: bool
    min_agreement: float

    @property
    def passed(self) -> bool:
        return self.detections[0] == self.detections[1] and self.agreement >= self.min_agreement

    def summary(self) -> str:
        kind = "synthetic" if self.synthetic else "real"
        return (
            f"{self.candidate} vs {self.reference}: {self.detections[1]} vs {self.detections[0]} detections, "
            f"mask agreement {100 * self.agreement:.3f}% on {self.tiles} {kind} tiles, max |delta score| "
            f"{self.max_score_diff:.2g}, max |delta box| {self.max_box_diff:.2g} px"
        )


@dataclass(frozen=True)
class DetectorExportReport:
    """What ``export_detector_onnx`` wrote (also saved as ``<stem>.export.json``)."""

    onnx: str
    report: str
    detector: str
    opset: int
    batch: int
    size_bytes: int
    exporter: str
    versions: dict[str, str]
    meta: dict[str, Any]
    parity: DetectorParity
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parity"]["passed"] = self.parity.passed
        return d


def _class_map(det: Any, size: int) -> np.ndarray:
    """(T, T) int: 1 + class of the best-scored mask covering each pixel, 0 where none does."""
    out = np.zeros((size, size), dtype=np.int64)
    for k in np.argsort(-det.scores, kind="stable")[::-1]:  # best last: it wins
        out[det.masks[k]] = det.labels[k] + 1
    return out


def compare_detectors(
    reference: Any, candidate: Any, tiles: np.ndarray, source: str = "synthetic", min_agreement: float = 0.999
) -> DetectorParity:
    """Run (N, C, T, T) normalised ``tiles`` through two detector runtimes, one at a time."""
    counts = [0, 0]
    score_diff = box_diff = 0.0
    same = total = 0
    for tile in tiles:
        (a,), (b,) = reference.detect(tile[None]), candidate.detect(tile[None])
        counts[0] += len(a)
        counts[1] += len(b)
        n = min(len(a), len(b))
        if n:
            score_diff = max(score_diff, float(np.abs(a.scores[:n] - b.scores[:n]).max()))
            box_diff = max(box_diff, float(np.abs(a.boxes[:n] - b.boxes[:n]).max()))
        size = tile.shape[-1]
        same += int((_class_map(a, size) == _class_map(b, size)).sum())
        total += size * size
    return DetectorParity(
        reference.name,
        candidate.name,
        (counts[0], counts[1]),
        score_diff,
        box_diff,
        same / max(total, 1),
        len(tiles),
        source,
        source == "synthetic",
        min_agreement,
    )


def export_detector_onnx(
    detector: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    check_data: str | Path | None = None,
    check_tiles: int = 4,
    min_agreement: float = 0.999,
    overwrite: bool = False,
) -> DetectorExportReport:
    """Export ``detector`` (a ``detector.pt``) to the ONNX model ``out`` (batch 1) and check it against PyTorch
    on ``check_tiles`` tiles of ``check_data`` (a folder of images) or synthetic ones; written only if they agree.

    Raises OutputExistsError (``out`` exists, no ``overwrite``), CdkdValueError (a dynamic or larger batch, bad
    opset), DetectorParityError (ONNX Runtime finds other objects; nothing is written).
    """
    import onnx
    import onnxruntime
    import torch

    from cdkd.artifacts import load_detector
    from cdkd.export.onnx import (
        embed_meta,
        fixed_position_embedding,
        refuse_existing,
        report_path,
    )
    from cdkd.export.tiles import real_tiles, synthetic_tiles
    from cdkd.inference.detector_runtimes import OnnxDetectorRuntime, TorchDetectorRuntime

    start = time.perf_counter()
    detector, out = Path(detector), Path(out)
    if out.suffix.lower() != ".onnx":
        raise CdkdValueError(f"{out}: an ONNX model's name must end in .onnx (the runtime is chosen by suffix)")
    if dynamic_batch or batch_size != 1:
        raise CdkdValueError(
            "a detector exports with batch 1 only (torchvision's detection graph runs one image "
            "per call); drop --dynamic-batch / --batch-size"
        )
    highest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise CdkdValueError(f"opset must be an integer from {MIN_OPSET} to {highest}, got {opset!r}")
    report = report_path(out)
    refuse_existing([out, report], overwrite)
    model, info = load_detector(detector)
    meta = info.inference_meta()
    if check_data is None:
        tiles, source = synthetic_tiles(meta, check_tiles, 0), "synthetic"
    else:
        tiles, source = real_tiles(check_data, meta, check_tiles, 0)[0], str(check_data)
    wrapper = _OneTile(model).eval()
    example = torch.zeros(1, meta.in_chans, meta.tile_size, meta.tile_size)
    with atomic_path(out) as tmp:
        with fixed_position_embedding(model.encoder, meta.tile_size // model.patch_size), _quiet_tracing():
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        embed_meta(proto, meta)
        proto.doc_string = (
            f"cdkd detector: image (1, {meta.in_chans}, {meta.tile_size}, {meta.tile_size}) float32 "
            "normalised -> boxes, labels (1..K), scores, masks (N, 1, T, T)"
        )
        onnx.save(proto, str(tmp))
        parity = compare_detectors(
            TorchDetectorRuntime(detector, device="cpu", amp="none"),
            OnnxDetectorRuntime(tmp, device="cpu"),
            tiles,
            source,
            min_agreement,
        )
        if not parity.passed:
            raise DetectorParityError(
                f"{out}: ONNX Runtime disagrees with PyTorch ({parity.summary()}); the model was not written"
            )
    result = DetectorExportReport(
        onnx=str(out),
        report=str(report),
        detector=str(detector),
        opset=opset,
        batch=1,
        size_bytes=out.stat().st_size,
        exporter="torch.onnx.export(dynamo=False)",
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        meta=meta.to_dict(),
        parity=parity,
        seconds=round(time.perf_counter() - start, 3),
    )
    atomic_write_text(report, json.dumps(result.to_dict(), indent=2))
    return result


class _OneTile:
    """(1, C, T, T) -> Mask R-CNN's four outputs for that tile, as a module (built lazily: torch imported late)."""

    def __new__(cls, detector: Any) -> Any:
        import torch

        class OneTile(torch.nn.Module):
            def __init__(self, det: Any) -> None:
                super().__init__()
                self.det = det

            def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
                found = self.det.mask_rcnn([image[0]])[0]
                return tuple(found[k] for k in OUTPUT_NAMES)

        return OneTile(detector)


def _quiet_tracing() -> Any:
    """The TorchScript exporter warns about every Python value it traces as a constant; they are expected here
    (tile size, batch 1) and would bury the report."""
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


__all__ = ["DetectorExportReport", "DetectorParity", "DetectorParityError", "compare_detectors", "export_detector_onnx"]
