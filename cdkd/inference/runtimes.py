"""Three runtimes behind one interface: PyTorch (``segmenter.pt``), ONNX Runtime (``.onnx``), TensorRT (``.engine``).

A runtime is a callable that maps a (B, C, T, T) float32 batch, already normalised, to (B, K, T, T) float32
logits, and carries the model's ``InferenceMeta`` (classes, normalisation, tile size). The scene engine does all
pre- and post-processing itself, so the three runtimes differ only in how they run the network. ``forward``
returns the logits as a torch tensor where they already are (``blend_device``: the GPU for PyTorch on CUDA,
ONNX Runtime's CUDA provider and TensorRT; the CPU otherwise), so the engine blends them there and only class
ids cross back to the host. ``open_runtime``
picks one from the model file's suffix (or ``runtime=``). Heavy optional packages (onnxruntime, tensorrt) are
imported where they are used, with an error naming the package when missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cdkd.artifacts import ONNX_METADATA_KEY, InferenceMeta, engine_sidecar
from cdkd.errors import CdkdValueError, CheckpointError

if TYPE_CHECKING:
    import torch

RUNTIMES = ("torch", "onnx", "tensorrt")
SUFFIXES = {
    ".pt": "torch",
    ".pth": "torch",
    ".onnx": "onnx",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
    ".trt": "tensorrt",
}
AMP_MODES = ("auto", "none", "fp16", "bf16")
GRAPH_MODES = ("auto", "on", "off")  # CUDA graphs of a torch model's forward: auto = on CUDA


class RuntimeInfo(Protocol):
    """What reports and resume fingerprints read of a runtime: also met by a model that runs on dask workers."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def meta(self) -> InferenceMeta: ...

    @property
    def device(self) -> str: ...

    @property
    def blend_device(self) -> str: ...

    @property
    def options(self) -> dict: ...


class Runtime(Protocol):
    """(B, C, T, T) float32 normalised tiles -> (B, K, T, T) float32 logits, with the model's metadata."""

    name: str
    path: str  # the model file
    meta: InferenceMeta
    device: str
    blend_device: str  # the torch device that ``forward``'s logits live on
    max_batch: int | None  # None: any batch size; else the largest batch the model accepts
    fixed_tile: bool  # True: only meta.tile_size; False: any multiple of the patch size
    options: dict  # how it runs (amp, threads, provider), for reports

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...

    def forward(self, batch: np.ndarray) -> torch.Tensor: ...


def runtime_for(path: str | Path, runtime: str | None = None) -> str:
    """The runtime that runs ``path``: ``runtime`` if given, else the one its suffix names."""
    if runtime is not None:
        if runtime not in RUNTIMES:
            raise CdkdValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        return runtime
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise CdkdValueError(
            f"{path}: cannot tell the runtime from the suffix {suffix!r} (known: "
            f"{', '.join(SUFFIXES)}); pass --runtime {'|'.join(RUNTIMES)}"
        )
    return SUFFIXES[suffix]


def _check_shape(shape: tuple[int, ...], meta: InferenceMeta, fixed_tile: bool = True) -> None:
    expected = (meta.in_chans, meta.tile_size, meta.tile_size)
    ok = len(shape) == 4 and (tuple(shape[1:]) == expected if fixed_tile else shape[1] == meta.in_chans)
    if not ok:
        raise CdkdValueError(f"runtime input must be (B, {', '.join(map(str, expected))}), got {shape}")


def check_batch(batch: np.ndarray, meta: InferenceMeta, fixed_tile: bool = True) -> np.ndarray:
    _check_shape(tuple(batch.shape), meta, fixed_tile)
    return np.ascontiguousarray(batch, dtype=np.float32)


def _chunked(run, batch: np.ndarray, max_batch: int | None, fixed: bool):
    """Run ``run`` on at most ``max_batch`` tiles at a time; a fixed-batch model gets its last chunk padded.

    ``run`` returns numpy arrays or torch tensors; the chunks' outputs are joined in the same kind."""
    if max_batch is None or len(batch) <= max_batch and not (fixed and len(batch) < max_batch):
        return run(batch)
    outs = []
    for start in range(0, len(batch), max_batch):
        chunk = batch[start : start + max_batch]
        n = len(chunk)
        if fixed and n < max_batch:  # a static-batch graph only accepts its own batch size
            chunk = np.concatenate([chunk, np.zeros((max_batch - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(run(chunk)[:n])
    if isinstance(outs[0], np.ndarray):
        return np.concatenate(outs)
    import torch

    return torch.cat(outs)


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), the only case where bf16 autocast on the
    CPU pays: elsewhere oneDNN emulates it, slower than float32."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's probes (torch >= 2.1)
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


class TorchRuntime:
    """A ``segmenter.pt`` on the CPU or a CUDA GPU; fp16/bf16 autocast on CUDA (``amp="auto"`` = bf16), bf16
    autocast on a CPU with native bf16 when asked for (``amp="bf16"``; "auto" keeps float32 there). On CUDA the
    forward is replayed as a CUDA graph (``cuda_graph``: "auto" = on CUDA, ``cudagraph.GraphedForward``); if
    capturing fails the model runs eagerly and ``options["cuda_graph"]`` says why."""

    name = "torch"
    max_batch: int | None = None
    fixed_tile = False  # the ViT resamples its position embedding: any multiple of the patch size
    takes_tensors = True  # forward also takes a float32 tensor batch already on the device
    graphable = True  # a forward of fixed shapes: capturable as a CUDA graph

    def __init__(self, path: str | Path, device: str = "auto", amp: str = "auto", cuda_graph: str = "auto") -> None:
        import torch

        from cdkd.train.distributed import DistContext, resolve_device

        if amp not in AMP_MODES:
            raise CdkdValueError(f"unknown amp mode {amp!r}; choose one of {', '.join(AMP_MODES)}")
        if cuda_graph not in GRAPH_MODES:
            raise CdkdValueError(f"unknown cuda graph mode {cuda_graph!r}; choose one of {', '.join(GRAPH_MODES)}")
        self._device = resolve_device(device, DistContext())
        if cuda_graph == "on" and self._device.type != "cuda":
            raise CdkdValueError(f"--cuda-graph on needs a CUDA device, not {self._device}; use auto or off")
        self.model, self.meta = self._load(path)
        self.path = str(path)
        self.device = self.blend_device = str(self._device)
        self._dtype = None
        if self._device.type == "cuda" and amp != "none":
            self._dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        elif self._device.type == "cpu" and amp == "bf16":
            if not cpu_bf16_supported():
                raise CdkdValueError(
                    "--amp bf16 on the CPU needs AVX-512 BF16 or AMX, which this CPU lacks (bf16 "
                    "would be emulated, slower than float32); use --amp none"
                )
            self._dtype = torch.bfloat16
        self._graphed = None
        if self._device.type == "cuda" and cuda_graph != "off" and self.graphable:
            from cdkd.inference.cudagraph import GraphedForward

            self._graphed = GraphedForward(self._eager)
        self.options = {
            "amp": str(self._dtype).replace("torch.", "") if self._dtype else "none",
            "threads": torch.get_num_threads() if self._device.type == "cpu" else None,
            "cuda_graph": self._graphed is not None,
        }

    def _load(self, path: str | Path) -> tuple[torch.nn.Module, InferenceMeta]:
        from cdkd.artifacts import load_segmenter

        model, info = load_segmenter(path, map_location=self._device)
        return model.eval(), info.inference_meta()

    def forward(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        import torch

        from cdkd.inference.rowblend import to_device

        if isinstance(batch, torch.Tensor):
            _check_shape(tuple(batch.shape), self.meta, fixed_tile=False)
            x = to_device(batch.float(), self._device)
        else:
            x = to_device(torch.from_numpy(check_batch(batch, self.meta, fixed_tile=False)), self._device)
        if self._graphed is None:
            return self._eager(x)
        try:
            return self._graphed(x)
        except RuntimeError as e:  # a model or driver that cannot be captured still runs, eagerly, and says so
            self._graphed = None
            self.options["cuda_graph"] = f"off: capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            return self._eager(x)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        # no autocast cache: a cached cast of a weight made while capturing would be freed with the capture
        with (
            torch.inference_mode(),
            torch.autocast(self._device.type, dtype=self._dtype, enabled=self._dtype is not None, cache_enabled=False),
        ):
            return self.model(x).float()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.forward(batch).cpu().numpy()


def _torch_cuda() -> bool:
    """Whether torch can hold ONNX Runtime's CUDA outputs (a CPU build of torch beside onnxruntime-gpu cannot)."""
    import torch

    return torch.cuda.is_available()


def physical_cores() -> int:
    """CPU cores this process may run on, one per physical core (hyper-threads share one core's integer and
    vector units, so a second thread per core gains little for dense kernels)."""
    import os

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil  # installed with dask.distributed; optional here

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    return max(1, min(physical or allowed, allowed))


def onnx_session_options(threads: int | None = None, log_severity: int | None = None) -> Any:
    """The options of every ONNX Runtime session cdkd opens (float and INT8 models alike), set in this one place.

    - intra-op threads: ``threads``, else one per physical core (``physical_cores``), which is also ONNX
      Runtime's own default; said explicitly so that reports show it.
    - graph optimisation level ORT_ENABLE_ALL: on x86 it adds the NCHWc convolution layout, 1.2x faster than
      ORT_ENABLE_EXTENDED for a float32 ViT-S + UPerNet on the CPU; for INT8 models BASIC and lower skip the Q/DQ
      fusions into integer kernels (2.6x slower). docs/int8.md has the measurements.
    - memory pattern planning on: the tile size is fixed, so buffers planned at the first run serve every run.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads else physical_cores()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = True
    if log_severity is not None:
        options.log_severity_level = log_severity
    return options


def read_onnx_meta(path: str | Path) -> InferenceMeta:
    """The ``InferenceMeta`` that ``cdkd export`` embedded in an ONNX model's metadata."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx its own types
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if ONNX_METADATA_KEY not in props:
        raise CheckpointError(f"{path}: has no cdkd metadata ({ONNX_METADATA_KEY!r}); export it with cdkd export")
    return InferenceMeta.from_json(props[ONNX_METADATA_KEY], str(path))


class OnnxRuntime:
    """An exported ``.onnx`` model in ONNX Runtime: the CUDA provider when installed and wanted, else the CPU."""

    name = "onnx"
    task = "semantic"  # what the model must predict: an .onnx file of the other task is refused, not misread
    fixed_tile = True
    log_severity: int | None = None  # ONNX Runtime's session log level (None: its default)

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CdkdValueError("the onnx runtime needs the onnxruntime package (pip install onnxruntime)") from None
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: ONNX model not found (cdkd export --format onnx writes one)")
        self.meta = read_onnx_meta(path)
        if self.meta.task != self.task:
            raise CdkdValueError(
                f"{path}: a model of the {self.meta.task} task, not {self.task}; open it through its "
                "task (cdkd.tasks.task_of_model(path).open_runtime)"
            )
        available = ort.get_available_providers()
        if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
            raise CdkdValueError(
                f"device {device!r} requested but onnxruntime has no CUDA provider here "
                "(install onnxruntime-gpu); use --device cpu"
            )
        want_cuda = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
        self._device_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        providers = (
            [("CUDAExecutionProvider", {"device_id": self._device_id}), "CPUExecutionProvider"]
            if want_cuda
            else ["CPUExecutionProvider"]
        )
        options = onnx_session_options(threads, self.log_severity)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.path = str(path)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.blend_device = f"cuda:{self._device_id}" if self.device == "cuda" and _torch_cuda() else "cpu"
        self.options = {"provider": self.session.get_providers()[0], "threads": options.intra_op_num_threads}
        inp = self.session.get_inputs()[0]
        self._input, self._output = inp.name, self.session.get_outputs()[0].name
        dim = inp.shape[0]
        self._fixed = isinstance(dim, int)
        self.max_batch = dim if self._fixed else None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: batch})[0].astype(np.float32, copy=False)

    def _run_cuda(self, batch: np.ndarray) -> torch.Tensor:
        """Input and output bound to torch CUDA tensors (IOBinding): the logits stay on the GPU."""
        import torch

        x = torch.from_numpy(batch).to(self.blend_device)
        y = torch.empty(
            (x.shape[0], self.meta.num_classes, *x.shape[2:]), dtype=torch.float32, device=self.blend_device
        )
        torch.cuda.current_stream(x.device).synchronize()  # ONNX Runtime runs on its own stream
        binding = self.session.io_binding()
        binding.bind_input(self._input, "cuda", self._device_id, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self._output, "cuda", self._device_id, np.float32, tuple(y.shape), y.data_ptr())
        self.session.run_with_iobinding(binding)  # returns once the provider's stream is done
        return y

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return _chunked(self._run, check_batch(batch, self.meta), self.max_batch, self._fixed)

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        import torch

        batch = check_batch(batch, self.meta)
        if self.blend_device != "cpu":
            return _chunked(self._run_cuda, batch, self.max_batch, self._fixed)
        return torch.from_numpy(_chunked(self._run, batch, self.max_batch, self._fixed))


class TensorRTRuntime:
    """A serialized TensorRT engine (``.engine``/``.plan``) with its ``.json`` sidecar; needs CUDA and tensorrt.

    Engines are specific to the GPU and TensorRT version that built them: build them on the target device
    (README: ``trtexec --onnx=model.onnx --saveEngine=model.engine``, then copy the sidecar with it).
    """

    name = "tensorrt"
    fixed_tile = True

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: TensorRT engine not found")
        sidecar = engine_sidecar(path)
        if not sidecar.is_file():
            raise CheckpointError(
                f"{path}: its metadata sidecar {sidecar.name} is missing (cdkd export writes it; "
                "for a trtexec-built engine copy the .onnx model's with cdkd export --sidecar)"
            )
        self.meta = InferenceMeta.from_json(sidecar.read_text(), str(sidecar))
        try:
            import tensorrt as trt
        except ImportError:
            raise CdkdValueError(
                "the tensorrt runtime needs NVIDIA TensorRT (pip install tensorrt) and a CUDA GPU; "
                "use the .onnx model with --runtime onnx elsewhere"
            ) from None
        import torch

        if not torch.cuda.is_available() or device == "cpu":
            raise CdkdValueError(f"{path}: a TensorRT engine runs only on a CUDA GPU, and none is in use here")
        self._torch = torch
        self._stream = torch.cuda.Stream()
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise CheckpointError(
                f"{path}: TensorRT could not deserialize the engine (built for another GPU or "
                "TensorRT version? rebuild it on this device)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self._output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.path = str(path)
        self.device = self.blend_device = "cuda"
        self.options = {"tensorrt": trt.__version__}
        shape = tuple(self.engine.get_tensor_shape(self._input))
        self._fixed = shape[0] != -1
        if self._fixed:
            self.max_batch = shape[0]
        else:  # the largest batch of the optimisation profile
            self.max_batch = int(self.engine.get_tensor_profile_shape(self._input, 0)[2][0])

    def _run(self, batch: np.ndarray) -> torch.Tensor:
        torch = self._torch
        x = torch.from_numpy(batch).cuda()
        self.context.set_input_shape(self._input, tuple(x.shape))
        out_shape = tuple(self.context.get_tensor_shape(self._output))
        y = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self._input, x.data_ptr())
        self.context.set_tensor_address(self._output, y.data_ptr())
        with torch.cuda.stream(self._stream):
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise CdkdValueError("TensorRT failed to run the engine")
        self._stream.synchronize()
        return y

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        return _chunked(self._run, check_batch(batch, self.meta), self.max_batch, self._fixed)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.forward(batch).cpu().numpy()


def open_runtime(
    path: str | Path,
    runtime: str | None = None,
    device: str = "auto",
    amp: str = "auto",
    threads: int | None = None,
    cuda_graph: str = "auto",
) -> Runtime:
    """The runtime for the segmenter file ``path`` (``segmenter.pt``, ``.onnx`` or ``.engine``). An instance model
    (``detector.pt``) is opened by its task: ``cdkd.tasks.task_of_model(path).open_runtime``."""
    kind = runtime_for(path, runtime)
    if kind == "torch":
        return TorchRuntime(path, device=device, amp=amp, cuda_graph=cuda_graph)
    if kind == "onnx":
        return OnnxRuntime(path, device=device, threads=threads)
    return TensorRTRuntime(path, device=device)


@dataclass(frozen=True)
class RuntimeSpec:
    """How to open a runtime: sent to dask workers instead of the model itself (a path pickles; a model may not)."""

    model: str
    runtime: str | None = None
    device: str = "auto"
    amp: str = "auto"
    threads: int | None = None
    cuda_graph: str = "auto"

    def open(self) -> Runtime:
        return open_runtime(self.model, self.runtime, self.device, self.amp, self.threads, self.cuda_graph)

    def meta(self) -> InferenceMeta:
        """The model's metadata without loading it to run (a TensorRT engine needs no GPU for this)."""
        kind = runtime_for(self.model, self.runtime)
        if kind == "onnx":
            return read_onnx_meta(self.model)
        if kind == "tensorrt":
            sidecar = engine_sidecar(Path(self.model))
            if not sidecar.is_file():
                raise CheckpointError(f"{self.model}: its metadata sidecar {sidecar.name} is missing")
            return InferenceMeta.from_json(sidecar.read_text(), str(sidecar))
        from cdkd.artifacts import (
            DETECTOR_FORMAT,
            artifact_format,
            load_detector,
            load_segmenter,
        )

        if artifact_format(self.model) == DETECTOR_FORMAT:
            return load_detector(self.model, map_location="cpu")[1].inference_meta()
        return load_segmenter(self.model, map_location="cpu")[1].inference_meta()
