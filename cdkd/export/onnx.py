"""ONNX export of a ``segmenter.pt``: one self-describing ``.onnx`` file, checked against PyTorch before it is kept.

The model maps ``image`` (B, C, T, T) float32, normalised with the model's statistics, to ``logits``
(B, K, T, T) float32. T (the tile size) is fixed; B is fixed to ``batch_size`` or, with ``dynamic_batch``, free.
The ``InferenceMeta`` JSON (classes, normalisation with the bands' wavelengths when known, tile size, overlap) is
embedded in ``metadata_props`` under ``ONNX_METADATA_KEY``, so ``cdkd.inference.runtimes.OnnxRuntime`` needs nothing
but the file.

Which exporter: ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript's translation). The
TorchScript exporter (``dynamo=False``) fails on this model: it cannot export the UPerNet pyramid pooling's
``adaptive_avg_pool2d`` when the pool size does not divide the map (scales 3 and 6 on the 16 x 16 map of a
512 px tile, or any size once the batch is dynamic), and it is deprecated. torch.export traces timm's
``dynamic_img_size`` position-embedding path, ceil-mode pooling and bilinear resizes as plain ops, turns the
adaptive pooling into gathers and means, and keeps the batch symbolic.

Which opset: that exporter translates to opset 18 and newer only; asked for less it tries onnx's version converter,
which fails on this model (no 18 -> 17 adapter for Pad, asserts on default-valued attributes) and silently keeps
18. Opset 17 matters: TensorRT 8.5/8.6 (JetPack 5) parse at most opset 17 (TensorRT 10 parses 9 to 20+). So
the model is exported at 18 and the few operators that opset 18 changed are rewritten here (``_to_opset17``).
The parity check runs on the rewritten model, so a bad rewrite cannot go unnoticed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cdkd.artifacts import ONNX_METADATA_KEY, InferenceMeta, load_segmenter
from cdkd.errors import CdkdValueError, OutputExistsError
from cdkd.export.parity import MIN_AGREEMENT, ParityError, ParityResult, compare
from cdkd.export.tiles import real_tiles, synthetic_tiles
from cdkd.utils.atomic import atomic_path, atomic_write_text

DEFAULT_OPSET = 17
MIN_OPSET = 17  # LayerNormalization, in every ViT block, is an opset-17 operator
EXPORTER_OPSET = 18  # the lowest opset torch's dynamo exporter translates to
INPUT_NAME, OUTPUT_NAME = "image", "logits"
SINGLE_FILE_LIMIT = 2**31 - 2**26  # protobuf caps a message at 2 GiB; leave room for the graph itself

# Reductions whose ``axes`` opset 18 moved from an attribute to an input (ReduceSum did so in opset 13).
_REDUCE_AXES_INPUT = (
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
)
# Attributes opset 18 added to existing operators, at the values that mean what opset 17 meant without them.
_OPSET18_DEFAULTS: dict[str, dict[str, Any]] = {
    "Resize": {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"},
    "LpPool": {"ceil_mode": 0},
    **{op: {"noop_with_empty_axes": 0} for op in _REDUCE_AXES_INPUT},
}


@dataclass(frozen=True)
class ExportReport:
    """What ``export_onnx`` wrote and how well the exported model matches PyTorch (also saved as JSON).

    ``batch``: the fixed batch size, or None for a dynamic batch. ``input_shape``/``output_shape``: as in the
    model, "batch" for the dynamic dimension. ``seconds``: wall time of export and check together.
    """

    onnx: str
    report: str
    segmenter: str
    opset: int
    batch: int | None
    input_shape: tuple[int | str, ...]
    output_shape: tuple[int | str, ...]
    size_bytes: int
    exporter: str
    versions: dict[str, str]
    meta: dict[str, Any]
    parity: ParityResult
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parity"]["passed"] = self.parity.passed
        return d


def report_path(out: str | Path) -> Path:
    """``model.onnx`` -> ``model.export.json`` (``model.onnx.json`` would read as a TensorRT engine sidecar)."""
    out = Path(out)
    return out.with_name(out.stem + ".export.json")


def _check_args(out: Path, opset: int, batch_size: int, check_tiles: int, min_agreement: float) -> None:
    import onnx

    if out.suffix.lower() != ".onnx":
        raise CdkdValueError(f"{out}: an ONNX model's name must end in .onnx (the runtime is chosen by suffix)")
    highest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise CdkdValueError(
            f"opset must be an integer from {MIN_OPSET} (LayerNormalization) to {highest} "
            f"(this onnx package), got {opset!r}"
        )
    for name, value in (("batch size", batch_size), ("number of check tiles", check_tiles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CdkdValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 <= min_agreement <= 1.0:
        raise CdkdValueError(f"min_agreement must be a fraction in [0, 1], got {min_agreement}")


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """OutputExistsError naming the first of ``paths`` that exists, unless ``overwrite``."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]}: already exists; pass --overwrite (overwrite=True) to replace it")
    from cdkd.utils.paths import check_writable

    check_writable(Path(paths[0]).parent, f"{paths[0]}: cannot write the output")


@contextmanager
def fixed_position_embedding(encoder: Any, grid: int) -> Iterator[None]:
    """While exporting, make ``encoder`` add its position embedding for a ``grid`` x ``grid`` token map as a constant.

    With ``dynamic_img_size`` timm resamples the learnt embedding in every forward, and under torch.export it
    skips its same-size shortcut on purpose (to keep graphs size-generic): the ONNX graph would carry a bicubic,
    antialiased Resize of a constant, which opset 17 cannot express, TensorRT may not parse and every run would
    recompute. The tile size of an export is fixed, so the embedding is computed once here, by the same function
    the forward calls, and captured as a constant. The same holds for the windowed and RSMamba students' own
    resampling.
    """
    import torch
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer

    from cdkd.models.tokengrid import TokenGridBackbone

    with torch.no_grad():
        if isinstance(encoder, TokenGridBackbone):  # cdkd's students resample in position_embedding(h, w)
            pos = encoder.position_embedding(grid, grid)  # (1, grid, grid, C)
            name = "position_embedding"

            def fixed(h: int, w: int) -> torch.Tensor:
                return pos

        elif (
            isinstance(encoder, VisionTransformer)
            and encoder.dynamic_img_size
            and encoder.pos_embed is not None
            and encoder.num_prefix_tokens == 0
        ):  # the students: no class or register tokens
            pos = resample_abs_pos_embed(
                encoder.pos_embed,
                new_size=[grid, grid],
                old_size=list(encoder.patch_embed.grid_size),
                num_prefix_tokens=0,
            )
            name = "_pos_embed"  # timm's own method

            def fixed(x: torch.Tensor) -> torch.Tensor:  # type: ignore[misc]  # timm's _pos_embed: (B, h, w, C) -> (B, h * w, C)
                b, _, _, c = x.shape
                return encoder.pos_drop(x.view(b, -1, c) + pos)

        else:
            yield
            return
    setattr(encoder, name, fixed)  # an instance attribute shadows the method until deleted
    try:
        yield
    finally:
        delattr(encoder, name)


def _trace(model: Any, meta: InferenceMeta, opset: int, batch: int, dynamic: bool) -> Any:
    """The segmenter as an ``onnx.ModelProto`` at ``max(opset, 18)``, weights inside."""
    import torch

    # torch.export specialises a dimension whose example size is 1, so a dynamic batch is traced at 2 or more.
    example = torch.zeros(max(batch, 2) if dynamic else batch, meta.in_chans, meta.tile_size, meta.tile_size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    with fixed_position_embedding(model.encoder, meta.tile_size // model.patch_size):
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=max(opset, EXPORTER_OPSET),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
        )
    assert program is not None  # the dynamo exporter returns its program
    return program.model_proto


def _constant_tensors(graph: Any) -> dict[str, Any]:
    """Constant tensors of ``graph`` by name: initializers and Constant node outputs (where Reduce axes live)."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def _drop_unused(graph: Any, names: set[str]) -> None:
    """Remove the initializers and Constant nodes among ``names`` that nothing reads any more."""
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    unused = names - used
    kept_init = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)
    kept_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in unused)]
    del graph.node[:]
    graph.node.extend(kept_nodes)


def _to_opset17(proto: Any) -> Any:
    """Rewrite an opset-18 ``proto`` as opset 17, in place; CdkdValueError where 17 cannot express it.

    One opset step changes few operators (``since_version == 18``), and the exporter uses them in their opset-17
    meaning: attributes at their defaults, Reduce ``axes`` as a constant input, Pad without ``axes``. onnx's own
    version converter cannot do it: it has no 18 -> 17 adapter for Pad and rejects attributes set to defaults.
    """
    import onnx
    from onnx import numpy_helper

    constants = _constant_tensors(proto.graph)
    moved: set[str] = set()  # constants that became attributes

    def refuse(node: Any, why: str) -> CdkdValueError:
        return CdkdValueError(
            f"cannot express the exported model in opset 17 ({node.op_type} {why}); export with "
            f"opset {EXPORTER_OPSET} or higher (TensorRT 10, ONNX Runtime)"
        )

    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or onnx.defs.get_schema(node.op_type, 18).since_version < 18:
            continue  # the same operator in opset 17
        defaults = _OPSET18_DEFAULTS.get(node.op_type, {})
        kept = [
            a
            for a in node.attribute
            if not (a.name in defaults and onnx.helper.get_attribute_value(a) == defaults[a.name])
        ]
        del node.attribute[:]
        node.attribute.extend(kept)
        new = [a.name for a in node.attribute if a.name in defaults or (node.op_type == "Resize" and a.name == "axes")]
        if new:
            raise refuse(node, f"sets {', '.join(new)}, new in opset 18")
        if node.op_type in _REDUCE_AXES_INPUT:
            if len(node.input) > 1 and node.input[1]:
                if node.input[1] not in constants:
                    raise refuse(node, "has computed axes")
                axes = numpy_helper.to_array(constants[node.input[1]]).reshape(-1).tolist()
                moved.add(node.input[1])
                del node.input[1:]
                if axes:  # no axes: reduce over all, in both opsets
                    node.attribute.append(onnx.helper.make_attribute("axes", axes))
        elif node.op_type == "Pad":
            if len(node.input) > 3 and node.input[3]:
                raise refuse(node, "pads selected axes")
        elif node.op_type in ("ScatterElements", "ScatterND"):
            if any(a.name == "reduction" and a.s in (b"max", b"min") for a in node.attribute):
                raise refuse(node, "reduces with max/min")
        elif node.op_type not in ("Resize", "LpPool"):
            raise refuse(node, "is not in opset 17")
    _drop_unused(proto.graph, moved)  # ONNX Runtime would warn about each one at every session start
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 17
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise CdkdValueError(
            f"the exported model fails onnx's checker at opset 17 ({str(e).splitlines()[0]}); "
            f"export with opset {EXPORTER_OPSET} or higher"
        ) from None
    return proto


def embed_meta(proto: Any, meta: InferenceMeta) -> None:
    """Write the ``InferenceMeta`` JSON and a few human-readable keys into ``metadata_props``."""
    props = {
        ONNX_METADATA_KEY: meta.to_json(),
        "cdkd.classes": json.dumps(list(meta.classes.names)),
        "cdkd.tile_size": str(meta.tile_size),
        "cdkd.in_chans": str(meta.in_chans),
        "cdkd.arch": f"{meta.arch} + {meta.head}",
    }
    if meta.norm.spectral is not None:  # the bands' centres, readable without parsing the JSON
        props["cdkd.wavelengths_nm"] = ",".join(f"{c:g}" for c in meta.norm.spectral.centers)
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (
        f"cdkd segmenter: {INPUT_NAME} (B, {meta.in_chans}, {meta.tile_size}, {meta.tile_size}) "
        f"float32 normalised -> {OUTPUT_NAME} (B, {meta.num_classes}, {meta.tile_size}, "
        f"{meta.tile_size}); metadata under {ONNX_METADATA_KEY!r}"
    )


def _shape(value_info: Any) -> tuple[int | str, ...]:
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)


@dataclass(frozen=True)
class CheckTiles:
    """Tiles (N, C, T, T) float32, normalised, for a parity check; ``source`` is a folder or "synthetic"."""

    tiles: Any
    source: str
    files: tuple[str, ...]

    @classmethod
    def make(cls, meta: InferenceMeta, check_data: str | Path | None, n: int, seed: int = 0) -> CheckTiles:
        """Real tiles from the images in ``check_data``, else (None) smooth synthetic ones."""
        if check_data is None:
            return cls(synthetic_tiles(meta, n, seed), "synthetic", ())
        tiles, files = real_tiles(check_data, meta, n, seed)
        return cls(tiles, str(check_data), tuple(files))


def _parity(segmenter: Path, onnx_path: Path, check: CheckTiles, min_agreement: float) -> ParityResult:
    from cdkd.inference.runtimes import OnnxRuntime, TorchRuntime

    reference = TorchRuntime(segmenter, device="cpu", amp="none")
    candidate = OnnxRuntime(onnx_path, device="cpu")
    return compare(
        reference,
        candidate,
        check.tiles,
        chunk=candidate.max_batch or 1,
        source=check.source,
        files=check.files,
        min_agreement=min_agreement,
    )


def check_parity(
    segmenter: str | Path,
    onnx_path: str | Path,
    *,
    check_data: str | Path | None = None,
    check_tiles: int = 8,
    min_agreement: float = MIN_AGREEMENT,
    seed: int = 0,
) -> ParityResult:
    """ONNX Runtime (CPU) against PyTorch (CPU, float32) on ``check_tiles`` tiles of ``check_data`` (a folder of
    images) or, without it, synthetic tiles. Returns the result; never raises on a mismatch."""
    from cdkd.inference.runtimes import read_onnx_meta

    check = CheckTiles.make(read_onnx_meta(onnx_path), check_data, check_tiles, seed)
    return _parity(Path(segmenter), Path(onnx_path), check, min_agreement)


def export_onnx(
    segmenter: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    check_data: str | Path | None = None,
    check_tiles: int = 8,
    min_agreement: float = MIN_AGREEMENT,
    overwrite: bool = False,
) -> ExportReport:
    """Export ``segmenter`` (a ``segmenter.pt``) to the ONNX model ``out`` and check it against PyTorch.

    Args:
        segmenter: ``segmenter.pt`` written by ``cdkd finetune``.
        out: the ``.onnx`` file; ``<stem>.export.json`` (the ``ExportReport``) is written beside it.
        opset: ONNX opset, 17 (default: TensorRT 8.5+, ONNX Runtime) or higher.
        dynamic_batch: a free batch dimension; else the batch is fixed to ``batch_size`` (runtimes pad/chunk).
        check_data: folder of images for the parity check (tiles normalised as the scene engine does); None
            uses smooth synthetic tiles, which the report says.
        check_tiles: number of parity tiles.
        min_agreement: the smallest fraction of pixels whose class must agree with PyTorch.
        overwrite: replace an existing ``out`` and report.

    The model is kept only if the check passes: the file is written under a temporary name, checked with
    ``onnx.checker`` and ONNX Runtime, and renamed when both are satisfied.

    Raises:
        OutputExistsError: ``out`` or its report exists and not ``overwrite``. CheckpointError: ``segmenter`` is
        missing or corrupt. CdkdValueError: bad argument, a model too large for one file. DataError: no usable
        image in ``check_data``. ParityError: agreement below ``min_agreement`` (nothing is written).

    A ``detector.pt`` (instance segmentation) is refused here: ``cdkd.export.detector_onnx`` exports it (batch 1,
    its own parity check), and ``cdkd.tasks.task_of_model(path).export_onnx`` picks the exporter by the model.
    """
    import onnx
    import onnxruntime
    import torch

    from cdkd.artifacts import DETECTOR_FORMAT, artifact_format

    if artifact_format(segmenter) == DETECTOR_FORMAT:
        raise CdkdValueError(
            f"{segmenter}: an instance model (detector.pt); export it with cdkd export or "
            "cdkd.export.detector_onnx.export_detector_onnx (cdkd.tasks chooses by the model)"
        )
    start = time.perf_counter()
    out, segmenter = Path(out), Path(segmenter)
    if segmenter.suffix.lower() == ".onnx":
        raise CdkdValueError(
            f"{segmenter}: already an ONNX model; ONNX export takes a segmenter.pt (to build an "
            "engine from it: --format tensorrt)"
        )
    report = report_path(out)
    _check_args(out, opset, batch_size, check_tiles, min_agreement)
    refuse_existing([out, report], overwrite)
    model, info = load_segmenter(segmenter)
    meta = info.inference_meta()
    check = CheckTiles.make(meta, check_data, check_tiles)  # before the slow part: bad data fails fast
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if size >= SINGLE_FILE_LIMIT:
        raise CdkdValueError(
            f"{segmenter}: {size / 2**30:.1f} GiB of weights exceed what one ONNX file can hold "
            "(protobuf's 2 GiB limit); cdkd exports single-file models only"
        )

    proto = _trace(model, meta, opset, batch_size, dynamic_batch)
    del model  # the PyTorch runtime of the parity check loads its own copy
    onnx.checker.check_model(proto, full_check=True)  # a failure here is an exporter bug: keep its traceback
    if opset < EXPORTER_OPSET:
        proto = _to_opset17(proto)  # MIN_OPSET is 17: one step down at most
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:  # torch keeps the opset it could reach when a conversion fails, with a log line only
        raise CdkdValueError(
            f"torch {torch.__version__} exported opset {written}, not the {opset} asked for; use --opset {written}"
        )
    embed_meta(proto, meta)

    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
        parity = _parity(segmenter, tmp, check, min_agreement)
        if not parity.passed:
            raise ParityError(
                f"{out}: ONNX Runtime disagrees with PyTorch ({parity.summary()}, below the "
                f"{100 * min_agreement:.1f}% that --min-agreement asks); the model was not written"
            )
    result = ExportReport(
        onnx=str(out),
        report=str(report),
        segmenter=str(segmenter),
        opset=opset,
        batch=None if dynamic_batch else batch_size,
        input_shape=_shape(proto.graph.input[0]),
        output_shape=_shape(proto.graph.output[0]),
        size_bytes=out.stat().st_size,
        exporter="torch.onnx.export(dynamo=True)",
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        meta=meta.to_dict(),
        parity=parity,
        seconds=round(time.perf_counter() - start, 3),
    )
    atomic_write_text(report, json.dumps(result.to_dict(), indent=2) + "\n")
    return result
