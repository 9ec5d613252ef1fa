"""A miniature of the paper's claim on CPU: does distillation (Mask-CDKD, RS4D) transfer land-cover knowledge?

    python bench/transfer.py --out runs/transfer            # about 30-40 minutes on 2 CPU cores
    python bench/transfer.py --rows random,kd,rsmamba-random,rs4d   # a subset of the students

1. Teacher that knows land cover: a small SAM-architecture encoder (``vit_t``: SAM's ImageEncoderViT, 8 blocks,
   256-d) trained supervised with a UPerNet head on the Dubai train tiles (tile1-6).
2. Distil it into ViT-S students on unlabeled RSSCN7 tiles with cdkd's ``distill`` (the code behind
   ``cdkd distill``): full Mask-CDKD (KD + MAE, dynamic schedule), MAE-only (S_MAE weight 1) and KD-only (KD weight 1);
   and into RS4D's ``rsmamba_s`` with recipe ``rs4d`` (L1 to the teacher's 256-channel neck output, 20 % noised and
   20 % masked patches). vit_t's neck is never trained in step 1 (its UPerNet reads block outputs), so RS4D's
   target here is a fixed random projection (1x1 conv, LayerNorm, 3x3 conv, LayerNorm) of the trained last block.
3. Freeze each student (and a random-init one) and train the same UPerNet decoder on Dubai tile1-6 with
   ``finetune``; evaluate on a fixed sample of 512 windows from tile7-8 (see ``evaluate_model``). The teacher row is the supervised
   teacher itself (its own decoder), the upper bound.

Prints one table (mIoU, OA, mF1, encoder GFLOPs at the tile size) and writes it to OUT/transfer-HEAD.md and .json.
Every stage's budget is a flag, so a longer run is one command away. Needs ../shared/data (Dubai and RSSCN7).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def encoder_gflops(encoder: torch.nn.Module, tile: int, layers: list[int]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        encoder.forward_intermediates(
            torch.zeros(1, 3, tile, tile), indices=[i - 1 for i in layers], output_fmt="NCHW", intermediates_only=True
        )
    return fc.get_total_flops() / 1e9


def dubai_train(a: argparse.Namespace):
    """Dubai tile1-6 pairs, the class schema and normalisation statistics computed from those images."""
    import rasterio

    from cdkd.data import compute_stats
    from cdkd.data.files import RasterInfo
    from cdkd.data.labeled import find_pairs, schema_for

    pairs = find_pairs(SHARED / "labeled" / "dubai", "dubai", ["tile[1-6]"])
    infos = []
    for p in pairs:
        with rasterio.open(p.image) as src:
            infos.append(RasterInfo(p.image, src.width, src.height, src.count, src.dtypes[0]))
    return pairs, schema_for("dubai", None), compute_stats(infos, (1, 2, 3), n_samples=64, window=a.tile, seed=0)


def train_segmenter(seg: torch.nn.Module, a: argparse.Namespace, steps: int, lr: float, what: str) -> None:
    """Cross-entropy training of ``seg`` on random Dubai tile1-6 crops (the parameters that require grad)."""
    from cdkd.data import StepSampler
    from cdkd.data.labeled import LabeledTiles
    from cdkd.train.optim import adamw, lr_lambda

    pairs, schema, stats = dubai_train(a)
    opt = adamw(seg, lr, 0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("poly", 20, steps))
    data = LabeledTiles(pairs, schema, stats, a.tile, augment=True, seed=0)
    loader = DataLoader(
        data, batch_size=a.batch_size, sampler=StepSampler(a.batch_size, num_micro_steps=steps), num_workers=0
    )
    seg.train()
    for step, batch in enumerate(loader, 1):
        loss = F.cross_entropy(seg(batch["image"]), batch["label"], ignore_index=schema.ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in seg.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            log(f"{what} step {step}/{steps} loss {float(loss):.3f}")


def teacher_segmenter(a: argparse.Namespace, ckpt: Path | None, head: str, frozen: bool):
    """vit_t (random, or from ``ckpt``) under a segmenter head, and the info evaluation needs."""
    from cdkd.artifacts import SegmenterInfo, StudentInfo
    from cdkd.config import TeacherConfig
    from cdkd.models.teacher import MMoATeacher, build_sam_encoder
    from cdkd.models.upernet import Segmenter

    torch.manual_seed(0)
    _, schema, stats = dubai_train(a)
    teacher = MMoATeacher(
        build_sam_encoder("vit_t", ckpt, random_init=ckpt is None),
        TeacherConfig(variant="vit_t", random_init=True, adapter_blocks=()),
    )
    if not frozen:
        teacher.requires_grad_(True)
        teacher.mask_token.requires_grad_(False)
    seg = Segmenter(
        teacher,
        num_classes=schema.num_classes,
        head=head,
        layers=(2, 4, 6, 8),
        channels=a.channels,
        freeze_encoder=frozen,
        feature_norm=False,
    )
    info = SegmenterInfo(
        StudentInfo("sam_vit_t", {"img_size": a.tile, "in_chans": 3}, stats, {}),
        seg.config(),
        schema,
        a.tile,
        a.overlap,
    )
    return seg, info, teacher


def train_teacher(a: argparse.Namespace, out: Path) -> tuple[Path, dict]:
    """Supervised vit_t + UPerNet on Dubai tile1-6; returns the encoder checkpoint and its own evaluation."""
    ckpt = out / "teacher_vit_t.pth"
    if a.reuse and ckpt.is_file():
        log(f"reusing {ckpt}")
        seg, info, teacher = teacher_segmenter(a, ckpt, "upernet", frozen=True)
        return ckpt, {
            "miou": float("nan"),
            "oa": float("nan"),
            "mf1": float("nan"),
            "gflops": encoder_gflops(teacher, a.tile, [2, 4, 6, 8]),
        }
    seg, info, teacher = teacher_segmenter(a, None, "upernet", frozen=False)
    train_segmenter(seg, a, a.teacher_steps, a.teacher_lr, "teacher")
    torch.save({k: v for k, v in teacher.state_dict().items() if k != "mask_token"}, ckpt)
    return ckpt, dict(evaluate_model(seg.eval(), info), gflops=encoder_gflops(teacher, a.tile, [2, 4, 6, 8]))


def probe_teacher(a: argparse.Namespace, ckpt: Path) -> dict:
    """The same decoder as the students get, on the frozen supervised teacher's features."""
    seg, info, teacher = teacher_segmenter(a, ckpt, a.head, frozen=True)
    train_segmenter(seg, a, a.decoder_steps, a.decoder_lr, "teacher probe")
    return dict(evaluate_model(seg.eval(), info), gflops=encoder_gflops(teacher, a.tile, [2, 4, 6, 8]))


def evaluate_model(model: torch.nn.Module, info, samples: int = 512) -> dict:
    """mIoU/OA/mF1 on a fixed, seeded sample of ``samples`` tiles from Dubai tile7-8 (the same for every model).

    The 18 held-out images hold 62 Mpx: scoring them whole with sliding windows costs about 6 minutes per ViT-S on
    2 CPU cores, so the benchmark scores 512 windows (8.4 Mpx, every image visited ~28 times); ``cdkd evaluate``
    itself always covers whole images.
    """
    from cdkd.data.labeled import LabeledTiles, find_pairs
    from cdkd.evaluation.metrics import MetricAccumulator

    pairs = find_pairs(SHARED / "labeled" / "dubai", "dubai", ["tile[7-8]"])
    tiles = LabeledTiles(pairs, info.classes, info.norm, info.tile_size, augment=False, seed=1234)
    acc = MetricAccumulator(info.classes.num_classes, info.classes.ignore_index, class_names=info.classes.names)
    loader = DataLoader(torch.utils.data.Subset(tiles, range(samples)), batch_size=32, num_workers=0)
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            acc.update(model(batch["image"]).argmax(1), batch["label"])
    m = acc.compute()
    return {"miou": float(m.miou), "oa": float(m.oa), "mf1": float(m.mf1)}


def distill_student(
    a: argparse.Namespace,
    out: Path,
    name: str,
    teacher_ckpt: Path,
    schedule: str = "fixed",
    weights: tuple[float, float, float] = (1.0, 0.0, 0.0),
    recipe: str = "mask-cdkd",
    student: str = "vit_s",
) -> Path:
    from cdkd.config import DistillConfig, apply_overrides
    from cdkd.distill.trainer import distill

    if a.reuse and (out / name / "student.pt").is_file():
        log(f"reusing {out / name / 'student.pt'}")
        return out / name / "student.pt"
    cfg = apply_overrides(
        DistillConfig(),
        {
            "recipe": recipe,
            "student.arch": student,
            "data.root": str(SHARED / "unlabeled" / "rsscn7"),
            "data.tile_size": a.tile,
            "data.num_workers": 1,
            "teacher.variant": "vit_t",
            "teacher.checkpoint": str(teacher_ckpt),
            "teacher.adapter_dim": 32,
            "objective.decoder_dim": 128,
            "objective.decoder_depth": 2,
            "objective.decoder_heads": 4,
            "objective.schedule": schedule,
            "objective.fixed_weights": weights,
            "objective.schedule_warmup": 20,
            "rs4d.noise_ratio": 0.2,
            "rs4d.mask_ratio": 0.2,
            "train.steps": a.distill_steps,
            "train.batch_size": a.batch_size,
            "train.lr": a.rs4d_lr if recipe == "rs4d" else a.distill_lr,
            "train.warmup_steps": 20,
            "train.log_every": 10,
            "train.checkpoint_every": a.distill_steps,
        },
    )
    res = distill(cfg, out / name, overwrite=True, progress=False, log=log)
    return res.student_path


def random_student(a: argparse.Namespace, out: Path, name: str, arch: str) -> Path:
    """A random-init ``arch`` with the normalisation the distilled students get (RSSCN7 statistics)."""
    from cdkd.artifacts import StudentInfo, save_student
    from cdkd.data import compute_stats, find_rasters
    from cdkd.models.student import build_student

    rasters = find_rasters(SHARED / "unlabeled" / "rsscn7", bands=(1, 2, 3), min_bands=3)
    norm = compute_stats(rasters, (1, 2, 3), n_samples=64, window=a.tile, seed=0)  # what distill computes
    torch.manual_seed(0)
    path = out / name / "student.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    arch_args = {"img_size": a.tile, "in_chans": 3}
    save_student(path, build_student(arch, **arch_args), StudentInfo(arch, arch_args, norm, {"init": "random"}))
    return path


def layers_for(path: Path) -> list[int]:
    """Four evenly spaced 1-based blocks: 3, 6, 9, 12 of a 12-block ViT-S; 4, 8, 12, 16 of rsmamba_s."""
    from cdkd.artifacts import load_student

    depth = load_student(path)[0].depth
    return [depth * k // 4 for k in range(1, 5)]


def transfer(a: argparse.Namespace, out: Path, name: str, student: Path) -> dict:
    from cdkd.artifacts import load_segmenter
    from cdkd.config import FinetuneConfig, apply_overrides
    from cdkd.finetune.trainer import finetune

    layers = layers_for(student)
    cfg = apply_overrides(
        FinetuneConfig(),
        {
            "student": str(student),
            "data.root": str(SHARED / "labeled" / "dubai"),
            "data.format": "dubai",
            "data.split": ("tile[1-6]",),
            "data.tile_size": a.tile,
            "data.overlap": a.overlap,
            "data.num_workers": 1,
            "head.type": a.head,
            "head.layers": layers,
            "head.channels": a.channels,
            "train.steps": a.decoder_steps,
            "train.batch_size": a.batch_size,
            "train.lr": a.decoder_lr,
            "train.checkpoint_every": a.decoder_steps,
            "train.log_every": 10,
        },
    )
    res = finetune(cfg, out / f"{name}-{a.head}", overwrite=True, progress=False, log=log)
    model, info = load_segmenter(res.segmenter_path)
    return dict(evaluate_model(model, info), gflops=encoder_gflops(model.encoder, a.tile, layers))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/transfer"))
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--overlap", type=int, default=32, help="stored in segmenter.pt for later whole-image use")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=128, help="UPerNet width (512 in the paper; 128 for CPU)")
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--teacher-lr", type=float, default=5e-4)
    p.add_argument("--distill-steps", type=int, default=150)
    p.add_argument("--distill-lr", type=float, default=5e-4)
    p.add_argument("--rs4d-lr", type=float, default=5e-4)
    p.add_argument("--decoder-steps", type=int, default=120)
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument(
        "--head",
        default="upernet",
        choices=["upernet", "linear"],
        help="the decoder every encoder gets (linear = the DINOv2 linear probe)",
    )
    p.add_argument("--reuse", action="store_true", help="reuse the teacher and students already in --out")
    p.add_argument("--rows", default=",".join(ROWS), help=f"students to run, from {','.join(ROWS)}")
    a = p.parse_args()
    if not (SHARED / "labeled" / "dubai").is_dir() or not (SHARED / "unlabeled" / "rsscn7").is_dir():
        sys.exit(f"needs the shared data folder with labeled/dubai and unlabeled/rsscn7: {SHARED}")
    torch.set_num_threads(torch.get_num_threads())
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    log("1/3 supervised teacher (vit_t) on Dubai tile1-6")
    teacher_ckpt, rows["teacher (supervised vit_t)"] = train_teacher(a, a.out)
    log(f"teacher: {rows['teacher (supervised vit_t)']}")
    log("2/3 distillation on RSSCN7")
    wanted = a.rows.split(",")
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        sys.exit(f"unknown --rows {unknown}; choose from {','.join(ROWS)}")
    students = {}
    for key in ROWS:
        if key in wanted:
            name, make = ROWS[key]
            students[name] = make(a, a.out, teacher_ckpt)
    log(f"3/3 frozen encoders + {a.head} decoder on Dubai tile1-6, evaluated on tile7-8")
    for name, path in students.items():
        rows[name] = transfer(a, a.out, path.parent.name, path)
        log(f"{name}: {rows[name]}")
    rows["teacher features (frozen vit_t)"] = probe_teacher(a, teacher_ckpt)
    log(f"teacher probe: {rows['teacher features (frozen vit_t)']}")
    minutes = (time.perf_counter() - t0) / 60
    order = [name for name, _ in ROWS.values() if name in rows]
    order += ["teacher features (frozen vit_t)", "teacher (supervised vit_t)"]
    lines = ["| encoder | mIoU | OA | mF1 | encoder GFLOPs |", "|---|---|---|---|---|"]
    for name in order:
        r = rows[name]
        cells = " | ".join("—" if math.isnan(r[k]) else f"{100 * r[k]:.2f}" for k in ("miou", "oa", "mf1"))
        lines.append(f"| {name} | {cells} | {r['gflops']:.2f} |")
    table = "\n".join(lines)
    note = (
        f"\n\n{a.head} decoder on every frozen encoder (the last row: the teacher with its own UPerNet, "
        f"trained end to end). Dubai tile7-8: 512 seeded {a.tile} px windows from the 18 held-out images; teacher {a.teacher_steps} steps, "
        f"distillation {a.distill_steps} steps, decoder {a.decoder_steps} steps, batch {a.batch_size}; "
        f"{minutes:.0f} min in all."
    )
    print(table + note)
    (a.out / f"transfer-{a.head}.md").write_text(table + note + "\n")
    (a.out / f"transfer-{a.head}.json").write_text(
        json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(a).items()}, "minutes": minutes}, indent=2)
    )


ROWS = {  # --rows key -> (table row, how the frozen encoder is made)
    "random": ("random init ViT-S", lambda a, out, t: random_student(a, out, "random", "vit_s")),
    "mae": ("MAE only", lambda a, out, t: distill_student(a, out, "mae", t, "fixed", (0.0, 0.0, 1.0))),
    "kd": ("KD only", lambda a, out, t: distill_student(a, out, "kd", t, "fixed", (1.0, 0.0, 0.0))),
    "cdkd": (
        "Mask-CDKD (KD + MAE, dynamic)",
        lambda a, out, t: distill_student(a, out, "cdkd", t, "dynamic", (0.6, 0.2, 0.2)),
    ),
    "rsmamba-random": (
        "random init rsmamba_s",
        lambda a, out, t: random_student(a, out, "rsmamba-random", "rsmamba_s"),
    ),
    "rs4d": (
        "RS4D rsmamba_s (L1 to the embedding, 20/20)",
        lambda a, out, t: distill_student(a, out, "rs4d", t, recipe="rs4d", student="rsmamba_s"),
    ),
    "rs4d-vit": (
        "RS4D ViT-S (L1 to the embedding, 20/20)",
        lambda a, out, t: distill_student(a, out, "rs4d-vit", t, recipe="rs4d", student="vit_s"),
    ),
}


if __name__ == "__main__":
    main()
