"""TensorRT engines from an exported ONNX model, and the metadata sidecar every engine needs.

An engine runs only on the GPU model and TensorRT version that built it, so it is built on the target device:
with ``build_engine`` where the ``tensorrt`` Python package and CUDA are present, or with ``trtexec`` (e.g. on a
Jetson) followed by ``write_sidecar``. An engine file cannot hold metadata, so the ONNX model's
``InferenceMeta`` JSON sits beside it as ``model.engine.json`` (``engine_sidecar``), where
``cdkd.inference.runtimes.TensorRTRuntime`` reads it.

Written against the TensorRT 10 Python API (explicit batch networks, ``build_serialized_network``, memory pool
limits). INT8 takes one of two paths, chosen once by ``int8_mode``: a Q/DQ model (``cdkd export --int8``, whose
scales were calibrated when it was quantized) is built with explicit quantization, the INT8 flag and no
calibrator or cache; a float model with ``int8`` is calibrated by TensorRT itself (implicit quantization,
``IInt8EntropyCalibrator2`` over real tiles normalised exactly as the engine's inputs), which TensorRT 10
deprecates and keeps for float models only.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cdkd.artifacts import InferenceMeta, engine_sidecar, load_segmenter
from cdkd.errors import CdkdError, CdkdValueError, CheckpointError
from cdkd.export.onnx import DEFAULT_OPSET, INPUT_NAME, export_onnx, refuse_existing
from cdkd.export.parity import ParityResult
from cdkd.export.quantize import is_qdq
from cdkd.export.tiles import real_tiles
from cdkd.inference.runtimes import read_onnx_meta
from cdkd.utils.atomic import atomic_path, atomic_write_text

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
GiB = 2**30


class EngineBuildError(CdkdError):
    """TensorRT could not parse the ONNX model or build an engine from it."""


@dataclass(frozen=True)
class EngineReport:
    """What ``build_engine`` wrote. ``batch``: (min, opt, max) of the optimisation profile, all equal for a
    fixed-batch model. ``precision``: "fp32", "fp16", "int8" or "int8+fp16" (the kernels TensorRT may pick).
    ``quantization``: "explicit" (a Q/DQ model), "implicit" (calibrated by TensorRT) or "none"."""

    engine: str
    sidecar: str
    source: str  # the .onnx or segmenter.pt it was built from
    precision: str
    batch: tuple[int, int, int]
    tensorrt: str
    calibration_cache: str | None
    calibration_tiles: int
    onnx_parity: ParityResult | None  # the ONNX export's check, when the engine was built from a segmenter.pt
    seconds: float
    quantization: str = "none"


def calibration_cache(engine: str | Path) -> Path:
    """``model.engine`` -> ``model.calib.cache``: INT8 scales, reusable by later builds (and ``trtexec --calib``)."""
    engine = Path(engine)
    return engine.with_name(engine.stem + ".calib.cache")


def write_sidecar(onnx_path: str | Path, engine_path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``engine_path``'s sidecar (``<engine>.json``) from the metadata of the ONNX model it was built from.

    For engines built with ``trtexec``, e.g. on a Jetson: ``cdkd export model.onnx --sidecar model.engine``.
    Returns the sidecar's path. Raises CheckpointError for a missing engine or an ONNX model without cdkd
    metadata, OutputExistsError for an existing sidecar unless ``overwrite``.
    """
    onnx_path, engine = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise CheckpointError(f"{onnx_path}: ONNX model not found (give the .onnx the engine was built from)")
    meta = read_onnx_meta(onnx_path)
    if not engine.is_file():
        raise CheckpointError(
            f"{engine}: engine not found (build it first, e.g. trtexec --onnx={onnx_path.name} "
            f"--saveEngine={engine.name} --fp16)"
        )
    sidecar = engine_sidecar(engine)
    refuse_existing([sidecar], overwrite)
    atomic_write_text(sidecar, meta.to_json())
    return sidecar


def _onnx_batch(path: Path) -> int | None:
    """The fixed batch size of an ONNX model's input, None when it is dynamic."""
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return None if dim.dim_param or not dim.dim_value else int(dim.dim_value)


def int8_mode(onnx_path: str | Path | None, int8: bool) -> str:
    """How an engine built from ``onnx_path`` quantizes: "explicit" for a Q/DQ model (whatever ``int8`` says: its
    scales are in the graph), "implicit" for a float model with ``int8`` (TensorRT calibrates), else "none".
    ``onnx_path`` None: a float model still to be exported from a segmenter.pt."""
    if onnx_path is not None and is_qdq(onnx_path):
        return "explicit"
    return "implicit" if int8 else "none"


def trtexec_command(
    onnx_name: str, engine_name: str, meta: InferenceMeta, *, dynamic: bool, fp16: bool, int8: bool, max_batch: int
) -> str:
    """The ``trtexec`` command that builds the engine ``build_engine`` would (without INT8 calibration data);
    for a Q/DQ model ``int8`` is what makes TensorRT take its Q/DQ nodes as int8 kernels."""
    parts = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={engine_name}"]
    parts += ["--fp16"] * fp16 + ["--int8"] * int8
    if dynamic:  # trtexec would otherwise build a batch-1 engine from a dynamic model
        dims = f"{meta.in_chans}x{meta.tile_size}x{meta.tile_size}"
        parts += [
            f"--minShapes={INPUT_NAME}:1x{dims}",
            f"--optShapes={INPUT_NAME}:{max_batch}x{dims}",
            f"--maxShapes={INPUT_NAME}:{max_batch}x{dims}",
        ]
    return " ".join(parts)


def _tensorrt() -> tuple[Any, str]:
    """(the tensorrt module, "") where engines can be built here, else (None, why not)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None, "the tensorrt Python package is not installed"
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA GPU is available"
    return trt, ""


def _unavailable(
    reason: str, model: Path, out: Path, meta: InferenceMeta, *, fp16: bool, mode: str, max_batch: int
) -> CdkdValueError:
    """The one-line error that says where and how to build the engine instead."""
    if model.suffix.lower() == ".onnx":
        onnx_name, first, dynamic = model.name, "", _onnx_batch(model) is None
    else:
        onnx_name, dynamic = f"{out.stem}.onnx", True
        first = f"export the ONNX model (cdkd export {model} --format onnx --dynamic-batch --out {onnx_name}), then "
    command = trtexec_command(
        onnx_name, out.name, meta, dynamic=dynamic, fp16=fp16, int8=mode != "none", max_batch=max_batch
    )
    if mode == "implicit":  # trtexec cannot calibrate from images: without a cache its INT8 scales are placeholders
        command += (
            f" --calib={calibration_cache(out).name} (a cache from a cdkd export --format tensorrt --int8 "
            "--calib build with the same TensorRT; without one use --fp16, or a Q/DQ model from cdkd export "
            "--int8 --calib DIR, which needs no cache)"
        )
    return CdkdValueError(
        f"TensorRT engines must be built on the target GPU (an engine runs only on the GPU model and TensorRT "
        f"version that built it), and {reason} here: {first}on the target device run {command}, then write its "
        f"metadata sidecar with cdkd export {onnx_name} --sidecar {out.name} (creates {engine_sidecar(out).name})"
    )


def _calibrator(trt: Any, tiles: np.ndarray | None, batch: int, cache: Path) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``tiles`` (N, C, T, T) ``batch`` at a time from one CUDA buffer.

    With ``tiles`` it calibrates afresh and writes ``cache``; without, TensorRT takes the scales from ``cache``.
    Defined here because the base class exists only once tensorrt is imported. (TensorRT 10.1 deprecates this
    implicit quantization in favour of Q/DQ nodes in the ONNX model, but still supports it.)
    """
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind11 bases must be initialised explicitly
            self.index = 0
            self.buffer: torch.Tensor | None = None
            if tiles is not None:
                self.buffer = torch.empty((batch, *tiles.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if tiles is None or self.index + batch > len(tiles):
                return None  # no more batches: calibration ends
            assert self.buffer is not None  # allocated whenever there are tiles
            self.buffer.copy_(torch.from_numpy(tiles[self.index : self.index + batch]))
            torch.cuda.synchronize()  # TensorRT reads the buffer on its own stream
            self.index += batch
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if tiles is None and cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                f.write(data)

    return Calibrator()


def _build(
    trt: Any,
    onnx_path: Path,
    out: Path,
    meta: InferenceMeta,
    *,
    fp16: bool,
    int8: bool,
    calib: Path | None,
    calib_tiles: int,
    max_batch: int,
    workspace_gb: float,
) -> tuple[tuple[int, int, int], int, str]:
    """Parse ``onnx_path``, build and write the engine ``out``; returns (batch profile, calibration tiles used,
    ``int8_mode``)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (flag 0); 8.x needs the flag, which 10 deprecates.
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse the model ({errors})")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * GiB))
    inp = network.get_input(0)
    sample = tuple(inp.shape)[1:]  # (C, T, T)
    dynamic = inp.shape[0] == -1
    if dynamic:
        profile = builder.create_optimization_profile()
        # the scene engine sends full batches except the last, so the kernels are tuned for the largest
        profile.set_shape(inp.name, (1, *sample), (max_batch, *sample), (max_batch, *sample))
        config.add_optimization_profile(profile)
        batches = (1, max_batch, max_batch)
    else:
        batches = (inp.shape[0],) * 3
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)

    used = 0
    mode = int8_mode(onnx_path, int8)
    if mode == "explicit":  # the Q/DQ nodes carry the scales: no calibrator, no cache
        config.set_flag(trt.BuilderFlag.INT8)
    elif mode == "implicit":
        config.set_flag(trt.BuilderFlag.INT8)
        tiles = real_tiles(calib, meta, calib_tiles)[0] if calib is not None else None
        if not dynamic:
            batch = batches[2]
        else:
            batch = min(max_batch, len(tiles)) if tiles is not None else 1
        if tiles is not None:
            used = len(tiles) // batch * batch  # whole batches only; a fixed-batch model takes nothing else
            if used == 0:
                raise CdkdValueError(
                    f"INT8 calibration of {onnx_path.name} needs at least {batch} tiles (its fixed "
                    f"batch), got {len(tiles)}: raise --calib-tiles"
                )
            tiles = tiles[:used]
        calibrator = _calibrator(trt, tiles, batch, calibration_cache(out))
        config.int8_calibrator = calibrator
        if dynamic:  # calibration runs at one shape: without this profile TensorRT takes kOPT, max_batch
            shape = (batch, *sample)
            calib_profile = builder.create_optimization_profile()
            calib_profile.set_shape(inp.name, shape, shape, shape)
            config.set_calibration_profile(calib_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"{onnx_path}: TensorRT could not build an engine (see its messages above; a larger "
            "--workspace-gb or a smaller --max-batch may help)"
        )
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        f.write(serialized)
    return batches, used, mode


def build_engine(
    model: str | Path,
    out: str | Path,
    *,
    fp16: bool = False,
    int8: bool = False,
    calib: str | Path | None = None,
    calib_tiles: int = 32,
    max_batch: int = 4,
    workspace_gb: float = 4.0,
    opset: int = DEFAULT_OPSET,
    check_data: str | Path | None = None,
    check_tiles: int = 8,
    min_agreement: float = 0.999,
    overwrite: bool = False,
) -> EngineReport:
    """Build the TensorRT engine ``out`` (and its sidecar ``<out>.json``) on this machine's GPU.

    Args:
        model: an exported ``.onnx`` (from ``export_onnx``), or a ``segmenter.pt``, exported first to a temporary
            dynamic-batch ONNX model (``opset``, ``check_data``, ``check_tiles``, ``min_agreement``: as for
            ``export_onnx``, parity check included).
        out: ``.engine``/``.plan`` file to write.
        fp16, int8: let TensorRT use fp16 / int8 kernels (both may be given; neither gives fp32).
        calib: folder of images for INT8 calibration of a float model (``calib_tiles`` tiles, normalised as the
            engine's inputs); without it ``int8`` reuses the calibration cache ``<stem>.calib.cache`` of an earlier
            build. A Q/DQ model (``cdkd export --int8``) is always built with its own int8 scales and takes none.
        max_batch: largest batch of a dynamic-batch model's optimisation profile (min 1, opt = max).
        workspace_gb: TensorRT's workspace memory pool limit in GiB.

    Raises:
        CdkdValueError: bad argument, or TensorRT/CUDA unavailable here (the message gives the trtexec command).
        CheckpointError: ``model`` missing or without cdkd metadata. EngineBuildError: TensorRT failed.
        OutputExistsError: ``out`` or its sidecar exists and not ``overwrite``.
    """
    start = time.perf_counter()
    model, out = Path(model), Path(out)
    if out.suffix.lower() not in ENGINE_SUFFIXES:
        raise CdkdValueError(
            f"{out}: an engine's name must end in {', '.join(ENGINE_SUFFIXES)} (the runtime is chosen by suffix)"
        )
    for name, value in (("max batch", max_batch), ("number of calibration tiles", calib_tiles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CdkdValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not workspace_gb > 0:
        raise CdkdValueError(f"workspace must be > 0 GiB, got {workspace_gb}")
    cache = calibration_cache(out)
    suffix = model.suffix.lower()
    if suffix not in (".onnx", ".pt", ".pth"):
        raise CdkdValueError(f"{model}: give an exported .onnx model or a segmenter.pt")
    sidecar = engine_sidecar(out)
    refuse_existing([out, sidecar], overwrite)
    meta = read_onnx_meta(model) if suffix == ".onnx" else load_segmenter(model)[1].inference_meta()
    mode = int8_mode(model if suffix == ".onnx" else None, int8)
    if mode == "explicit" and calib is not None:
        raise CdkdValueError(
            f"{model}: a Q/DQ model was calibrated when it was quantized; drop --calib (its int8 "
            "scales are in the graph)"
        )
    if mode == "implicit" and calib is None and not cache.is_file():
        raise CdkdValueError(
            f"int8 needs images to calibrate on (--calib DIR) or the calibration cache {cache} "
            "of an earlier build; or quantize the model first (cdkd export --format onnx --int8)"
        )
    trt, reason = _tensorrt()
    if trt is None:
        raise _unavailable(reason, model, out, meta, fp16=fp16, mode=mode, max_batch=max_batch)

    parity = None
    build = partial(
        _build,
        trt,
        out=out,
        meta=meta,
        fp16=fp16,
        int8=int8,
        calib=Path(calib) if calib else None,
        calib_tiles=calib_tiles,
        max_batch=max_batch,
        workspace_gb=workspace_gb,
    )
    if suffix == ".onnx":
        batches, used, mode = build(model)
    else:
        with tempfile.TemporaryDirectory(prefix="cdkd-export-") as tmp:
            onnx_path = Path(tmp) / f"{out.stem}.onnx"
            parity = export_onnx(
                model,
                onnx_path,
                opset=opset,
                dynamic_batch=True,
                check_data=check_data,
                check_tiles=check_tiles,
                min_agreement=min_agreement,
            ).parity
            batches, used, mode = build(onnx_path)
    atomic_write_text(sidecar, meta.to_json())
    precision = "+".join(p for p, on in (("int8", mode != "none"), ("fp16", fp16)) if on) or "fp32"
    return EngineReport(
        engine=str(out),
        sidecar=str(sidecar),
        source=str(model),
        precision=precision,
        batch=batches,
        tensorrt=trt.__version__,
        calibration_cache=str(cache) if mode == "implicit" else None,
        calibration_tiles=used,
        onnx_parity=parity,
        seconds=round(time.perf_counter() - start, 3),
        quantization=mode,
    )
