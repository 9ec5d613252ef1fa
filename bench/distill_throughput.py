"""Throughput and peak memory of one Mask-CDKD training step, per teacher x student x tile size.

    python bench/distill_throughput.py                       # CPU: vit_b/vit_l x vit_s/vit_s_win at 256 and 512 px
    python bench/distill_throughput.py --sizes 1024 --batch-size 4 --amp bf16 --grad-checkpointing both   # a GPU

Each configuration runs in its own subprocess so that peak memory (CUDA: max allocated; CPU: max RSS) belongs
to that configuration alone. Random SAM weights (the real architecture) stand in for a checkpoint: speed and
memory do not depend on the weights. All rows come from one run on one machine, so their ratios compare.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_config(teacher: str, student: str, size: int, batch: int, steps: int, amp: str, ckpt: bool,
               device: str) -> dict:
    import torch

    from cdkd.config import ObjectiveConfig, TeacherConfig
    from cdkd.distill.objective import MaskCDKD
    from cdkd.models.mae import random_patch_mask
    from cdkd.models.student import build_student
    from cdkd.models.teacher import build_teacher

    import numpy as np

    dev = torch.device(device)
    torch.manual_seed(0)
    model = MaskCDKD(build_teacher(TeacherConfig(variant=teacher, random_init=True, grad_checkpointing=ckpt)),
                     build_student(student, img_size=size), ObjectiveConfig()).to(dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rng = np.random.default_rng(0)
    n = (size // 16) ** 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        x = torch.randn(batch, 3, size, size, device=dev)
        mask = torch.from_numpy(np.stack([random_patch_mask(n, 0.75, rng) for _ in range(batch)])).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            losses = model(x, mask)
        losses.weighted((0.2, 0.4, 0.4)).backward()
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
    return {"teacher": teacher, "student": student, "size": size, "batch": batch, "amp": amp, "grad_ckpt": ckpt,
            "device": device, "s_per_step": round(sec, 3), "images_per_s": round(batch / sec, 3),
            "peak_gb": round(peak_gb, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    print(f"{'teacher':8} {'student':10} {'px':>5} {'batch':>5} {'ckpt':>5} {'s/step':>8} {'img/s':>8} {'peak GB':>8}")
    for teacher in a.teachers.split(","):
        for student in a.students.split(","):
            for size in (int(s) for s in a.sizes.split(",")):
                for ckpt in ckpts:
                    spec = dict(teacher=teacher, student=student, size=size, batch=a.batch_size, steps=a.steps,
                                amp=a.amp, ckpt=ckpt, device=device)
                    proc = subprocess.run([sys.executable, __file__, "--_one", json.dumps(spec)], cwd=REPO,
                                          capture_output=True, text=True)
                    if proc.returncode:
                        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                        print(f"{teacher:8} {student:10} {size:>5} {a.batch_size:>5} {ckpt!s:>5} failed: {err}")
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    rows.append(r)
                    print(f"{teacher:8} {student:10} {size:>5} {a.batch_size:>5} {ckpt!s:>5} {r['s_per_step']:>8.2f} "
                          f"{r['images_per_s']:>8.2f} {r['peak_gb']:>8.2f}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
