"""What drawing ``curves.png`` costs a training run: ``write_curves`` on a mask-cdkd run folder of N logged steps.

    python bench/curves.py [--rows 10000] [--repeat 5]

The folder is written as the trainer writes it (``RunDir``: config.yaml, one metrics.jsonl row per step with a
stage change every third of the run as events); the drawing is timed as the trainer runs it at a checkpoint
(read the file, summarise, draw, write atomically), best of ``--repeat``, in wall-clock and CPU seconds (CPU time
is the fair number on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from cdkd.config import DistillConfig, apply_overrides, save_config
from cdkd.train.rundir import RunDir
from cdkd.train.summary import write_curves


def write_run(root: Path, rows: int, seed: int = 0) -> RunDir:
    rng = np.random.default_rng(seed)
    paths = RunDir(root, "student.pt")
    save_config(apply_overrides(DistillConfig(), {"train.steps": rows}), paths.config)
    stages = {rows // 3: "middle", 2 * rows // 3: "late"}
    stage, lines, t0 = "early", [], time.time() - rows
    for s in range(1, rows + 1):
        if s in stages:
            stage = stages[s]
            lines.append({"step": s, "event": "stage", "stage": stage, "ratio": 0.84, "time": t0 + s})
        kd, t_mae, s_mae = (
            float(a * math.exp(-b * s / rows) * (1 + 0.1 * rng.random()))
            for a, b in ((2.0, 3.0), (1.0, 1.0), (1.2, 0.8))
        )
        lines.append(
            {
                "step": s,
                "lr": 1e-4 * 0.5 * (1 + math.cos(math.pi * s / rows)),
                "loss": 0.2 * kd + 0.4 * t_mae + 0.4 * s_mae,
                "kd": kd,
                "t_mae": t_mae,
                "s_mae": s_mae,
                "ratio": t_mae / s_mae,
                "stage": stage,
                "weights": [0.2, 0.4, 0.4],
                "images_per_s": float(30 + rng.normal()),
                "time": t0 + s,
            }
        )
    paths.metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_run(Path(tmp) / "run", args.rows)
        write_curves(paths.root)  # the first draw also imports matplotlib: not what a checkpoint pays
        walls, cpus = [], []
        for _ in range(args.repeat):
            w, c = time.perf_counter(), time.process_time()
            write_curves(paths.root)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        size = paths.metrics.stat().st_size / 1e6
        print(
            f"| rows | metrics.jsonl | wall s (best) | CPU s (best) |\n|---|---|---|---|\n"
            f"| {args.rows} | {size:.1f} MB | {min(walls):.2f} | {min(cpus):.2f} |"
        )


if __name__ == "__main__":
    main()
