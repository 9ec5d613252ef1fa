"""The blend's Triton kernels (``cdkd.inference.blend_triton``) against the numpy blend, bitwise.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, in a fresh process with ``TRITON_INTERPRET=1``
set before triton is imported (as ``test_scan_triton`` explains); there class ids and confidence are bitwise the
numpy blend's. On a GPU the same tests run compiled: class ids bitwise (no multiply-add is contracted, which
``test_kernels_compile_without_multiply_add`` checks in the compiled code), confidence within 1 (the GPU's exp and
division).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import CUDA, TRITON_INTERPRETED, kernel_test, make_geotiff, run_interpreted, synthetic_image
from test_scene_pipeline import QUIET, LinearRuntime

from cdkd.data.classraster import NODATA
from cdkd.errors import CdkdValueError
from cdkd.inference.blend import window_weights
from cdkd.inference.rowblend import PlanBlender
from cdkd.inference.tiler import plan_rows
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.core.runstate import output_paths
from cdkd.scene.engine import segment_scene

pytest.importorskip("triton")

INTERPRETED = TRITON_INTERPRETED
DEVICE = "cuda" if CUDA else "cpu"
CONF_TOLERANCE = 1 if CUDA else 0  # the GPU's exp and division are not numpy's; the interpreter's are
K = 6


def test_in_the_triton_interpreter() -> None:
    """This file's kernel tests in a fresh process whose triton is imported with ``TRITON_INTERPRET=1``."""
    run_interpreted(__file__)


def test_kernels_compile_without_multiply_add(tmp_path, monkeypatch) -> None:
    """Both kernels compiled by Triton down to an sm_90 cubin (ptxas, no GPU needed), with the launch's options:
    no fused multiply-add in their PTX (the same kernels with Triton's default fusion have them, so the check
    can fail), so each product and sum rounds once, as numpy's does."""
    if INTERPRETED:
        pytest.skip("the kernels are interpreted in this process")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    from cdkd.inference import blend_triton as module

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    blocks = dict(BLOCK_R=module.BLOCK[0], BLOCK_C=module.BLOCK[1])
    kernels = (
        (module._add_window_kernel, ["*fp32", "*fp32", "*u8", "*fp32", "*fp32", "*u8", "*u8", "*u8"], True),
        (module._reduce_rows_kernel, ["*fp32", "*fp32", "*u8", "*u8", "*u8", "*u8"], False),
    )
    for kernel, pointers, window in kernels:
        consts = {
            **blocks,
            "PROBS": True,
            "NODATA_ID": 255,
            "NODATA_CONF": 0,
            **({"HAS_LOGITS": True} if window else {}),
        }
        kinds = iter(pointers + ["i32"] * len(kernel.arg_names))
        signature = {n: "constexpr" if n in consts else next(kinds) for n in kernel.arg_names}
        source = ASTSource(
            fn=kernel, signature=signature, constexprs={(kernel.arg_names.index(n),): v for n, v in consts.items()}
        )
        target = GPUTarget("cuda", 90, 32)
        ours = triton_compile(source, target=target, options={"num_warps": 4, **module._launch_options()})
        fused = triton_compile(source, target=target, options={"num_warps": 4})
        assert ours.asm.get("cubin"), kernel.fn.__name__
        assert "fma." not in ours.asm["ptx"], kernel.fn.__name__
        assert "fma." in fused.asm["ptx"], kernel.fn.__name__


def test_the_triton_backend_is_refused_where_it_cannot_run(tmp_path) -> None:
    """On the CPU without Triton's interpreter: one line before any work, nothing written."""
    if CUDA or INTERPRETED:
        pytest.skip("the triton backend runs here")
    scene = make_geotiff(tmp_path / "s.tif", synthetic_image((3, 80, 90), seed=1))
    out = tmp_path / "out.tif"
    with pytest.raises(CdkdValueError, match="triton blend backend runs on a CUDA GPU"):
        segment_scene(scene, LinearRuntime(tmp_path / "m"), out, SegmentOptions(blend_backend="triton", **QUIET))
    with pytest.raises(CdkdValueError, match="unknown blend backend"):
        segment_scene(scene, LinearRuntime(tmp_path / "m"), out, SegmentOptions(blend_backend="cuda", **QUIET))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "s.tif"]


def _blend(backend: str, device: str, height: int, width: int, tile: int, overlap: int, margin: int, **kw):
    """Rows of random logits through a ``PlanBlender``: (classes, confidence) of every finished row, heads and
    carries (CPU numpy arrays)."""
    rows = plan_rows(height, width, tile, overlap, margin)
    tops, cols = [r[0].row for r in rows], [w.col for w in rows[0]]
    blender = PlanBlender(K, tops, cols, (tile, tile), (height, width), device, probs=True, backend=backend, **kw)
    x0, x1 = kw.get("x_range") or (0, width)
    finished, states = [], []
    for i, row in enumerate(rows):
        blender.begin(i)
        for w in row:
            if w.col + tile <= x0 or w.col >= x1:
                continue
            r = np.random.default_rng((w.row + margin) * 1000 + w.col + margin)
            logits = torch.from_numpy(r.normal(size=(K, tile + 3, tile)).astype(np.float32)).to(device)
            valid = np.ones((tile, tile), bool)
            valid[:25] = w.row > 0  # nodata along the top (past an edge margin of 20)
            valid[:, -3:] = w.col < 60  # and in stripes inside windows
            if w == rows[1][-1]:
                blender.add(w, None, None, np.zeros((tile, tile), bool))  # a skipped window
            else:
                weights = torch.from_numpy(window_weights(w, height, width, overlap, margin=margin)).to(device)
                blender.add(w, logits[:, :tile], weights, valid)  # a crop, as the engine hands them over
        head, fin = blender.end(i)
        finished.append((fin.classes, fin.confidence) if fin is not None else None)
        for part in (head, blender.carry):
            states.append(None if part is None else {k: np.asarray(v) for k, v in part.state().items()})
    return finished, states


def _assert_same(numpy_out, triton_out) -> None:
    (want, want_states), (got, got_states) = numpy_out, triton_out
    assert len(want) == len(got) and any(w is not None and (w[0] == NODATA).any() for w in want)
    for a, b in zip(want, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert np.array_equal(a[0], b[0]), f"{(a[0] != b[0]).sum()} class ids differ"
            assert np.abs(a[1].astype(int) - b[1].astype(int)).max() <= CONF_TOLERANCE
    for a, b in zip(want_states, got_states):  # heads and carries: the sums the next row adds to
        assert (a is None) == (b is None)
        for key in a or {}:
            assert np.array_equal(a[key], b[key]), key


@kernel_test
@pytest.mark.parametrize("margin", [0, 20])  # 20: an edge margin, windows reaching past the image
@pytest.mark.parametrize("x_range", [None, (30, 170)])  # a block's columns, cutting through windows
def test_triton_blend_equals_the_numpy_blend(margin, x_range) -> None:
    args = (150, 203, 64, 16, margin)
    _assert_same(_blend("numpy", "cpu", *args, x_range=x_range), _blend("triton", DEVICE, *args, x_range=x_range))


@kernel_test
def test_triton_blend_of_wide_overlaps_and_a_block_head() -> None:
    """Overlap past half the tile (three windows share pixels: their order matters), a block's head."""
    args = (131, 170, 48, 30, 0)
    _assert_same(_blend("numpy", "cpu", *args, head=True), _blend("triton", DEVICE, *args, head=True))


class _DeviceLinear(LinearRuntime):
    """``LinearRuntime`` whose logits live on the kernels' device, as a GPU runtime's do."""

    takes_tensors = False

    def __init__(self, path: Path) -> None:
        super().__init__(path, border=2.0)
        self.device = self.blend_device = DEVICE

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self(np.asarray(batch))).to(DEVICE)


@kernel_test
def test_the_engine_with_the_triton_blend_equals_numpy_bitwise(tmp_path) -> None:
    """A scene end to end (edge context, a nodata collar that skips windows, confidence): the class raster of the
    Triton blend is the numpy blend's, bit for bit; the report names the backend."""
    image = synthetic_image((3, 173, 211), seed=7)
    image[:, :, :70] = 0
    image[:, 150:, 150:] = 0
    scene = make_geotiff(tmp_path / "collar.tif", image, nodata=0)
    rasters = {}
    for backend, runtime in (
        ("numpy", LinearRuntime(tmp_path / "a", border=2.0)),
        ("triton", _DeviceLinear(tmp_path / "b")),
    ):
        out = tmp_path / f"{backend}.tif"
        options = SegmentOptions(batch_size=3, probs=True, progress=False, blend_backend=backend)
        report = segment_scene(scene, runtime, out, options)
        assert report.runtime_options["blend"] == backend and report.tiles_skipped > 0
        with rasterio.open(out) as a, rasterio.open(output_paths(out)[1]) as c:
            rasters[backend] = a.read(1), c.read(1)
    assert np.array_equal(rasters["numpy"][0], rasters["triton"][0])
    diff = np.abs(rasters["numpy"][1].astype(int) - rasters["triton"][1].astype(int))
    assert diff.max() <= CONF_TOLERANCE


def test_auto_picks_the_triton_blend_only_where_it_can_compile(monkeypatch) -> None:
    """numpy on the CPU; on CUDA the kernels when triton is importable and the card is one Triton supports."""
    from cdkd.inference import rowblend

    assert rowblend.blend_backend("cpu") == "numpy"
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    assert rowblend.blend_backend("cuda:0") == "triton"
    capability["value"] = (6, 1)  # a Pascal card: Triton has no code for it
    assert rowblend.blend_backend("cuda:0") == "torch"
    capability["value"] = (9, 0)
    monkeypatch.setattr(rowblend.importlib.util, "find_spec", lambda name: None)  # a torch build without triton
    assert rowblend.blend_backend("cuda:0") == "torch"
