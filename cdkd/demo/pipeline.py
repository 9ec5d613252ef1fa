"""``cdkd demo``: every stage of cdkd on the CPU in a few minutes, with no downloads and no SAM weights.

It makes its own data in code (unlabeled tiles, labeled tiles, a georeferenced scene with a nodata collar; see
``landscape.py``), then runs the real library entry points, the same ones the commands call: ``distill`` (a
random-weight SAM-architecture teacher, so the features mean nothing: the point is the plumbing), ``finetune``,
``export_onnx`` (with the parity check), ``segment_scene`` on ONNX Runtime, and ``vectorize``. The scene's true
classes are known, so the demo also says how well the map agrees with them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import rasterio
from rasterio.transform import from_origin

from cdkd.data.classraster import NODATA
from cdkd.demo.landscape import demo_schema, make_landscape
from cdkd.errors import OutputExistsError
from cdkd.utils.atomic import atomic_write_text

CRS = "EPSG:32633"  # UTM 33N, 10 m pixels: a Sentinel-2-like scene
GSD = 10.0


@dataclass(frozen=True)
class DemoSettings:
    """Sizes that keep the demo at a few CPU minutes; larger values give a better (still synthetic) map."""

    tile: int = 64
    unlabeled_tiles: int = 32
    labeled_tiles: int = 24
    scene_height: int = 480
    scene_width: int = 640
    distill_steps: int = 40
    finetune_steps: int = 150
    seed: int = 0


@dataclass(frozen=True)
class DemoResult:
    out: Path
    outputs: dict[str, Path]
    agreement: float  # fraction of valid scene pixels whose predicted class is the true one
    seconds: float


def _write_tif(path: Path, image: np.ndarray, origin: tuple[float, float], nodata: float | None = None) -> None:
    profile = {
        "driver": "GTiff",
        "width": image.shape[-1],
        "height": image.shape[-2],
        "count": image.shape[0],
        "dtype": image.dtype.name,
        "crs": CRS,
        "transform": from_origin(*origin, GSD, GSD),
        "nodata": nodata,
        "tiled": True,
        "compress": "deflate",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image)


def make_demo_data(root: Path, s: DemoSettings) -> dict[str, Path]:
    """Unlabeled tiles, a labeled folder (images/, masks/, classes.yaml) and the scene, each from its own landscape."""
    unlabeled, labeled, scene = root / "unlabeled", root / "labeled", root / "scene.tif"
    image, _ = make_landscape(4 * s.tile, s.unlabeled_tiles // 4 * s.tile, seed=s.seed + 1)
    for i in range(s.unlabeled_tiles):
        r, c = divmod(i, s.unlabeled_tiles // 4)
        crop = image[:, r * s.tile : (r + 1) * s.tile, c * s.tile : (c + 1) * s.tile]
        _write_tif(unlabeled / f"tile_{i:03d}.tif", crop, (400_000 + c * s.tile * GSD, 5_000_000 - r * s.tile * GSD))
    image, classes = make_landscape(s.tile, s.labeled_tiles * s.tile, seed=s.seed + 2)
    for i in range(s.labeled_tiles):
        cols = slice(i * s.tile, (i + 1) * s.tile)
        _write_tif(labeled / "images" / f"t{i:03d}.tif", image[:, :, cols], (500_000 + i * s.tile * GSD, 5_000_000))
        _write_tif(labeled / "masks" / f"t{i:03d}.tif", classes[None, :, cols], (500_000 + i * s.tile * GSD, 5_000_000))
    demo_schema().save(labeled / "classes.yaml")
    image, classes = make_landscape(s.scene_height, s.scene_width, seed=s.seed + 3)
    collar = s.scene_width // 8  # a nodata collar, as along the edge of a satellite swath
    image[:, :, :collar] = 0
    _write_tif(scene, image, (600_000, 5_100_000), nodata=0)
    truth = classes.copy()
    truth[:, :collar] = NODATA
    _write_tif(root / "scene_truth.tif", truth[None], (600_000, 5_100_000), nodata=NODATA)
    return {"unlabeled": unlabeled, "labeled": labeled, "scene": scene, "truth": root / "scene_truth.tif"}


def run_demo(
    out: str | Path,
    settings: DemoSettings = DemoSettings(),
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run every stage into ``out`` and return where the outputs are."""
    from cdkd.config import (
        DataConfig,
        DistillConfig,
        FinetuneConfig,
        HeadConfig,
        LabeledDataConfig,
        ObjectiveConfig,
        StudentConfig,
        TeacherConfig,
        TrainConfig,
    )
    from cdkd.distill.trainer import distill
    from cdkd.export.onnx import export_onnx
    from cdkd.finetune.trainer import finetune
    from cdkd.inference.runtimes import open_runtime
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene
    from cdkd.vector.vectorize import vectorize

    out, s, start = Path(out), settings, time.perf_counter()
    log = _timed(log)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out}: already holds files; pass --overwrite to replace them")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    log(f"[1/6] making demo data in code (landscapes with {len(demo_schema().classes)} classes) ...")
    data = make_demo_data(out / "data", s)

    log("[2/6] distilling a ViT-S student from a random-weight SAM-architecture teacher (vit_t) ...")
    dcfg = DistillConfig(
        data=DataConfig(root=str(data["unlabeled"]), tile_size=s.tile, num_workers=0, stats_samples=16),
        teacher=TeacherConfig(variant="vit_t", random_init=True),
        student=StudentConfig(arch="vit_s"),
        objective=ObjectiveConfig(decoder_dim=128, decoder_depth=1, decoder_heads=4),
        train=TrainConfig(
            steps=s.distill_steps,
            batch_size=4,
            lr=2e-4,
            warmup_steps=5,
            checkpoint_every=1000,
            log_every=10,
            seed=s.seed,
            device="cpu",
        ),
    )
    student = distill(dcfg, out / "distill", progress=progress, log=log).student_path

    log("[3/6] fine-tuning a UPerNet decoder on the frozen student (labeled demo tiles) ...")
    fcfg = FinetuneConfig(
        student=str(student),
        data=LabeledDataConfig(
            root=str(data["labeled"]), format="folder", classes=str(data["labeled"] / "classes.yaml"), num_workers=0
        ),
        head=HeadConfig(channels=64),
        train=TrainConfig(
            steps=s.finetune_steps,
            batch_size=8,
            lr=1e-3,
            warmup_steps=0,
            lr_schedule="poly",
            checkpoint_every=1000,
            log_every=25,
            seed=s.seed,
            device="cpu",
        ),
    )
    segmenter = finetune(fcfg, out / "finetune", progress=progress, log=log).segmenter_path

    log("[4/6] exporting to ONNX and checking it against PyTorch on the labeled tiles ...")
    onnx_path = out / "model.onnx"
    exported = export_onnx(segmenter, onnx_path, dynamic_batch=True, check_data=data["labeled"] / "images")
    log(
        f"      argmax agreement {100 * exported.parity.agreement:.3f} %, max |delta logit| "
        f"{exported.parity.max_abs_diff:.2e}"
    )

    log("[5/6] segmenting the scene with ONNX Runtime ...")
    landcover = out / "landcover.tif"
    scene = segment_scene(
        data["scene"], open_runtime(onnx_path), landcover, SegmentOptions(batch_size=8, probs=True, progress=progress)
    )

    log("[6/6] vectorising the land-cover raster to GeoPackage ...")
    polygons = out / "landcover.gpkg"
    vector = vectorize(landcover, polygons, min_area="4px", progress=progress)

    agreement = _agreement(landcover, data["truth"])
    assert scene.confidence is not None  # probs=True writes the confidence raster
    outputs = {
        "scene": data["scene"],
        "student": student,
        "segmenter": segmenter,
        "onnx": onnx_path,
        "landcover": landcover,
        "confidence": Path(scene.confidence),
        "scene_report": landcover.with_suffix(".json"),
        "polygons": polygons,
        "polygons_report": vector.json_path,
    }
    result = DemoResult(out, outputs, agreement, time.perf_counter() - start)
    atomic_write_text(
        out / "demo.json",
        json.dumps(
            {"outputs": {k: str(v) for k, v in outputs.items()}, "agreement": agreement, "seconds": result.seconds},
            indent=2,
        ),
    )
    return result


def _timed(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` that appends the seconds since the previous stage line ("[i/n] ...") to each new stage line."""
    last = [time.perf_counter()]

    def timed(message: str) -> None:
        if message.startswith("["):
            now = time.perf_counter()
            if message[1] != "1":
                log(f"      ({now - last[0]:.0f} s)")
            last[0] = now
        log(message)

    return timed


def _agreement(pred_path: Path, truth_path: Path) -> float:
    with rasterio.open(pred_path) as p, rasterio.open(truth_path) as t:
        pred, truth = p.read(1), t.read(1)
    valid = truth != NODATA
    return float((pred[valid] == truth[valid]).mean())


EXPLAIN = {
    "scene": "the input: a synthetic 10 m GeoTIFF (EPSG:32633) with a nodata collar on its left edge",
    "student": "the distilled ViT-S student (Mask-CDKD; random teacher here, so it learned little)",
    "segmenter": "student + UPerNet decoder, with classes, normalisation and tiling (cdkd finetune)",
    "onnx": "the exported model with its metadata, parity-checked against PyTorch (cdkd export)",
    "landcover": "class raster: Cloud-Optimized GeoTIFF with colour table and class names (cdkd segment)",
    "confidence": "per-pixel confidence of the predicted class, 1..255 (cdkd segment --probs)",
    "scene_report": "tiles, valid area, speed and area per class (JSON)",
    "polygons": "land-cover polygons with class, area and perimeter; opens in QGIS (cdkd vectorize)",
    "polygons_report": "polygons and area per class (JSON)",
}
