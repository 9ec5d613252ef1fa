"""``cdkd export``: a segmenter as an ONNX model checked against PyTorch, a TensorRT engine, or an engine's sidecar."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import typer

from cli import options as o
from cli.errors import cli_errors

ONNX = "ONNX"
INT8 = "INT8 (ONNX Q/DQ model, TensorRT engine)"
TRT = "TensorRT"

# Options as module constants, the way options.py holds the shared ones (and no call in a default argument).
model_arg = typer.Argument(
    ..., help="segmenter.pt from cdkd finetune; or model.onnx for --format tensorrt, --int8 and --sidecar."
)
format_opt = typer.Option(o.ExportFormat.onnx, "--format", help="What to write.")
out_opt = typer.Option(None, "--out", help="model.onnx or model.engine to write.")
opset_opt = typer.Option(
    17, "--opset", help="ONNX opset (17 suits TensorRT 8.5+ and ONNX Runtime).", rich_help_panel=ONNX
)
dynamic_opt = typer.Option(
    False, "--dynamic-batch", help="Free batch dimension (else fixed to --batch-size).", rich_help_panel=ONNX
)
batch_opt = typer.Option(1, "--batch-size", help="Fixed batch size of the ONNX model.", rich_help_panel=ONNX)
check_data_opt = typer.Option(
    None, "--check-data", help="Folder of images for the parity check (default: synthetic tiles).", rich_help_panel=ONNX
)
check_tiles_opt = typer.Option(8, "--check-tiles", help="Tiles in the parity check.", rich_help_panel=ONNX)
agreement_opt = typer.Option(
    None,
    "--min-agreement",
    help="Fraction of pixels whose class must match the float "
    "model (default 0.999; with --int8 0.98, on tiles held out of calibration).",
    rich_help_panel=ONNX,
)
fp16_opt = typer.Option(False, "--fp16", help="Allow fp16 kernels.", rich_help_panel=TRT)
int8_opt = typer.Option(
    False,
    "--int8",
    help="--format onnx: write a calibrated INT8 Q/DQ model (for ONNX Runtime "
    "and TensorRT); --format tensorrt: allow int8 kernels (a float model is calibrated on "
    "--calib, a Q/DQ model needs nothing).",
    rich_help_panel=INT8,
)
calib_opt = typer.Option(
    None,
    "--calib",
    help="Folder of images for INT8 calibration (some files are held out to check the INT8 ONNX model).",
    rich_help_panel=INT8,
)
calib_tiles_opt = typer.Option(32, "--calib-tiles", help="Tiles for INT8 calibration.", rich_help_panel=INT8)
calib_method_opt = typer.Option(
    o.CalibMethod.minmax,
    "--calib-method",
    help="INT8 ONNX: how activation ranges are calibrated.",
    rich_help_panel=INT8,
)
keep_float_opt = typer.Option(
    None,
    "--keep-float",
    help="INT8 ONNX: parts left float32, comma-separated from "
    "patch_embed, attention, classifier, or 'none' (default: all three).",
    rich_help_panel=INT8,
)
max_batch_opt = typer.Option(4, "--max-batch", help="Largest batch of a dynamic-batch engine.", rich_help_panel=TRT)
workspace_opt = typer.Option(4.0, "--workspace-gb", help="TensorRT workspace limit in GiB.", rich_help_panel=TRT)
sidecar_opt = typer.Option(
    None,
    "--sidecar",
    metavar="ENGINE",
    help="Write ENGINE.json for an engine built with trtexec from MODEL (.onnx), then stop.",
    rich_help_panel=TRT,
)


def export_command(
    model: Path = model_arg,
    fmt: o.ExportFormat = format_opt,
    out: Path | None = out_opt,
    opset: int = opset_opt,
    dynamic_batch: bool = dynamic_opt,
    batch_size: int = batch_opt,
    check_data: Path | None = check_data_opt,
    check_tiles: int = check_tiles_opt,
    min_agreement: float | None = agreement_opt,
    fp16: bool = fp16_opt,
    int8: bool = int8_opt,
    calib: Path | None = calib_opt,
    calib_tiles: int = calib_tiles_opt,
    calib_method: o.CalibMethod = calib_method_opt,
    keep_float: str | None = keep_float_opt,
    max_batch: int = max_batch_opt,
    workspace_gb: float = workspace_opt,
    sidecar: Path | None = sidecar_opt,
    overwrite: bool = o.overwrite_opt,
) -> None:
    """Export a segmenter to ONNX (checked against PyTorch on real or synthetic tiles), to an INT8 ONNX model, or
    build a TensorRT engine.

    Examples: cdkd export runs/seg/segmenter.pt --format onnx --dynamic-batch --check-data scenes/ --out model.onnx;
    cdkd export runs/seg/segmenter.pt --format onnx --int8 --calib tiles/ --out model.int8.onnx;
    cdkd export model.onnx --format tensorrt --fp16 --out model.engine (on the target GPU);
    cdkd export model.onnx --sidecar model.engine (for an engine built with trtexec).
    """
    if sidecar is not None:
        if out is not None:
            raise typer.BadParameter("--sidecar writes ENGINE.json beside the engine and takes no --out")
    elif out is None:
        raise typer.BadParameter("--out is required (the .onnx or .engine file to write)")
    onnx_int8 = fmt == o.ExportFormat.onnx and sidecar is None and int8
    if fmt == o.ExportFormat.onnx and sidecar is None and (fp16 or (calib is not None and not int8)):
        raise typer.BadParameter("--fp16 builds TensorRT engines (add --format tensorrt); --calib calibrates --int8")
    if onnx_int8 and check_data is not None:
        raise typer.BadParameter("--int8 checks the model on tiles held out of --calib; drop --check-data")
    with cli_errors():
        if sidecar is not None:
            from cdkd.export import write_sidecar

            typer.echo(f"wrote {write_sidecar(model, sidecar, overwrite=overwrite)} (metadata of {model})")
        elif onnx_int8:
            _export_int8(
                model,
                cast(Path, out),  # --out is required without --sidecar (checked above)
                calib,
                calib_tiles,
                calib_method,
                keep_float,
                check_tiles,
                min_agreement,
                opset=opset,
                dynamic_batch=dynamic_batch,
                batch_size=batch_size,
                overwrite=overwrite,
            )
        elif fmt == o.ExportFormat.onnx:
            from cdkd.tasks import task_of_model

            res = task_of_model(model).export_onnx(
                model,
                cast(Path, out),
                opset=opset,
                dynamic_batch=dynamic_batch,
                batch_size=batch_size,
                check_data=check_data,
                check_tiles=check_tiles,
                min_agreement=_float(min_agreement),
                overwrite=overwrite,
            )
            typer.echo(res.parity.summary())
            if res.parity.synthetic:
                typer.echo("(synthetic tiles: pass --check-data DIR to check on real imagery)")
            batch = "dynamic" if res.batch is None else res.batch
            typer.echo(
                f"wrote {res.onnx} (opset {res.opset}, batch {batch}, {res.size_bytes / 2**20:.1f} MiB) "
                f"and {res.report}"
            )
        else:
            from cdkd.export import build_engine
            from cdkd.tasks import task_of_model

            task_of_model(model).check_runtime(model, "tensorrt")

            res = build_engine(
                model,
                cast(Path, out),
                fp16=fp16,
                int8=int8,
                calib=calib,
                calib_tiles=calib_tiles,
                max_batch=max_batch,
                workspace_gb=workspace_gb,
                opset=opset,
                check_data=check_data,
                check_tiles=check_tiles,
                min_agreement=_float(min_agreement),
                overwrite=overwrite,
            )
            if res.onnx_parity is not None:
                typer.echo(res.onnx_parity.summary())
            lo, _, hi = res.batch
            how = {"explicit": " from Q/DQ", "implicit": " calibrated by TensorRT"}.get(res.quantization, "")
            typer.echo(
                f"wrote {res.engine} ({res.precision}{how}, batch {lo}..{hi}, TensorRT {res.tensorrt}) "
                f"and {res.sidecar}"
            )


def _float(min_agreement: float | None) -> float:
    """--min-agreement of a float export (the INT8 export has its own default)."""
    from cdkd.export.parity import MIN_AGREEMENT

    return MIN_AGREEMENT if min_agreement is None else min_agreement


def _export_int8(
    model: Path,
    out: Path,
    calib: Path | None,
    calib_tiles: int,
    method: o.CalibMethod,
    keep_float: str | None,
    check_tiles: int,
    min_agreement: float | None,
    **export: object,
) -> None:
    """``--format onnx --int8``: the calibrated Q/DQ model, its check on held-out tiles printed."""
    from cdkd.export.quantize import DEFAULT_KEEP_FLOAT, MIN_INT8_AGREEMENT, QuantizeOptions, export_int8

    words = o.words(keep_float)
    keep = DEFAULT_KEEP_FLOAT if words is None else tuple(w for w in words if w != "none")
    options = QuantizeOptions(
        method=method.value,
        calib_tiles=calib_tiles,
        check_tiles=check_tiles,
        keep_float=keep,
        min_agreement=MIN_INT8_AGREEMENT if min_agreement is None else min_agreement,
    )
    res = export_int8(model, out, calib, options=options, **export)  # type: ignore[arg-type]
    if res.float_parity is not None:
        typer.echo(f"float export: {res.float_parity.summary()}")
    held = (
        f"{len(res.held_files)} file(s) held out of calibration"
        if res.held_disjoint
        else "other positions of the one calibration image"
    )
    typer.echo(f"int8 ({options.method}, {len(res.calib_files)} calibration file(s)): {res.parity.summary()} [{held}]")
    ops = ", ".join(f"{n} {op}" for op, n in res.quantized.items())
    kept = ", ".join(f"{part} ({len(names)})" for part, names in res.kept_float.items()) or "nothing"
    typer.echo(f"quantized {ops}; kept float: {kept}")
    typer.echo(
        f"wrote {res.onnx} (opset {res.opset}, {res.size_bytes / 2**20:.1f} MiB, float "
        f"{res.float_size_bytes / 2**20:.1f} MiB) and {res.report}"
    )
