"""INT8 ONNX models: one calibrated Q/DQ model for ONNX Runtime on CPUs and for TensorRT on Jetsons.

A float model (``export_onnx``'s, or one exported on the way from a ``segmenter.pt``) is quantized statically by
ONNX Runtime's tools (``quantize_static``, ``QuantFormat.QDQ``): QuantizeLinear/DequantizeLinear pairs on the
inputs and weights of the matrix products and convolutions, their activation ranges calibrated on real tiles cut
and normalised exactly as the scene engine cuts them (``cdkd.export.tiles``). The choices serve both runtimes
with one file:

- int8 activations with zero point 0 and int8 weights, symmetric, one scale per output channel: TensorRT's
  explicit quantization takes nothing else (no uint8, no zero points), and ONNX Runtime runs the same S8S8 model
  with its integer (VNNI) kernels; uint8 activations were ~10 % faster there, not worth a second artifact.
- Only MatMul, Gemm and Conv are quantized. Softmax, LayerNormalization, GELU, Resize and the additions stay
  float32 (quantized, ONNX Runtime's QLinearSoftmax alone cost more than all int8 matrix products gained), and
  so do the biases (TensorRT takes no int32 DequantizeLinear; ONNX Runtime was no slower).
- The parts in ``KEEP_FLOAT`` may stay float; ``DEFAULT_KEEP_FLOAT`` holds those whose quantization measurably
  cost accuracy for what it saved (docs/int8.md): ``attention`` (the two activation-by-activation products of
  every attention block, whose softmax input and output have the widest, least uniform ranges), ``patch_embed``
  (the first convolution, on raw normalised pixels) and ``classifier`` (the last products before the logits).
- No graph optimisation before quantizing: ``quant_pre_process``'s would write ``com.microsoft`` fused operators
  that TensorRT cannot parse, and its shape inference alone changed nothing here (the exporter's graph carries
  its shapes). The result keeps the float model's opset (17: TensorRT 8.5+).

The quantized model is kept only if it agrees with the reference (PyTorch for a ``segmenter.pt``, ONNX Runtime
float32 for a float ``.onnx``) on ``check_tiles`` tiles held out of calibration (other files of the same folder)
on at least ``min_agreement`` of the pixels' classes. It carries cdkd's metadata like any exported model, plus
``cdkd.quantization`` (the settings, JSON), and ``<stem>.export.json`` reports both.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cdkd.errors import CdkdValueError
from cdkd.export.onnx import (
    DEFAULT_OPSET,
    INPUT_NAME,
    embed_meta,
    export_onnx,
    refuse_existing,
    report_path,
)
from cdkd.export.parity import MIN_AGREEMENT, ParityError, ParityResult, compare
from cdkd.export.tiles import CalibrationSplit, calibration_split
from cdkd.utils.atomic import atomic_path, atomic_write_text

CALIB_METHODS = ("minmax", "entropy", "percentile")
KEEP_FLOAT = ("patch_embed", "attention", "classifier")
DEFAULT_KEEP_FLOAT = ("patch_embed", "attention", "classifier")
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
MIN_INT8_AGREEMENT = 0.98  # fraction of pixels; see docs/int8.md for what trained models reach
QUANTIZATION_KEY = "cdkd.quantization"
PERCENTILE = 99.999  # of |activation|, for method "percentile" (ONNX Runtime's default)


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize: calibration ``method`` over ``calib_tiles`` tiles, check on ``check_tiles`` held-out
    tiles against ``min_agreement``; the parts of ``KEEP_FLOAT`` named in ``keep_float`` stay float32."""

    method: str = "minmax"
    calib_tiles: int = 32
    check_tiles: int = 8
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    per_channel: bool = True
    min_agreement: float = MIN_INT8_AGREEMENT
    seed: int = 0

    def check(self) -> None:
        """CdkdValueError naming the first bad field."""
        if self.method not in CALIB_METHODS:
            raise CdkdValueError(
                f"unknown calibration method {self.method!r}; choose one of {', '.join(CALIB_METHODS)}"
            )
        for name, value in (("calibration tiles", self.calib_tiles), ("check tiles", self.check_tiles)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CdkdValueError(f"number of {name} must be an integer >= 1, got {value!r}")
        unknown = [p for p in self.keep_float if p not in KEEP_FLOAT]
        if unknown:
            raise CdkdValueError(f"cannot keep {unknown[0]!r} in float; choose from {', '.join(KEEP_FLOAT)} (or none)")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise CdkdValueError(f"min_agreement must be a fraction in [0, 1], got {self.min_agreement}")


@dataclass(frozen=True)
class QuantizeReport:
    """What ``export_int8`` wrote (also saved as ``<stem>.export.json``).

    ``source``: the segmenter.pt or float .onnx quantized. ``parity``: the INT8 model against ``reference`` on
    tiles held out of calibration. ``float_parity``: the float export's own check, when the source was a
    segmenter.pt. ``quantized``: operators wrapped in Q/DQ, by type; ``kept_float``: node names left float32.
    """

    onnx: str
    report: str
    source: str
    opset: int
    batch: int | None
    size_bytes: int
    float_size_bytes: int
    options: QuantizeOptions
    quantized: dict[str, int]
    kept_float: dict[str, list[str]]
    calib_files: tuple[str, ...]
    held_files: tuple[str, ...]
    held_disjoint: bool
    versions: dict[str, str]
    meta: dict[str, Any]
    parity: ParityResult
    float_parity: ParityResult | None
    seconds: float
    format: str = "onnx int8 qdq"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parity"]["passed"] = self.parity.passed
        if self.float_parity is not None:
            d["float_parity"]["passed"] = self.float_parity.passed
        return d


def is_qdq(model: str | Path | Any) -> bool:
    """Whether ``model`` (a path or an ``onnx.ModelProto``) is quantized in Q/DQ form (holds QuantizeLinear or
    DequantizeLinear nodes): TensorRT builds such a model with explicit quantization, without a calibrator."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    return any(n.op_type in QDQ_OPS for n in proto.graph.node)


def _producers(graph: Any) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output}


def _constants(graph: Any) -> set[str]:
    return {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}


def float_nodes(graph: Any, parts: tuple[str, ...]) -> dict[str, list[str]]:
    """The quantizable nodes of ``graph`` that make up each of ``parts`` (names of ``KEEP_FLOAT``), found by the
    graph's structure rather than by layer names, so any student and head qualifies.

    ``patch_embed``: the products reading the model's input. ``classifier``: the products from which the output
    is reached without passing another product. ``attention``: MatMuls with no constant operand (Q Kᵀ and
    softmax · V).
    """
    quantizable = [n for n in graph.node if n.op_type in QUANTIZED_OPS]
    inputs = {i.name for i in graph.input}
    found: dict[str, list[str]] = {}
    if "patch_embed" in parts:
        found["patch_embed"] = [n.name for n in quantizable if any(i in inputs for i in n.input)]
    if "attention" in parts:
        constants = _constants(graph)
        found["attention"] = [
            n.name for n in quantizable if n.op_type == "MatMul" and not any(i in constants for i in n.input)
        ]
    if "classifier" in parts:
        producers, last, seen = _producers(graph), [], set()
        stack = [o.name for o in graph.output]
        while stack:  # walk back from the outputs through the float operators (Resize, Transpose, ...)
            node = producers.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in QUANTIZED_OPS:
                last.append(node.name)
            else:
                stack.extend(i for i in node.input if i)
        found["classifier"] = sorted(last)
    return found


def _reader(tiles: np.ndarray, batch: int) -> Any:
    """A ``CalibrationDataReader`` over ``tiles`` (N, C, T, T), ``batch`` at a time, with the ``__len__`` and
    ``set_range`` that ONNX Runtime's strided calibration calls (one batch's activations in memory at a time)."""
    from onnxruntime.quantization import CalibrationDataReader

    class TileReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = [tiles[i : i + batch] for i in range(0, len(tiles) - batch + 1, batch)]
            self.set_range(0, len(self.batches))

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(self.batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.pending, None)
            return None if x is None else {INPUT_NAME: np.ascontiguousarray(x)}

    return TileReader()


@contextmanager
def _quiet_ort_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice as root-logger warnings ("consider pre-processing", an out-of-range
    axis it then ignores) and prints its histogram progress; cdkd's choices are made above and its command prints
    its own lines, so both are muted while the quantizer runs."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


@contextmanager
def _calibrate_only(quantized: set[str]) -> Iterator[None]:
    """While ``quantize_static`` runs, its calibrator records only the tensors of the nodes named in ``quantized``.

    It records every input and output of every MatMul/Gemm/Conv, those left float included; for the attention
    products these are the (B, heads, N, N) scores, and with them its calibration run of one 1024 px ViT-S tile
    passed 10 GiB (3.8 GiB without them; a plain forward takes 1.9). The calibrator has no option for this, so
    its tensor selection (``CalibraterBase.select_tensors_to_calibrate``, which every method inherits) is
    narrowed for the duration and restored after.
    """
    from onnxruntime.quantization.calibrate import CalibraterBase

    select = CalibraterBase.select_tensors_to_calibrate

    def narrowed(self: Any, model: Any) -> tuple[set[str], dict[str, Any]]:
        tensors, value_infos = select(self, model)
        wanted = {t for node in model.graph.node if node.name in quantized for t in (*node.input, *node.output)}
        return tensors & wanted, value_infos

    CalibraterBase.select_tensors_to_calibrate = narrowed
    try:
        yield
    finally:
        CalibraterBase.select_tensors_to_calibrate = select


def quantize_qdq(float_onnx: Path, out: Path, tiles: np.ndarray, options: QuantizeOptions) -> dict[str, list[str]]:
    """Write ``out``: ``float_onnx`` quantized to int8 Q/DQ, calibrated on ``tiles`` (N, C, T, T) normalised.

    Returns the nodes kept in float, by part. Metadata are the float model's; ``export_int8`` adds its own.
    ONNX Runtime writes its calibration model (every intermediate tensor an output) in a temporary folder of
    its own and sees one batch's activations at a time.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    proto = onnx.load(str(float_onnx), load_external_data=False)
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    batch = dim.dim_value if dim.dim_value and not dim.dim_param else 1
    if len(tiles) < batch:
        raise CdkdValueError(
            f"calibrating {float_onnx.name} needs at least {batch} tiles (its fixed batch), got "
            f"{len(tiles)}: raise --calib-tiles"
        )
    kept = float_nodes(proto.graph, options.keep_float)
    excluded = {name for names in kept.values() for name in names}
    quantized = {n.name for n in proto.graph.node if n.op_type in QUANTIZED_OPS and n.name not in excluded}
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[options.method]
    extra = {
        "ActivationSymmetric": True,  # zero point 0: TensorRT's only int8 form
        "WeightSymmetric": True,
        "CalibTensorRangeSymmetric": True,  # histograms of |x| for the symmetric ranges above
        "QuantizeBias": False,  # float biases: TensorRT takes no int32 DequantizeLinear
        "CalibStridedMinMax": 1,  # one batch's activations in memory at a time (GBs at 1024 px)
        "CalibPercentile": PERCENTILE,
    }
    with _quiet_ort_quantizer(), _calibrate_only(quantized):
        quantize_static(
            str(float_onnx),
            str(out),
            _reader(tiles, batch),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=options.per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=sorted(excluded),
            extra_options=extra,
            calibration_providers=["CPUExecutionProvider"],
        )
    return kept


def quantized_ops(proto: Any) -> dict[str, int]:
    """How many MatMul/Gemm/Conv nodes of ``proto`` read a DequantizeLinear output, by operator type."""
    producers = _producers(proto.graph)
    counts: Counter[str] = Counter()
    for node in proto.graph.node:
        if node.op_type in QUANTIZED_OPS and any(
            producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input
        ):
            counts[node.op_type] += 1
    return dict(sorted(counts.items()))


def _int8_parity(
    reference: Any, candidate_path: Path, split: CalibrationSplit, held_source: str, min_agreement: float
) -> ParityResult:
    from cdkd.inference.runtimes import OnnxRuntime

    candidate = OnnxRuntime(candidate_path, device="cpu")
    result = compare(
        reference,
        candidate,
        split.held,
        chunk=candidate.max_batch or 1,
        source=held_source,
        files=split.held_files,
        min_agreement=min_agreement,
    )
    return replace(result, candidate="onnx int8", reference=f"{reference.name} float32")


def export_int8(
    model: str | Path,
    out: str | Path,
    calib: str | Path | None,
    *,
    options: QuantizeOptions | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    overwrite: bool = False,
) -> QuantizeReport:
    """Write ``out``, an INT8 Q/DQ ONNX model of ``model``, calibrated on the images in ``calib``, and its report.

    Args:
        model: a ``segmenter.pt`` (exported to a float ONNX model in a temporary folder first: ``opset``,
            ``dynamic_batch``, ``batch_size`` as for ``export_onnx``, its parity check on ``calib``'s tiles) or a
            float ``.onnx`` written by ``export_onnx``.
        out: the ``.onnx`` to write; ``<stem>.export.json`` goes beside it.
        calib: folder of images like those the model will map; its files are split into calibration tiles and
            check tiles held out of calibration (``cdkd.export.tiles.calibration_split``).
        options: calibration method, tile counts, parts kept in float, the agreement the check demands
            (default ``QuantizeOptions()``).

    Raises:
        CdkdValueError: no ``calib``, a bad option, an already quantized or instance model. DataError: no usable
        image in ``calib``. OutputExistsError: ``out`` or its report exists and not ``overwrite``.
        CheckpointError: ``model`` missing or corrupt. ParityError: the INT8 model agrees with the reference on
        fewer than ``options.min_agreement`` of the held-out pixels (nothing is written).
    """
    import onnx
    import onnxruntime

    from cdkd.artifacts import load_segmenter
    from cdkd.inference.runtimes import OnnxRuntime, TorchRuntime, read_onnx_meta

    start = time.perf_counter()
    model, out = Path(model), Path(out)
    if calib is None:
        raise CdkdValueError(
            "INT8 export needs images to calibrate on: pass --calib DIR (real imagery like the "
            "scenes the model will map; some of its files are held out to check the result)"
        )
    options = options if options is not None else QuantizeOptions()
    options.check()
    if out.suffix.lower() != ".onnx":
        raise CdkdValueError(f"{out}: an ONNX model's name must end in .onnx (the runtime is chosen by suffix)")
    report = report_path(out)
    refuse_existing([out, report], overwrite)
    from_onnx = model.suffix.lower() == ".onnx"
    if from_onnx:
        meta = read_onnx_meta(model)
        if is_qdq(model):
            raise CdkdValueError(
                f"{model}: already quantized (it holds QuantizeLinear/DequantizeLinear); quantize "
                "the float model it came from"
            )
    else:
        meta = load_segmenter(model)[1].inference_meta()
    if meta.task != "semantic":
        raise CdkdValueError(f"{model}: INT8 export covers segmenters; run instance models in float")
    split = calibration_split(calib, meta, options.calib_tiles, options.check_tiles, options.seed)  # fail fast

    with tempfile.TemporaryDirectory(prefix="cdkd-int8-") as tmp:
        float_parity = None
        if from_onnx:
            float_onnx = model
            reference: OnnxRuntime | TorchRuntime = OnnxRuntime(model, device="cpu")
        else:
            float_onnx = Path(tmp) / "float.onnx"
            float_parity = export_onnx(
                model,
                float_onnx,
                opset=opset,
                dynamic_batch=dynamic_batch,
                batch_size=batch_size,
                check_data=calib,
                check_tiles=options.check_tiles,
                min_agreement=MIN_AGREEMENT,
            ).parity
            reference = TorchRuntime(model, device="cpu", amp="none")
        raw = Path(tmp) / "int8.onnx"
        kept = quantize_qdq(float_onnx, raw, split.calib, options)
        proto = onnx.load(str(raw))
        embed_meta(proto, meta)
        settings = {
            "method": options.method,
            "activations": "int8 symmetric per tensor",
            "weights": f"int8 symmetric per {'channel' if options.per_channel else 'tensor'}",
            "keep_float": list(options.keep_float),
            "calib_tiles": len(split.calib),
        }
        entry = proto.metadata_props.add()
        entry.key, entry.value = QUANTIZATION_KEY, json.dumps(settings)
        onnx.checker.check_model(proto)
        float_size = float_onnx.stat().st_size
        held_source = f"{calib} (held out of calibration)"
        with atomic_path(out) as candidate:
            onnx.save(proto, str(candidate))
            parity = _int8_parity(reference, candidate, split, held_source, options.min_agreement)
            if not parity.passed:
                raise ParityError(
                    f"{out}: the INT8 model disagrees with the float model ({parity.summary()}, below "
                    f"the {100 * options.min_agreement:.1f}% that --min-agreement asks); try "
                    "--calib-method entropy or percentile, more --calib-tiles or --keep-float; "
                    "the model was not written"
                )
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    result = QuantizeReport(
        onnx=str(out),
        report=str(report),
        source=str(model),
        opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        batch=None if dim.dim_param or not dim.dim_value else int(dim.dim_value),
        size_bytes=out.stat().st_size,
        float_size_bytes=float_size,
        options=options,
        quantized=quantized_ops(proto),
        kept_float=kept,
        calib_files=split.calib_files,
        held_files=split.held_files,
        held_disjoint=split.disjoint,
        versions={"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        meta=meta.to_dict(),
        parity=parity,
        float_parity=float_parity,
        seconds=round(time.perf_counter() - start, 3),
    )
    atomic_write_text(report, json.dumps(result.to_dict(), indent=2) + "\n")
    return result
