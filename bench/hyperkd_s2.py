"""HyperKD end to end on the real Sentinel-2 patches: per-band files -> 12-band student -> decoder -> ONNX -> scene.

    python bench/hyperkd_s2.py --out runs/hyperkd_s2 [--teacher-checkpoint vit_t.pth | --random-teacher]
                               [--steps 60] [--finetune-steps 60] [--tile 112]

Steps (each one a ``cdkd`` command, printed as it runs):

1. one band-stack manifest per BigEarthNet patch (``<patch>.bands.yaml`` -> the patch's folder of 12 single-band
   files at 10/20/60 m, resampled onto the 10 m grid on the fly; nothing is pre-stacked);
2. ``cdkd distill --recipe hyperkd`` on the manifests (the bands' wavelengths come from the Sentinel-2 band names
   in the file names; the run report prints the spectral alignment);
3. labels generated from spectral indices, because no multispectral masks ship with the data: vegetation
   (NDVI > 0.4), snow (NDSI > 0.4 and green > 0.2 reflectance), other; written beside links to the stacked files
   (``--format folder``), patches split 4 train / 2 test;
4. ``cdkd finetune`` (frozen student, UPerNet, class-balanced loss) and ``cdkd evaluate`` on the 2 test patches,
   for the HyperKD student and for a random-init 12-band ViT-S with the same normalisation (the baseline);
5. ``cdkd export`` to ONNX (parity on the stacked tiles), ``cdkd segment`` of a band-stack manifest (per-band files)
   and of the stacked file of the same patch with ONNX Runtime; the two class rasters are compared.

Writes ``OUT/summary.json``. Paths of the real data: ``$CDKD_SHARED_DATA`` or ``../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import rasterio

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CDKD_SHARED_DATA", REPO.parent / "shared" / "data")) / "multispectral" / "bigearthnet_s2"
TEST = ("S2A_MSIL2A_20170617T113321_4_55", "S2B_MSIL2A_20170924T93020_69_24")
CLASSES = """ignore_index: 255
classes:
  - {id: 0, name: vegetation, color: "#2E8B57"}
  - {id: 1, name: snow, color: "#DDEEFF"}
  - {id: 2, name: other, color: "#C2A878"}
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cdkd(*args: object) -> str:
    cmd = [sys.executable, "-m", "cli.main", *map(str, args)]
    log("cdkd " + " ".join(map(str, args)))
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    out = res.stdout + res.stderr
    if res.returncode:
        raise SystemExit(f"command failed ({res.returncode}):\n{out}")
    print(res.stdout, flush=True)
    return res.stdout


def labels(stacked: Path) -> np.ndarray:
    """(H, W) uint8 class ids from spectral indices of a 12-band stack (order B01..B8A, B09, B11, B12)."""
    with rasterio.open(stacked) as src:
        x = src.read().astype(np.float64)
    green, red, nir, swir1 = x[2], x[3], x[7], x[10]
    ndvi = (nir - red) / (nir + red + 1e-6)
    ndsi = (green - swir1) / (green + swir1 + 1e-6)
    out = np.full(ndvi.shape, 2, dtype=np.uint8)
    out[(ndsi > 0.4) & (green > 2000)] = 1
    out[ndvi > 0.4] = 0
    return out


def write_labeled(root: Path) -> dict[str, list[float]]:
    """images/{train,test}/<patch>.tif (links to the stacked files) and masks/{train,test}/<patch>.tif."""
    shares = {}
    for stacked in sorted((DATA / "stacked").glob("*.tif")):
        split = "test" if stacked.stem in TEST else "train"
        img = root / "images" / split / stacked.name
        img.parent.mkdir(parents=True, exist_ok=True)
        if not img.exists():
            img.symlink_to(stacked)
        mask = labels(stacked)
        with rasterio.open(stacked) as src:
            profile = dict(
                driver="GTiff",
                width=src.width,
                height=src.height,
                count=1,
                dtype="uint8",
                crs=src.crs,
                transform=src.transform,
            )
        dst = root / "masks" / split / stacked.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(dst, "w", **profile) as out:
            out.write(mask[None])
        shares[stacked.stem] = [round(float((mask == k).mean()), 3) for k in range(3)]
    (root / "classes.yaml").write_text(CLASSES)
    return shares


def distill(out: Path, manifests: Path, a: argparse.Namespace) -> None:
    teacher = ["--teacher-checkpoint", a.teacher_checkpoint.resolve()] if a.teacher_checkpoint else ["--random-teacher"]
    short = out / "short_run.yaml"  # the default 100 warm-up steps would outlast a short run
    short.write_text(f"train: {{warmup_steps: {max(1, a.steps // 10)}}}\n")
    cdkd(
        "distill",
        "--recipe",
        "hyperkd",
        "--data",
        manifests,
        "--out",
        out / "distill",
        "--config",
        short,
        "--teacher",
        a.teacher,
        *teacher,
        "--student",
        a.student,
        "--in-chans",
        12,
        "--tile-size",
        a.tile,
        "--batch-size",
        a.batch_size,
        "--steps",
        a.steps,
        "--lr",
        "1e-4",
        "--workers",
        0,
        "--log-every",
        1,
        "--checkpoint-every",
        max(a.steps, 1),
        "--overwrite",
        "--no-progress",
    )


def random_student(like: Path, out: Path) -> None:
    """A seeded random-init student with ``like``'s architecture, normalisation and bands: the baseline."""
    import torch

    from cdkd.artifacts import load_student, save_student
    from cdkd.models.student import build_student

    _, info = load_student(like)
    torch.manual_seed(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_student(
        out,
        build_student(info.arch, **info.arch_args),
        replace(info, provenance={"init": "random (bench/hyperkd_s2.py baseline)"}),
    )


def finetune_and_evaluate(out: Path, a: argparse.Namespace, student: Path, name: str) -> dict:
    """Frozen ``student`` + UPerNet (64 channels, class-balanced loss) on the train patches; test-patch scores."""
    labeled = out / "labeled"
    cdkd(
        "finetune",
        "--student",
        student,
        "--data",
        labeled,
        "--format",
        "folder",
        "--classes",
        labeled / "classes.yaml",
        "--split",
        "train",
        "--out",
        out / f"seg_{name}",
        "--tile-size",
        a.tile,
        "--batch-size",
        4,
        "--steps",
        a.finetune_steps,
        "--decoder-channels",
        64,
        "--class-balanced",
        "--seed",
        0,
        "--workers",
        0,
        "--overwrite",
        "--no-progress",
    )
    cdkd(
        "evaluate",
        out / f"seg_{name}" / "segmenter.pt",
        "--data",
        labeled,
        "--format",
        "folder",
        "--classes",
        labeled / "classes.yaml",
        "--split",
        "test",
        "--out",
        out / f"eval_{name}",
        "--overwrite",
    )
    m = json.loads((out / f"eval_{name}" / "metrics.json").read_text())
    return {"miou": m.get("miou"), "oa": m.get("oa"), "mf1": m.get("mf1"), "iou": dict(zip(m["class_names"], m["iou"]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", default="vit_t")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--teacher-checkpoint", type=Path)
    g.add_argument("--random-teacher", action="store_true")
    p.add_argument("--student", default="vit_s")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--tile", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--reuse", action="store_true", help="keep OUT/distill/student.pt if it is there")
    a = p.parse_args()
    out = a.out.resolve()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: the BigEarthNet-S2 patches are not here (set CDKD_SHARED_DATA)")
    patches = sorted(d for d in DATA.iterdir() if d.is_dir() and d.name != "stacked")

    log(f"1/5 band-stack manifests for {len(patches)} patches")
    from cdkd.data.bandstack import write_manifest

    manifests = out / "manifests"
    for d in patches:
        write_manifest(manifests / f"{d.name}.bands.yaml", folder=d, resampling="bilinear")

    log("2/5 distillation (hyperkd)")
    if a.reuse and (out / "distill" / "student.pt").is_file():
        log("reusing the distilled student")
    else:
        distill(out, manifests, a)
    report = json.loads((out / "distill" / "report.json").read_text())
    metrics = [json.loads(x) for x in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "kd" in m]

    log("3/5 labels from spectral indices (NDVI, NDSI)")
    shares = write_labeled(out / "labeled")

    log("4/5 decoder fine-tuning and evaluation: the HyperKD student, and a random-init 12-band ViT-S")
    random_student(out / "distill" / "student.pt", out / "random" / "student.pt")
    evaluation = {
        name: finetune_and_evaluate(out, a, student, name)
        for name, student in (("hyperkd", out / "distill" / "student.pt"), ("random", out / "random" / "student.pt"))
    }

    log("5/5 ONNX export, then segment a band-stack scene and its stacked twin")
    cdkd(
        "export",
        out / "seg_hyperkd" / "segmenter.pt",
        "--format",
        "onnx",
        "--out",
        out / "model.onnx",
        "--check-data",
        out / "labeled" / "images",
        "--overwrite",
    )
    scene = TEST[1]
    cdkd(
        "segment",
        manifests / f"{scene}.bands.yaml",
        "--engine",
        out / "model.onnx",
        "--out",
        out / "lc_bandfiles.tif",
        "--overwrite",
        "--no-progress",
    )
    cdkd(
        "segment",
        DATA / "stacked" / f"{scene}.tif",
        "--engine",
        out / "model.onnx",
        "--out",
        out / "lc_stacked.tif",
        "--overwrite",
        "--no-progress",
    )
    with rasterio.open(out / "lc_bandfiles.tif") as a1, rasterio.open(out / "lc_stacked.tif") as a2:
        agree = float((a1.read(1) == a2.read(1)).mean())
    export = json.loads((out / "model.export.json").read_text())

    summary = {
        "distill": {
            "steps": report["steps"],
            "seconds": report["seconds"],
            "images_seen": report["images_seen"],
            "first": {k: steps[0][k] for k in ("kd", "pix", "spec", "mask_saliency")},
            "last": {k: steps[-1][k] for k in ("kd", "pix", "spec", "mask_saliency")},
            "images_per_s": float(np.median([m["images_per_s"] for m in steps[1:]] or [0])),
            "alignment": report["alignment"]["table"],
        },
        "labels_share_veg_snow_other": shares,
        "evaluate": evaluation,
        "export": {"agreement": export["parity"]["agreement"], "max_abs_diff": export["parity"]["max_abs_diff"]},
        "segment_bandfiles_vs_stacked_agreement": agree,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
