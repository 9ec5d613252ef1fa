"""cdkd export: ONNX models that describe themselves and match PyTorch, engine sidecars, and the command's errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer
from conftest import TINY_STUDENT, make_segmenter, one_clean_error
from typer.testing import CliRunner

from cdkd.artifacts import InferenceMeta, engine_sidecar, load_segmenter
from cdkd.errors import CdkdValueError, OutputExistsError
from cdkd.export import (
    ParityError,
    ParityResult,
    check_parity,
    export_onnx,
    report_path,
)
from cdkd.export.parity import compare
from cdkd.inference.runtimes import OnnxRuntime, TorchRuntime, read_onnx_meta
from cli import export

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("export", no_args_is_help=True)(export.export_command)


@app.callback()
def _main() -> None:
    """A group, so that the command is invoked as ``export`` the way cli.main registers it."""


runner = CliRunner()


def _run(*args: object):
    res = runner.invoke(app, ["export", *map(str, args)])
    return res, res.output


def _segmenter_on_larger_student(path: Path, student_size: int = 224, tile: int = 64) -> Path:
    """Like ``make_segmenter``, but the student was distilled at ``student_size`` px and the decoder trained at
    ``tile`` px, so its position embedding is resampled (14 x 14 -> 4 x 4 tokens; too large for the exporter's
    constant folding to hide a resampling left in the graph)."""
    import torch

    from cdkd.artifacts import SegmenterInfo, StudentInfo, save_segmenter
    from cdkd.data.classes import BUILTIN_SCHEMAS
    from cdkd.data.stats import NormStats
    from cdkd.models.student import build_student
    from cdkd.models.upernet import Segmenter

    torch.manual_seed(0)
    schema = BUILTIN_SCHEMAS["dubai"]
    arch_args = dict(TINY_STUDENT, img_size=student_size, in_chans=3)
    model = Segmenter(build_student("vit_s", **arch_args), schema.num_classes, layers=(1, 2, 3, 4), channels=32)
    norm = NormStats(mean=(110.0,) * 3, std=(50.0,) * 3, bands=(1, 2, 3), dtype="uint8")
    student = StudentInfo("vit_s", arch_args, norm, {"teacher": "none (test)"})
    info = SegmenterInfo(student=student, head=model.config(), classes=schema, tile_size=tile, overlap=16)
    save_segmenter(path, model.eval(), info)
    return path


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> Path:
    return _segmenter_on_larger_student(tmp_path_factory.mktemp("seg") / "segmenter.pt")


@pytest.fixture(scope="module")
def exported(seg: Path):
    """One dynamic-batch export at the default opset (17), checked on synthetic tiles, shared by the tests below."""
    return export_onnx(seg, seg.parent / "model.onnx", dynamic_batch=True)


def _tiles(n: int, in_chans: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, in_chans, 64, 64)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# the exported model


def test_model_is_valid_and_carries_its_metadata(seg: Path, exported) -> None:
    path = Path(exported.onnx)
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["logits"]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert read_onnx_meta(path) == load_segmenter(seg)[1].inference_meta()
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["cdkd.classes"])[0] == "building" and props["cdkd.tile_size"] == "64"
    assert exported.input_shape == ("batch", 3, 64, 64) and exported.output_shape == ("batch", 5, 64, 64)


def test_position_embedding_is_a_constant(exported) -> None:
    """timm resamples it in the graph under torch.export (bicubic, antialiased: no opset 17, trouble for TensorRT)."""
    resizes = [n for n in onnx.load(exported.onnx).graph.node if n.op_type == "Resize"]
    assert resizes  # UPerNet's bilinear upsampling
    for node in resizes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["mode"] == b"linear" and "antialias" not in attrs


def test_report_is_written_beside_the_model(exported) -> None:
    report = json.loads(report_path(exported.onnx).read_text())
    assert report_path(exported.onnx).name == "model.export.json"
    assert report["batch"] is None and report["opset"] == 17
    assert report["parity"]["passed"] and report["parity"]["synthetic"] and report["parity"]["source"] == "synthetic"
    assert InferenceMeta.from_json(json.dumps(report["meta"])).tile_size == 64


def test_parity_on_synthetic_tiles(exported) -> None:
    parity = exported.parity
    assert parity.tiles == 8 and parity.synthetic
    assert parity.agreement >= 0.999 and parity.max_abs_diff < 1e-4


@pytest.mark.filterwarnings("ignore:skipped .* files")  # the scenes folder holds a deliberately corrupt file
def test_parity_on_real_tiles(seg: Path, exported, shared_data: Path) -> None:
    scenes = shared_data / "scenes"
    if not scenes.is_dir():
        pytest.skip(f"real scenes not available: {scenes}")
    parity = check_parity(seg, exported.onnx, check_data=scenes, check_tiles=6)
    assert not parity.synthetic and parity.source == str(scenes) and parity.tiles == 6
    assert len(parity.files) >= 3 and all(Path(f).parent == scenes for f in parity.files)
    assert parity.agreement >= 0.999 and parity.max_abs_diff < 1e-4


def test_dynamic_batch_takes_any_batch(seg: Path, exported) -> None:
    rt, ref = OnnxRuntime(exported.onnx, device="cpu"), TorchRuntime(seg, device="cpu", amp="none")
    assert rt.max_batch is None
    for n in (1, 3):
        x = _tiles(n, seed=n)
        out = rt(x)
        assert out.shape == (n, 5, 64, 64)
        np.testing.assert_allclose(out, ref(x), atol=1e-4)


def test_refuses_to_overwrite(seg: Path, exported) -> None:
    before = Path(exported.onnx).stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_onnx(seg, exported.onnx)
    assert Path(exported.onnx).stat().st_mtime_ns == before


def test_failed_parity_writes_nothing(seg: Path, exported, tmp_path: Path, monkeypatch) -> None:
    import cdkd.export.onnx as export_module

    class Negated:  # a "runtime" that gets every class wrong
        name = "broken"

        def __init__(self, inner) -> None:
            self.inner = inner

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            return -self.inner(batch)

    def bad_parity(segmenter, onnx_path, check, min_agreement) -> ParityResult:
        ref = OnnxRuntime(onnx_path, device="cpu")
        return compare(ref, Negated(ref), check.tiles, min_agreement=min_agreement)

    monkeypatch.setattr(export_module, "_trace", lambda *a: onnx.load(exported.onnx))  # skip the slow trace
    monkeypatch.setattr(export_module, "_parity", bad_parity)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match="not written"):
        export_onnx(seg, out)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(seg: Path, tmp_path: Path) -> None:
    with pytest.raises(CdkdValueError, match="opset"):
        export_onnx(seg, tmp_path / "m.onnx", opset=13)
    with pytest.raises(CdkdValueError, match=r"\.onnx"):
        export_onnx(seg, tmp_path / "m.bin")
    with pytest.raises(CdkdValueError, match="batch size"):
        export_onnx(seg, tmp_path / "m.onnx", batch_size=0)


# --------------------------------------------------------------------------------------------------------------
# the command


def test_help() -> None:
    res = runner.invoke(app, ["export", "--help"])
    assert res.exit_code == 0 and "Usage" in res.output and "--sidecar" in res.output


def test_cli_exports_a_fixed_batch_four_band_model(tmp_path: Path) -> None:
    seg = make_segmenter(tmp_path / "segmenter.pt", in_chans=4, seed=1)
    out = tmp_path / "ms.onnx"
    res, output = _run(seg, "--format", "onnx", "--batch-size", "2", "--opset", "18", "--out", out)
    assert res.exit_code == 0, output
    assert "argmax agreement 100.000% on 8 synthetic tiles" in output and "--check-data" in output
    assert f"wrote {out} (opset 18, batch 2" in output and str(report_path(out)) in output
    assert onnx.load(str(out)).opset_import[0].version == 18
    rt = OnnxRuntime(out, device="cpu")
    assert rt.max_batch == 2 and rt.meta.in_chans == 4
    x = _tiles(3, in_chans=4)  # more than the fixed batch, not a multiple of it: the runtime chunks and pads
    np.testing.assert_allclose(rt(x), TorchRuntime(seg, device="cpu", amp="none")(x), atol=1e-4)
    res, output = _run(seg, "--out", out)
    assert res.exit_code == 1 and "--overwrite" in one_clean_error(output)


def test_cli_missing_or_corrupt_segmenter(tmp_path: Path) -> None:
    res, output = _run(tmp_path / "nope.pt", "--out", tmp_path / "m.onnx")
    assert res.exit_code == 1 and "not found" in one_clean_error(output)
    corrupt = tmp_path / "segmenter.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    res, output = _run(corrupt, "--out", tmp_path / "m.onnx")
    assert res.exit_code == 1 and "segmenter.pt" in one_clean_error(output)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_bad_parameters(segmenter_pt: Path, tmp_path: Path) -> None:
    for args in (["--format", "tflite", "--out", tmp_path / "m.onnx"], [], ["--fp16", "--out", tmp_path / "m.onnx"]):
        res, output = _run(segmenter_pt, *args)
        assert res.exit_code == 2 and "Traceback" not in output


def _tensorrt_buildable() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_tensorrt_buildable(), reason="TensorRT and CUDA are here: engines can be built")
def test_cli_tensorrt_without_a_gpu_says_how(seg: Path, exported, tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    for model in (exported.onnx, seg):
        res, output = _run(model, "--format", "tensorrt", "--fp16", "--out", engine)
        assert res.exit_code == 2
        line = one_clean_error(output)
        assert "built on the target GPU" in line and "trtexec --onnx=" in line and "--saveEngine=m.engine" in line
        assert "--fp16" in line and "--sidecar m.engine" in line
    assert not engine.exists() and not engine_sidecar(engine).exists()


def test_cli_sidecar_for_a_trtexec_engine(exported, tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    res, output = _run(exported.onnx, "--sidecar", engine)
    assert res.exit_code == 1 and "engine not found" in one_clean_error(output)
    engine.write_bytes(b"\x00not really an engine\x00")
    res, output = _run(exported.onnx, "--sidecar", engine)
    assert res.exit_code == 0, output
    sidecar = tmp_path / "model.engine.json"
    assert engine_sidecar(engine) == sidecar
    assert InferenceMeta.from_json(sidecar.read_text()) == read_onnx_meta(exported.onnx)
    res, output = _run(exported.onnx, "--sidecar", engine)
    assert res.exit_code == 1 and "--overwrite" in one_clean_error(output)
    res, output = _run(exported.onnx, "--sidecar", engine, "--overwrite")
    assert res.exit_code == 0, output


class _FakeTensorRT:
    """Just enough of the TensorRT 10 Python API to run build_engine's wiring (fp16, dynamic batch) on a CPU."""

    __version__ = "10.0.0"
    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    MemoryPoolType = type("MemoryPoolType", (), {"WORKSPACE": "workspace"})
    BuilderFlag = type("BuilderFlag", (), {"FP16": "fp16", "INT8": "int8"})

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        fake = self

        class Input:
            name, shape = "image", (-1, 3, 64, 64)

        class Network:
            def get_input(self, i: int) -> Input:
                return Input()

        class Config:
            def set_memory_pool_limit(self, pool, size) -> None:
                fake.calls.append(("pool", pool, size))

            def add_optimization_profile(self, profile) -> None:
                fake.calls.append(("profile", *profile.shapes))

            def set_flag(self, flag) -> None:
                fake.calls.append(("flag", flag))

        class Profile:
            def set_shape(self, name, lo, opt, hi) -> None:
                self.shapes = (name, lo, opt, hi)

        class Builder:
            def __init__(self, logger) -> None:
                pass

            def create_network(self, flags: int) -> Network:
                fake.calls.append(("network", flags))
                return Network()

            create_builder_config = staticmethod(Config)
            create_optimization_profile = staticmethod(Profile)

            def build_serialized_network(self, network, config) -> bytes:
                return b"serialized engine"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                fake.calls.append(("parse", Path(path).suffix))
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_build_engine_wiring_with_a_fake_tensorrt(exported, tmp_path: Path, monkeypatch) -> None:
    import cdkd.export.tensorrt as trt_module

    fake = _FakeTensorRT()
    monkeypatch.setattr(trt_module, "_tensorrt", lambda: (fake, ""))
    engine = tmp_path / "m.engine"
    res, output = _run(exported.onnx, "--format", "tensorrt", "--fp16", "--max-batch", "6", "--out", engine)
    assert res.exit_code == 0, output
    assert engine.read_bytes() == b"serialized engine"
    assert InferenceMeta.from_json(engine_sidecar(engine).read_text()) == read_onnx_meta(exported.onnx)
    assert ("network", 0) in fake.calls and ("flag", "fp16") in fake.calls
    assert ("pool", "workspace", 4 * 2**30) in fake.calls
    assert ("profile", "image", (1, 3, 64, 64), (6, 3, 64, 64), (6, 3, 64, 64)) in fake.calls
    assert f"wrote {engine} (fp16, batch 1..6, TensorRT 10.0.0) and {engine_sidecar(engine)}" in output
    res, output = _run(exported.onnx, "--format", "tensorrt", "--int8", "--out", tmp_path / "q.engine")
    assert res.exit_code == 2 and "--calib" in one_clean_error(output)  # no images, no calibration cache


def test_engine_from_segmenter_checks_parity_as_asked(seg: Path, tmp_path: Path, monkeypatch) -> None:
    """segmenter.pt -> engine goes through a temporary ONNX export whose parity check takes --check-tiles and
    --min-agreement from the command line."""
    import cdkd.export.tensorrt as trt_module

    fake = _FakeTensorRT()
    monkeypatch.setattr(trt_module, "_tensorrt", lambda: (fake, ""))
    engine = tmp_path / "m.engine"
    res, output = _run(
        seg, "--format", "tensorrt", "--fp16", "--check-tiles", "3", "--min-agreement", "0.5", "--out", engine
    )
    assert res.exit_code == 0, output
    assert "on 3 synthetic tiles" in output and ("parse", ".onnx") in fake.calls
    assert engine.read_bytes() == b"serialized engine"
