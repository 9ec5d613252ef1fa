"""``cdkd segment``: land-cover class rasters (COG) for GeoTIFF scenes of any size, with any runtime."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from cli import options as o
from cli.errors import cli_errors

RUN = "Runtime"
TILING = "Tiling"


def segment_command(
    scenes: List[Path] = typer.Argument(..., help="GeoTIFF (or VRT) scene(s), or folders of them."),
    model: Optional[Path] = typer.Option(None, "--model", help="segmenter.pt from cdkd finetune (PyTorch).",
                                         rich_help_panel=RUN),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Exported model.onnx or TensorRT model.engine.",
                                          rich_help_panel=RUN),
    out: Optional[Path] = typer.Option(None, "--out", help="Output class raster (one scene)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Output folder (any number of scenes): "
                                           "<stem>.tif per scene and segment_report.json."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="torch, onnx or tensorrt (default: from the "
                                          "model file's suffix).", rich_help_panel=RUN),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=RUN),
    amp: str = typer.Option("auto", "--amp", help="Autocast on CUDA for --model: auto (bf16), fp16, bf16, none.",
                            rich_help_panel=RUN),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime CPU threads.", rich_help_panel=RUN),
    tile_size: Optional[int] = typer.Option(None, "--tile-size", help="Tile size in px (default: the model's).",
                                            rich_help_panel=TILING),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="Window overlap in px (default: the model's).",
                                          rich_help_panel=TILING),
    batch_size: int = typer.Option(4, "--batch-size", help="Tiles per forward pass.", rich_help_panel=TILING),
    bands: Optional[str] = typer.Option(None, "--bands", help="Scene bands fed to the model, in order, e.g. "
                                        "3,2,1 or 1,1,1 (default: the model's).", rich_help_panel=TILING),
    stats: str = typer.Option("model", "--stats", help="Normalisation: model (stored with it) or scene "
                              "(computed once from this scene).", rich_help_panel=TILING),
    probs: bool = typer.Option(False, "--probs", help="Also write <out>_confidence.tif (uint8 max probability)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="dask.distributed scheduler address, e.g. "
                                            "tcp://host:8786 (default: run here)."),
    on_error: str = typer.Option("fail", "--on-error", help="fail: stop at the first bad scene; skip: go on."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted scene from its last row."),
    progress: bool = o.progress_opt,
) -> None:
    """Segment scenes into Cloud-Optimized GeoTIFF class rasters, streamed tile row by tile row.

    Examples:
      cdkd segment scene.tif --model runs/seg/segmenter.pt --out scene_lc.tif
      cdkd segment scene.tif --engine orin.engine --out scene_lc.tif --probs
      cdkd segment a.tif b.tif c.tif --engine model.onnx --out-dir lc/ --scheduler tcp://10.0.0.5:8786
      cdkd segment scenes/ --engine model.onnx --out-dir lc/   (every *.tif, *.tiff, *.vrt, *.jp2 in scenes/)
    """
    with cli_errors(resumable=True):
        from cdkd.errors import CdkdValueError
        from cdkd.scene.batch import RuntimeSpec, expand_scenes, segment_many
        from cdkd.scene.engine import SegmentOptions, segment_scene

        if (model is None) == (engine is None):
            raise CdkdValueError("give exactly one of --model segmenter.pt or --engine model.onnx|model.engine")
        scenes = expand_scenes(scenes)
        if (out is None) == (out_dir is None):
            raise CdkdValueError("give exactly one of --out FILE (one scene) or --out-dir DIR")
        if out is not None and len(scenes) != 1:
            raise CdkdValueError(f"--out names one output but {len(scenes)} scenes were given; use --out-dir")
        if scheduler is not None and out_dir is None:
            raise CdkdValueError("--scheduler writes <stem>.tif per scene: give --out-dir DIR instead of --out")
        if resume and overwrite:
            raise CdkdValueError("--resume and --overwrite contradict each other; pick one")
        spec = RuntimeSpec(str(model or engine), runtime, device, amp, threads)
        options = SegmentOptions(tile_size=tile_size, overlap=overlap, batch_size=batch_size,
                                 bands=o.ints(bands, "--bands"), stats=stats, probs=probs, overwrite=overwrite,
                                 resume=resume, progress=progress)
        if out is not None:
            report = segment_scene(scenes[0], spec.open(), out, options)
            _print_scene(report.to_dict())
            return
        batch = segment_many(scenes, out_dir, spec, options, scheduler, on_error)
        for result in batch.scenes:
            if result.ok:
                _print_scene(result.report)
            else:
                print(f"Error: {result.error}", file=sys.stderr)
        typer.echo(f"{len(batch.scenes) - len(batch.failed)} of {len(scenes)} scene(s) done in "
                   f"{batch.seconds:.1f} s")
        if batch.failed or len(batch.scenes) < len(scenes):
            raise typer.Exit(1)


def _print_scene(report: dict) -> None:
    typer.echo(f"{report['scene']} -> {report['output']}: {report['width']}x{report['height']} px, "
               f"{report['tiles_run']} of {report['tiles']} tiles run, {report['area_km2']:.3f} km² valid, "
               f"{report['seconds']:.1f} s ({report['mpx_per_s']:.2f} Mpx/s, {report['runtime']} on "
               f"{report['device']})")
    for name, c in report["classes"].items():
        typer.echo(f"  {name:<20} {100 * c['fraction']:6.2f} %  {c['area_km2']:.4f} km²")
