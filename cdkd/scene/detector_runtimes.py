"""Runtimes for instance models (``detector.pt`` in PyTorch, an exported detector ``.onnx`` in ONNX Runtime).

They follow ``cdkd.scene.runtimes``: the same attributes (``name``, ``path``, ``meta``, ``device``, ``options``,
``max_batch``, ``fixed_tile``) and the same input, (B, C, T, T) float32 tiles already normalised with
``meta.norm``. Instead of logits, ``detect`` returns one ``Detections`` per tile: boxes, scores, 0-based class
ids and binary masks (Mask R-CNN's mask probabilities thresholded at 0.5, its own rule), on the host.
``cdkd.scene.runtimes.open_runtime`` returns one of these when the model file holds an instance model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdkd.errors import CdkdValueError, CheckpointError
from cdkd.scene.runtimes import AMP_MODES, _check_batch, read_onnx_meta

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
        as_np = (lambda a: a.detach().float().cpu().numpy() if hasattr(a, "detach") else np.asarray(a))
        masks = np.asarray(as_np(masks) >= MASK_THRESHOLD)
        return cls(np.asarray(as_np(boxes), np.float32).reshape(-1, 4), np.asarray(as_np(scores), np.float32),
                   np.asarray(as_np(labels)).astype(np.int64) - 1, masks.reshape(len(masks), *masks.shape[-2:]))


class TorchDetectorRuntime:
    """A ``detector.pt`` on the CPU or a CUDA GPU; fp16/bf16 autocast on CUDA (``amp="auto"`` = bf16)."""

    name = "torch"
    max_batch = None
    fixed_tile = False

    def __init__(self, path: str | Path, device: str = "auto", amp: str = "auto") -> None:
        import torch

        from cdkd.artifacts import load_detector
        from cdkd.utils.distributed import DistContext, resolve_device

        if amp not in AMP_MODES:
            raise CdkdValueError(f"unknown amp mode {amp!r}; choose one of {', '.join(AMP_MODES)}")
        self._device = resolve_device(device, DistContext())
        model, info = load_detector(path, map_location=self._device)
        self.model, self.meta = model.eval(), info.inference_meta()
        self.path = str(path)
        self.device = self.blend_device = str(self._device)
        self._dtype = None
        if self._device.type == "cuda" and amp != "none":
            self._dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        self.options = {"amp": str(self._dtype).replace("torch.", "") if self._dtype else "none",
                        "threads": torch.get_num_threads() if self._device.type == "cpu" else None}

    def detect(self, batch: np.ndarray) -> list[Detections]:
        import torch

        x = torch.from_numpy(_check_batch(batch, self.meta, fixed_tile=False)).to(self._device)
        with torch.inference_mode(), torch.autocast(self._device.type, dtype=self._dtype,
                                                    enabled=self._dtype is not None):
            out = self.model(x)
        return [Detections.from_outputs(o["boxes"], o["labels"], o["scores"], o["masks"]) for o in out]


class OnnxDetectorRuntime:
    """An exported detector (``cdkd.export.detector_onnx``) in ONNX Runtime: one tile per run (the graph's
    batch is 1), outputs ``boxes``, ``labels``, ``scores``, ``masks``."""

    name = "onnx"
    fixed_tile = True
    max_batch = 1

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CdkdValueError("the onnx runtime needs the onnxruntime package (pip install onnxruntime)") from None
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: ONNX model not found (cdkd export --format onnx writes one)")
        self.meta = read_onnx_meta(path)
        available = ort.get_available_providers()
        if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
            raise CdkdValueError(f"device {device!r} requested but onnxruntime has no CUDA provider here "
                                 "(install onnxruntime-gpu); use --device cpu")
        want_cuda = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the paste Loop's outputs grow per detection; ORT warns at each run
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.path = str(path)
        self.device = self.blend_device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.options = {"provider": self.session.get_providers()[0], "threads": threads}
        self._input = self.session.get_inputs()[0].name
        self._outputs = [o.name for o in self.session.get_outputs()]

    def detect(self, batch: np.ndarray) -> list[Detections]:
        batch = _check_batch(batch, self.meta)
        out = []
        for tile in batch:
            res = dict(zip(self._outputs, self.session.run(None, {self._input: tile[None]})))
            out.append(Detections.from_outputs(res["boxes"], res["labels"], res["scores"], res["masks"]))
        return out


def open_detector(path: str | Path, kind: str, device: str = "auto", amp: str = "auto",
                  threads: int | None = None) -> TorchDetectorRuntime | OnnxDetectorRuntime:
    """The detector runtime ``kind`` (torch, onnx) for ``path``; TensorRT is not offered for detectors."""
    if kind == "torch":
        return TorchDetectorRuntime(path, device=device, amp=amp)
    if kind == "onnx":
        return OnnxDetectorRuntime(path, device=device, threads=threads)
    raise CdkdValueError(f"{path}: instance models run in PyTorch (detector.pt) or ONNX Runtime (.onnx), not {kind}")


__all__ = ["Detections", "MASK_THRESHOLD", "OnnxDetectorRuntime", "TorchDetectorRuntime", "open_detector"]
