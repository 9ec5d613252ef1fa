"""Segmentation metrics from a confusion matrix: IoU, F1, precision, recall, overall accuracy.

Everything derives from one (K, K) matrix of pixel counts (rows = ground truth, columns = prediction), so
metrics over a whole test set are exact, not averages of per-batch scores, and ranks can sum their matrices.

Undefined ratios are NaN, never 0: a class absent from both the ground truth and the prediction has no IoU/F1
and is left out of the means (mIoU, mF1, mAcc), as in mmsegmentation. A class that is only predicted has IoU 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from cdkd.errors import CdkdValueError

__all__ = ["MetricAccumulator", "SegMetrics", "confusion_matrix"]

NORMALIZE = ("true", "pred", "all", None)
ANNOTATE_MAX_CLASSES = 12


def _as_numpy(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Class-index array of any shape; tensors are moved to the CPU. Floats are refused (logits by mistake)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise CdkdValueError(
            f"{name} must hold integer class indices, got dtype {x.dtype}; take logits.argmax(dim=1) first"
        )
    return x


def confusion_matrix(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int | None = 255,
) -> np.ndarray:
    """Pixel confusion matrix (K, K) int64: entry [t, p] counts pixels of true class t predicted as p.

    Args:
        pred: predicted class indices, any shape, integer dtype (numpy or torch, any device).
        target: ground-truth class indices, the same shape as ``pred``.
        num_classes: K.
        ignore_index: target value of pixels to skip (their prediction is not looked at); None = skip nothing.

    Raises:
        CdkdValueError: shapes differ, a non-integer dtype, or a value outside [0, K) in ``target`` (other than
            ``ignore_index``) or in ``pred`` at a pixel that counts.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise CdkdValueError(f"num_classes must be a positive int, got {num_classes!r}")
    k = int(num_classes)
    p, t = _as_numpy(pred, "pred"), _as_numpy(target, "target")
    if p.shape != t.shape:
        raise CdkdValueError(f"pred shape {p.shape} and target shape {t.shape} differ")
    # int64 before K * t: uint8 labels would overflow.
    p, t = p.reshape(-1).astype(np.int64, copy=False), t.reshape(-1).astype(np.int64, copy=False)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    if t.size == 0:
        return np.zeros((k, k), dtype=np.int64)
    for name, v in (("target", t), ("pred", p)):
        lo, hi = int(v.min()), int(v.max())
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            extra = f" (ignore_index is {ignore_index})" if name == "target" else ""
            raise CdkdValueError(f"{name} holds class {bad}, outside [0, {k}) for num_classes={k}{extra}")
    return np.bincount(k * t + p, minlength=k * k).reshape(k, k).astype(np.int64, copy=False)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise as float64, NaN where den == 0 (undefined), without numpy warnings."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    """Mean over the defined (non-NaN) entries; NaN when none is defined (no RuntimeWarning)."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100.0 * v:.2f}"


@dataclass
class SegMetrics:
    """Metrics of one confusion matrix (K, K) (rows = ground truth, columns = prediction).

    Per class (K,) float64: ``iou`` = TP / (TP + FP + FN) and ``f1`` = 2 TP / (2 TP + FP + FN), NaN for a class
    absent from both ground truth and prediction; ``precision`` = TP / (TP + FP), NaN if never predicted;
    ``recall`` = TP / (TP + FN), NaN if absent from the ground truth. ``support`` (K,) int64 = ground-truth
    pixels per class. Scalars: ``oa`` = trace / total, ``miou``/``mf1``/``macc`` = NaN-skipping means of
    ``iou``/``f1``/``recall``.
    """

    confusion: np.ndarray
    class_names: list[str] | None = None
    iou: np.ndarray = field(init=False)
    f1: np.ndarray = field(init=False)
    precision: np.ndarray = field(init=False)
    recall: np.ndarray = field(init=False)
    support: np.ndarray = field(init=False)
    oa: float = field(init=False)
    miou: float = field(init=False)
    mf1: float = field(init=False)
    macc: float = field(init=False)

    def __post_init__(self) -> None:
        cm = np.asarray(self.confusion)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 1:
            raise CdkdValueError(f"confusion matrix must be square (K, K), got shape {cm.shape}")
        if not np.issubdtype(cm.dtype, np.integer):
            if not np.all(np.isfinite(cm)) or np.any(cm != np.round(cm)):
                raise CdkdValueError("confusion matrix must hold whole pixel counts")
        if np.any(cm < 0):
            raise CdkdValueError("confusion matrix holds negative counts")
        cm = cm.astype(np.int64)
        k = cm.shape[0]
        names = [str(i) for i in range(k)] if self.class_names is None else [str(n) for n in self.class_names]
        if len(names) != k:
            raise CdkdValueError(f"{len(names)} class names for a {k}-class confusion matrix")
        self.confusion, self.class_names = cm, names

        tp = np.diag(cm).astype(np.float64)
        gt = cm.sum(axis=1)  # pixels truly of each class
        pr = cm.sum(axis=0)  # pixels predicted as each class
        self.support = gt.astype(np.int64)
        # TP + FP + FN = gt + pr - tp; it is 0 exactly when the class is absent from both.
        self.iou = _ratio(tp, gt + pr - tp)
        self.f1 = _ratio(2.0 * tp, gt + pr)
        self.precision = _ratio(tp, pr)
        self.recall = _ratio(tp, gt)
        self.oa = float(_ratio(tp.sum(), cm.sum()))
        self.miou = _nanmean(self.iou)
        self.mf1 = _nanmean(self.f1)
        self.macc = _nanmean(self.recall)

    @classmethod
    def from_confusion(
        cls, cm: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str] | None = None
    ) -> SegMetrics:
        """Metrics of the (K, K) matrix ``cm``; ``class_names`` (K names) default to "0", "1", ..."""
        return cls(np.asarray(cm), None if class_names is None else list(class_names))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegMetrics:
        """Rebuild from ``to_dict()`` output (only the confusion matrix and class names are needed)."""
        return cls.from_confusion(np.asarray(d["confusion"], dtype=np.int64), d.get("class_names"))

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: Python floats/ints, NaN as None, per-class lists in ``class_names`` order."""

        def per_class(a: np.ndarray) -> list[float | None]:
            return [_json_float(float(v)) for v in a]

        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names or []),
            "oa": _json_float(self.oa),
            "miou": _json_float(self.miou),
            "mf1": _json_float(self.mf1),
            "macc": _json_float(self.macc),
            "iou": per_class(self.iou),
            "f1": per_class(self.f1),
            "precision": per_class(self.precision),
            "recall": per_class(self.recall),
            "support": [int(v) for v in self.support],
            "confusion": self.confusion.tolist(),
        }

    def markdown_table(self) -> str:
        """Per-class IoU / F1 (percent, 2 decimals) and support, a mean row, then OA; "n/a" where undefined."""
        lines = ["| class | IoU (%) | F1 (%) | support (px) |", "|:--|--:|--:|--:|"]
        for name, iou, f1, n in zip(self.class_names or [], self.iou, self.f1, self.support):
            label = name.replace("|", "\\|")  # a pipe would split the cell
            lines.append(f"| {label} | {_pct(iou)} | {_pct(f1)} | {int(n)} |")
        lines.append(f"| **mean** | **{_pct(self.miou)}** | **{_pct(self.mf1)}** | {int(self.support.sum())} |")
        lines.append("")
        lines.append(f"mIoU {_pct(self.miou)} %, mF1 {_pct(self.mf1)} %, OA {_pct(self.oa)} %")
        return "\n".join(lines) + "\n"

    def plot_confusion(self, path: str | Path, normalize: str | None = "true", title: str | None = None) -> Path:
        """Write the confusion matrix as a PNG heat map; returns ``path``.

        ``normalize``: "true" divides each row by its ground-truth total (rows show recall), "pred" each column
        by its prediction total, "all" by the grand total, None keeps counts. Empty rows/columns show 0. Values
        are written in the cells when K <= 12.
        """
        if normalize not in NORMALIZE:
            raise CdkdValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        # Figure + Agg canvas directly: no pyplot, so the caller's global backend and figure list stay untouched.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        cm = self.confusion.astype(np.float64)
        if normalize == "true":
            values = np.nan_to_num(_ratio(cm, cm.sum(axis=1, keepdims=True)))
        elif normalize == "pred":
            values = np.nan_to_num(_ratio(cm, cm.sum(axis=0, keepdims=True)))
        elif normalize == "all":
            values = np.nan_to_num(_ratio(cm, np.full_like(cm, cm.sum())))
        else:
            values = cm
        k = self.num_classes
        names = self.class_names or []
        side = min(max(4.0, 0.6 * k + 2.0), 24.0)
        fig = Figure(figsize=(side + 1.0, side))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        vmax = 1.0 if normalize else max(float(values.max()), 1.0)
        im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticklabels(names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title(title or f"confusion ({'counts' if normalize is None else f'normalised: {normalize}'})")
        if k <= ANNOTATE_MAX_CLASSES:
            for i in range(k):
                for j in range(k):
                    v = values[i, j]
                    text = f"{v:.2f}" if normalize else f"{int(v)}"
                    # white text on the dark half of the colour map stays readable
                    ax.text(
                        j, i, text, ha="center", va="center", fontsize=8, color="white" if v > 0.5 * vmax else "black"
                    )
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=120)
        return path


class MetricAccumulator:
    """Running confusion matrix over batches: ``update(pred, target)`` per batch, ``compute()`` at the end."""

    def __init__(
        self, num_classes: int, ignore_index: int | None = 255, class_names: Sequence[str] | None = None
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise CdkdValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise CdkdValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = None if class_names is None else list(class_names)
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add a batch of class-index maps (same shape, any shape) to the running matrix."""
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def reset(self) -> None:
        self.confusion[...] = 0

    def all_reduce(self) -> None:
        """Sum the matrices of all ranks in place (every rank then holds the total); no-op without a process group.

        Counts travel as int64 on the device the backend needs (CUDA for NCCL), so the sum is exact.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        counts = torch.from_numpy(self.confusion).to(device)
        dist.all_reduce(counts)
        self.confusion = counts.cpu().numpy().astype(np.int64)

    def compute(self) -> SegMetrics:
        """Metrics of everything seen since construction or ``reset()``."""
        return SegMetrics.from_confusion(self.confusion.copy(), self.class_names)
