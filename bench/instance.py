"""Instance segmentation on the CPU, end to end: NWPU VHR-10 AP for ViT-S students, and a SpaceNet scene.

    python bench/instance.py --out runs/instance [--distilled runs/transfer/kd/student.pt]   # ~1-2 h on 2 cores

1. Students (frozen): ViT-S with random weights, and a distilled ViT-S (``--distilled``: a ``student.pt``, e.g. the
   KD-only student of ``bench/transfer.py``; without it that bench's supervised ``vit_t`` teacher and KD-only
   distillation on RSSCN7 are run here first).
2. NWPU VHR-10 (40 images, 10 classes): ``finetune --task instance`` on the 30 images whose name does not end in
   2, 6 or 8 for ``--steps`` steps; ``evaluate --task instance`` (COCO AP, pycocotools) on the 10 held-out images
   (``*[268].jpg``: every class present), and for the random-init student also on 4 of its training images (2 for the untrained head) and
   with an untrained head (the "does it learn" check).
3. SpaceNet (solaris): the 900 x 900 panchromatic uint16 scene and its 43 footprints (``--format geo``): fine-tune
   on the scene, segment it with the scene engine (``cdkd segment`` -> GeoPackage) and match the polygons with
   the 43 labelled footprints at IoU 0.5. The scene is the training data: no other labelled georeferenced scene
   is at hand, so this row measures the pipeline (vector labels -> training -> streaming scene -> polygons in the
   scene's CRS), not generalisation.

Prints one markdown table and writes it to OUT/instance.md and OUT/instance.json. Every budget is a flag.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
SHARED = REPO.parent / "shared" / "data"
NWPU = SHARED / "instances" / "nwpu_vhr10"
SOLARIS = SHARED / "instances" / "solaris"
TRAIN, HELD_OUT, TRAIN_SUBSET = "*[0134579].jpg", "*[268].jpg", "0[34]*.jpg"  # TRAIN_SUBSET: 4 training images
UNTRAINED_SUBSET = "0[34]0.jpg"  # 2 of them: an untrained head reports ~100 objects per tile, slow to score


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def finetune_detector(a: argparse.Namespace, student: Path, out: Path, data: dict, steps: int) -> Path:
    from cdkd.config import FinetuneConfig, apply_overrides
    from cdkd.finetune.trainer import finetune

    if a.reuse and (out / "detector.pt").is_file():
        log(f"reusing {out / 'detector.pt'}")
        return out / "detector.pt"
    cfg = apply_overrides(
        FinetuneConfig(task="instance"),
        {
            "student": str(student),
            **{f"data.{k}": v for k, v in data.items()},
            "data.tile_size": a.tile,
            "data.overlap": a.tile // 4,
            "data.num_workers": 1,
            "instance.channels": a.channels,
            "instance.box_batch_size_per_image": a.box_batch,
            "train.steps": steps,
            "train.batch_size": a.batch_size,
            "train.lr": a.lr,
            "train.warmup_steps": min(20, steps),
            "train.checkpoint_every": max(steps, 1),
            "train.log_every": 10,
        },
    )
    t0 = time.perf_counter()
    res = finetune(cfg, out, overwrite=True, progress=False, log=log)
    (out / "bench_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return res.segmenter_path


def evaluate(a: argparse.Namespace, detector: Path, out: Path, split: str) -> dict:
    from cdkd.evaluation.instance import evaluate_instances

    res = evaluate_instances(
        detector, NWPU, out, fmt="coco", split=[split], overwrite=True, progress=False, batch_size=2
    )
    m = res.metrics.metrics
    log(
        f"{detector.parent.name} on {split}: box AP {m['bbox']['AP']:.3f} AP50 {m['bbox']['AP50']:.3f}, mask AP "
        f"{m['segm']['AP']:.3f} AP50 {m['segm']['AP50']:.3f} ({res.seconds:.0f} s)"
    )
    return {
        "box_AP": m["bbox"]["AP"],
        "box_AP50": m["bbox"]["AP50"],
        "mask_AP": m["segm"]["AP"],
        "mask_AP50": m["segm"]["AP50"],
        "images": res.metrics.images,
        "seconds": round(res.seconds, 1),
    }


def distilled_student(a: argparse.Namespace) -> Path:
    if a.distilled is not None:
        return a.distilled
    import transfer

    t = argparse.Namespace(
        tile=128,
        overlap=32,
        batch_size=16,
        channels=128,
        teacher_steps=200,
        teacher_lr=5e-4,
        distill_steps=150,
        distill_lr=5e-4,
        rs4d_lr=5e-4,
        decoder_steps=0,
        decoder_lr=1e-3,
        head="upernet",
        reuse=a.reuse,
    )
    ckpt, _ = transfer.train_teacher(t, a.out)
    return transfer.distill_student(t, a.out, "kd", ckpt, "fixed", (1.0, 0.0, 0.0))


def untrained(a: argparse.Namespace, student: Path, out: Path) -> Path:
    """A detector.pt with the head as initialised (0 steps): the floor the trained heads are compared with."""
    import torch

    from cdkd.artifacts import DetectorInfo, load_student, save_detector
    from cdkd.config import FinetuneConfig, apply_overrides
    from cdkd.data.coco import read_coco
    from cdkd.tasks.instance import build_detector

    st, info = load_student(student)
    schema = read_coco(NWPU).schema
    torch.manual_seed(0)
    cfg = apply_overrides(FinetuneConfig(task="instance"), {"instance.channels": a.channels})
    det = build_detector(st, schema.num_classes, cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_detector(out / "detector.pt", det, DetectorInfo(info, det.config(), schema, a.tile, a.tile // 4))
    return out / "detector.pt"


def scene_run(a: argparse.Namespace, student: Path) -> dict:
    """Fine-tune on the SpaceNet scene's footprints, segment the scene, match with the 43 footprints."""
    import pyogrio
    import shapely

    from cdkd.evaluation.instance import match_footprints
    from cdkd.inference.runtimes import open_runtime
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene

    scene, labels = SOLARIS / "sample_geotiff.tif", SOLARIS / "geotiff_labels.geojson"
    det = finetune_detector(
        a, student, a.out / "spacenet", {"root": str(scene), "format": "geo", "labels": str(labels)}, a.scene_steps
    )
    out = a.out / "spacenet" / "buildings.gpkg"
    report = segment_scene(
        scene,
        open_runtime(det, device="cpu"),
        out,
        SegmentOptions(overwrite=True, progress=False, min_score=a.min_score, batch_size=2),
    )
    pred = pyogrio.read_dataframe(out, layer=out.stem)
    truth = pyogrio.read_dataframe(labels).to_crs(pred.crs)
    m = match_footprints(pred.geometry.to_numpy(), pred["score"].to_numpy(), truth.geometry.to_numpy())
    log(
        f"SpaceNet: {len(pred)} predicted, {len(truth)} labelled, {m['matched']} matched at IoU 0.5 "
        f"({report.seconds:.1f} s)"
    )
    train_s = (
        float((a.out / "spacenet" / "bench_seconds.txt").read_text())
        if (a.out / "spacenet" / "bench_seconds.txt").is_file()
        else None
    )
    return {
        **m,
        "predicted": len(pred),
        "labelled": len(truth),
        "segment_seconds": round(report.seconds, 1),
        "train_seconds": train_s,
        "area_m2_predicted": round(float(pred["area_m2"].sum()), 1),
        "area_m2_labelled": round(float(shapely.area(truth.geometry.to_numpy()).sum()), 1),
    }


def table(rows: dict, scene: dict | None, a: argparse.Namespace) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.1f}"

    lines = [
        "| encoder (frozen) | head | evaluated on | box AP | box AP50 | mask AP | mask AP50 |",
        "|:--|:--|:--|--:|--:|--:|--:|",
    ]
    for (enc, head, split), r in rows.items():
        lines.append(
            f"| {enc} | {head} | {split} ({r['images']} images) | {pct(r['box_AP'])} | {pct(r['box_AP50'])} "
            f"| {pct(r['mask_AP'])} | {pct(r['mask_AP50'])} |"
        )
    if scene:
        lines += [
            "",
            "| SpaceNet scene | predicted | labelled | matched (IoU 0.5) | precision | recall | F1 | segment s |",
            "|:--|--:|--:|--:|--:|--:|--:|--:|",
            f"| {a.scene_steps} steps on the scene | {scene['predicted']} | {scene['labelled']} | "
            f"{scene['matched']} | {pct(scene['precision'])} | {pct(scene['recall'])} | {pct(scene['f1'])} | "
            f"{scene['segment_seconds']} |",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/instance"))
    p.add_argument("--distilled", type=Path, default=None, help="a distilled ViT-S student.pt (else made here)")
    p.add_argument("--tile", type=int, default=192)
    p.add_argument("--channels", type=int, default=64, help="pyramid and mask head width (256 in ViTDet)")
    p.add_argument("--box-batch", type=int, default=128, help="RoIs per tile for the box loss (512 in ViTDet)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--scene-steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-score", type=float, default=0.5)
    p.add_argument("--stages", default="random,distilled,scene", help="which of random,distilled,scene to run")
    p.add_argument("--reuse", action="store_true", help="reuse detectors already in --out")
    a = p.parse_args()
    if not NWPU.is_dir() or not SOLARIS.is_dir():
        sys.exit(f"needs the shared data folder with instances/nwpu_vhr10 and instances/solaris: {SHARED}")
    import transfer

    a.out.mkdir(parents=True, exist_ok=True)
    stages = a.stages.split(",")
    results_path = a.out / "instance.json"
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": [], "scene": None}
    rows = {tuple(r["key"]): r for r in saved["rows"]}
    scene = saved.get("scene")
    t_args = argparse.Namespace(tile=128, reuse=True)
    nwpu = {"root": str(NWPU), "format": "coco", "split": [TRAIN]}
    head = f"{a.steps} steps"

    def save() -> None:
        out = {"rows": [dict(r, key=list(k)) for k, r in rows.items()], "scene": scene, "settings": vars(a)}
        (a.out / "instance.json").write_text(json.dumps(out, indent=2, default=str))
        (a.out / "instance.md").write_text(table(rows, scene, a))

    if "random" in stages:
        student = transfer.random_student(t_args, a.out, "random", "vit_s")
        det = finetune_detector(a, student, a.out / "random-nwpu", nwpu, a.steps)
        rows[("random init ViT-S", head, "held-out")] = evaluate(a, det, a.out / "random-nwpu" / "heldout", HELD_OUT)
        rows[("random init ViT-S", head, "train subset")] = evaluate(
            a, det, a.out / "random-nwpu" / "train", TRAIN_SUBSET
        )
        zero = untrained(a, student, a.out / "random-untrained")
        rows[("random init ViT-S", "untrained", "train subset")] = evaluate(
            a, zero, a.out / "random-untrained" / "train", UNTRAINED_SUBSET
        )
        save()
    if "distilled" in stages:
        student = distilled_student(a)
        det = finetune_detector(a, student, a.out / "distilled-nwpu", nwpu, a.steps)
        rows[("distilled ViT-S (KD only)", head, "held-out")] = evaluate(
            a, det, a.out / "distilled-nwpu" / "heldout", HELD_OUT
        )
        save()
    if "scene" in stages:
        scene = scene_run(a, transfer.random_student(t_args, a.out, "random", "vit_s"))
        save()
    save()
    print(table(rows, scene, a))


if __name__ == "__main__":
    main()
