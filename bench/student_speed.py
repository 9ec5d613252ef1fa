"""Speed of the two students: timm's global-attention ViT-S/16 vs the windowed ``vit_s_win``.

Run by hand::

    python bench/student_speed.py [--size 1024] [--repeats 3] [--batch 1] [--threads N] [--json PATH]

For each student: parameters (M), forward GFLOPs at the size (``FlopCounterMode``, batch 1 by default), and the
median forward wall time (``inference_mode``, float32, after one warm-up), then the windowed/global ratios. Timed
runs alternate between the two models, so load from other processes on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cdkd.models.windowed_vit import WindowedViT  # noqa: E402


def build_students(size: int) -> dict[str, nn.Module]:
    """The global ViT-S exactly as cdkd's ``vit_s`` student is specified, and the windowed one."""
    torch.manual_seed(0)
    global_vit = VisionTransformer(
        img_size=size, patch_size=16, embed_dim=384, depth=12, num_heads=6, class_token=False,
        global_pool="avg", num_classes=0, dynamic_img_size=True,
    )
    return {"vit_s (global)": global_vit.eval(), "vit_s_win": WindowedViT(img_size=size).eval()}


def gflops(model: nn.Module, x: torch.Tensor) -> float:
    """Forward GFLOPs (a multiply-add counts 2) for input x."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() / 1e9


def time_forward(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Wall seconds per forward for each model: one warm-up each, then ``repeats`` rounds, interleaved."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return times


def run(size: int, repeats: int, batch: int) -> dict:
    """All measurements in one process; returns the JSON-able result."""
    if size % 16:
        raise SystemExit(f"--size {size} is not a multiple of the patch size 16")
    models = build_students(size)
    x = torch.randn(batch, 3, size, size)
    flops = {name: gflops(m, x[:1]) for name, m in models.items()}
    times = time_forward(models, x, repeats)
    rows = {
        name: {
            "params_m": sum(p.numel() for p in m.parameters()) / 1e6,
            "gflops": flops[name],
            "median_s": statistics.median(times[name]),
            "times_s": times[name],
        }
        for name, m in models.items()
    }
    g, w = rows["vit_s (global)"], rows["vit_s_win"]
    return {
        "size": size,
        "batch": batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "models": rows,
        "ratio_time": w["median_s"] / g["median_s"],
        "ratio_gflops": w["gflops"] / g["gflops"],
    }


def print_table(result: dict) -> None:
    print(
        f"{result['size']} px, batch {result['batch']}, float32, {result['threads']} threads, "
        f"median of {result['repeats']} (GFLOPs at batch 1)"
    )
    print(f"{'model':<16}{'params (M)':>12}{'GFLOPs':>10}{'time (s)':>10}")
    for name, r in result["models"].items():
        print(f"{name:<16}{r['params_m']:>12.2f}{r['gflops']:>10.1f}{r['median_s']:>10.3f}")
    print(f"{'win / global':<16}{'':>12}{result['ratio_gflops']:>10.2f}{result['ratio_time']:>10.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="square input side in px (multiple of 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.size, args.repeats, args.batch)
    print_table(result)
    if args.json:
        from cdkd.utils.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
