"""``cdkd export``: a segmenter as an ONNX model checked against PyTorch, a TensorRT engine, or an engine's sidecar."""

from __future__ import annotations

from pathlib import Path

import typer

from cli import options as o
from cli.errors import cli_errors

ONNX = "ONNX"
TRT = "TensorRT"

# Options as module constants, the way options.py holds the shared ones (and no call in a default argument).
model_arg = typer.Argument(..., help="segmenter.pt from cdkd finetune; or model.onnx for --format tensorrt and "
                           "--sidecar.")
format_opt = typer.Option(o.ExportFormat.onnx, "--format", help="What to write.")
out_opt = typer.Option(None, "--out", help="model.onnx or model.engine to write.")
opset_opt = typer.Option(17, "--opset", help="ONNX opset (17 suits TensorRT 8.5+ and ONNX Runtime).",
                         rich_help_panel=ONNX)
dynamic_opt = typer.Option(False, "--dynamic-batch", help="Free batch dimension (else fixed to --batch-size).",
                           rich_help_panel=ONNX)
batch_opt = typer.Option(1, "--batch-size", help="Fixed batch size of the ONNX model.", rich_help_panel=ONNX)
check_data_opt = typer.Option(None, "--check-data", help="Folder of images for the parity check (default: "
                              "synthetic tiles).", rich_help_panel=ONNX)
check_tiles_opt = typer.Option(8, "--check-tiles", help="Tiles in the parity check.", rich_help_panel=ONNX)
agreement_opt = typer.Option(0.999, "--min-agreement", help="Fraction of pixels whose class must match PyTorch.",
                             rich_help_panel=ONNX)
fp16_opt = typer.Option(False, "--fp16", help="Allow fp16 kernels.", rich_help_panel=TRT)
int8_opt = typer.Option(False, "--int8", help="Allow int8 kernels (calibrated on --calib).", rich_help_panel=TRT)
calib_opt = typer.Option(None, "--calib", help="Folder of images for INT8 calibration.", rich_help_panel=TRT)
calib_tiles_opt = typer.Option(32, "--calib-tiles", help="Tiles for INT8 calibration.", rich_help_panel=TRT)
max_batch_opt = typer.Option(4, "--max-batch", help="Largest batch of a dynamic-batch engine.", rich_help_panel=TRT)
workspace_opt = typer.Option(4.0, "--workspace-gb", help="TensorRT workspace limit in GiB.", rich_help_panel=TRT)
sidecar_opt = typer.Option(None, "--sidecar", metavar="ENGINE", help="Write ENGINE.json for an engine built with "
                           "trtexec from MODEL (.onnx), then stop.", rich_help_panel=TRT)


def export_command(
    model: Path = model_arg,
    fmt: o.ExportFormat = format_opt,
    out: Path | None = out_opt,
    opset: int = opset_opt,
    dynamic_batch: bool = dynamic_opt,
    batch_size: int = batch_opt,
    check_data: Path | None = check_data_opt,
    check_tiles: int = check_tiles_opt,
    min_agreement: float = agreement_opt,
    fp16: bool = fp16_opt,
    int8: bool = int8_opt,
    calib: Path | None = calib_opt,
    calib_tiles: int = calib_tiles_opt,
    max_batch: int = max_batch_opt,
    workspace_gb: float = workspace_opt,
    sidecar: Path | None = sidecar_opt,
    overwrite: bool = o.overwrite_opt,
) -> None:
    """Export a segmenter to ONNX (checked against PyTorch on real or synthetic tiles) or build a TensorRT engine.

    Examples: cdkd export runs/seg/segmenter.pt --format onnx --dynamic-batch --check-data scenes/ --out model.onnx;
    cdkd export model.onnx --format tensorrt --fp16 --out model.engine (on the target GPU);
    cdkd export model.onnx --sidecar model.engine (for an engine built with trtexec).
    """
    if sidecar is not None:
        if out is not None:
            raise typer.BadParameter("--sidecar writes ENGINE.json beside the engine and takes no --out")
    elif out is None:
        raise typer.BadParameter("--out is required (the .onnx or .engine file to write)")
    if fmt == o.ExportFormat.onnx and sidecar is None and (fp16 or int8 or calib is not None):
        raise typer.BadParameter("--fp16, --int8 and --calib build TensorRT engines: add --format tensorrt")
    with cli_errors():
        if sidecar is not None:
            from cdkd.export import write_sidecar

            typer.echo(f"wrote {write_sidecar(model, sidecar, overwrite=overwrite)} (metadata of {model})")
        elif fmt == o.ExportFormat.onnx:
            from cdkd.export import export_onnx

            res = export_onnx(model, out, opset=opset, dynamic_batch=dynamic_batch, batch_size=batch_size,
                              check_data=check_data, check_tiles=check_tiles, min_agreement=min_agreement,
                              overwrite=overwrite)
            typer.echo(res.parity.summary())
            if res.parity.synthetic:
                typer.echo("(synthetic tiles: pass --check-data DIR to check on real imagery)")
            batch = "dynamic" if res.batch is None else res.batch
            typer.echo(f"wrote {res.onnx} (opset {res.opset}, batch {batch}, {res.size_bytes / 2**20:.1f} MiB) "
                       f"and {res.report}")
        else:
            from cdkd.errors import CdkdValueError
            from cdkd.export import build_engine
            from cdkd.scene.runtimes import is_instance_model, runtime_for

            if is_instance_model(model, runtime_for(model)):
                raise CdkdValueError(f"{model}: instance models (Mask R-CNN) do not build TensorRT engines here (NMS, "
                                     "RoIAlign and a variable number of detections); run the .onnx in ONNX Runtime")

            res = build_engine(model, out, fp16=fp16, int8=int8, calib=calib, calib_tiles=calib_tiles,
                               max_batch=max_batch, workspace_gb=workspace_gb, opset=opset, check_data=check_data,
                               check_tiles=check_tiles, min_agreement=min_agreement, overwrite=overwrite)
            if res.onnx_parity is not None:
                typer.echo(res.onnx_parity.summary())
            lo, _, hi = res.batch
            typer.echo(f"wrote {res.engine} ({res.precision}, batch {lo}..{hi}, TensorRT {res.tensorrt}) "
                       f"and {res.sidecar}")
