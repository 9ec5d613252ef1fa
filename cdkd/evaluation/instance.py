"""Evaluation of an instance model: COCO AP for boxes and masks with ``pycocotools``, overall and per class.

``evaluate_instances`` is what ``cdkd evaluate --task instance`` calls. Every image is covered by the scene
engine's overlapping windows and the pieces of objects cut by window borders are joined the way scenes join them
(``cdkd.scene.instances.detect_image``), so an image scores what its segmentation as a scene would give. Then
``pycocotools``' ``COCOeval`` does the scoring, for ``bbox`` and ``segm``: AP (IoU .50:.95), AP50, AP75, AP for
small / medium / large objects, and AP / AP50 per class read from its precision array (``coco_metrics``).
Predictions keep every detection the model reports (its score threshold is 0.05), as COCO AP expects.

Outputs: ``metrics.json``, ``metrics.md`` (the table also printed), ``predictions.json`` (COCO results, with the
data's own category ids) and ``predictions.png`` (predictions drawn over a few images, ground truth dashed).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np

from cdkd.data.classes import ClassSchema
from cdkd.data.coco import INSTANCE_FORMATS, InstanceData, encode_mask, object_mask
from cdkd.data.files import read_window
from cdkd.errors import CdkdValueError, DataError, OutputExistsError
from cdkd.progress import track
from cdkd.scene.objects import SceneObject
from cdkd.utils.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    import shapely

IOU_TYPES = ("bbox", "segm")
SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
PREVIEW_IMAGES = 4
PREVIEW_MIN_SCORE = 0.3  # predictions drawn in the PNG (all of them count for AP)
MAX_DETECTIONS = 100  # COCOeval's largest maxDets: detections per image and category that count


def _quiet(fn, *args):
    """Run a pycocotools call without its prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def coco_metrics(
    gt: dict[str, Any], results: list[dict[str, Any]], iou_types: Sequence[str] = IOU_TYPES
) -> dict[str, Any]:
    """COCO AP of ``results`` (COCO result dicts) against the ground truth ``gt`` (a COCO instances dict).

    Returns ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class": {category id: {"AP", "AP50"}}}}``
    as fractions (COCOeval's -1, "no such object", becomes NaN). Per-class AP is COCOeval's own: the mean of
    its precision array over IoU thresholds and recall points for that category (area "all", 100 detections),
    the number ``COCOeval`` reports when run on that category alone. No result at all scores 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = gt
    _quiet(coco_gt.createIndex)
    cat_ids = sorted(c["id"] for c in gt["categories"])
    out: dict[str, Any] = {}
    for iou_type in iou_types:
        if not results:
            out[iou_type] = {**{k: 0.0 for k in SUMMARY}, "per_class": {c: {"AP": 0.0, "AP50": 0.0} for c in cat_ids}}
            continue
        coco_dt = _quiet(coco_gt.loadRes, [dict(r) for r in results])  # loadRes adds keys: keep the caller's clean
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        _quiet(ev.evaluate)
        _quiet(ev.accumulate)
        _quiet(ev.summarize)
        summary = {k: _nan(v) for k, v in zip(SUMMARY, ev.stats[:6])}
        precision = ev.eval["precision"]  # (IoU thresholds, recall points, categories, areas, max dets)
        per_class = {}
        for k, cat in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p50 = precision[0, :, k, 0, -1]
            per_class[cat] = {
                "AP": float(p[p > -1].mean()) if (p > -1).any() else math.nan,
                "AP50": float(p50[p50 > -1].mean()) if (p50 > -1).any() else math.nan,
            }
        out[iou_type] = {**summary, "per_class": per_class}
    return out


def _nan(v: float) -> float:
    return math.nan if v < 0 else float(v)


def object_results(
    objects: Sequence[SceneObject],
    image_id: int,
    height: int,
    width: int,
    category_ids: Sequence[int],
    max_per_class: int = MAX_DETECTIONS,
) -> list[dict[str, Any]]:
    """COCO result dicts (box, compressed RLE mask, score, the data's category id) of one image's objects.

    Only the ``max_per_class`` best of each class are kept: COCOeval scores no more than that per image and
    category (its largest ``maxDets``), so the metrics are the same and no mask is encoded for nothing.
    """
    from cdkd.data.coco import InstanceObject

    ranked = sorted(objects, key=lambda o: -o.score)
    kept: dict[int, int] = {}
    out = []
    for obj in ranked:
        kept[obj.class_id] = kept.get(obj.class_id, 0) + 1
        if kept[obj.class_id] > max_per_class:
            continue
        mask = np.zeros((height, width), dtype=bool)
        if obj.polygon is not None:  # the detector's box counts even when its mask is empty (as in Mask R-CNN)
            x0, y0, x1, y1 = (round(v) for v in obj.polygon.bounds)
            mask[y0:y1, x0:x1] = object_mask(
                InstanceObject(obj.class_id, (x0, y0, x1 - x0, y1 - y0), obj.polygon),
                height,
                width,
                (y0, x0, y1 - y0, x1 - x0),
            )
        bx0, by0, bx1, by1 = obj.box if obj.box is not None else cast("shapely.Polygon", obj.polygon).bounds
        out.append(
            {
                "image_id": image_id,
                "category_id": int(category_ids[obj.class_id]),
                "bbox": [round(float(v), 2) for v in (bx0, by0, bx1 - bx0, by1 - by0)],
                "segmentation": encode_mask(mask),
                "score": round(float(obj.score), 5),
            }
        )
    return out


def match_footprints(
    predicted: Sequence[Any] | np.ndarray, scores: Sequence[float], truth: Sequence[Any] | np.ndarray, iou: float = 0.5
) -> dict[str, Any]:
    """Greedy one-to-one matching of predicted polygons (best score first) with labelled ones, in one CRS: a
    prediction matches the unmatched label it overlaps most if their IoU is at least ``iou`` (COCO's rule for
    one IoU threshold). Returns matched, precision, recall, F1 and the mean IoU of the matches."""
    import shapely

    predicted, truth = np.asarray(predicted, dtype=object), np.asarray(truth, dtype=object)
    tree = shapely.STRtree(truth)
    free = np.ones(len(truth), dtype=bool)
    ious = []
    for k in np.argsort(-np.asarray(scores, dtype=float), kind="stable"):
        p = predicted[k]
        best, best_iou = -1, iou
        for t in tree.query(p):
            if not free[t]:
                continue
            inter = shapely.intersection(p, truth[t]).area
            value = inter / max(shapely.union(p, truth[t]).area, 1e-12)
            if value >= best_iou:
                best, best_iou = int(t), value
        if best >= 0:
            free[best] = False
            ious.append(best_iou)
    matched = len(ious)
    precision = matched / len(predicted) if len(predicted) else 0.0
    recall = matched / len(truth) if len(truth) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "matched": matched,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_iou": float(np.mean(ious)) if ious else math.nan,
    }


def check_categories(model: ClassSchema, data: InstanceData) -> None:
    """The data's categories must be the model's classes, by name and in the same order (ids may differ)."""
    a = [n.lower() for n in model.names]
    b = [n.lower() for n in data.schema.names]
    if a != b:
        raise DataError(
            f"{data.source}: its categories {b} do not match the model's classes {a}; evaluate on data "
            "labelled with the model's classes"
        )


@dataclass(frozen=True)
class InstanceMetrics:
    """COCO AP (fractions) for boxes and masks, overall and per class, and what was evaluated."""

    metrics: dict[str, Any]  # coco_metrics' output, per-class keys turned into class names
    class_names: tuple[str, ...]
    images: int
    objects: int  # ground-truth objects
    detections: int

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.metrics,
            "classes": list(self.class_names),
            "images": self.images,
            "ground_truth_objects": self.objects,
            "detections": self.detections,
        }

    def markdown_table(self) -> str:
        """AP / AP50 (percent) for boxes and masks per class, then the overall COCO summary."""
        b, s = self.metrics["bbox"], self.metrics["segm"]
        lines = ["| class | box AP | box AP50 | mask AP | mask AP50 |", "|:--|--:|--:|--:|--:|"]
        for name in self.class_names:
            cb, cs = b["per_class"][name], s["per_class"][name]
            lines.append(
                f"| {name.replace('|', chr(92) + '|')} | {_pct(cb['AP'])} | {_pct(cb['AP50'])} | "
                f"{_pct(cs['AP'])} | {_pct(cs['AP50'])} |"
            )
        lines.append(
            f"| **all** | **{_pct(b['AP'])}** | **{_pct(b['AP50'])}** | **{_pct(s['AP'])}** | **{_pct(s['AP50'])}** |"
        )
        lines += ["", "| | AP | AP50 | AP75 | APs | APm | APl |", "|:--|--:|--:|--:|--:|--:|--:|"]
        for kind, m in (("box", b), ("mask", s)):
            lines.append(f"| {kind} | " + " | ".join(_pct(m[k]) for k in SUMMARY) + " |")
        return "\n".join(lines) + "\n"


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}"


@dataclass(frozen=True)
class InstanceEvalOutputs:
    metrics: InstanceMetrics
    json_path: Path
    markdown_path: Path
    predictions_path: Path
    preview_path: Path
    seconds: float
    runtime: str
    device: str

    def summary(self) -> str:
        """The console summary: the AP table, what was evaluated and the files written."""
        m = self.metrics
        return "\n".join(
            [
                m.markdown_table(),
                f"evaluated {m.images} images ({m.objects} labelled objects, {m.detections} detections) in "
                f"{self.seconds:.1f} s with {self.runtime} on {self.device}",
                f"wrote {self.json_path}, {self.markdown_path}, {self.predictions_path}, {self.preview_path}",
            ]
        )


def read_instance_data(
    data: str | Path,
    fmt: str,
    *,
    split: Sequence[str] | None = None,
    labels: str | Path | None = None,
    class_field: str | None = None,
    classes: str | Path | None = None,
) -> InstanceData:
    """Objects of ``--format coco`` (a COCO file or its folder) or ``geo`` (a scene + vector footprints)."""
    if fmt not in INSTANCE_FORMATS:
        raise CdkdValueError(f"format {fmt!r} is not an instance format; choose one of {', '.join(INSTANCE_FORMATS)}")
    if fmt == "coco":
        from cdkd.data.coco import read_coco

        return read_coco(data, split)
    from cdkd.data.vector_labels import read_geo

    schema = ClassSchema.load(classes) if classes else None
    return read_geo(data, labels, class_field=class_field, schema=schema, split=split)


def evaluate_instances(
    model: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    fmt: str = "coco",
    split: Sequence[str] | None = None,
    labels: str | Path | None = None,
    class_field: str | None = None,
    classes: str | Path | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    runtime: str | None = None,
    amp: str = "none",
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> InstanceEvalOutputs:
    """COCO AP (box and mask) of the instance model ``model`` (``detector.pt`` or its ``.onnx``) on ``data``."""
    from cdkd.inference.detector_runtimes import open_detector
    from cdkd.inference.runtimes import runtime_for
    from cdkd.scene.instances import detect_image

    out = Path(out_dir)
    paths = [out / "metrics.json", out / "metrics.md", out / "predictions.json", out / "predictions.png"]
    if not overwrite and any(p.exists() for p in paths):
        raise OutputExistsError(f"{out}: already holds evaluation results; pass --overwrite to replace them")
    rt: Any = open_detector(model, runtime_for(model, runtime), device=device, amp=amp, threads=threads)
    meta = rt.meta
    if meta.task != "instance":
        raise CdkdValueError(f"{model}: is a semantic segmenter; evaluate it without --task instance")
    overlap = meta.overlap if overlap is None else int(overlap)
    if not 0 < overlap < meta.tile_size:
        raise CdkdValueError(f"overlap {overlap} must be > 0 and smaller than the tile size {meta.tile_size}")
    dataset = read_instance_data(data, fmt, split=split, labels=labels, class_field=class_field, classes=classes)
    check_categories(meta.classes, dataset)
    iterator: Any = dataset.images
    if progress:
        iterator = track(dataset.images, desc="evaluate", unit="image")
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    drawn: list[tuple[Any, np.ndarray, list[SceneObject]]] = []
    for im in iterator:
        pixels, valid = read_window(im.path, meta.norm.bands, 0, 0, im.height, im.width)
        if pixels.dtype.name != meta.norm.dtype:
            raise DataError(
                f"{im.path}: pixels are {pixels.dtype.name} but the model's normalisation statistics are "
                f"for {meta.norm.dtype}"
            )
        objects = detect_image(
            rt.detect, meta.norm.normalize(pixels, valid), meta.tile_size, overlap, valid=valid, batch_size=batch_size
        )
        results += object_results(objects, im.id, im.height, im.width, dataset.category_ids)
        if len(drawn) < PREVIEW_IMAGES:
            drawn.append((im, pixels, objects))
    seconds = time.perf_counter() - t0
    gt = dataset.to_coco()
    raw = coco_metrics(gt, results)
    name_of = dict(zip(dataset.category_ids, meta.classes.names))
    named = {
        t: {
            **{k: v for k, v in m.items() if k != "per_class"},
            "per_class": {name_of[c]: v for c, v in m["per_class"].items()},
        }
        for t, m in raw.items()
    }
    metrics = InstanceMetrics(named, meta.classes.names, len(dataset.images), dataset.num_objects, len(results))
    out.mkdir(parents=True, exist_ok=True)
    report = dict(
        metrics.to_dict(),
        model=str(model),
        data=str(data),
        format=fmt,
        tile_size=meta.tile_size,
        overlap=overlap,
        cost={"runtime": rt.name, "device": rt.device, "seconds": round(seconds, 2)},
    )
    atomic_write_text(paths[0], json.dumps(report, indent=2))
    atomic_write_text(paths[1], metrics.markdown_table())
    atomic_write_text(paths[2], json.dumps(results))
    with atomic_path(paths[3]) as tmp:
        draw_predictions(tmp, drawn, meta.classes)
    return InstanceEvalOutputs(metrics, paths[0], paths[1], paths[2], paths[3], seconds, rt.name, rt.device)


def draw_predictions(
    path: Path,
    images: Sequence[tuple[Any, np.ndarray, list[SceneObject]]],
    schema: ClassSchema,
    min_score: float = PREVIEW_MIN_SCORE,
) -> Path:
    """A PNG of ``images`` (InstanceImage, raw pixels (C, H, W), objects) side by side: predictions scoring at
    least ``min_score`` in their class colours (mask outline, box dotted, class and score), ground truth dashed
    cyan."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Polygon as Patch
    from matplotlib.patches import Rectangle

    from cdkd.scene.preview import stretch

    n = max(len(images), 1)
    fig = Figure(figsize=(5 * n, 5.4), dpi=110)
    FigureCanvasAgg(fig)
    for k, (im, pixels, objects) in enumerate(images):
        ax = fig.add_subplot(1, n, k + 1)
        rgb = stretch(pixels[:3] if len(pixels) >= 3 else pixels[:1], np.ones(pixels.shape[1:], bool))
        ax.imshow(rgb if rgb.shape[-1] == 3 else rgb[..., 0], cmap=None if rgb.shape[-1] == 3 else "gray")
        for obj in im.objects:
            for ring in _rings(obj.segmentation, im):
                ax.add_patch(Patch(ring, closed=True, fill=False, edgecolor="cyan", linestyle="--", linewidth=1.0))
        shown = [o for o in objects if o.score >= min_score]
        for obj in shown:
            color = np.array(schema.classes[obj.class_id].color) / 255
            if obj.polygon is not None:
                ax.add_patch(
                    Patch(
                        np.asarray(obj.polygon.exterior.coords), closed=True, fill=False, edgecolor=color, linewidth=1.4
                    )
                )
            x0, y0, x1, y1 = obj.box if obj.box is not None else cast("shapely.Polygon", obj.polygon).bounds
            ax.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linestyle=":", linewidth=0.8)
            )
            ax.text(x0, y0 - 2, f"{schema.names[obj.class_id]} {obj.score:.2f}", color=color, fontsize=6)
        ax.set_title(
            f"{im.file_name}: {len(shown)} found (score >= {min_score}), {len(im.objects)} labelled", fontsize=8
        )
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _rings(segmentation: Any, im: Any) -> list[np.ndarray]:
    """Outlines of a ground-truth segmentation, for drawing: polygons as they are, other forms traced."""
    if isinstance(segmentation, list):
        return [np.asarray(p, dtype=float).reshape(-1, 2) for p in segmentation if len(p) >= 6]
    from cdkd.data.coco import InstanceObject
    from cdkd.scene.objects import mask_polygon

    poly = mask_polygon(object_mask(InstanceObject(0, (0, 0, 0, 0), segmentation), im.height, im.width), 0, 0, 1)
    return [np.asarray(poly.exterior.coords)] if poly is not None else []


__all__ = [
    "IOU_TYPES",
    "InstanceEvalOutputs",
    "InstanceMetrics",
    "check_categories",
    "coco_metrics",
    "draw_predictions",
    "evaluate_instances",
    "match_footprints",
    "object_results",
    "read_instance_data",
]
