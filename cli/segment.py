"""``cdkd segment``: land-cover class rasters (COG) for GeoTIFF scenes of any size, with any runtime; with an
instance model (``detector.pt``), one polygon per object (GeoPackage)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, cast

import typer

from cli import options as o
from cli.errors import cli_errors

RUN = "Runtime"
TILING = "Tiling"


def segment_command(
    scenes: list[str] = typer.Argument(
        ...,
        help="GeoTIFF (or VRT) scene(s), folders of them, GDAL virtual paths "
        "(/vsizip/..., /vsis3/...), URLs, or STAC Items / ItemCollections (.json "
        "file or URL; see docs/stac.md).",
    ),
    model: Optional[Path] = typer.Option(
        None, "--model", help="segmenter.pt (or detector.pt) from cdkd finetune (PyTorch).", rich_help_panel=RUN
    ),
    engine: Optional[Path] = typer.Option(
        None, "--engine", help="Exported model.onnx or TensorRT model.engine.", rich_help_panel=RUN
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        help="Output class raster (one scene); for a detector the objects' polygons (.gpkg, .fgb, .parquet).",
    ),
    out_dir: Optional[Path] = typer.Option(
        None, "--out-dir", help="Output folder (any number of scenes): <stem>.tif per scene and segment_report.json."
    ),
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        help="YAML file of segment options (tile_size, "
        "overlap, batch_size, bands, stats, probs, ...); flags override it.",
    ),
    runtime: Optional[o.Runtime] = typer.Option(
        None, "--runtime", help="Default: from the model file's suffix.", rich_help_panel=RUN
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=RUN),
    amp: o.Amp = typer.Option(
        o.Amp.auto,
        "--amp",
        help="Autocast for --model: on CUDA (auto = bf16), bf16 also on "
        "CPUs with AVX-512 BF16/AMX (auto = float32 there).",
        rich_help_panel=RUN,
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="ONNX Runtime CPU threads (default: one per physical core).", rich_help_panel=RUN
    ),
    cuda_graph: o.CudaGraph = typer.Option(
        o.CudaGraph.auto,
        "--cuda-graph",
        help="Replay --model's forward as a CUDA graph (auto = on CUDA).",
        rich_help_panel=RUN,
    ),
    tile_size: Optional[int] = typer.Option(
        None, "--tile-size", help="Tile size in px (default: the model's).", rich_help_panel=TILING
    ),
    overlap: Optional[int] = typer.Option(
        None, "--overlap", help="Window overlap in px (default: the model's).", rich_help_panel=TILING
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Tiles per forward pass (default 4).", rich_help_panel=TILING
    ),
    edge_context: Optional[int] = typer.Option(
        None,
        "--edge-context",
        help="Px of reflected context past the scene's edge, so its border pixels are predicted like inner ones "
        "(default 64, at most half a tile; 0: windows end at the edge).",
        rich_help_panel=TILING,
    ),
    read_threads: Optional[int] = typer.Option(
        None,
        "--read-threads",
        help="Threads reading tiles ahead of the "
        "model (default 2 beside a CPU model, up to 6 feeding a GPU; 0 reads in "
        "the engine's thread).",
        rich_help_panel=RUN,
    ),
    bands: Optional[str] = typer.Option(
        None,
        "--bands",
        help="Scene bands fed to the model, in order, e.g. 3,2,1 or 1,1,1 (default: the model's).",
        rich_help_panel=TILING,
    ),
    assets: Optional[str] = typer.Option(
        None,
        "--assets",
        help="STAC items: the asset keys to stack as the "
        "scene's bands, in order, e.g. B04,B03,B02 (default: the assets holding "
        "the model's bands).",
        rich_help_panel=TILING,
    ),
    stats: Optional[o.Stats] = typer.Option(
        None,
        "--stats",
        help="Normalisation: model (stored with it, the default) or scene (computed once from this scene).",
        rich_help_panel=TILING,
    ),
    probs: Optional[bool] = typer.Option(
        None, "--probs/--no-probs", help="Also write <out>_confidence.tif (uint8 max probability)."
    ),
    min_score: Optional[float] = typer.Option(
        None, "--min-score", help="Detectors: drop objects scoring less (default 0.5).", rich_help_panel=TILING
    ),
    preview: bool = typer.Option(
        False, "--preview", help="Also write <out>.png: the scene beside its classes, with the legend."
    ),
    scheduler: Optional[str] = typer.Option(
        None,
        "--scheduler",
        help="dask.distributed scheduler address, e.g. "
        "tcp://host:8786 (default: run here). With --out the scene is split "
        "into blocks of window rows across the workers; with --out-dir each "
        "scene is one task.",
    ),
    block_rows: int = typer.Option(
        4,
        "--block-rows",
        help="Window rows per block when one scene runs on a cluster (--scheduler with --out).",
        rich_help_panel=TILING,
    ),
    on_error: o.OnError = typer.Option(
        o.OnError.fail, "--on-error", help="fail: stop at the first bad scene; skip: go on."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted scene from its last row."),
    progress: bool = o.progress_opt,
) -> None:
    """Segment scenes into Cloud-Optimized GeoTIFF class rasters, streamed tile row by tile row.

    Examples:
      cdkd segment scene.tif --model runs/seg/segmenter.pt --out scene_lc.tif
      cdkd segment scene.tif --engine orin.engine --out scene_lc.tif --probs
      cdkd segment a.tif b.tif c.tif --engine model.onnx --out-dir lc/ --scheduler tcp://10.0.0.5:8786
      cdkd segment big.tif --model segmenter.pt --out big_lc.tif --scheduler tcp://10.0.0.5:8786
      cdkd segment /vsizip/scenes.zip/a.tif --engine model.onnx --out a_lc.tif
      cdkd segment scenes/ --engine model.onnx --out-dir lc/   (every *.tif, *.tiff, *.vrt, *.jp2 in scenes/)
      cdkd segment scene.tif --engine model.onnx --out scene_lc.tif --config segment.yaml --preview
      cdkd segment scene.tif --model runs/det/detector.pt --out buildings.gpkg --min-score 0.6
      cdkd segment items.json --model s2_segmenter.pt --out-dir lc/   (a STAC ItemCollection: one output per item)
    """
    with cli_errors(resumable=True):
        from cdkd.errors import CdkdValueError
        from cdkd.inference.runtimes import RuntimeSpec
        from cdkd.scene.batch import expand_scenes, plan_outputs
        from cdkd.scene.core.options import SegmentOptions
        from cdkd.tasks import task_of_model

        if (model is None) == (engine is None):
            raise CdkdValueError("give exactly one of --model segmenter.pt or --engine model.onnx|model.engine")
        paths = expand_scenes(scenes)
        if (out is None) == (out_dir is None):
            raise CdkdValueError("give exactly one of --out FILE (one scene) or --out-dir DIR")
        if out is not None and len(paths) != 1:
            raise CdkdValueError(f"--out names one output but {len(paths)} scenes were given; use --out-dir")
        flags = o.given(
            {
                "tile_size": tile_size,
                "overlap": overlap,
                "batch_size": batch_size,
                "edge_context": edge_context,
                "bands": o.ints(bands, "--bands"),
                "stats": o.value(stats),
                "probs": probs,
                "read_threads": read_threads,
                "min_score": min_score,
                "assets": o.words(assets),
                "overwrite": overwrite or None,
                "resume": resume or None,
                "progress": progress,
            }
        )
        options = o.resolve_config(SegmentOptions, config, None, flags)
        if options.resume and options.overwrite:
            raise CdkdValueError("--resume and --overwrite contradict each other; pick one")
        if preview:
            outputs = [out] if out is not None else [dst for _, dst in plan_outputs(paths, cast(Path, out_dir))]
            _check_previews(outputs, options.overwrite or options.resume)  # a resumed run finishes its previews
        spec = RuntimeSpec(str(model or engine), o.value(runtime), device, amp.value, threads, cuda_graph.value)
        task = task_of_model(spec.model, spec.runtime)
        task.check_scene_job(spec.model, many=out is None, cluster=scheduler is not None, preview=preview)
        if out is not None:
            _segment_one(paths[0], out, spec, task, options, scheduler, block_rows, preview)
        else:
            _segment_many(paths, cast(Path, out_dir), spec, options, scheduler, on_error.value, preview)


def _segment_one(
    scene: str | Path,
    out: Path,
    spec: Any,
    task: Any,
    options: Any,
    scheduler: str | None,
    block_rows: int,
    preview: bool,
) -> None:
    """One scene to ``out``, here through the model's task or on a dask cluster (semantic models)."""
    from cdkd.progress import finish

    if scheduler is not None:
        from cdkd.scene.blocks import segment_scene_on_cluster

        report = segment_scene_on_cluster(scene, spec, out, scheduler, options, block_rows)
    else:
        report = task.segment_scene(scene, task.open_runtime(spec), out, options)
    typer.echo(report.summary())
    if preview:
        _write_preview(scene, out, options.bands)
    finish([*report.outputs(), preview_path(out) if preview else None])


def _segment_many(
    scenes: list[str | Path],
    out_dir: Path,
    spec: Any,
    options: Any,
    scheduler: str | None,
    on_error: str,
    preview: bool,
) -> None:
    """Every scene to ``out_dir``: one summary per scene, one line per failure, a non-zero exit if any failed."""
    from cdkd.progress import finish
    from cdkd.scene.batch import segment_many
    from cdkd.scene.core.report import scene_summary

    batch = segment_many(scenes, out_dir, spec, options, scheduler, on_error)
    for result in batch.scenes:
        if result.ok:
            assert result.report is not None  # a scene that succeeded carries its report
            typer.echo(scene_summary(result.report))
            if preview:
                _write_preview(result.scene, Path(result.output), options.bands)
        else:
            print(f"Error: {result.error}", file=sys.stderr)
    typer.echo(f"{len(batch.scenes) - len(batch.failed)} of {len(scenes)} scene(s) done in {batch.seconds:.1f} s")
    if batch.failed or len(batch.scenes) < len(scenes):
        raise typer.Exit(1)
    finish([r.output for r in batch.scenes])


def preview_path(out: Path) -> Path:
    """``--preview``'s PNG for the class raster ``out``: ``lc/scene.tif`` -> ``lc/scene.png``."""
    return Path(out).with_suffix(".png")


def _check_previews(outputs: list[Path], overwrite: bool) -> None:
    """Refuse before hours of work, not after, when a preview would replace a file it must not."""
    from cdkd.errors import CdkdValueError, OutputExistsError

    for out in outputs:
        png = preview_path(out)
        if png == Path(out):
            raise CdkdValueError(f"{out}: the preview would replace the class raster; name the output .tif")
        if png.exists() and not overwrite:
            raise OutputExistsError(f"{png}: already exists (--preview writes it); pass --overwrite to replace it")


def _write_preview(scene: str | Path, out: Path, bands: Optional[tuple[int, ...]]) -> None:
    """The preview shows the bands the model read when they make an image (1 or 3), else the scene's RGB (a STAC
    item's red, green and blue assets: --bands numbers the model's stack of assets, not these)."""
    from cdkd.data.stac import is_stac
    from cdkd.scene.preview import write_preview

    bands = bands if bands is not None and len(bands) in (1, 3) and not is_stac(scene) else None
    typer.echo(f"  preview: {write_preview(scene, out, preview_path(out), bands=bands, overwrite=True)}")
