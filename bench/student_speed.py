"""Speed and memory of the students: global ViT-S/16, windowed ``vit_s_win`` and RS4D's state-space ``rsmamba_s``.

Run by hand::

    python bench/student_speed.py [--sizes 512,1024,2048] [--models vit_s,vit_s_win,rsmamba_s] [--repeats 3]
                                  [--batch 1] [--threads N] [--device cuda] [--json PATH]

For each size and student: parameters (M), forward GFLOPs (``FlopCounterMode`` on the meta device: matmuls,
convolutions and attention; for rsmamba the selective scan's elementwise work, which it does not see, is added analytically and shown
apart: 5 x L x d_inner x d_state per direction and block for the step products, the exponential and the
recurrence's multiply-add; the contraction with C is a matmul and already counted), the median forward wall time (``inference_mode``,
float32, after one warm-up; timed runs alternate between the models, so load from other processes hits all alike)
and the peak memory of one forward, measured in a fresh subprocess per (model, size): the process's peak RSS during
the forward (Linux's high-water mark, reset after the model is built) and the part of it the forward added on top
of the built model. Ratios are to ``vit_s`` at the same size.

With ``--device cuda`` the forwards run on the GPU under bf16 autocast (as ``cdkd segment`` runs them there), timed
with the device synchronised, and the memory columns are the CUDA allocator's peak during the forward instead.

``--segmenters 512,256`` adds the bare-model table a user picks a model from: tiles/s of each student + UPerNet with
those head widths (as ``cdkd finetune`` builds it: blocks 3, 6, 9, 12, 6 classes) at ``--seg-size`` px (1024), eager
and compiled (``--compile both``: the student's blocks compiled in place, one graph shared by all blocks of a kind,
plus the neck and the head; the rsmamba scan runs as its fused kernel behind a graph break), and on CUDA the eager
model replayed as CUDA graphs (``graphed``: what ``cdkd segment`` runs for a ``segmenter.pt``). Only the table is
printed with ``--segmenters-only``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from cdkd.models.student import build_student  # noqa: E402

LABELS = {"vit_s": "vit_s (global)"}


def build(name: str, size: int) -> nn.Module:
    """The student ``name`` exactly as cdkd builds it for ``size`` px tiles, in eval mode, seeded."""
    torch.manual_seed(0)
    return build_student(name, img_size=size).eval()


def gflops(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(counted, scan) forward GFLOPs for input x: what FlopCounterMode counts (a multiply-add = 2), and for a
    Mamba student the selective scan's elementwise operations it does not count.

    Counted on the meta device (shapes only, no memory: a 2048 px global attention map would need 6 GB) with
    attention forced onto its math path, whose matmuls the counter sees (it misses the fused CPU kernels).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    meta = copy.deepcopy(model).to("meta")
    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), counter:
        meta(torch.empty(x.shape, device="meta"))
    scan = 0.0
    blocks = getattr(model, "blocks", [])
    if blocks and hasattr(blocks[0], "mixer"):
        tokens = (x.shape[-2] // model.patch_size) * (x.shape[-1] // model.patch_size)
        mixer = blocks[0].mixer
        scan = 5.0 * tokens * mixer.d_inner * mixer.d_state * 2 * len(blocks) * x.shape[0]  # 2 directions
    return counter.get_total_flops() / 1e9, scan / 1e9


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Wall seconds per forward for each model: one warm-up each, then ``repeats`` rounds, interleaved."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode(), _autocast(x.device):
        for model in models.values():
            model(x)
        for _ in range(repeats):
            for name, model in models.items():
                _sync(x.device)
                start = time.perf_counter()
                model(x)
                _sync(x.device)
                times[name].append(time.perf_counter() - start)
    return times


def cuda_memory(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The CUDA allocator's peak (MB) during one forward, and what the forward added to the model's memory."""
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    with torch.inference_mode(), _autocast(x.device):
        model(x)
    peak = torch.cuda.max_memory_allocated(x.device)
    return {"peak_mb": round(peak / 2**20, 1), "forward_mb": round((peak - before) / 2**20, 1)}


def _status_mb(key: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process in MB, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory(name: str, size: int, batch: int, threads: int | None) -> dict[str, float]:
    """Peak RSS (MB) of a fresh process that builds ``name`` and runs one forward, and what the forward added."""
    spec = json.dumps({"name": name, "size": size, "batch": batch, "threads": threads})
    proc = subprocess.run([sys.executable, __file__, "--_memory", spec], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"peak_mb": float("nan"), "forward_mb": float("nan"), "error": err}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_child(spec: dict) -> None:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model = build(spec["name"], spec["size"])
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"])
    # Importing CUDA-enabled torch alone peaks at ~500 MB: reset the high-water mark so it covers the forward only.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mb("VmRSS")
    with torch.inference_mode():
        model(x)
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_mb": round(peak, 1), "forward_mb": round(peak - before, 1)}))


def run(sizes: list[int], names: list[str], repeats: int, batch: int, threads: int | None, device: str = "cpu") -> dict:
    """All measurements; returns the JSON-able result."""
    dev = torch.device(device)
    out = []
    for size in sizes:
        if size % 16:
            raise SystemExit(f"size {size} is not a multiple of the patch size 16")
        models = {name: build(name, size).to(dev) for name in names}
        x = torch.randn(batch, 3, size, size, device=dev)
        flops = {name: gflops(m.cpu(), x[:1].cpu()) for name, m in models.items()}
        models = {name: m.to(dev) for name, m in models.items()}
        times = time_forward(models, x, repeats)
        rows = {}
        for name, m in models.items():
            mem = cuda_memory(m, x) if dev.type == "cuda" else peak_memory(name, size, batch, threads)
            rows[name] = {
                "params_m": sum(p.numel() for p in m.parameters()) / 1e6,
                "gflops": sum(flops[name]),
                "gflops_scan": flops[name][1],
                "median_s": statistics.median(times[name]),
                "times_s": times[name],
                **mem,
            }
            print(
                f"  {size} px {name}: {rows[name]['median_s']:.2f} s, {rows[name]['peak_mb']:.0f} MB peak",
                file=sys.stderr,
                flush=True,
            )
        del models
        ref = rows.get("vit_s")
        for r in rows.values():
            r["time_vs_vit_s"] = r["median_s"] / ref["median_s"] if ref else float("nan")
        out.append({"size": size, "models": rows})
    return {
        "batch": batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "machine": platform.processor() or platform.machine(),
        "load_avg": os.getloadavg(),
        "sizes": out,
    }


def build_segmenter(name: str, size: int, channels: int) -> nn.Module:
    """``name`` + UPerNet of ``channels`` channels on blocks 3, 6, 9, 12, 6 classes, eval mode, seeded."""
    from cdkd.models.upernet import Segmenter

    return Segmenter(build(name, size), 6, channels=channels).eval()


def compile_segmenter(model: nn.Module) -> nn.Module:
    """Regional compilation: the encoder's blocks in place (one graph per kind of block), then neck and head."""
    from cdkd.models.speedups import compile_blocks

    compile_blocks(model.encoder)
    model.neck.compile()
    model.head.compile()
    return model


def graphed_segmenter(model: nn.Module) -> Any:
    """``model``'s forward as ``cdkd segment`` runs a ``segmenter.pt`` on CUDA: bf16, replayed as CUDA graphs."""
    from cdkd.inference.cudagraph import GraphedForward

    def forward(t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return model(t).float()

    return GraphedForward(forward)


def segmenter_table(
    names: list[str],
    channels: list[int],
    size: int,
    batch: int,
    repeats: int,
    device: str,
    compiles: list[bool],
    progress=None,
) -> list[dict]:
    """tiles/s of every student x head width, eager and/or compiled (each its own freshly built model);
    ``progress(rows)`` is called after every row (to save what is done when a time limit cuts the run short)."""
    dev = torch.device(device)
    x = torch.randn(batch, 3, size, size, device=dev)
    rows = []
    for name in names:
        for ch in channels:
            row = {"model": name, "channels": ch, "size": size, "batch": batch}
            for compiled in compiles:
                model = build_segmenter(name, size, ch).to(dev)
                start = time.perf_counter()
                if compiled:
                    compile_segmenter(model)
                with torch.inference_mode(), _autocast(dev):
                    model(x)  # warm-up (and compilation)
                    model(x)
                warm = time.perf_counter() - start
                t = statistics.median(time_forward({name: model}, x, repeats)[name])
                key = "compiled" if compiled else "eager"
                row[f"{key}_tiles_s"] = batch / t
                row[f"{key}_warmup_s"] = warm
                print(
                    f"  {size} px {name} + UPerNet {ch} {key}: {batch / t:.1f} tiles/s (warm-up {warm:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                if dev.type == "cuda" and not compiled:  # the eager model as the torch runtime replays it
                    graphed = graphed_segmenter(model)
                    t = statistics.median(time_forward({name: graphed}, x, repeats)[name])
                    row["graphed_tiles_s"] = batch / t
                    print(f"  {size} px {name} + UPerNet {ch} graphed: {batch / t:.1f} tiles/s", file=sys.stderr)
                    del graphed
                del model
            rows.append(row)
            _relative(rows)
            if progress is not None:
                progress(rows)
    return rows


def _relative(rows: list[dict]) -> None:
    """Each row's tiles/s over vit_s's with the same head width."""
    for r in rows:
        ref = next((x for x in rows if x["model"] == "vit_s" and x["channels"] == r["channels"]), None)
        for key in ("eager", "compiled", "graphed"):
            if ref and f"{key}_tiles_s" in r and f"{key}_tiles_s" in ref:
                r[f"{key}_vs_vit_s"] = r[f"{key}_tiles_s"] / ref[f"{key}_tiles_s"]


def print_segmenter_table(rows: list[dict], where: str) -> None:
    if not rows:
        return
    r0 = rows[0]
    print(f"student + UPerNet at {r0['size']} px, batch {r0['batch']}, {where}: tiles/s (x vit_s with the same head)")
    header = f"{'model':<12}{'head ch':>8}{'eager':>10}{'graphed':>10}{'compiled':>10}{'compiled/eager':>16}"
    print(f"{header}{'x vit_s':>9}")
    for r in rows:
        eager, comp, graphed = r.get("eager_tiles_s"), r.get("compiled_tiles_s"), r.get("graphed_tiles_s")
        ratio = f"{comp / eager:.2f}" if eager and comp else "-"
        rel = r.get("compiled_vs_vit_s", r.get("eager_vs_vit_s"))
        print(
            f"{r['model']:<12}{r['channels']:>8}{_num(eager):>10}{_num(graphed):>10}{_num(comp):>10}{ratio:>16}"
            f"{'-' if rel is None else f'{rel:.2f}':>9}"
        )


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_table(result: dict) -> None:
    where = (
        f"{result['device']}, bf16 autocast"
        if result.get("device", "cpu") != "cpu"
        else f"float32, {result['threads']} threads"
    )
    print(
        f"batch {result['batch']}, {where}, median of {result['repeats']} "
        f"(GFLOPs at batch 1; load average at the end {result['load_avg'][0]:.1f})"
    )
    print(
        f"{'px':>5} {'model':<16}{'params (M)':>11}{'GFLOPs':>9}{'(scan)':>8}{'time (s)':>10}{'x vit_s':>9}"
        f"{'peak MB':>9}{'fwd MB':>8}"
    )
    for block in result["sizes"]:
        for name, r in block["models"].items():
            scan = f"{r['gflops_scan']:.1f}" if r["gflops_scan"] else ""
            print(
                f"{block['size']:>5} {LABELS.get(name, name):<16}{r['params_m']:>11.2f}{r['gflops']:>9.1f}{scan:>8}"
                f"{r['median_s']:>10.3f}{r['time_vs_vit_s']:>9.2f}{r['peak_mb']:>9.0f}{r['forward_mb']:>8.0f}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024,2048", help="square input sides in px (multiples of 16)")
    parser.add_argument("--models", default="vit_s,vit_s_win,rsmamba_s", help="registered students to compare")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast, CUDA allocator peaks)")
    parser.add_argument(
        "--segmenters",
        default="",
        help="UPerNet head widths for the student + UPerNet table, e.g. 512,256 (empty: no table)",
    )
    parser.add_argument("--seg-size", type=int, default=1024, help="tile side of the student + UPerNet table")
    parser.add_argument(
        "--compile",
        default="off",
        choices=["off", "on", "both"],
        help="student + UPerNet table: eager, compiled or both",
    )
    parser.add_argument("--segmenters-only", action="store_true", help="skip the per-student table")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory:
        _memory_child(json.loads(args._memory))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",")
    result: dict = {}
    if not args.segmenters_only:
        sizes = [int(s) for s in args.sizes.split(",")]
        result = run(sizes, names, args.repeats, args.batch, args.threads, args.device)
        print_table(result)
    if args.segmenters:
        compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        dev = torch.device(args.device)
        where = (
            f"{torch.cuda.get_device_name(dev)}, bf16 autocast"
            if dev.type == "cuda"
            else f"cpu float32, {torch.get_num_threads()} threads"
        )

        def save(rows: list[dict]) -> None:
            result["segmenters"] = {"where": where, "rows": rows}
            _save(args.json, result)

        rows = segmenter_table(
            names,
            [int(c) for c in args.segmenters.split(",")],
            args.seg_size,
            args.batch,
            args.repeats,
            args.device,
            compiles,
            progress=save,
        )
        print_segmenter_table(rows, where)
        result["segmenters"] = {"where": where, "rows": rows}
    _save(args.json, result)


def _save(path: Path | None, result: dict) -> None:
    if path is not None:
        from cdkd.utils.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
