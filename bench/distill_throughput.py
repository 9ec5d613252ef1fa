"""Distillation step: throughput, memory, FLOPs and the fraction of the machine's matmul peak it reaches, per
recipe x teacher x student x tile x speed setting; and the data loader alone.

    python bench/distill_throughput.py                       # CPU: vit_b/vit_l x vit_s/vit_s_win at 256 and 512 px
    python bench/distill_throughput.py --teachers vit_b --students vit_s --sizes 1024 --batch-size 8 \
        --amp bf16 --device cuda --compile both --attention sam,sdpa --loader   # a GPU (bench/gpu.sh)
    python bench/distill_throughput.py --recipes rs4d --teachers vit_b --students rsmamba_s,vit_s   # RS4D rows

Every row is built from the trainer's own pieces: the recipe's model, ``cdkd.models.speedups.apply_speedups``
(blocks compiled per ``--compile``, the adapters' convolutions channels-last on CUDA), ``cdkd.train.optim.adamw``
(fused on CUDA), bf16 autocast under ``--amp bf16``, the teacher's attention per ``--attention`` (``auto``: the
fused ``sdpa`` form on CUDA, segment-anything's own ``sam`` code on the CPU). Grad checkpointing applies to what
trains through deep blocks: the teacher under mask-cdkd, the student under rs4d.

Columns:
- s/step, images/s: median of ``--steps`` full optimiser steps (forward, backward, AdamW) after warm-up steps
  (three when compiling: the first steps compile);
- peak: CUDA allocator's peak, or the process's max RSS on the CPU (each row runs in its own process);
- GFLOP/step: the step's matrix products and convolutions forward and backward, counted once with
  ``FlopCounterMode`` (``cdkd.utils.flops``) on the uncompiled model with SAM's attention as segment-anything
  writes it (the model's FLOPs, not the wider products of the fused attention form), on one image x batch size;
- TFLOP/s = GFLOP/step / s/step, and % peak: that against the peak measured in this script by timing a large
  matrix product in the step's dtype (bf16 8192^3 on CUDA under ``--amp bf16``, float32 otherwise).
``--loader`` adds the recipe's DataLoader alone (its worker processes, pinned memory, copies to the device): images/s
over ``--data`` or synthetic 2048 px GeoTIFFs; the step never starves while that is well above the step's images/s.
Random SAM weights (the real architecture) stand in for a checkpoint: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


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


def matmul_peak(device: str, dtype_name: str) -> dict:
    """TFLOP/s of a large square matrix product in ``dtype_name`` on ``device``: the machine's practical peak."""
    import torch

    dev = torch.device(device)
    dtype = getattr(torch, dtype_name)
    n, reps = (8192, 20) if dev.type == "cuda" else (2048, 3)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(dev)
    seconds = (time.perf_counter() - t0) / reps
    del a, b
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"n": n, "dtype": dtype_name, "tflops": round(2 * n**3 / seconds / 1e12, 2)}


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _build(recipe: str, teacher: str, student: str, size: int, ckpt: bool, attention: str, device):
    import torch

    from cdkd.config import DistillConfig, StudentConfig, TeacherConfig
    from cdkd.distill.recipes import build_recipe
    from cdkd.models.student import build_student

    cfg = DistillConfig(
        recipe=recipe,
        student=StudentConfig(arch=student),
        teacher=TeacherConfig(
            variant=teacher, random_init=True, attention=attention, grad_checkpointing=ckpt and recipe == "mask-cdkd"
        ),
    )
    r = build_recipe(cfg)
    torch.manual_seed(0)
    t = r.build_teacher()
    s = build_student(student, img_size=size)
    if ckpt and recipe != "mask-cdkd":
        s.set_grad_checkpointing(True)
    return r, r.build(t, s).to(device).train()


def _step(model, r, batch, weights, knobs, dtype, optimizer=None) -> None:
    import torch

    with torch.autocast(batch["image"].device.type, dtype=dtype, enabled=dtype is not None):
        losses = model(batch, knobs)
    sum(weights[k] * losses[k] for k in r.terms).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def step_flops(model, r, batch, weights, knobs, dtype) -> int:
    """FLOPs of one forward + backward with the teacher's attention as segment-anything writes it."""
    from cdkd.models.kernels.sam_attention import FusedSamAttention
    from cdkd.utils.flops import count_flops

    fused = [m for m in model.modules() if isinstance(m, FusedSamAttention)]
    impls = [m.impl for m in fused]
    for m in fused:
        m.impl = "sam"
    try:
        return count_flops(lambda: _step(model, r, batch, weights, knobs, dtype))
    finally:
        for m, impl in zip(fused, impls):
            m.impl = impl
        model.zero_grad(set_to_none=True)


def one_config(
    recipe: str,
    teacher: str,
    student: str,
    size: int,
    batch: int,
    steps: int,
    amp: str,
    ckpt: bool,
    device: str,
    compile: str,
    attention: str,
    flops: bool,
) -> dict:
    import numpy as np
    import torch

    from cdkd.models.speedups import apply_speedups, resolve_compile
    from cdkd.train.optim import adamw

    dev = torch.device(device)
    r, model = _build(recipe, teacher, student, size, ckpt, attention, dev)
    control = r.control()
    weights, knobs = control.weights(), control.knobs()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    rng = np.random.default_rng(0)
    # Counted on one image and scaled: every FLOP is per image, and segment-anything's attention at the full batch
    # could need more memory than the row being measured.
    counted = (
        batch * step_flops(model, r, synthetic_batch(recipe, 1, size, rng, dev), weights, knobs, dtype)
        if flops
        else None
    )
    done = apply_speedups(model, dev, compile=compile, channels_last=True)
    opt = adamw(model, 1e-5, 0.01)
    warmup = 3 if resolve_compile(compile, dev) else 1
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(steps + warmup):
        batch_ = synthetic_batch(recipe, batch, size, rng, dev)
        _sync(dev)
        t0 = time.perf_counter()
        _step(model, r, batch_, weights, knobs, dtype, opt)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    if dev.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    return {
        "recipe": recipe,
        "teacher": teacher,
        "student": student,
        "size": size,
        "batch": batch,
        "amp": amp,
        "grad_ckpt": ckpt,
        "device": device,
        "compile": resolve_compile(compile, dev),
        "attention": attention,
        "fused_adamw": bool(opt.defaults.get("fused")),
        "channels_last_convs": done["channels_last_convs"],
        "s_per_step": round(sec, 4),
        "images_per_s": round(batch / sec, 3),
        "peak_gb": round(peak_gb, 2),
        "gflop_per_step": None if counted is None else round(counted / 1e9, 1),
        "tflops": None if counted is None else round(counted / sec / 1e12, 4),
    }


def synthetic_rasters(folder: Path, count: int, side: int = 2048) -> Path:
    """``count`` smooth RGB uint8 GeoTIFFs (tiled, deflate) in ``folder``: something to decode like real imagery."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.uniform(20, 230, (3, side // 64, side // 64))
        img = np.kron(coarse, np.ones((64, 64))) + rng.normal(0, 6, (3, side, side))
        profile = dict(
            driver="GTiff",
            width=side,
            height=side,
            count=3,
            dtype="uint8",
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="deflate",
            crs="EPSG:32633",
            transform=from_origin(0, side, 1, 1),
        )
        with rasterio.open(folder / f"tile_{i:02d}.tif", "w", **profile) as dst:
            dst.write(np.clip(img, 0, 255).astype("uint8"))
    return folder


def loader_rate(
    recipe: str, size: int, batch: int, workers: int, device: str, data: Path | None, batches: int = 20
) -> dict:
    """images/s of the recipe's DataLoader alone, as the trainer builds it, copies to ``device`` included."""
    import torch
    from torch.utils.data import DataLoader

    from cdkd.config import DataConfig, DistillConfig, TeacherConfig
    from cdkd.data import StepSampler, compute_stats, find_rasters
    from cdkd.distill.recipes import build_recipe

    with tempfile.TemporaryDirectory() as tmp:
        root = data or synthetic_rasters(Path(tmp), 8)
        cfg = DistillConfig(
            recipe=recipe,
            data=DataConfig(root=str(root), tile_size=size, num_workers=workers),
            teacher=TeacherConfig(variant="vit_b", random_init=True),
        )
        r = build_recipe(cfg)
        rasters = find_rasters(root, bands=(1, 2, 3), min_bands=3)
        r.stats = compute_stats(rasters, (1, 2, 3), n_samples=8, window=size, seed=0)
        dev = torch.device(device)
        loader = DataLoader(
            r.dataset(rasters, r.stats),
            batch_size=batch,
            num_workers=workers,
            sampler=StepSampler(batch, num_micro_steps=batches + 1),
            pin_memory=dev.type == "cuda",
        )
        it = iter(loader)
        next(it)  # worker start-up
        t0 = time.perf_counter()
        for _ in range(batches):
            items = {k: v.to(dev, non_blocking=True) for k, v in next(it).items()}
        _sync(dev)
        seconds = time.perf_counter() - t0
        del items
    return {
        "recipe": recipe,
        "size": size,
        "batch": batch,
        "workers": workers,
        "files": len(rasters),
        "data": str(data) if data else "synthetic 2048 px GeoTIFFs",
        "images_per_s": round(batches * batch / seconds, 2),
    }


def _child(spec: dict) -> dict:
    kind = spec.pop("kind")
    return {"step": one_config, "peak": matmul_peak, "loader": loader_rate}[kind](**spec)


def run_child(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--_one", json.dumps(spec)], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


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
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off", "both"],
        help="torch.compile of the blocks (auto: on CUDA only; both: a row each)",
    )
    p.add_argument("--attention", default="auto", help="teacher attention forms, comma-separated: auto,sam,sdpa,flex")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra step per row)")
    p.add_argument("--loader", action="store_true", help="also time the recipe's DataLoader alone")
    p.add_argument("--data", type=Path, help="images for --loader (default: synthetic 2048 px GeoTIFFs)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes for --loader")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path)
    p.add_argument("--_one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:  # child process: one measurement, result as JSON on stdout
        print(json.dumps(_child(json.loads(a._one))))
        return
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    dtype = "bfloat16" if a.amp == "bf16" else "float16" if a.amp == "fp16" else "float32"
    peak = run_child({"kind": "peak", "device": device, "dtype_name": dtype})
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"{name}: {dtype} matmul peak {peak.get('tflops', '?')} TFLOP/s ({peak.get('n', '?')}^3)", flush=True)
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[a.grad_checkpointing]
    compiles = ["off", "on"] if a.compile == "both" else [a.compile]
    rows = []
    print(
        f"{'recipe':10} {'teacher':7} {'student':10} {'px':>5} {'batch':>5} {'ckpt':>5} {'compile':>7} {'attn':>5} "
        f"{'s/step':>8} {'img/s':>7} {'peak GB':>7} {'GFLOP/step':>10} {'TFLOP/s':>8} {'% peak':>6}"
    )
    configs = itertools.product(
        a.recipes.split(","),
        a.teachers.split(","),
        a.students.split(","),
        (int(s) for s in a.sizes.split(",")),
        ckpts,
        compiles,
        a.attention.split(","),
    )
    for recipe, teacher, student, size, ckpt, comp, attn in configs:
        spec = dict(
            kind="step",
            recipe=recipe,
            teacher=teacher,
            student=student,
            size=size,
            batch=a.batch_size,
            steps=a.steps,
            amp=a.amp,
            ckpt=ckpt,
            device=device,
            compile=comp,
            attention=attn,
            flops=not a.no_flops,
        )
        r = run_child(spec)
        head = f"{recipe:10} {teacher:7} {student:10} {size:>5} {a.batch_size:>5} {ckpt!s:>5} {comp:>7} {attn:>5}"
        if "error" in r:
            print(f"{head} failed: {r['error']}", flush=True)
            continue
        r["peak_fraction"] = round(r["tflops"] / peak["tflops"], 4) if r["tflops"] and "tflops" in peak else None
        rows.append(r)
        frac = None if r["peak_fraction"] is None else 100 * r["peak_fraction"]
        print(
            f"{head} {r['s_per_step']:>8.3f} {r['images_per_s']:>7.2f} {r['peak_gb']:>7.2f} "
            f"{_fmt(r['gflop_per_step'], '>10.0f')} {_fmt(r['tflops'], '>8.2f')} {_fmt(frac, '>6.1f')}",
            flush=True,
        )
    loaders = []
    if a.loader:
        for recipe, size in itertools.product(a.recipes.split(","), (int(s) for s in a.sizes.split(","))):
            lr = run_child(
                dict(
                    kind="loader",
                    recipe=recipe,
                    size=size,
                    batch=a.batch_size,
                    workers=a.workers,
                    device=device,
                    data=None if a.data is None else str(a.data),
                )
            )
            loaders.append(lr)
            steps = [x["images_per_s"] for x in rows if x["recipe"] == recipe and x["size"] == size]
            fastest = f" (fastest step: {max(steps):.2f} img/s)" if steps else ""
            print(
                f"loader {recipe} {size} px, batch {a.batch_size}, {a.workers} workers: "
                f"{lr.get('images_per_s', lr.get('error'))} images/s{fastest}",
                flush=True,
            )
    if a.json:
        a.json.write_text(json.dumps({"device": name, "peak": peak, "rows": rows, "loader": loaders}, indent=2))


if __name__ == "__main__":
    main()
