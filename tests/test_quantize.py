"""INT8: the calibrated Q/DQ ONNX model (structure, ONNX Runtime, agreement, metadata, refusals), the TensorRT
path it takes, and the CPU runtime choices (session options, bf16 autocast)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import make_geotiff, make_image, make_segmenter, one_clean_error, synthetic_image
from test_export import _FakeTensorRT
from typer.testing import CliRunner

from cdkd.artifacts import engine_sidecar
from cdkd.errors import CdkdValueError, DataError, OutputExistsError
from cdkd.export import check_parity, export_onnx
from cdkd.export.parity import ParityError, compare
from cdkd.export.quantize import (
    CALIB_METHODS,
    QUANTIZATION_KEY,
    QuantizeOptions,
    export_int8,
    float_nodes,
    is_qdq,
)
from cdkd.export.tensorrt import build_engine, int8_mode
from cdkd.export.tiles import calibration_split
from cdkd.inference.runtimes import (
    OnnxRuntime,
    TorchRuntime,
    cpu_bf16_supported,
    onnx_session_options,
    physical_cores,
    read_onnx_meta,
)
from cli.main import app

runner = CliRunner()
# The fixture's weights are random: its logits lie close together, so quantization noise flips more pixels than in a
# trained model (docs/int8.md: >= 99 % there). The check's own threshold for these tests:
FIXTURE_AGREEMENT = 0.95
OPTIONS = QuantizeOptions(calib_tiles=8, check_tiles=4, min_agreement=FIXTURE_AGREEMENT)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    """Ten small structured RGB images (96 x 96 PNG) to calibrate and check on."""
    root = tmp_path_factory.mktemp("calib") / "tiles"
    for i in range(10):
        make_image(root / f"t{i}.png", synthetic_image((3, 96, 96), seed=10 + i), "PNG")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory, calib_dir: Path) -> tuple[Path, Path, object]:
    """A tiny 64 px vit_s + UPerNet segmenter.pt, its float ONNX export and that export quantized (min-max)."""
    root = tmp_path_factory.mktemp("int8")
    seg = make_segmenter(root / "segmenter.pt")
    fp32 = Path(export_onnx(seg, root / "model.onnx", dynamic_batch=True).onnx)
    return seg, fp32, export_int8(fp32, root / "model.int8.onnx", calib_dir, options=OPTIONS)


def _consumers_of_dq(proto) -> dict[str, list[str]]:
    """Node name -> the op types producing its inputs."""
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    return {n.name: [producers.get(i, "") for i in n.input] for n in proto.graph.node}


# --------------------------------------------------------------------------------------------------------------
# the quantized model


def test_qdq_wraps_the_products_it_should_and_only_those(models) -> None:
    _, fp32, res = models
    proto = onnx.load(res.onnx)
    assert is_qdq(proto) and not is_qdq(fp32)
    kept = {name for names in res.kept_float.values() for name in names}
    assert len(res.kept_float["patch_embed"]) == 1 and len(res.kept_float["classifier"]) == 1
    assert len(res.kept_float["attention"]) == 2 * 4  # Q Kᵀ and softmax · V in each of the 4 blocks
    inputs = _consumers_of_dq(proto)
    products = [n for n in proto.graph.node if n.op_type in ("MatMul", "Conv", "Gemm")]
    for node in products:
        from_dq = [p == "DequantizeLinear" for p in inputs[node.name][:2]]
        if node.name in kept:
            assert not any(from_dq), node.name
        else:  # activations and weights both int8
            assert all(from_dq), (node.name, inputs[node.name])
    wrapped = sum(res.quantized.values())
    assert wrapped == len(products) - len(kept) and res.quantized["Conv"] >= 8 and res.quantized["MatMul"] >= 16
    softmax_out = {n.output[0] for n in proto.graph.node if n.op_type == "Softmax"}
    assert softmax_out and not any(
        i in softmax_out for n in proto.graph.node if n.op_type == "QuantizeLinear" for i in n.input
    )  # attention stays float32 on both sides of its softmax
    for node in proto.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization", "Erf"):
            assert "DequantizeLinear" not in inputs[node.name], node.name  # these read float32


def test_scales_suit_tensorrt_and_opset_stays_17(models) -> None:
    """Symmetric int8 (zero point 0) everywhere, per-channel weights, float biases, standard operators only."""
    _, _, res = models
    proto = onnx.load(res.onnx)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    dqs = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert dqs
    per_channel = 0
    for node in dqs:
        zero = init[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name
        if node.op_type == "DequantizeLinear" and node.input[0] in init:  # a weight
            assert init[node.input[0]].dtype == np.int8
            per_channel += init[node.input[1]].size > 1
    assert per_channel >= 8
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17] == [res.opset]
    assert res.size_bytes < 0.6 * res.float_size_bytes  # the tiny model's LayerNorms etc. weigh more than ViT-S's


def test_runs_in_onnx_runtime_and_matches_the_float_model(models, calib_dir: Path) -> None:
    _, fp32, res = models
    assert res.parity.passed and res.parity.agreement >= FIXTURE_AGREEMENT and not res.parity.synthetic
    assert res.held_disjoint and not set(res.held_files) & set(res.calib_files)
    int8 = OnnxRuntime(res.onnx, device="cpu")
    tiles = calibration_split(calib_dir, int8.meta, 2, 3, seed=5).held
    out = int8(tiles)
    assert out.shape == (3, 5, 64, 64) and np.isfinite(out).all()
    again = compare(OnnxRuntime(fp32, device="cpu"), int8, tiles, min_agreement=FIXTURE_AGREEMENT)
    assert again.passed, again.summary()


def test_keeps_its_metadata_and_reports(models) -> None:
    _, fp32, res = models
    assert read_onnx_meta(res.onnx) == read_onnx_meta(fp32)
    props = {p.key: p.value for p in onnx.load(res.onnx, load_external_data=False).metadata_props}
    settings = json.loads(props[QUANTIZATION_KEY])
    assert settings["method"] == "minmax" and settings["calib_tiles"] == 8
    assert settings["weights"] == "int8 symmetric per channel"
    report = json.loads(Path(res.report).read_text())
    assert report["parity"]["passed"] and report["parity"]["reference"] == "onnx float32"
    assert report["options"]["keep_float"] == ["patch_embed", "attention", "classifier"]
    assert Path(res.report).name == "model.int8.export.json"


def test_float_parts_are_found_by_structure(models) -> None:
    _, fp32, _ = models
    graph = onnx.load(str(fp32)).graph
    found = float_nodes(graph, ("patch_embed", "classifier"))
    by_name = {n.name: n for n in graph.node}
    (first,) = found["patch_embed"]
    (last,) = found["classifier"]
    assert by_name[first].input[0] == "image" and by_name[first].op_type == "Conv"
    assert by_name[last].op_type == "Conv" and "attention" not in found


def test_calibration_records_only_what_is_quantized(models, tmp_path: Path) -> None:
    """The attention scores (kept float) are not recorded: at 1024 px they held calibration above 10 GiB."""
    from onnxruntime.quantization import MinMaxCalibrater
    from onnxruntime.quantization.calibrate import CalibraterBase

    from cdkd.export.quantize import _calibrate_only

    _, fp32, res = models
    graph = onnx.load(str(fp32)).graph
    scores = {n.output[0] for n in graph.node if n.op_type == "Softmax"}
    kept = {name for names in res.kept_float.values() for name in names}
    quantized = {n.name for n in graph.node if n.op_type in ("MatMul", "Conv") and n.name not in kept}
    original = CalibraterBase.select_tensors_to_calibrate
    calibrator = MinMaxCalibrater(str(fp32), ["MatMul", "Conv"], str(tmp_path / "aug.onnx"))
    assert scores <= calibrator.select_tensors_to_calibrate(calibrator.model)[0]  # ONNX Runtime's own choice
    with _calibrate_only(quantized):
        tensors, _ = calibrator.select_tensors_to_calibrate(calibrator.model)
    assert tensors and not tensors & scores
    assert CalibraterBase.select_tensors_to_calibrate is original


# --------------------------------------------------------------------------------------------------------------
# refusals


def test_refuses_without_calibration_tiles(models, tmp_path: Path) -> None:
    seg, fp32, _ = models
    out = tmp_path / "m.int8.onnx"
    res = runner.invoke(app, ["export", str(seg), "--int8", "--out", str(out)])
    assert res.exit_code == 2 and "needs images to calibrate on: pass --calib DIR" in one_clean_error(res.output)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        export_int8(fp32, out, tmp_path / "empty", options=OPTIONS)
    assert not out.exists() and not list(tmp_path.glob("*.json"))


def test_below_the_agreement_nothing_is_written(models, calib_dir: Path, tmp_path: Path) -> None:
    _, fp32, _ = models
    out = tmp_path / "m.int8.onnx"
    strict = QuantizeOptions(calib_tiles=4, check_tiles=4, keep_float=(), min_agreement=1.0)
    with pytest.raises(ParityError, match="the model was not written"):
        export_int8(fp32, out, calib_dir, options=strict)
    assert list(tmp_path.iterdir()) == []


def test_refuses_quantized_input_existing_output_and_bad_options(models, calib_dir: Path, tmp_path: Path) -> None:
    _, fp32, res = models
    with pytest.raises(CdkdValueError, match="already quantized"):
        export_int8(res.onnx, tmp_path / "again.onnx", calib_dir, options=OPTIONS)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_int8(fp32, res.onnx, calib_dir, options=OPTIONS)
    for bad, match in (
        (dict(method="kl"), "minmax, entropy, percentile"),
        (dict(keep_float=("softmax",)), "'softmax'"),
        (dict(calib_tiles=0), "calibration tiles"),
    ):
        with pytest.raises(CdkdValueError, match=match):
            export_int8(fp32, tmp_path / "x.onnx", calib_dir, options=QuantizeOptions(**bad))
    res_cli = runner.invoke(
        app,
        [
            "export",
            str(fp32),
            "--int8",
            "--calib",
            str(calib_dir),
            "--check-data",
            str(calib_dir),
            "--out",
            str(tmp_path / "y.onnx"),
        ],
    )
    assert res_cli.exit_code == 2 and "held out of --calib" in res_cli.output


def test_calibration_split_holds_files_out(calib_dir: Path, tmp_path: Path, models) -> None:
    meta = read_onnx_meta(models[1])
    split = calibration_split(calib_dir, meta, 8, 4)
    assert split.calib.shape == (8, 3, 64, 64) and split.held.shape == (4, 3, 64, 64) and split.disjoint
    assert not set(split.calib_files) & set(split.held_files) and len(split.held_files) == 3  # 10 x 4 / 12
    one = tmp_path / "one"
    make_image(one / "a.png", synthetic_image((3, 200, 200), seed=3), "PNG")
    single = calibration_split(one, meta, 3, 2)
    assert not single.disjoint and single.held_files == single.calib_files
    assert not np.array_equal(single.held[0], single.calib[0])  # other positions


# --------------------------------------------------------------------------------------------------------------
# the command, end to end from a segmenter.pt, and the scene engine on the INT8 model


def test_cli_int8_export_from_a_segmenter_and_segment_with_it(
    models, calib_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """From a segmenter.pt: exported to float ONNX, checked (float against PyTorch), quantized, checked (INT8
    against PyTorch on held-out tiles). The float export is the fixture's, of the same segmenter.pt (torch.export
    takes half a minute; test_export covers it), its parity check run afresh on the calibration folder."""
    import shutil

    import cdkd.export.quantize as quantize

    seg, fp32, _ = models

    def exported(segmenter, onnx_path, *, check_data, check_tiles, min_agreement, **_):
        shutil.copy(fp32, onnx_path)
        return SimpleNamespace(
            parity=check_parity(
                segmenter, onnx_path, check_data=check_data, check_tiles=check_tiles, min_agreement=min_agreement
            )
        )

    monkeypatch.setattr(quantize, "export_onnx", exported)
    out = tmp_path / "m.int8.onnx"
    res = runner.invoke(
        app,
        [
            "export",
            str(seg),
            "--format",
            "onnx",
            "--int8",
            "--calib",
            str(calib_dir),
            "--calib-method",
            "percentile",
            "--calib-tiles",
            "6",
            "--check-tiles",
            "3",
            "--min-agreement",
            str(FIXTURE_AGREEMENT),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "float export: onnx vs torch" in res.output and "int8 (percentile" in res.output
    assert "onnx int8 vs torch float32" in res.output and "held out of calibration" in res.output
    report = json.loads((tmp_path / "m.int8.export.json").read_text())
    assert report["float_parity"]["passed"] and report["options"]["method"] == "percentile"

    scene = make_geotiff(tmp_path / "scene.tif", synthetic_image((3, 150, 170), seed=7))
    res = runner.invoke(
        app,
        [
            "segment",
            str(scene),
            "--engine",
            str(out),
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "lc.tif"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "onnx on cpu" in res.output and (tmp_path / "lc.tif").is_file()


# --------------------------------------------------------------------------------------------------------------
# TensorRT: a Q/DQ model is built with explicit quantization


def test_tensorrt_chooses_explicit_quantization_for_a_qdq_model(
    models, calib_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import cdkd.export.tensorrt as trt_module

    _, fp32, res = models
    assert int8_mode(res.onnx, int8=False) == "explicit" == int8_mode(res.onnx, int8=True)
    assert int8_mode(fp32, int8=True) == "implicit" and int8_mode(None, int8=True) == "implicit"
    assert int8_mode(fp32, int8=False) == "none"

    fake = _FakeTensorRT()
    configs: list = []
    real_config = fake.Builder.create_builder_config

    def config():
        configs.append(real_config())
        return configs[-1]

    fake.Builder.create_builder_config = staticmethod(config)
    monkeypatch.setattr(trt_module, "_tensorrt", lambda: (fake, ""))
    engine = tmp_path / "q.engine"
    report = build_engine(res.onnx, engine)
    assert report.quantization == "explicit" and report.precision == "int8" and report.calibration_cache is None
    assert ("flag", "int8") in fake.calls and not hasattr(configs[0], "int8_calibrator")
    assert report.calibration_tiles == 0 and engine.is_file() and engine_sidecar(engine).is_file()
    assert not list(tmp_path.glob("*.cache"))
    with pytest.raises(CdkdValueError, match="drop --calib"):
        build_engine(res.onnx, tmp_path / "r.engine", int8=True, calib=calib_dir)


def test_tensorrt_absent_prints_the_explicit_int8_command(models, tmp_path: Path, monkeypatch) -> None:
    import cdkd.export.tensorrt as trt_module

    _, _, res = models
    monkeypatch.setattr(trt_module, "_tensorrt", lambda: (None, "no CUDA GPU is available"))
    out = runner.invoke(app, ["export", res.onnx, "--format", "tensorrt", "--out", str(tmp_path / "q.engine")])
    line = one_clean_error(out.output)
    assert out.exit_code == 2 and "trtexec --onnx=model.int8.onnx --saveEngine=q.engine --int8" in line
    assert "--calib" not in line and "--sidecar q.engine" in line


# --------------------------------------------------------------------------------------------------------------
# CPU runtime choices


def test_onnx_sessions_use_the_tuned_options(models) -> None:
    import onnxruntime as ort

    options = onnx_session_options()
    assert options.intra_op_num_threads == physical_cores() >= 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL and options.enable_mem_pattern
    assert onnx_session_options(threads=1).intra_op_num_threads == 1
    assert OnnxRuntime(models[2].onnx, device="cpu").options["threads"] == physical_cores()


def test_bf16_autocast_on_the_cpu(models, monkeypatch) -> None:
    import cdkd.inference.runtimes as runtimes

    seg = models[0]
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    if cpu_bf16_supported():
        bf16 = TorchRuntime(seg, device="cpu", amp="bf16")
        assert bf16.options["amp"] == "bfloat16"
        assert TorchRuntime(seg, device="cpu", amp="auto").options["amp"] == "none"  # auto keeps float32 on CPUs
        fp32 = TorchRuntime(seg, device="cpu", amp="none")
        assert compare(fp32, bf16, x, min_agreement=0.9).passed
    monkeypatch.setattr(runtimes, "cpu_bf16_supported", lambda: False)
    with pytest.raises(CdkdValueError, match="AVX-512 BF16 or AMX"):
        TorchRuntime(seg, device="cpu", amp="bf16")


def test_choice_mirrors_the_library() -> None:
    from cli import options as o

    assert tuple(c.value for c in o.CalibMethod) == CALIB_METHODS
