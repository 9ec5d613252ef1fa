"""Distillation step cost of a 12-band HyperKD student against RGB students, and HyperKD's mask statistics.

    python bench/hyperkd_throughput.py --data runs/hyperkd_s2/manifests --teacher-checkpoint vit_t.pth \
        [--rounds 5] [--tile 112] [--batch-size 4] [--student vit_s]

Rows, built with the trainer's own pieces (recipe, statistics with band metadata, student, AdamW) on the same data
(the Sentinel-2 band-stack manifests ``bench/hyperkd_s2.py`` writes), teacher, student architecture, tile and batch:

- ``hyperkd 12 bands``: the student reads all 12 bands (guided ratio 0.5);
- ``hyperkd RGB``: the same recipe on bands 4, 3, 2 only (``--bands 4,3,2``);
- ``mask-cdkd RGB``: the default recipe (MMoA teacher trained too, two MAE heads) on bands 4, 3, 2;
- ``hyperkd 12 bands, guided 0`` / ``guided 1``: uniform vs. saliency-only masking, for the mask statistics.

Every round times one full optimiser step (forward, backward, AdamW) of every row in turn, each on the round's own
batch, so load on a shared machine falls on all rows alike; reported: the median over rounds, and the mean of
``mask_saliency`` (the masked patches' mean saliency percentile: 0.5 = uniform masking).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate


def build(overrides: dict, a: argparse.Namespace):
    from cdkd.config import DistillConfig, apply_overrides
    from cdkd.data import compute_stats, find_rasters
    from cdkd.data.stats import with_band_metadata
    from cdkd.distill.recipes import build_recipe
    from cdkd.models.student import build_student
    from cdkd.train.optim import adamw

    base = {
        "data.root": str(a.data),
        "data.tile_size": a.tile,
        "data.stats_samples": 16,
        "teacher.variant": a.teacher,
        "student.arch": a.student,
        "train.batch_size": a.batch_size,
    }
    base.update(
        {"teacher.checkpoint": str(a.teacher_checkpoint)} if a.teacher_checkpoint else {"teacher.random_init": True}
    )
    cfg = apply_overrides(DistillConfig(), dict(base, **overrides))
    recipe = build_recipe(cfg)
    bands = cfg.data.bands or tuple(range(1, cfg.student.in_chans + 1))
    rasters = find_rasters(cfg.data.root, bands=bands, min_bands=max(bands))
    recipe.stats = with_band_metadata(compute_stats(rasters, bands, n_samples=16, window=a.tile), rasters)
    torch.manual_seed(0)
    teacher = recipe.build_teacher()
    student = build_student(cfg.student.arch, img_size=a.tile, in_chans=cfg.student.in_chans)
    model = recipe.build(teacher, student).train()
    weights = recipe.control().weights()
    return model, adamw(model, 1e-5, 0.01), recipe.dataset(rasters, recipe.stats), weights


def step(model, optimizer, batch: dict, weights: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    losses = model(batch, {})
    sum(weights[k] * v for k, v in losses.items()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, {k: float(v.detach()) for k, v in losses.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder of 12-band Sentinel-2 rasters or manifests")
    p.add_argument("--teacher", default="vit_t")
    p.add_argument("--teacher-checkpoint", type=Path)
    p.add_argument("--student", default="vit_s")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tile", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=4)
    a = p.parse_args()
    rgb = {"data.bands": [4, 3, 2], "student.in_chans": 3}
    twelve = {"recipe": "hyperkd", "student.in_chans": 12}
    specs = [
        ("hyperkd 12 bands", twelve),
        ("hyperkd RGB", {"recipe": "hyperkd", **rgb}),
        ("mask-cdkd RGB", {"recipe": "mask-cdkd", **rgb}),
        ("hyperkd 12 bands, guided 0", dict(twelve, **{"hyperkd.guided_ratio": 0.0})),
        ("hyperkd 12 bands, guided 1", dict(twelve, **{"hyperkd.guided_ratio": 1.0})),
    ]
    rows = {name: build(o, a) for name, o in specs}
    times: dict[str, list[float]] = {n: [] for n in rows}
    seen: dict[str, list[dict]] = {n: [] for n in rows}
    rounds = a.rounds + 1  # round 0 warms every row up and is not counted
    for r in range(rounds):
        for name, (model, opt, data, w) in rows.items():
            batch = default_collate([data[r * a.batch_size + i] for i in range(a.batch_size)])
            seconds, losses = step(model, opt, batch, w)
            if r:
                times[name].append(seconds)
                seen[name].append(losses)
        print(f"round {r + 1}/{rounds} done", flush=True)
    print(f"\n{'row':<28} {'s/step':>7} {'img/s':>6}  in_chans  mask_saliency  losses (mean)")
    for name, (model, *_rest) in rows.items():
        med = float(np.median(times[name]))
        mean = {k: round(float(np.mean([s[k] for s in seen[name]])), 4) for k in seen[name][0]}
        sal = mean.pop("mask_saliency", None)
        chans = model.student.patch_embed.proj.in_channels
        print(f"{name:<28} {med:7.2f} {a.batch_size / med:6.2f}  {chans:8d}  {'' if sal is None else sal:>13}  {mean}")
    ref = float(np.median(times["hyperkd RGB"]))
    print(
        f"\nhyperkd 12 bands / hyperkd RGB: {np.median(times['hyperkd 12 bands']) / ref:.2f}x the step time; "
        f"mask-cdkd RGB / hyperkd RGB: {np.median(times['mask-cdkd RGB']) / ref:.2f}x "
        f"(medians of {a.rounds} rounds, batch {a.batch_size}, {a.tile} px, {a.student}, teacher {a.teacher})"
    )


if __name__ == "__main__":
    main()
