"""Export: ``segmenter.pt`` -> a self-describing ONNX model checked against PyTorch, and TensorRT engines.

``export_onnx`` writes ``model.onnx`` (metadata embedded) and ``model.export.json`` (the ``ExportReport``, parity
included); ``build_engine`` builds ``model.engine`` on the target GPU with its ``model.engine.json`` sidecar;
``write_sidecar`` gives an engine built with ``trtexec`` the same sidecar.
"""

from cdkd.export.onnx import ExportReport, check_parity, export_onnx, report_path
from cdkd.export.parity import ParityError, ParityResult
from cdkd.export.tensorrt import (
    EngineBuildError,
    EngineReport,
    build_engine,
    write_sidecar,
)

__all__ = [
    "EngineBuildError",
    "EngineReport",
    "ExportReport",
    "ParityError",
    "ParityResult",
    "build_engine",
    "check_parity",
    "export_onnx",
    "report_path",
    "write_sidecar",
]
