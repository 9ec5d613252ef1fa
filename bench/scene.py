"""Scene engine: throughput of ``segment_scene`` per runtime, and its peak memory as scenes grow, vs a baseline.

Run by hand::

    python bench/scene.py                                     # ~10 min on 2 CPU cores
    python bench/scene.py --model-size full --repeats 1 --parts throughput      # vit_s + UPerNet 512 at 1024 px
    python bench/scene.py --base naip_4band.tif --bands 1,2,3 --factors 1,4,16,64 --workdir /tmp/scene-bench
    python bench/scene.py --parts memory --gdal-cachemax 16MB  # the engine with GDAL's block cache bounded

1. Throughput: Mpx/s and km²/h of ``segment_scene`` (read, normalise, run, blend, write the COG) with the PyTorch
   runtime (``segmenter.pt``) and ONNX Runtime (the same model exported to ``.onnx``), on the CPU, plus CUDA
   variants where a GPU (and onnxruntime's CUDA provider) is present. ``--model-size small`` (default): the real
   vit_s encoder at 256 px tiles with a 128-channel UPerNet; ``full``: vit_s + UPerNet 512 at 1024 px tiles as
   users run it. Random weights: speed does not depend on them.
2. Memory: peak RSS of ``segment_scene`` on mosaics of 1x, 4x, 16x ... the base scene's area, against the
   baseline most tools implement: read the whole scene, normalise, ``sliding_window_logits`` (a (K, H, W)
   float32 logit sum in memory), argmax, write a GeoTIFF. Same model (tiny by default, so its weights do not
   dominate RSS), tile and overlap.

3. Ceiling (``--parts ceiling``): tiles/s of the engine itself with a model that costs nothing (precomputed
   logits, K=6, 1024 px tiles, overlap 64, batch 4) on the base tiled to 8192 x 8192, next to plain windowed reads
   of the same windows, and whether the output is a valid COG (rio-cogeo).
4. Overhead (``--parts overhead``): the real model (vit_s + UPerNet 512, 1024 px) through the engine vs the bare
   model on the same number of tiles (``Runtime.forward`` on batches already in memory): engine / model time.
   ``--device cuda`` measures it on a GPU (bf16 autocast, as ``cdkd segment`` runs).
5. Scale-out (``--parts scaleout``): one 16384 x 16384 scene on a dask ``LocalCluster`` of 1 and then 2
   single-threaded worker processes (``segment_scene_on_cluster``), speed-up, output equality, peak RSS per worker.
6. Seams (``--parts seams``): the seam index (``blend.seam_index``: class changes across window edges over the
   mean) of an untrained tiny segmenter (512 px tiles, overlap 64) on the base tiled 4 x 4.

Every measurement runs in a fresh subprocess that reports its own peak RSS (VmHWM; ``_peak_mb`` says why not
``ru_maxrss``; RUSAGE_CHILDREN in the parent would give the largest child so far, not each child's). Throughput
runs alternate between runtimes, so load from other processes on the machine hits them alike. Mosaics are the base tiled n x n with windowed writes into a
DEFLATE-tiled GeoTIFF (same CRS, centred on the base) in a temporary folder or ``--workdir``, never the repo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
SHARED_DATA = Path(os.environ.get("CDKD_SHARED_DATA", REPO.parent / "shared" / "data"))

# Segmenters built here: vit_s variants + UPerNet, written as cdkd finetune writes segmenter.pt.
MODELS = {
    "tiny": {
        "student": {"embed_dim": 48, "depth": 4, "num_heads": 2},
        "layers": (1, 2, 3, 4),
        "channels": 32,
        "tile": 256,
        "what": "vit_s shrunk to embed 48, depth 4 (the tests' fixture) + UPerNet 32 ch",
    },
    "small": {
        "student": {},
        "layers": (3, 6, 9, 12),
        "channels": 128,
        "tile": 256,
        "what": "vit_s (embed 384, depth 12) + UPerNet 128 ch",
    },
    "full": {
        "student": {},
        "layers": (3, 6, 9, 12),
        "channels": 512,
        "tile": 1024,
        "what": "vit_s (embed 384, depth 12) + UPerNet 512 ch, as cdkd finetune builds it",
    },
}
SCHEMA = "dubai"
BLOCK = 512


# ---------------------------------------------------------------------------------------------------- set-up


def build_segmenter(
    path: Path, size: str, tile: int, bands: tuple[int, ...], dtype: str, overlap: int | None = None
) -> dict:
    """Write a seeded random ``segmenter.pt`` of the ``MODELS[size]`` recipe; returns its description."""
    import torch

    from cdkd.artifacts import SegmenterInfo, StudentInfo, save_segmenter
    from cdkd.data.classes import BUILTIN_SCHEMAS
    from cdkd.data.stats import NormStats
    from cdkd.models.student import build_student
    from cdkd.models.upernet import Segmenter

    spec = MODELS[size]
    schema = BUILTIN_SCHEMAS[SCHEMA]
    norm = NormStats(mean=(110.0,) * len(bands), std=(50.0,) * len(bands), bands=bands, dtype=dtype)
    torch.manual_seed(0)
    arch_args = dict(spec["student"], img_size=tile, in_chans=len(bands))
    model = Segmenter(
        build_student("vit_s", **arch_args), schema.num_classes, layers=spec["layers"], channels=spec["channels"]
    )
    student = StudentInfo("vit_s", arch_args, norm, {"teacher": "none (bench/scene.py, random weights)"})
    overlap = tile // 4 if overlap is None else overlap
    info = SegmenterInfo(student=student, head=model.config(), classes=schema, tile_size=tile, overlap=overlap)
    save_segmenter(path, model.eval(), info)
    params = sum(p.numel() for p in model.parameters())
    return {
        "size": size,
        "what": spec["what"],
        "path": str(path),
        "tile": tile,
        "overlap": overlap,
        "classes": schema.num_classes,
        "params_m": params / 1e6,
        "weights_mb": params * 4 / 2**20,
    }


def export_onnx_model(pt: Path, out: Path) -> str:
    """``pt`` as a dynamic-batch ``.onnx`` with cdkd's metadata; returns how it was exported."""
    try:
        from cdkd.export.onnx import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        # As `cdkd export` writes it. Random weights give near-tied logits, so the exporter's argmax parity check
        # is reported, not enforced.
        report = export_onnx(pt, out, dynamic_batch=True, check_tiles=1, min_agreement=0.0, overwrite=True)
        return f"cdkd.export.export_onnx (opset {report.opset}, dynamic batch; {report.parity.summary()})"
    # Fallback for checkouts without cdkd.export. Unlike it, this keeps timm's per-call bicubic resampling of the
    # position embedding in the graph (a little slower in ONNX Runtime).
    import onnx
    import torch

    from cdkd.artifacts import ONNX_METADATA_KEY, load_segmenter

    model, info = load_segmenter(pt)
    meta = info.inference_meta()
    example = torch.zeros(2, meta.in_chans, meta.tile_size, meta.tile_size)  # batch 1 would be specialised
    program = torch.onnx.export(
        model,
        (example,),
        input_names=["image"],
        output_names=["logits"],
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        external_data=False,
        verbose=False,
    )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, meta.to_json()
    onnx.save(proto, str(out))
    return "torch.onnx.export(dynamo=True) in this bench (cdkd.export not importable), dynamic batch"


def build_mosaic(base: Path, rows: int, cols: int, out: Path) -> Path:
    """The base scene tiled ``rows`` x ``cols`` into a DEFLATE-tiled GeoTIFF centred on the base, written window by
    window (nodata, and an internal mask if the base has one, carried over); only one base copy is in memory."""
    import rasterio
    from rasterio.enums import MaskFlags
    from rasterio.transform import Affine
    from rasterio.windows import Window

    with rasterio.open(base) as src:
        data = src.read()
        flags = src.mask_flag_enums[0]
        internal_mask = MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags
        mask = src.dataset_mask() if internal_mask else None
        w, h = src.width, src.height
        shift = Affine.translation(-(cols - 1) * w / 2, -(rows - 1) * h / 2)  # keep the base's centre (latitude)
        profile = {
            "driver": "GTiff",
            "width": w * cols,
            "height": h * rows,
            "count": src.count,
            "dtype": src.dtypes[0],
            "crs": src.crs,
            "transform": src.transform * shift,
            "nodata": src.nodata,
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "compress": "deflate",
            "interleave": "pixel",
            "BIGTIFF": "IF_SAFER",
        }
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(out, "w", **profile) as dst:
        for i in range(rows):
            for j in range(cols):
                window = Window(j * w, i * h, w, h)
                dst.write(data, window=window)
                if mask is not None:
                    dst.write_mask(mask, window=window)
    return out


def synthetic_base(path: Path, size: int = 1024) -> Path:
    """A 1024 x 1024 RGB uint8 GeoTIFF with land-cover-like structure (smooth fields, blobs, noise), EPSG:32633."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    bands = []
    for _ in range(3):
        band = 0.5 + 0.25 * np.sin(rng.uniform(3, 15) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(3, 15) * yy)
        for _ in range(12):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.02, 0.1)
            band += rng.uniform(-0.3, 0.3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        bands.append(np.clip(band + rng.normal(0, 0.03, band.shape), 0.02, 0.98))
    data = np.round(np.stack(bands) * 255).astype(np.uint8)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500_000, 5_000_000, 0.5, 0.5),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
    ) as dst:
        dst.write(data)
    return path


def scene_facts(path: Path) -> dict:
    import rasterio

    with rasterio.open(path) as src:
        res = abs(src.transform.a)
        return {
            "width": src.width,
            "height": src.height,
            "count": src.count,
            "dtype": src.dtypes[0],
            "crs": src.crs.to_string(),
            "res": res,
        }


def ground_km2(path: Path) -> float | None:
    """The scene footprint's area on the WGS84 ellipsoid (km²), to check the engine's; None without pyproj."""
    try:
        from pyproj import Geod
    except ImportError:
        return None
    import rasterio
    from rasterio.warp import transform

    with rasterio.open(path) as src:
        w, h, t = src.width, src.height, src.transform
        edge = np.linspace(0, 1, 65)[:-1]  # 64 points per side: curved edges in geographic coordinates
        cols = np.concatenate([edge * w, np.full(64, w), (1 - edge) * w, np.zeros(64)])
        rows = np.concatenate([np.zeros(64), edge * h, np.full(64, h), (1 - edge) * h])
        xs, ys = t * (cols, rows)
        lon, lat = transform(src.crs, "EPSG:4326", xs, ys)
    area, _ = Geod(ellps="WGS84").polygon_area_perimeter(lon, lat)
    return abs(area) / 1e6


# ---------------------------------------------------------------------------------------------------- child jobs


def _peak_mb() -> float:
    """This process's peak RSS so far in MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's memory since its exec. Not
    ``ru_maxrss``: Linux carries the parent's peak over fork + exec into the child's ru_maxrss, so a child of a
    large parent would report the parent's peak. Elsewhere ru_maxrss (KiB; bytes on macOS) is all there is.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _set_threads(threads: int | None) -> None:
    """torch's intra-op threads (onnxruntime gets ``threads`` through ``open_runtime``)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def job_throughput(
    model: str, scene: str, out: str, runtime: str, device: str, batch: int, bands: list[int], threads: int | None
) -> dict:
    """One warm-up batch, then one timed ``segment_scene``."""
    from cdkd.inference.runtimes import open_runtime
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene

    _set_threads(threads)
    rt = open_runtime(model, runtime=runtime, device=device, threads=threads)
    t = rt.meta.tile_size
    rt(np.zeros((batch, rt.meta.in_chans, t, t), np.float32))
    report = segment_scene(
        scene, rt, out, SegmentOptions(batch_size=batch, bands=tuple(bands), overwrite=True, progress=False)
    )
    return {
        "seconds": report.seconds,
        "mpx_s": report.mpx_per_s,
        "km2": report.area_m2 / 1e6,
        "tiles": report.tiles_run,
        "device": rt.device,
        "peak_mb": _peak_mb(),
    }


def job_cdkd(model: str, scene: str, out: str, batch: int, bands: list[int], threads: int | None) -> dict:
    """Streaming: ``segment_scene`` with the torch runtime on the CPU."""
    from cdkd.inference.runtimes import open_runtime
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene

    _set_threads(threads)
    rt = open_runtime(model, device="cpu")
    start_mb = _peak_mb()
    report = segment_scene(
        scene, rt, out, SegmentOptions(batch_size=batch, bands=tuple(bands), overwrite=True, progress=False)
    )
    return {"seconds": report.seconds, "start_mb": start_mb, "peak_mb": _peak_mb()}


def job_baseline(model: str, scene: str, out: str, batch: int, bands: list[int], threads: int | None) -> dict:
    """What most tools do: the whole scene in memory, ``sliding_window_logits`` over it, argmax, one write."""
    import rasterio
    import torch

    from cdkd.data.classraster import NODATA
    from cdkd.data.stats import NormStats
    from cdkd.inference.runtimes import open_runtime
    from cdkd.inference.sliding import sliding_window_logits

    _set_threads(threads)
    rt = open_runtime(model, device="cpu")
    meta = rt.meta
    start_mb = _peak_mb()
    start = time.perf_counter()
    with rasterio.open(scene) as src:
        pixels = src.read(indexes=bands)
        valid = src.dataset_mask() > 0
        profile = {
            "driver": "GTiff",
            "width": src.width,
            "height": src.height,
            "count": 1,
            "dtype": "uint8",
            "crs": src.crs,
            "transform": src.transform,
            "nodata": NODATA,
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "compress": "deflate",
        }
    x = NormStats(meta.norm.mean, meta.norm.std, tuple(bands), meta.norm.dtype).normalize(pixels)
    x[:, ~valid] = 0.0
    logits = sliding_window_logits(
        lambda b: torch.from_numpy(rt(b.numpy())), x, meta.tile_size, meta.overlap, meta.num_classes, batch_size=batch
    )
    classes = logits.argmax(dim=0).numpy().astype(np.uint8)
    classes[~valid] = NODATA
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(classes, 1)
    return {"seconds": time.perf_counter() - start, "start_mb": start_mb, "peak_mb": _peak_mb()}


class FreeRuntime:
    """A runtime that costs nothing: the same precomputed smooth logits for every tile (what is left is the engine)."""

    name, device, blend_device, max_batch, fixed_tile = "free", "cpu", "cpu", None, True

    def __init__(self, tile: int, overlap: int, classes: int = 6) -> None:
        from cdkd.artifacts import InferenceMeta
        from cdkd.data.classes import BUILTIN_SCHEMAS
        from cdkd.data.stats import NormStats

        schema = BUILTIN_SCHEMAS["deepglobe"] if classes == 7 else BUILTIN_SCHEMAS[SCHEMA]
        self.meta = InferenceMeta(schema, NormStats((110.0,) * 3, (50.0,) * 3, (1, 2, 3), "uint8"), tile, overlap, 3)
        self.path, self.options = __file__, {"what": "precomputed logits"}
        k = schema.num_classes
        yy, xx = np.mgrid[0:tile, 0:tile] / tile
        rng = np.random.default_rng(1)
        self.field = np.stack(
            [
                np.sin(rng.uniform(2, 9) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 9) * yy + rng.uniform(0, 6))
                for _ in range(k)
            ]
        ).astype(np.float32)
        self._out: dict[int, np.ndarray] = {}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) not in self._out:
            self._out[len(batch)] = np.ascontiguousarray(np.broadcast_to(self.field, (len(batch), *self.field.shape)))
        return self._out[len(batch)]

    def forward(self, batch: np.ndarray):
        import torch

        return torch.from_numpy(self(batch))


def job_ceiling(scene: str, out: str, tile: int, overlap: int, batch: int, read_threads: int) -> dict:
    """The engine with a free model, then plain windowed reads of the same windows."""
    import rasterio

    from cdkd.inference.tiler import plan_windows
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene

    report = segment_scene(
        scene,
        FreeRuntime(tile, overlap),
        out,
        SegmentOptions(batch_size=batch, overwrite=True, progress=False, read_threads=read_threads),
    )
    with rasterio.open(scene) as src:
        windows = plan_windows(src.height, src.width, tile, overlap)
        start = time.perf_counter()
        for w in windows:
            src.read(window=w.to_rasterio())
        reads = time.perf_counter() - start
    try:
        from rio_cogeo.cogeo import cog_validate

        valid_cog = cog_validate(out)[0]
    except ImportError:
        valid_cog = None
    return {
        "tiles": report.tiles_run,
        "seconds": report.seconds,
        "tiles_s": report.tiles_run / report.seconds,
        "read_tiles_s": len(windows) / reads,
        "stages": report.stages,
        "valid_cog": valid_cog,
        "peak_mb": _peak_mb(),
    }


def job_overhead(
    model: str, scene: str, out: str, device: str, batch: int, threads: int | None, read_threads: int | None = None
) -> dict:
    """Engine time vs the bare model on as many tiles, per variant: on CUDA the eager forward with the torch blend
    (the engine before CUDA graphs and the Triton blend), then both (the default); on the CPU the default."""
    _set_threads(threads)
    cuda = device.startswith("cuda")
    variants = [("off", "torch"), ("on", "triton")] if cuda else [("auto", "auto")]
    rows = [_overhead_variant(model, scene, out, device, batch, read_threads, g, b) for g, b in variants]
    return {**rows[-1], "variants": rows}


def _overhead_variant(
    model: str, scene: str, out: str, device: str, batch: int, read_threads: int | None, graph: str, blend: str
) -> dict:
    """One engine run and the bare model (batches already in memory) on as many tiles, after a warm-up."""
    from cdkd.inference.runtimes import open_runtime
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene

    rt = open_runtime(model, device=device, cuda_graph=graph)
    t = rt.meta.tile_size
    x = np.random.default_rng(0).normal(size=(batch, rt.meta.in_chans, t, t)).astype(np.float32)
    _sync(rt.forward(x))  # warm-up (cuDNN autotuning, allocator, the graph's capture)
    options = SegmentOptions(
        batch_size=batch, overwrite=True, progress=False, read_threads=read_threads, blend_backend=blend
    )
    report = segment_scene(scene, rt, out, options)
    tiles = report.tiles_run
    start = time.perf_counter()
    for i in range(0, tiles, batch):
        _sync(rt.forward(x[: min(batch, tiles - i)]))
    bare = time.perf_counter() - start
    return {
        "tiles": tiles,
        "engine_s": report.seconds,
        "model_s": bare,
        "ratio": report.seconds / bare,
        "device": rt.device,
        "amp": rt.options.get("amp"),
        "cuda_graph": rt.options.get("cuda_graph"),
        "blend": report.runtime_options.get("blend"),
        "stages": report.stages,
        "tiles_s": tiles / report.seconds,
        "model_tiles_s": tiles / bare,
    }


def _sync(y) -> None:
    import torch

    if isinstance(y, torch.Tensor) and y.is_cuda:
        torch.cuda.synchronize()


def job_scaleout(model: str, scene: str, work: str, workers: int, block_rows: int) -> dict:
    """One scene on a LocalCluster of ``workers`` single-threaded processes; peak RSS of each worker."""
    import distributed

    from cdkd.inference.runtimes import RuntimeSpec
    from cdkd.scene.blocks import segment_scene_on_cluster
    from cdkd.scene.core.options import SegmentOptions

    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with (
        distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, env=env
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.run(lambda: __import__("torch").set_num_threads(1))
        out = Path(work) / f"scaleout_{workers}.tif"
        report = segment_scene_on_cluster(
            scene,
            RuntimeSpec(model, device="cpu"),
            out,
            client,
            SegmentOptions(overwrite=True, progress=False, read_threads=1),
            rows_per_block=block_rows,
        )
        peaks = client.run(_peak_mb)
    return {
        "workers": workers,
        "seconds": report.seconds,
        "tiles": report.tiles_run,
        "out": str(out),
        "blocks": report.runtime_options["blocks"],
        "worker_peak_mb": sorted(peaks.values()),
    }


def content_matched_seams(classes: np.ndarray, tile: int, overlap: int, period: int, margin: int = 0) -> float:
    """The seam index with the content held fixed, for a mosaic of one base scene repeated every ``period`` px:
    the change rate at window edges over the rate at the same base-scene position in the copies where no window
    edge lies. (Edges fall on other content than the average row, and an untrained ViT changes class more often on
    its 16 px patch grid, which the window edges share: both inflate the plain index without any seam.)"""
    from cdkd.inference.tiler import window_edges

    change = (classes[:, 1:] != classes[:, :-1]).mean(axis=0)
    size = classes.shape[1]
    edges = set(window_edges(size, tile, overlap, margin))
    at, elsewhere = [], []
    for e in sorted(edges):
        same = [p for p in range(e % period, size - 1, period) if p not in edges]
        if same:
            at.append(change[e])
            elsewhere.append(change[same].mean())
    return float(np.mean(at) / np.mean(elsewhere)) if at else float("nan")


def job_seams(model: str, scene: str, out: str, period: list[int]) -> dict:
    import rasterio

    from cdkd.inference.blend import seam_index
    from cdkd.inference.runtimes import open_runtime
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene

    rt = open_runtime(model, device="cpu")
    report = segment_scene(scene, rt, out, SegmentOptions(overwrite=True, progress=False, batch_size=4))
    with rasterio.open(out) as src:
        classes = src.read(1)
    tile, overlap, margin = rt.meta.tile_size, rt.meta.overlap, report.edge_context
    cols, rows = seam_index(classes, tile, overlap, nodata=255, margin=margin)
    return {
        "cols": cols,
        "rows": rows,
        "tile": tile,
        "overlap": overlap,
        "edge_context": margin,
        "matched_cols": content_matched_seams(classes, tile, overlap, period[1], margin),
        "matched_rows": content_matched_seams(classes.T, tile, overlap, period[0], margin),
    }


JOBS = {
    "throughput": job_throughput,
    "cdkd": job_cdkd,
    "baseline": job_baseline,
    "ceiling": job_ceiling,
    "overhead": job_overhead,
    "scaleout": job_scaleout,
    "seams": job_seams,
}


GDAL_CACHEMAX: str | None = None  # --gdal-cachemax, passed to the children's environment


def run_child(job: str, **kwargs) -> dict | None:
    """Run ``JOBS[job](**kwargs)`` in a fresh interpreter; its result, or None (and the error printed)."""
    env = dict(os.environ, **({"GDAL_CACHEMAX": GDAL_CACHEMAX} if GDAL_CACHEMAX else {}))
    proc = subprocess.run(
        [sys.executable, __file__, "--_job", json.dumps({"job": job, **kwargs})],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {job} {Path(kwargs['scene']).name} failed: {err}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- parts


def runtime_variants(runtimes: list[str], devices: list[str]) -> list[tuple[str, str]]:
    """(runtime, device) pairs: each runtime on the CPU, and on CUDA where it can run there (of ``devices``)."""
    import torch

    variants = [(r, "cpu") for r in runtimes] if "cpu" in devices else []
    if "cuda" in devices and torch.cuda.is_available():
        if "torch" in runtimes:
            variants.append(("torch", "cuda"))
        if "onnx" in runtimes:
            import onnxruntime

            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                variants.append(("onnx", "cuda"))
    return variants


_MOSAICS: dict[int, Path] = {}


def mosaic(base: Path, factor: int, work: Path, layout: str = "square") -> Path:
    """The ``factor`` x area mosaic of ``base`` in ``work``, built once per run: ``square`` tiles the base
    sqrt(factor) x sqrt(factor) (wider and taller), ``tall`` stacks ``factor`` copies (taller only)."""
    key = (factor, layout)
    if key not in _MOSAICS:
        rows, cols = (factor, 1) if layout == "tall" else (math.isqrt(factor), math.isqrt(factor))
        _MOSAICS[key] = build_mosaic(base, rows, cols, work / f"mosaic_{factor}x_{layout}_{base.stem}.tif")
    return _MOSAICS[key]


def throughput(args: argparse.Namespace, work: Path, bands: list[int], dtype: str) -> dict:
    model = build_segmenter(
        work / f"segmenter_{args.model_size}.pt",
        args.model_size,
        args.tile_size or MODELS[args.model_size]["tile"],
        tuple(bands),
        dtype,
    )
    files = {"torch": Path(model["path"])}
    exporter = None
    if "onnx" in args.runtimes:
        from cdkd.errors import CdkdError

        files["onnx"] = work / f"segmenter_{args.model_size}.onnx"
        try:
            exporter = export_onnx_model(files["torch"], files["onnx"])
        except CdkdError as e:  # the torch rows are still worth having
            exporter = f"export failed, onnx skipped: {e}"
            args.runtimes = [r for r in args.runtimes if r != "onnx"]
    scene = mosaic(args.base, args.throughput_factor, work)
    times: dict[str, list[dict]] = {}
    variants = runtime_variants(args.runtimes, args.devices)
    for _ in range(args.repeats):  # rounds alternate between runtimes
        for runtime, device in variants:
            r = run_child(
                "throughput",
                model=str(files[runtime]),
                scene=str(scene),
                out=str(work / f"out_{runtime}_{device}.tif"),
                runtime=runtime,
                device=device,
                batch=args.batch_size,
                bands=bands,
                threads=args.threads,
            )
            if r is not None:
                times.setdefault(f"{runtime}/{device}", []).append(r)
    facts = scene_facts(scene)
    mpx = facts["width"] * facts["height"] / 1e6
    rows = {}
    for name, runs in times.items():
        sec = statistics.median(r["seconds"] for r in runs)
        km2 = runs[0]["km2"]
        rows[name] = {
            "seconds": sec,
            "seconds_all": [r["seconds"] for r in runs],
            "mpx_s": mpx / sec,
            "km2_h": km2 / sec * 3600,
            "km2": km2,
            "tiles": runs[0]["tiles"],
            "peak_mb": max(r["peak_mb"] for r in runs),
        }
    note, ground = "", ground_km2(scene)
    if rows and ground:
        engine = next(iter(rows.values()))["km2"]
        if abs(engine / ground - 1) > 0.01:
            note = (
                f"; the footprint on the WGS84 ellipsoid is {ground:.3f} km²: the engine's areas are "
                f"{engine / ground:.2f}x the ground's"
            )
    return {
        "model": model,
        "exporter": exporter,
        "scene": str(scene),
        "factor": args.throughput_factor,
        "scene_facts": facts,
        "rows": rows,
        "area_note": note,
        "ground_km2": ground,
    }


def memory(args: argparse.Namespace, work: Path, bands: list[int], dtype: str) -> dict:
    model = build_segmenter(
        work / f"segmenter_{args.memory_model}_mem.pt",
        args.memory_model,
        args.tile_size or MODELS[args.memory_model]["tile"],
        tuple(bands),
        dtype,
    )
    rows = []
    for factor in args.factors:
        scene = mosaic(args.base, factor, work, args.layout)
        facts = scene_facts(scene)
        common = {
            "model": model["path"],
            "scene": str(scene),
            "batch": args.batch_size,
            "bands": bands,
            "threads": args.threads,
        }
        cdkd = run_child("cdkd", out=str(work / f"mem_cdkd_{factor}x.tif"), **common)
        base = run_child("baseline", out=str(work / f"mem_baseline_{factor}x.tif"), **common)
        rows.append({"factor": factor, "pixels": facts["width"] * facts["height"], "cdkd": cdkd, "baseline": base})
        print(f"  {factor}x done", flush=True)
    return {"model": model, "rows": rows, "layout": args.layout}


def ceiling(args: argparse.Namespace, work: Path) -> dict:
    scene = mosaic(args.base, args.ceiling_factor, work)
    runs = [
        run_child(
            "ceiling",
            scene=str(scene),
            out=str(work / "ceiling.tif"),
            tile=1024,
            overlap=64,
            batch=args.batch_size,
            read_threads=args.read_threads,
        )
        for _ in range(args.repeats)
    ]
    runs = [r for r in runs if r]
    best = min(runs, key=lambda r: r["seconds"]) if runs else None
    return {"scene": scene_facts(scene), "best": best, "seconds_all": [r["seconds"] for r in runs]}


def overhead(args: argparse.Namespace, work: Path, bands: list[int], dtype: str) -> dict:
    model = build_segmenter(work / "segmenter_full.pt", "full", 1024, tuple(bands), dtype)
    scene = mosaic(args.base, args.overhead_factor, work)
    r = run_child(
        "overhead",
        model=model["path"],
        scene=str(scene),
        out=str(work / "overhead.tif"),
        device=args.device,
        batch=args.batch_size,
        threads=args.threads,
        read_threads=args.read_threads,
    )
    return {"model": model, "scene": scene_facts(scene), "result": r}


def scaleout(args: argparse.Namespace, work: Path, bands: list[int], dtype: str) -> dict:
    model = build_segmenter(work / "segmenter_tiny512.pt", "tiny", 512, tuple(bands), dtype)
    scene = mosaic(args.base, args.scaleout_factor, work)
    runs = {
        n: run_child(
            "scaleout", model=model["path"], scene=str(scene), work=str(work), workers=n, block_rows=args.block_rows
        )
        for n in (1, 2)
    }
    equal = None
    if runs[1] and runs[2]:
        import rasterio

        with rasterio.open(runs[1]["out"]) as a, rasterio.open(runs[2]["out"]) as b:
            equal = all(np.array_equal(a.read(1, window=w), b.read(1, window=w)) for _, w in a.block_windows(1))
    return {"model": model, "scene": scene_facts(scene), "runs": runs, "equal": equal}


def seams(args: argparse.Namespace, work: Path, bands: list[int], dtype: str) -> dict:
    model = build_segmenter(work / "segmenter_tiny512_seams.pt", "tiny", 512, tuple(bands), dtype, overlap=64)
    scene = mosaic(args.base, args.seams_factor, work)
    base = scene_facts(args.base)
    return {
        "scene": scene_facts(scene),
        "result": run_child(
            "seams",
            model=model["path"],
            scene=str(scene),
            out=str(work / "seams.tif"),
            period=[base["height"], base["width"]],
        ),
    }


# ---------------------------------------------------------------------------------------------------- report


def print_ceiling(c: dict) -> None:
    s, b = c["scene"], c["best"]
    print(
        f"\n3. Engine ceiling: a model that costs nothing (precomputed logits), {s['width']} x {s['height']} "
        f"{s['count']}-band, 1024 px tiles, overlap 64"
    )
    if not b:
        print("   failed")
        return
    print(
        f"   engine {b['tiles_s']:.1f} tiles/s ({b['tiles']} tiles in {b['seconds']:.2f} s, best of "
        f"{', '.join(f'{x:.2f}' for x in c['seconds_all'])} s); plain windowed reads {b['read_tiles_s']:.1f} tiles/s; "
        f"engine / reads {b['tiles_s'] / b['read_tiles_s']:.2f}x; valid COG (rio-cogeo): {b['valid_cog']}; "
        f"peak {b['peak_mb']:.0f} MB"
    )
    print(f"   stage busy seconds: {b['stages']}")


def print_overhead(o: dict) -> None:
    r, s = o["result"], o["scene"]
    print(
        f"\n4. Overhead of the engine with the real model ({o['model']['what']}, 1024 px), {s['width']} x {s['height']}"
    )
    if not r:
        print("   failed")
        return
    for v in r.get("variants", [r]):
        print(
            f"   {v['device']} (amp {v['amp']}, cuda graph {v.get('cuda_graph')}, blend {v.get('blend')}): engine "
            f"{v['engine_s']:.2f} s, bare model {v['model_s']:.2f} s on {v['tiles']} tiles: engine / model = "
            f"{v['ratio']:.3f} ({v['tiles_s']:.2f} tiles/s; bare {v.get('model_tiles_s', 0):.2f})"
        )
        print(f"   stage busy seconds: {v['stages']}")


def print_scaleout(o: dict) -> None:
    s, runs = o["scene"], o["runs"]
    print(
        f"\n5. Scale-out: one {s['width']} x {s['height']} scene on a LocalCluster of single-threaded workers "
        f"({o['model']['what']}, 512 px tiles)"
    )
    for n, r in runs.items():
        if r:
            print(
                f"   {n} worker(s): {r['seconds']:.1f} s, {r['blocks']} blocks, peak RSS per worker "
                f"{', '.join(f'{m:.0f}' for m in r['worker_peak_mb'])} MB"
            )
    if runs[1] and runs[2]:
        print(f"   speed-up 2 / 1 workers: {runs[1]['seconds'] / runs[2]['seconds']:.2f}x; outputs equal: {o['equal']}")


def print_seams(o: dict) -> None:
    r = o["result"]
    if r:
        print(
            f"\n6. Seam index (class changes across window edges / mean), untrained tiny segmenter, tile "
            f"{r['tile']}, overlap {r['overlap']}, {o['scene']['width']} x {o['scene']['height']}: across columns "
            f"{r['cols']:.3f}, across rows {r['rows']:.3f} (1.0 = no trace of the window grid); with the content "
            f"held fixed (same base-scene position in the mosaic's other copies): {r['matched_cols']:.3f}, "
            f"{r['matched_rows']:.3f}"
        )


def print_throughput(t: dict, threads: str) -> None:
    m, s = t["model"], t["scene_facts"]
    print(
        f"\n1. Throughput of segment_scene per runtime (end to end: read, normalise, run, blend, write COG), {threads}"
    )
    print(
        f"   model: {m['size']} = {m['what']}, random weights, {m['params_m']:.1f} M params, tile {m['tile']}, "
        f"overlap {m['overlap']}, {m['classes']} classes"
    )
    if t["exporter"]:
        print(f"   onnx: {t['exporter']}")
    print(
        f"   scene: {t['factor']}x mosaic, {s['width']} x {s['height']} ({s['width'] * s['height'] / 1e6:.2f} Mpx); "
        "median over runs, each in a fresh process after one warm-up batch"
    )
    print(f"{'runtime':<14}{'tiles':>7}{'s':>9}{'Mpx/s':>9}{'km²/h':>10}{'peak MB':>10}   runs (s)")
    for name, r in t["rows"].items():
        runs = ", ".join(f"{x:.1f}" for x in r["seconds_all"])
        print(
            f"{name:<14}{r['tiles']:>7}{r['seconds']:>9.2f}{r['mpx_s']:>9.3f}{r['km2_h']:>10.2f}"
            f"{r['peak_mb']:>10.0f}   {runs}"
        )
    ref = t["rows"].get("torch/cpu")
    for name, r in t["rows"].items():
        if ref and name != "torch/cpu":
            print(f"{name} / torch/cpu: {r['mpx_s'] / ref['mpx_s']:.2f}x Mpx/s")
    if t["rows"]:
        km2 = next(iter(t["rows"].values()))["km2"]
        print(
            f"   km² = the engine's SceneReport.area_m2 / 1e6 of the valid pixels ({km2:.3f} km² per run){t['area_note']}"
        )


def _mb(r: dict | None, key: str) -> str:
    return "failed" if r is None else f"{r[key]:.0f}" if key != "delta" else f"{r['peak_mb'] - r['start_mb']:.0f}"


def print_memory(mem: dict, threads: str) -> None:
    m = mem["model"]
    print(
        f"\n2. Peak memory vs scene area: cdkd segment_scene (streaming) vs the whole-scene baseline, torch CPU, "
        f"{threads}"
    )
    print(
        f"   model: {m['size']} = {m['what']}, {m['params_m']:.2f} M params ({m['weights_mb']:.1f} MB of weights), "
        f"tile {m['tile']}, overlap {m['overlap']}, {m['classes']} classes"
    )
    print(
        "   baseline: rasterio full read -> normalise -> sliding_window_logits (K x H x W float32 sums) -> argmax "
        "-> tiled GeoTIFF (cdkd writes a COG with overviews)"
    )
    print(
        "   peak = peak RSS (VmHWM) of a fresh process, imports and model included; + = peak minus the high-water "
        "mark just before the call"
    )
    if mem.get("layout") == "tall":
        print(
            "   (what the call itself needed). Tall mosaics: the base stacked vertically, same width, so only the height "
            "grows"
        )
    else:
        print(
            "   (what the call itself needed). An n x n mosaic is n times wider: cdkd's row band (K x tile x W "
            "float32) grows with the width by design; --layout tall grows the height only"
        )
    print(f"{'':>6}{'':>12}{'peak MB':>14}{'':>5}{'+ MB':>13}{'':>6}{'seconds':>14}")
    print(f"{'area':>6}{'pixels':>12}" + f"{'cdkd':>9}{'baseline':>10}" * 3)
    for row in mem["rows"]:
        c, b = row["cdkd"], row["baseline"]
        cs = "-" if c is None else f"{c['seconds']:.1f}"
        bs = "-" if b is None else f"{b['seconds']:.1f}"
        print(
            f"{str(row['factor']) + 'x':>6}{row['pixels']:>12,}{_mb(c, 'peak_mb'):>9}{_mb(b, 'peak_mb'):>10}"
            f"{_mb(c, 'delta'):>9}{_mb(b, 'delta'):>10}{cs:>9}{bs:>10}"
        )
    ok = [r for r in mem["rows"] if r["cdkd"] and r["baseline"]]
    if not ok:
        return
    first, last = ok[0], ok[-1]

    def delta(r: dict) -> float:
        return max(r["peak_mb"] - r["start_mb"], 1.0)

    c, b = last["cdkd"], last["baseline"]
    print(
        f"baseline / cdkd at {last['factor']}x: peak {b['peak_mb'] / c['peak_mb']:.2f}x, + MB "
        f"{delta(b) / delta(c):.1f}x"
    )
    if first is not last:
        fc, fb = first["cdkd"], first["baseline"]
        print(
            f"growth {last['factor']}x / {first['factor']}x: cdkd peak {c['peak_mb'] / fc['peak_mb']:.2f}x "
            f"(+ MB {delta(c) / delta(fc):.1f}x), baseline peak {b['peak_mb'] / fb['peak_mb']:.2f}x "
            f"(+ MB {delta(b) / delta(fb):.1f}x)"
        )


# ---------------------------------------------------------------------------------------------------- main


def _factors(text: str) -> list[int]:
    factors = [int(f) for f in text.split(",")]
    bad = [f for f in factors if f < 1 or math.isqrt(f) ** 2 != f]
    if bad:
        raise argparse.ArgumentTypeError(f"area factors must be perfect squares (the base tiled n x n), got {bad}")
    return factors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", choices=["small", "full"], default="small", help="throughput model")
    parser.add_argument("--memory-model", choices=list(MODELS), default="tiny", help="model of the memory part")
    parser.add_argument(
        "--base",
        default="cogeo.tif",
        help="base scene: a path, a name in SHARED/scenes, or "
        "'synthetic' (made here, for machines without the shared data)",
    )
    parser.add_argument("--bands", default="1,2,3", help="scene bands fed to the model")
    parser.add_argument("--factors", type=_factors, default=[1, 4, 16], help="mosaic areas (x base) for memory")
    parser.add_argument(
        "--layout",
        choices=["square", "tall"],
        default="square",
        help="memory mosaics: square (n x n, grows in width too) or tall (factor x 1, height only)",
    )
    parser.add_argument("--throughput-factor", type=int, default=1, help="mosaic area (x base) for throughput")
    parser.add_argument("--runtimes", default="torch,onnx", help="comma list of torch, onnx")
    parser.add_argument("--devices", default="cpu,cuda", help="throughput devices: cpu, cuda (where present)")
    parser.add_argument("--tile-size", type=int, default=None, help="tile px for every model (default: its own)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per runtime")
    parser.add_argument("--threads", type=int, default=None, help="torch/onnxruntime intra-op threads")
    parser.add_argument(
        "--parts",
        default="throughput,memory",
        help="which parts to run: throughput, memory, ceiling, overhead, scaleout, seams",
    )
    parser.add_argument("--ceiling-factor", type=int, default=64, help="ceiling scene area (x base): 64 = 8192^2")
    parser.add_argument("--overhead-factor", type=int, default=4, help="overhead scene area (x base)")
    parser.add_argument("--scaleout-factor", type=int, default=256, help="scale-out scene area (x base): 16384^2")
    parser.add_argument("--seams-factor", type=int, default=16, help="seams scene area (x base): 16 = 4 x 4")
    parser.add_argument("--block-rows", type=int, default=2, help="window rows per block in the scale-out part")
    parser.add_argument(
        "--read-threads",
        type=int,
        default=None,
        help="engine reader threads (ceiling and overhead parts; default: the engine's)",
    )
    parser.add_argument("--device", default="cpu", help="device of the overhead part (cpu or cuda)")
    parser.add_argument(
        "--gdal-cachemax",
        default=None,
        help="GDAL block cache for the measured processes, e.g. 16MB (default: GDAL's, 5%% of RAM)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep models, mosaics and outputs here")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--_job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._job:  # child process: one measurement, result as JSON on the last stdout line
        spec = json.loads(args._job)
        print(json.dumps(JOBS[spec.pop("job")](**spec)))
        return
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    args.devices = [d for d in args.devices.split(",") if d]
    unknown = set(args.runtimes) - {"torch", "onnx"}
    if unknown:
        parser.error(f"--runtimes: unknown {sorted(unknown)}; choose from torch, onnx")
    if math.isqrt(args.throughput_factor) ** 2 != args.throughput_factor:
        parser.error(f"--throughput-factor {args.throughput_factor} is not a perfect square")
    base = Path(args.base) if Path(args.base).is_file() else SHARED_DATA / "scenes" / args.base
    if args.base == "synthetic":  # a machine without ../shared/data (a lent GPU): a scene made here
        base = synthetic_base(Path(tempfile.gettempdir()) / "cdkd-bench-synthetic-base.tif")
    if not base.is_file():
        parser.error(f"--base {args.base}: not a file, nor in {SHARED_DATA / 'scenes'} (set CDKD_SHARED_DATA)")
    args.base = base
    bands = [int(b) for b in args.bands.split(",")]
    global GDAL_CACHEMAX
    GDAL_CACHEMAX = args.gdal_cachemax
    parts = set(args.parts.split(","))

    import onnxruntime
    import torch

    facts = scene_facts(base)
    threads = f"{args.threads or torch.get_num_threads()} threads"
    print(
        f"cdkd scene bench: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, load average {os.getloadavg()[0]:.1f} at start"
    )
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}; torch on CUDA runs with amp=auto (bf16 autocast) as cdkd segment")
    print(
        f"base: {base.name} ({facts['width']} x {facts['height']}, {facts['count']} x {facts['dtype']}, "
        f"{facts['crs']}, {facts['res']:.2f} m px), bands {args.bands}, batch {args.batch_size}, GDAL_CACHEMAX "
        f"{args.gdal_cachemax or os.environ.get('GDAL_CACHEMAX', 'default (5% of RAM)')}"
    )
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(
            f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other processes compete and timings are "
            "inflated (torch's OpenMP threads suffer most; --threads 1 helps); memory is unaffected"
        )
    result = {
        "base": str(base),
        "bands": bands,
        "batch": args.batch_size,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    with tempfile.TemporaryDirectory(prefix="cdkd-bench-scene-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"work folder: {work}", flush=True)
        if "throughput" in parts:
            result["throughput"] = throughput(args, work, bands, facts["dtype"])
            print_throughput(result["throughput"], threads)
        if "memory" in parts:
            result["memory"] = memory(args, work, bands, facts["dtype"])
            print_memory(result["memory"], threads)
        if "ceiling" in parts:
            result["ceiling"] = ceiling(args, work)
            print_ceiling(result["ceiling"])
        if "overhead" in parts:
            result["overhead"] = overhead(args, work, bands, facts["dtype"])
            print_overhead(result["overhead"])
        if "scaleout" in parts:
            result["scaleout"] = scaleout(args, work, bands, facts["dtype"])
            print_scaleout(result["scaleout"])
        if "seams" in parts:
            result["seams"] = seams(args, work, bands, facts["dtype"])
            print_seams(result["seams"])
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (other processes share these CPUs)")
    if args.json:
        from cdkd.utils.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
