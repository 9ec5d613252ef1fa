"""Distillation step cost of a 12-band HyperKD student against RGB students, and HyperKD's mask statistics.

    python bench/hyperkd_throughput.py --data runs/hyperkd_s2/manifests --teacher-checkpoint vit_t.pth \
        [--steps 6] [--tile 112] [--batch-size 4] [--student vit_s]

Rows, all in one process on the same data (the Sentinel-2 band-stack manifests that ``bench/hyperkd_s2.py``
writes), the same teacher, student architecture, tile and batch:

- ``hyperkd 12 bands``: the student reads all 12 bands;
- ``hyperkd RGB``: the same recipe on bands 4, 3, 2 only (``--bands 4,3,2``);
- ``mask-cdkd RGB``: the default recipe (MMoA teacher trained too, two MAE heads) on bands 4, 3, 2;
- ``hyperkd 12 bands, guided 0`` / ``guided 1``: uniform vs. saliency-only masking, for the mask statistics.

Reported per row: median seconds per step and images/s over the steps after the first, peak RSS of the process
so far, the last step's losses and ``mask_saliency`` (mean saliency percentile of the masked patches: 0.5 =
uniform). On a shared CPU the absolute times drift; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import numpy as np


def run(name: str, overrides: dict, a: argparse.Namespace, work: Path) -> dict:
    from cdkd.config import DistillConfig, apply_overrides
    from cdkd.distill.trainer import distill

    base = {"data.root": str(a.data), "data.tile_size": a.tile, "data.num_workers": 0, "data.stats_samples": 16,
            "teacher.variant": a.teacher, "student.arch": a.student, "train.batch_size": a.batch_size,
            "train.steps": a.steps, "train.warmup_steps": 1, "train.log_every": 1,
            "train.checkpoint_every": 10**6}
    if a.teacher_checkpoint:
        base["teacher.checkpoint"] = str(a.teacher_checkpoint)
    else:
        base["teacher.random_init"] = True
    cfg = apply_overrides(DistillConfig(), dict(base, **overrides))
    out = work / name.replace(" ", "_").replace(",", "")
    result = distill(cfg, out, overwrite=True, progress=False, log=lambda _m: None)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r][1:]  # the first step pays for warm-up
    ips = float(np.median([r["images_per_s"] for r in rows]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"row": name, "s_per_step": a.batch_size / ips, "images_per_s": ips, "peak_rss_mb": round(peak),
            "losses": {k: round(v, 4) for k, v in result.losses.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder of 12-band Sentinel-2 rasters or manifests")
    p.add_argument("--teacher", default="vit_t")
    p.add_argument("--teacher-checkpoint", type=Path)
    p.add_argument("--student", default="vit_s")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--tile", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=4)
    a = p.parse_args()
    rgb = {"data.bands": [4, 3, 2], "student.in_chans": 3}
    rows = [("hyperkd 12 bands", {"recipe": "hyperkd", "student.in_chans": 12}),
            ("hyperkd RGB", {"recipe": "hyperkd", **rgb}),
            ("mask-cdkd RGB", {"recipe": "mask-cdkd", **rgb}),
            ("hyperkd 12 bands, guided 0", {"recipe": "hyperkd", "student.in_chans": 12, "hyperkd.guided_ratio": 0.0}),
            ("hyperkd 12 bands, guided 1", {"recipe": "hyperkd", "student.in_chans": 12, "hyperkd.guided_ratio": 1.0})]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in rows:
            results.append(run(name, overrides, a, Path(tmp)))
            r = results[-1]
            print(f"{name:<28} {r['s_per_step']:6.2f} s/step  {r['images_per_s']:5.2f} img/s  "
                  f"peak {r['peak_rss_mb']} MB  {r['losses']}", flush=True)
    ref = results[1]["s_per_step"]
    print(f"hyperkd 12 bands / hyperkd RGB: {results[0]['s_per_step'] / ref:.2f}x the step time; "
          f"mask-cdkd RGB / hyperkd RGB: {results[2]['s_per_step'] / ref:.2f}x")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
