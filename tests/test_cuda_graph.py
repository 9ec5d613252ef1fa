"""CUDA graphs of the torch runtime's forward (``cdkd.inference.cudagraph``): asked for where they cannot run,
refused in one line; on a GPU, the same logits as the eager forward, padded last batches, a larger batch
captured again, and the engine's class raster unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
from conftest import make_geotiff, make_segmenter, synthetic_image

from cdkd.errors import CdkdValueError
from cdkd.inference.cudagraph import GraphedForward, _Graph
from cdkd.inference.runtimes import RuntimeSpec, TorchRuntime
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.engine import segment_scene

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_graphs_only_where_cuda_runs(segmenter_pt):
    assert TorchRuntime(segmenter_pt, device="cpu").options["cuda_graph"] is False  # auto: off on the CPU
    assert RuntimeSpec(str(segmenter_pt), device="cpu", cuda_graph="off").open().options["cuda_graph"] is False
    with pytest.raises(CdkdValueError, match="--cuda-graph on needs a CUDA device"):
        TorchRuntime(segmenter_pt, device="cpu", cuda_graph="on")
    with pytest.raises(CdkdValueError, match="unknown cuda graph mode"):
        TorchRuntime(segmenter_pt, device="cpu", cuda_graph="yes")


class _ReplayEagerly(GraphedForward):
    """``GraphedForward``'s bookkeeping on the CPU: a "graph" whose replay runs the forward on the static input
    into the static output, as a captured graph does (capturing itself needs CUDA: the tests below)."""

    def _capture(self, x: torch.Tensor) -> _Graph:
        static = x.detach().clone()
        out = self.forward(static)
        graph = SimpleNamespace(replay=lambda: out.copy_(self.forward(static)))
        self.captures.append(tuple(x.shape))
        return _Graph(graph, static, out)  # type: ignore[arg-type]


def test_graph_bookkeeping_pads_recaptures_and_forgets_the_least_recently_used():
    weight = torch.arange(1.0, 4.0).view(1, 3, 1, 1)
    graphed = _ReplayEagerly(lambda x: (x * weight).sum(1, keepdim=True), max_graphs=2)
    graphed.captures = []
    x = torch.randn(5, 3, 4, 4)
    want = (x * weight).sum(1, keepdim=True)
    held = graphed(x[:4])
    assert torch.equal(held, want[:4])
    assert torch.equal(graphed(x[2:4]), want[2:4])  # padded into the batch of 4
    assert torch.equal(graphed(x), want) and graphed.captures == [(4, 3, 4, 4), (5, 3, 4, 4)]  # larger: again
    assert torch.equal(held, want[:4])  # the caller's copy: later replays do not overwrite it
    graphed(torch.randn(1, 3, 8, 8))
    graphed(x[:1])  # (3, 4, 4) used last
    graphed(torch.randn(1, 3, 2, 2))  # a third shape: (3, 8, 8) goes
    assert graphed.captured == {(3, 4, 4): 5, (3, 2, 2): 1}


@cuda
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_cuda_graph_forward_equals_the_eager_forward(tmp_path, amp):
    model = make_segmenter(tmp_path / "seg.pt")
    graphed = TorchRuntime(model, device="cuda", amp=amp, cuda_graph="on")
    eager = TorchRuntime(model, device="cuda", amp=amp, cuda_graph="off")
    x = np.random.default_rng(0).normal(size=(6, 3, 64, 64)).astype(np.float32)
    for n in (4, 4, 3, 6):  # the first batch captured, a padded smaller one, a larger one captured again
        got, want = graphed.forward(x[:n]), eager.forward(x[:n])
        assert got.shape == want.shape == (n, 6, 64, 64)
        assert graphed.options["cuda_graph"] is True
        if n != 3:  # the graph's batch is the eager forward's: the same kernels, the same bits
            assert torch.equal(got, want)
        else:  # padded to the captured 4: other kernels may run, rounding differences only
            torch.testing.assert_close(
                got, want, rtol=2e-2 if amp == "bf16" else 1e-4, atol=2e-2 if amp == "bf16" else 1e-4
            )
    assert graphed._graphed.captured == {(3, 64, 64): 6}


@cuda
def test_the_engine_with_a_cuda_graph_writes_the_eager_raster(tmp_path):
    model = make_segmenter(tmp_path / "seg.pt")
    scene = make_geotiff(tmp_path / "s.tif", synthetic_image((3, 150, 170), seed=3))
    rasters = []
    for mode in ("off", "on"):
        out = tmp_path / f"{mode}.tif"
        runtime = TorchRuntime(model, device="cuda", amp="none", cuda_graph=mode)
        # batches of one: the engine's last batch is never padded, so both forwards run the same kernels
        report = segment_scene(scene, runtime, out, SegmentOptions(batch_size=1, progress=False))
        assert report.runtime_options["cuda_graph"] is (mode == "on")
        with rasterio.open(out) as src:
            rasters.append(src.read(1))
    assert np.array_equal(*rasters)
