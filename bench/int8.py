"""INT8 on the CPU: speed of INT8 and float32 ONNX Runtime against PyTorch float32 and bf16, and how closely INT8
class maps follow float32 ones.

    python bench/int8.py speed --calib DIR [--archs vit_s,vit_s_win,rsmamba_s] [--tiles 512,1024] [--repeats 3]
    python bench/int8.py session --calib DIR [--arch vit_s] [--tile 512] [--repeats 3] [--keep-float 'none;attention']
    python bench/int8.py accuracy --segmenter segmenter.pt --calib DIR [--scenes a.tif,b.tif] [--generated 1024]
        [--labeled DIR --format dubai --split 'tile[7-8]'] [--methods minmax,entropy,percentile] [--keep-float ...]

speed: each student + UPerNet 512 with random weights (time does not depend on them), exported and quantized as
``cdkd export --int8`` does (``--calib`` images, min-max); one tile, batch 1, through the runtimes the scene
engine opens (ONNX Runtime with cdkd's session options, PyTorch float32 and bf16 autocast). In every repeat the
runtimes take turns, so load from other processes falls on all alike; medians, and ratios to ONNX Runtime float32.

session: the effect of each ONNX Runtime session option cdkd sets, one changed at a time, float32 and INT8; with
``--keep-float``, the speed of INT8 models that keep other parts in float32.

accuracy: a trained ``segmenter.pt`` exported to float32 and to INT8 with each calibration method; the held-out
check of each export, the fraction of valid pixels whose class agrees with float32 on whole scenes segmented by
the scene engine (real ones and a generated landscape), PyTorch bf16 beside them, and with ``--labeled`` mIoU/OA
of every model (``cdkd evaluate``'s sliding windows).

Prints Markdown tables headed by the date, the CPU model and the load (docs/int8.md holds a run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RUNTIMES = ("onnx fp32", "onnx int8", "torch fp32", "torch bf16")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def header(title: str) -> None:
    import onnxruntime
    import torch

    from cdkd.inference.runtimes import cpu_bf16_supported, physical_cores

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    isa = ", ".join(f for f in ("avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16") if f" {f}" in flags)
    print(f"## {title}\n")
    print(
        f"{datetime.date.today()}, {cpu_model()}, {physical_cores()} cores ({isa or 'no VNNI/BF16'}; torch bf16 "
        f"native: {cpu_bf16_supported()}), load {os.getloadavg()[0]:.1f} at start, onnxruntime "
        f"{onnxruntime.__version__}, torch {torch.__version__}\n"
    )


def make_segmenter(arch: str, tile: int, path: Path) -> Path:
    """A random-weight ``arch`` + UPerNet 512, 6 Dubai classes, saved the way ``cdkd finetune`` saves one."""
    import torch

    from cdkd.artifacts import SegmenterInfo, StudentInfo, save_segmenter
    from cdkd.data.classes import BUILTIN_SCHEMAS
    from cdkd.data.stats import NormStats
    from cdkd.models.student import build_student
    from cdkd.models.upernet import Segmenter

    torch.manual_seed(0)
    schema = BUILTIN_SCHEMAS["dubai"]
    args = dict(img_size=tile, in_chans=3)
    encoder = build_student(arch, **args)
    # the finetune default taps blocks 3, 6, 9, 12; a smaller test student gets four evenly spaced ones
    layers = (3, 6, 9, 12) if encoder.depth >= 12 else tuple(encoder.depth * i // 4 for i in (1, 2, 3, 4))
    model = Segmenter(encoder, schema.num_classes, layers=layers)
    # RSSCN7-like statistics: the calibration tiles come out near zero mean, unit spread
    norm = NormStats(mean=(95.0, 100.0, 90.0), std=(50.0,) * 3, bands=(1, 2, 3), dtype="uint8")
    info = SegmenterInfo(
        student=StudentInfo(arch, args, norm, {"teacher": "none (bench)"}),
        head=model.config(),
        classes=schema,
        tile_size=tile,
        overlap=tile // 8,
    )
    save_segmenter(path, model.eval(), info)
    return path


def timed(runtimes: dict[str, object], x: np.ndarray, repeats: int) -> dict[str, float]:
    """Median seconds of one call of each runtime on ``x``, the runtimes taking turns in each repeat."""
    times: dict[str, list[float]] = {k: [] for k in runtimes}
    for rt in runtimes.values():
        rt(x)  # warm-up: kernels chosen, buffers planned
    for _ in range(repeats):
        for name, rt in runtimes.items():
            t = time.perf_counter()
            rt(x)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def keep_label(keep: tuple[str, ...] | None) -> str:
    from cdkd.export.quantize import DEFAULT_KEEP_FLOAT

    keep = DEFAULT_KEEP_FLOAT if keep is None else keep
    return "+".join(keep) if keep else "none"


def export_pair(
    seg: Path,
    tmp: Path,
    calib: Path,
    method: str = "minmax",
    calib_tiles: int = 8,
    check_tiles: int = 2,
    min_agreement: float = 0.0,
    keep: tuple[str, ...] | None = None,
) -> tuple[Path, object]:
    """The float32 export of ``seg`` and its INT8 model (``cdkd export --int8``'s path; ``keep``: the parts left
    float, None for cdkd's default); (float path, int8 report)."""
    from cdkd.export import export_onnx
    from cdkd.export.quantize import DEFAULT_KEEP_FLOAT, QuantizeOptions, export_int8

    fp32 = tmp / "model.onnx"
    if not fp32.exists():
        export_onnx(seg, fp32, check_tiles=1)
    options = QuantizeOptions(
        method=method,
        calib_tiles=calib_tiles,
        check_tiles=check_tiles,
        min_agreement=min_agreement,
        keep_float=DEFAULT_KEEP_FLOAT if keep is None else keep,
    )
    out = tmp / f"model.int8.{method}.{keep_label(keep)}.onnx"
    return fp32, export_int8(fp32, out, calib, options=options)


def speed(args: argparse.Namespace) -> None:
    from cdkd.inference.runtimes import OnnxRuntime, TorchRuntime, cpu_bf16_supported

    header("Throughput, one tile (batch 1)")
    rows = []
    for tile in args.tiles:
        for arch in args.archs:
            with tempfile.TemporaryDirectory(prefix="cdkd-bench-int8-") as tmp:
                tmp = Path(tmp)
                seg = make_segmenter(arch, tile, tmp / "segmenter.pt")
                t0 = time.perf_counter()
                fp32, int8 = export_pair(seg, tmp, args.calib, calib_tiles=args.calib_tiles)
                export_s = time.perf_counter() - t0
                runtimes = {
                    "onnx fp32": OnnxRuntime(fp32, device="cpu"),
                    "onnx int8": OnnxRuntime(int8.onnx, device="cpu"),
                    "torch fp32": TorchRuntime(seg, device="cpu", amp="none"),
                }
                if cpu_bf16_supported():
                    runtimes["torch bf16"] = TorchRuntime(seg, device="cpu", amp="bf16")
                x = np.random.default_rng(0).normal(size=(1, 3, tile, tile)).astype(np.float32)
                t = timed(runtimes, x, args.repeats)
                rows.append((arch, tile, t, os.getloadavg()[0], export_s, int8.size_bytes / int8.float_size_bytes))
                print(f"  {arch} {tile}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()), flush=True)
                del runtimes
    print(
        "\n| student + UPerNet 512 | tile | "
        + " | ".join(f"{r} s/tile" for r in RUNTIMES)
        + " | INT8 / ORT fp32 | ORT fp32 / torch fp32 | bf16 / torch fp32 | INT8 size | load |"
    )
    print("|---|---|" + "---|" * (len(RUNTIMES) + 5))
    for arch, tile, t, load, _, size in rows:
        cells = " | ".join(f"{t[r]:.2f}" if r in t else "-" for r in RUNTIMES)
        bf16 = f"{t['torch fp32'] / t['torch bf16']:.2f}x" if "torch bf16" in t else "-"
        print(
            f"| {arch} | {tile} | {cells} | **{t['onnx fp32'] / t['onnx int8']:.2f}x** | "
            f"{t['torch fp32'] / t['onnx fp32']:.2f}x | {bf16} | {100 * size:.0f} % | {load:.1f} |"
        )
    print("\n(ratios are speed-ups: the left runtime's time over the right one's; INT8 size: of the float32 file)")


def session(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    from cdkd.inference.runtimes import onnx_session_options, physical_cores

    header(f"ONNX Runtime session options ({args.arch} + UPerNet 512, {args.tile} px)")
    variants = {
        "cdkd (threads = physical cores, ORT_ENABLE_ALL, memory pattern)": {},
        "ORT_ENABLE_EXTENDED": {"graph_optimization_level": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED},
        "ORT_ENABLE_BASIC": {"graph_optimization_level": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC},
        "no memory pattern": {"enable_mem_pattern": False},
        "1 thread": {"intra_op_num_threads": 1},
        f"{2 * physical_cores()} threads": {"intra_op_num_threads": 2 * physical_cores()},
        "no spinning": {"spin": "0"},
    }
    with tempfile.TemporaryDirectory(prefix="cdkd-bench-int8-") as tmp:
        tmp = Path(tmp)
        seg = make_segmenter(args.arch, args.tile, tmp / "segmenter.pt")
        fp32, int8 = export_pair(seg, tmp, args.calib, calib_tiles=args.calib_tiles)
        x = np.random.default_rng(0).normal(size=(1, 3, args.tile, args.tile)).astype(np.float32)
        results = {}
        for label, path in (("float32", fp32), ("INT8", Path(int8.onnx))):
            sessions = {}
            for name, change in variants.items():
                options = onnx_session_options()
                for key, value in change.items():
                    if key == "spin":
                        options.add_session_config_entry("session.intra_op.allow_spinning", value)
                    else:
                        setattr(options, key, value)
                s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                sessions[name] = lambda batch, s=s: s.run(None, {"image": batch})
            results[label] = timed(sessions, x, args.repeats)
    print("| session options | float32 s/tile | vs cdkd | INT8 s/tile | vs cdkd |")
    print("|---|---|---|---|---|")
    base = {k: next(iter(v.values())) for k, v in results.items()}
    for name in variants:
        f, q = results["float32"][name], results["INT8"][name]
        print(f"| {name} | {f:.2f} | {f / base['float32']:.2f} | {q:.2f} | {q / base['INT8']:.2f} |")
    print(f"\n(vs cdkd: time relative to cdkd's options, > 1 is slower; load {os.getloadavg()[0]:.1f} at the end)")
    if args.keep_float:
        from cdkd.inference.runtimes import OnnxRuntime

        with tempfile.TemporaryDirectory(prefix="cdkd-bench-int8-") as tmp:
            tmp = Path(tmp)
            seg = make_segmenter(args.arch, args.tile, tmp / "segmenter.pt")
            runtimes = {}
            for keep in args.keep_float:
                fp32, rep = export_pair(seg, tmp, args.calib, calib_tiles=args.calib_tiles, keep=keep)
                runtimes["float32"] = OnnxRuntime(fp32, device="cpu")
                runtimes[f"INT8, float: {keep_label(keep)}"] = OnnxRuntime(rep.onnx, device="cpu")
            t = timed(runtimes, x, args.repeats)
        print("\n| model | s/tile | speed-up over float32 |")
        print("|---|---|---|")
        for name, v in t.items():
            print(f"| {name} | {v:.2f} | {t['float32'] / v:.2f}x |")


def _classes(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read(1)


def _generated(size: int, path: Path) -> Path:
    """The demo's synthetic landscape as an RGB GeoTIFF (10 m UTM pixels)."""
    import rasterio
    from rasterio.transform import Affine

    from cdkd.demo.landscape import make_landscape

    image, _ = make_landscape(size, size, seed=3)
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=Affine(10, 0, 500_000, 0, -10, 5_000_000),
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image)
    return path


def accuracy(args: argparse.Namespace) -> None:
    from cdkd.data.classraster import NODATA
    from cdkd.errors import CdkdError
    from cdkd.inference.runtimes import OnnxRuntime, TorchRuntime, cpu_bf16_supported
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene

    header(f"INT8 against float32: {args.segmenter}")
    with tempfile.TemporaryDirectory(prefix="cdkd-bench-int8-") as tmp:
        tmp = Path(tmp)
        models: dict[str, tuple[str, object]] = {}
        checks = []
        fp32 = None
        for method in args.methods:
            for keep in args.keep_float or [None]:
                fp32, rep = export_pair(
                    args.segmenter,
                    tmp,
                    args.calib,
                    method=method,
                    calib_tiles=args.calib_tiles,
                    check_tiles=args.check_tiles,
                    keep=keep,
                )
                name = f"int8 {method}" + (f" (float: {keep_label(keep)})" if args.keep_float else "")
                models[name] = (rep.onnx, "onnx")
                checks.append((name, rep))
        open_fp32 = {"onnx fp32": (str(fp32), "onnx"), "torch fp32": (str(args.segmenter), "none")}
        if cpu_bf16_supported():
            models["torch bf16"] = (str(args.segmenter), "bf16")

        def runtime(path: str, how: str):
            return OnnxRuntime(path, device="cpu") if how == "onnx" else TorchRuntime(path, device="cpu", amp=how)

        print("| INT8 model | held-out tiles: class agreement with float32 | max abs logit difference | export s |")
        print("|---|---|---|---|")
        for name, rep in checks:
            print(
                f"| {name} | {100 * rep.parity.agreement:.2f} % | {rep.parity.max_abs_diff:.2f} | {rep.seconds:.0f} |",
                flush=True,
            )

        scenes = list(args.scenes) + ([_generated(args.generated, tmp / "generated.tif")] if args.generated else [])
        rows = []
        for scene in scenes:
            maps = {}
            for name, (path, how) in {"onnx fp32": open_fp32["onnx fp32"], **models}.items():
                out = tmp / f"{Path(scene).stem}.{name.replace(' ', '_')}.tif"
                try:
                    segment_scene(scene, runtime(path, how), out, SegmentOptions(progress=False), log=lambda m: None)
                except CdkdError as e:  # a scene the model cannot read (bands, dtype): say so and go on
                    print(f"  {Path(scene).name}: skipped ({str(e).splitlines()[0]})")
                    break
                maps[name] = _classes(out)
            if "onnx fp32" not in maps or len(maps) < 1 + len(models):
                continue
            valid = maps["onnx fp32"] != NODATA
            rows.append(
                (
                    Path(scene).name,
                    int(valid.sum()),
                    {
                        k: float((v[valid] == maps["onnx fp32"][valid]).mean())
                        for k, v in maps.items()
                        if k != "onnx fp32"
                    },
                )
            )
        if rows:
            print("\n| scene | valid pixels | " + " | ".join(f"{k} vs fp32" for k in models) + " |")
            print("|---|---|" + "---|" * len(models))
            for name, n, agree in rows:
                print(f"| {name} | {n} | " + " | ".join(f"{100 * agree[k]:.2f} %" for k in models) + " |")

        if args.labeled is not None:
            from cdkd.evaluation.semantic import evaluate

            print("\n| model | mIoU | OA | mF1 | mIoU - float32 |")
            print("|---|---|---|---|---|")
            base = None
            for name, (path, how) in {**open_fp32, **models}.items():
                kind = "onnx" if how == "onnx" else "torch"
                res = evaluate(
                    path,
                    args.labeled,
                    args.format,
                    tmp / f"eval_{name.replace(' ', '_')}",
                    split=args.split,
                    runtime=kind,
                    device="cpu",
                    amp=how if kind == "torch" else "none",
                    progress=False,
                )
                m = res.metrics
                base = m.miou if base is None else base
                print(
                    f"| {name} | {100 * m.miou:.2f} | {100 * m.oa:.2f} | {100 * m.mf1:.2f} | "
                    f"{100 * (m.miou - base):+.2f} |",
                    flush=True,
                )
    print(f"\n(load {os.getloadavg()[0]:.1f} at the end)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)

    def words(text: str) -> list[str]:
        return [w for w in text.replace(",", " ").split() if w]

    def keep_sets(text: str) -> list[tuple[str, ...]]:  # "patch_embed,attention;none" -> [(...), ()]
        return [tuple(w for w in words(part) if w != "none") for part in text.split(";")]

    for name in ("speed", "session", "accuracy"):
        p = sub.add_parser(name)
        p.add_argument("--calib", type=Path, required=True, help="folder of real images to calibrate on")
        p.add_argument("--calib-tiles", type=int, default=8 if name != "accuracy" else 32)
        p.add_argument("--repeats", type=int, default=3)
        if name == "speed":
            p.add_argument("--archs", type=words, default=["vit_s", "vit_s_win", "rsmamba_s"])
            p.add_argument("--tiles", type=lambda t: [int(v) for v in words(t)], default=[512, 1024])
        elif name == "session":
            p.add_argument("--arch", default="vit_s")
            p.add_argument("--tile", type=int, default=512)
            p.add_argument(
                "--keep-float",
                type=keep_sets,
                help="also time INT8 models keeping these parts float, "
                "e.g. 'none;attention;patch_embed,attention,classifier'",
            )
        else:
            p.add_argument("--segmenter", type=Path, required=True)
            p.add_argument("--check-tiles", type=int, default=16)
            p.add_argument("--methods", type=words, default=["minmax", "entropy", "percentile"])
            p.add_argument(
                "--keep-float",
                type=keep_sets,
                help="INT8 variants keeping these parts float (each "
                "with every method), e.g. 'none;attention'; default: cdkd's",
            )
            p.add_argument("--scenes", type=lambda t: [Path(w) for w in words(t)], default=[])
            p.add_argument("--generated", type=int, default=0, help="side of a generated landscape scene, px")
            p.add_argument("--labeled", type=Path)
            p.add_argument("--format", default="dubai")
            p.add_argument("--split", type=words)
    args = ap.parse_args(argv)
    {"speed": speed, "session": session, "accuracy": accuracy}[args.what](args)


if __name__ == "__main__":
    main()
