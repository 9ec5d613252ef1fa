"""Throughput and peak memory of one distillation training step, per recipe x teacher x student x tile size.

    python bench/distill_throughput.py                       # CPU: vit_b/vit_l x vit_s/vit_s_win at 256 and 512 px
    python bench/distill_throughput.py --sizes 1024 --batch-size 4 --amp bf16 --grad-checkpointing both   # a GPU
    python bench/distill_throughput.py --recipes rs4d --teachers vit_b --students rsmamba_s,vit_s   # RS4D rows

Grad checkpointing applies to what trains through deep blocks: the teacher under mask-cdkd (its adapters learn),
the student under rs4d (the teacher runs without gradients).

Each configuration runs in its own subprocess so that peak memory (CUDA: max allocated; CPU: max RSS) belongs
to that configuration alone. Random SAM weights (the real architecture) stand in for a checkpoint: speed and
memory do not depend on the weights. All rows come from one run on one machine, so their ratios compare.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def synthetic_batch(recipe: str, batch: int, size: int, rng, device) -> dict:
    """Random images plus the per-sample draws ``recipe``'s items carry (speed does not depend on the pixels)."""
    import numpy as np
    import torch

    from cdkd.models.mae import random_patch_mask

    n = (size // 16) ** 2
    out = {"image": torch.randn(batch, 3, size, size), "valid": torch.ones(batch, size, size, dtype=torch.bool)}
    if recipe == "mask-cdkd":
        out["mask"] = torch.from_numpy(np.stack([random_patch_mask(n, 0.75, rng) for _ in range(batch)]))
    else:
        out["patch_order"] = torch.from_numpy(np.stack([rng.permutation(n) for _ in range(batch)]))
        out["noise_seed"] = torch.from_numpy(rng.integers(0, 2**62, batch))
    return {k: v.to(device) for k, v in out.items()}


def one_config(recipe: str, teacher: str, student: str, size: int, batch: int, steps: int, amp: str, ckpt: bool,
               device: str) -> dict:
    import numpy as np
    import torch

    from cdkd.config import DistillConfig, StudentConfig, TeacherConfig
    from cdkd.distill.recipes import build_recipe
    from cdkd.models.student import build_student

    dev = torch.device(device)
    cfg = DistillConfig(recipe=recipe, teacher=TeacherConfig(variant=teacher, random_init=True,
                                                             grad_checkpointing=ckpt and recipe == "mask-cdkd"),
                        student=StudentConfig(arch=student))
    r = build_recipe(cfg)
    torch.manual_seed(0)
    t = r.build_teacher()
    s = build_student(student, img_size=size)
    if ckpt and recipe != "mask-cdkd":
        s.set_grad_checkpointing(True)
    model = r.build(t, s).to(dev).train()
    control = r.control()
    weights, knobs = control.weights(), control.knobs()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rng = np.random.default_rng(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        batch_ = synthetic_batch(recipe, batch, size, rng, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            losses = model(batch_, knobs)
        sum(weights[k] * losses[k] for k in r.terms).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    if dev.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    return {"recipe": recipe, "teacher": teacher, "student": student, "size": size, "batch": batch, "amp": amp,
            "grad_ckpt": ckpt, "device": device, "s_per_step": round(sec, 3), "images_per_s": round(batch / sec, 3),
            "peak_gb": round(peak_gb, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="mask-cdkd")
    p.add_argument("--teachers", default="vit_b,vit_l")
    p.add_argument("--students", default="vit_s,vit_s_win")
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--grad-checkpointing", default="off", choices=["off", "on", "both"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path)
    p.add_argument("--_one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:  # child process: one configuration, result as JSON on stdout
        print(json.dumps(one_config(**json.loads(a._one))))
        return
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[a.grad_checkpointing]
    rows = []
    print(f"{'recipe':10} {'teacher':8} {'student':10} {'px':>5} {'batch':>5} {'ckpt':>5} {'s/step':>8} {'img/s':>8} "
          f"{'peak GB':>8}")
    configs = itertools.product(a.recipes.split(","), a.teachers.split(","), a.students.split(","),
                                (int(s) for s in a.sizes.split(",")), ckpts)
    for recipe, teacher, student, size, ckpt in configs:
        spec = dict(recipe=recipe, teacher=teacher, student=student, size=size, batch=a.batch_size, steps=a.steps,
                    amp=a.amp, ckpt=ckpt, device=device)
        proc = subprocess.run([sys.executable, __file__, "--_one", json.dumps(spec)], cwd=REPO,
                              capture_output=True, text=True)
        head = f"{recipe:10} {teacher:8} {student:10} {size:>5} {a.batch_size:>5} {ckpt!s:>5}"
        if proc.returncode:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{head} failed: {err}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{head} {r['s_per_step']:>8.2f} {r['images_per_s']:>8.2f} {r['peak_gb']:>8.2f}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
