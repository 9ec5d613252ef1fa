"""Runtimes for instance models (``detector.pt`` in PyTorch, an exported detector ``.onnx`` in ONNX Runtime).

They are ``cdkd.inference.runtimes``' runtimes with another output: the same attributes (``name``, ``path``,
``meta``, ``device``, ``options``, ``max_batch``, ``fixed_tile``) and the same input, (B, C, T, T) float32 tiles
already normalised with ``meta.norm``. Instead of logits, ``detect`` returns one ``Detections`` per tile: boxes,
scores, 0-based class ids and binary masks (Mask R-CNN's mask probabilities thresholded at 0.5, its own rule), on
the host. ``open_detector`` opens one; ``cdkd.tasks.task_of_model(path).open_runtime`` does so for an instance
model file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cdkd.errors import CdkdValueError
from cdkd.inference.runtimes import OnnxRuntime, TorchRuntime, check_batch

if TYPE_CHECKING:
    import torch

MASK_THRESHOLD = 0.5  # Mask R-CNN's: a pixel belongs to the object where its mask probability is >= 0.5


@dataclass(frozen=True)
class Detections:
    """The objects found in one tile: ``boxes`` (N, 4) float32 x0, y0, x1, y1 in tile px, ``scores`` (N,)
    float32, ``labels`` (N,) int64 class ids 0..K-1, ``masks`` (N, T, T) bool, best score first."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_outputs(cls, boxes: Any, labels: Any, scores: Any, masks: Any) -> Detections:
        """From Mask R-CNN's outputs (torch tensors or numpy arrays): labels 1..K, masks (N, 1, T, T) float."""

        def as_np(a: Any) -> np.ndarray:
            return a.detach().float().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)

        masks = np.asarray(as_np(masks) >= MASK_THRESHOLD)
        return cls(
            np.asarray(as_np(boxes), np.float32).reshape(-1, 4),
            np.asarray(as_np(scores), np.float32),
            np.asarray(as_np(labels)).astype(np.int64) - 1,
            masks.reshape(len(masks), *masks.shape[-2:]),
        )


class TorchDetectorRuntime(TorchRuntime):
    """A ``detector.pt`` on the CPU or a CUDA GPU (``TorchRuntime``'s device and autocast handling)."""

    graphable = False  # detections vary in number from tile to tile

    def _load(self, path: str | Path) -> tuple[Any, Any]:
        from cdkd.artifacts import load_detector

        model, info = load_detector(path, map_location=self._device)
        return model.eval(), info.inference_meta()

    def forward(self, batch: np.ndarray | torch.Tensor) -> Any:
        raise CdkdValueError(f"{self.path}: an instance model gives objects, not logits; call detect()")

    def detect(self, batch: np.ndarray) -> list[Detections]:
        import torch

        x = torch.from_numpy(check_batch(batch, self.meta, fixed_tile=False)).to(self._device)
        with (
            torch.inference_mode(),
            torch.autocast(self._device.type, dtype=self._dtype, enabled=self._dtype is not None),
        ):
            out = self.model(x)
        return [Detections.from_outputs(o["boxes"], o["labels"], o["scores"], o["masks"]) for o in out]


class OnnxDetectorRuntime(OnnxRuntime):
    """An exported detector (``cdkd.export.detector_onnx``) in ONNX Runtime (``OnnxRuntime``'s providers and
    threads): one tile per run (the graph's batch is 1), outputs ``boxes``, ``labels``, ``scores``, ``masks``."""

    task = "instance"
    log_severity = 3  # the paste Loop's outputs grow per detection, and ONNX Runtime warns about it at every run

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        super().__init__(path, device=device, threads=threads)
        self._outputs = [o.name for o in self.session.get_outputs()]

    def forward(self, batch: np.ndarray) -> Any:
        raise CdkdValueError(f"{self.path}: an instance model gives objects, not logits; call detect()")

    def detect(self, batch: np.ndarray) -> list[Detections]:
        batch = check_batch(batch, self.meta)
        out = []
        for tile in batch:
            res = dict(zip(self._outputs, self.session.run(None, {self._input: tile[None]})))
            out.append(Detections.from_outputs(res["boxes"], res["labels"], res["scores"], res["masks"]))
        return out


def open_detector(
    path: str | Path, kind: str, device: str = "auto", amp: str = "auto", threads: int | None = None
) -> TorchDetectorRuntime | OnnxDetectorRuntime:
    """The detector runtime ``kind`` (torch, onnx) for ``path``; TensorRT is not offered for detectors."""
    if kind == "torch":
        return TorchDetectorRuntime(path, device=device, amp=amp)
    if kind == "onnx":
        return OnnxDetectorRuntime(path, device=device, threads=threads)
    raise CdkdValueError(f"{path}: instance models run in PyTorch (detector.pt) or ONNX Runtime (.onnx), not {kind}")


__all__ = ["MASK_THRESHOLD", "Detections", "OnnxDetectorRuntime", "TorchDetectorRuntime", "open_detector"]
