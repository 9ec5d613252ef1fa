"""Scene engine v2: the canonical blend (bitwise against an independent reference), determinism, seams, device
blending, overviews streamed with the rows, SIGINT checkpoints, reports, GDAL virtual paths and URLs."""

from __future__ import annotations

import json
import os
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import make_geotiff, synthetic_image

import cdkd
from cdkd.artifacts import InferenceMeta
from cdkd.data.classes import BUILTIN_SCHEMAS
from cdkd.data.classraster import NODATA
from cdkd.data.stats import NormStats
from cdkd.errors import CdkdIOError, CdkdValueError
from cdkd.inference.blend import seam_index, window_weights
from cdkd.inference.rowblend import PlanBlender
from cdkd.inference.tiler import grid_offsets, pad_to_tile, plan_rows
from cdkd.scene.blocks import plan_blocks
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.core.pyramid import Pyramid, reduce_mean, reduce_mode
from cdkd.scene.core.runstate import output_paths
from cdkd.scene.engine import segment_scene

QUIET = dict(progress=False, checkpoint_seconds=0, edge_context=0)  # 0: the references here plan without margin
SCHEMA = BUILTIN_SCHEMAS["dubai"]
K = SCHEMA.num_classes


class LinearRuntime:
    """A model that costs nothing and does not depend on the batch: per pixel, fixed linear maps of the bands plus
    a ``border`` bias towards class 0 near the tile's edges (where a real ViT sees less context). Numpy, so the
    blend can be checked bitwise against a reference."""

    name, device, blend_device, max_batch, fixed_tile, options = "linear", "cpu", "cpu", None, True, {}

    def __init__(self, path: Path, tile: int = 64, overlap: int = 16, in_chans: int = 3, border: float = 0.0) -> None:
        path.write_bytes(b"linear test model")
        self.path = str(path)
        norm = NormStats((110.0,) * in_chans, (50.0,) * in_chans, tuple(range(1, in_chans + 1)), "uint8")
        self.meta = InferenceMeta(SCHEMA, norm, tile, overlap, in_chans)
        rng = np.random.default_rng(0)
        self.weights = rng.normal(size=(K, in_chans)).astype(np.float32)
        i = np.arange(tile)
        edge = np.minimum(i, tile - 1 - i).astype(np.float32)
        near = np.exp(-np.minimum.outer(edge, edge) / 4.0).astype(np.float32)
        self.bias = np.zeros((K, tile, tile), np.float32)
        self.bias[0] = border * near
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.einsum("kc,bchw->bkhw", self.weights, batch).astype(np.float32) + self.bias

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self(batch))


def canonical_reference(
    runtime, pixels: np.ndarray, valid: np.ndarray, tile: int, overlap: int, kind: str = "cosine"
) -> np.ndarray:
    """Whole-image classes by the definition: per window row the sum of its windows' weighted logits (left to
    right), then the rows' sums top to bottom; argmax (first on ties); nodata where invalid."""
    _, height, width = pixels.shape
    x = runtime.meta.norm.normalize(pixels, valid)
    total = np.zeros((K, height, width), np.float32)
    for row in plan_rows(height, width, tile, overlap):
        partial = np.zeros_like(total)
        for w in row:
            if not valid[w.slices].any():
                continue
            padded, _ = pad_to_tile(x[(slice(None), *w.slices)], tile)
            logits = runtime(padded[None])[0][:, : w.height, : w.width]
            partial[(slice(None), *w.slices)] += logits * window_weights(w, height, width, overlap, kind)
        total += partial
    classes = total.argmax(0).astype(np.uint8)
    classes[~valid] = NODATA
    return classes


def _read(path: Path, band: int = 1) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band)


@pytest.fixture
def linear(tmp_path) -> LinearRuntime:
    return LinearRuntime(tmp_path / "linear.model", border=2.0)


@pytest.fixture
def collar_scene(tmp_path) -> Path:
    image = synthetic_image((3, 173, 211), seed=7)
    image[:, :, :70] = 0  # a nodata collar wider than a window: windows skipped, exclusive parts set to nodata
    image[:, 150:, 150:] = 0
    return make_geotiff(tmp_path / "collar.tif", image, nodata=0)


def test_engine_equals_the_canonical_reference_bitwise(collar_scene, linear, tmp_path):
    with rasterio.open(collar_scene) as src:
        pixels, valid = src.read(), src.dataset_mask() > 0
    expected = canonical_reference(linear, pixels, valid, 64, 16)
    for threads in (0, 3):  # reading in the engine's thread or ahead of it: the same bits
        out = tmp_path / f"out{threads}.tif"
        report = segment_scene(collar_scene, linear, out, SegmentOptions(read_threads=threads, batch_size=3, **QUIET))
        assert np.array_equal(_read(out), expected)
        assert report.tiles_skipped > 0 and report.valid_pixels == int(valid.sum())


class CudaLinearRuntime(LinearRuntime):
    """``LinearRuntime`` on the GPU as the torch runtime is there: batches arrive as tensors on the device (staged
    by the reader threads), logits stay there."""

    device = blend_device = "cuda"
    takes_tensors = True

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        assert batch.is_cuda
        return torch.from_numpy(self(batch.cpu().numpy())).cuda()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_engine_on_a_gpu_equals_the_canonical_reference_bitwise(collar_scene, tmp_path):
    """The GPU path end to end: blended and reduced on the device, rows copied back asynchronously."""
    runtime = CudaLinearRuntime(tmp_path / "linear.model", border=2.0)
    with rasterio.open(collar_scene) as src:
        pixels, valid = src.read(), src.dataset_mask() > 0
    out = tmp_path / "out.tif"
    segment_scene(collar_scene, runtime, out, SegmentOptions(batch_size=3, probs=True, **QUIET))
    assert np.array_equal(_read(out), canonical_reference(runtime, pixels, valid, 64, 16))


def test_two_runs_are_bitwise_identical_and_batches_do_not_matter(collar_scene, linear, tmp_path):
    a = segment_scene(collar_scene, linear, tmp_path / "a.tif", SegmentOptions(batch_size=1, probs=True, **QUIET))
    b = segment_scene(collar_scene, linear, tmp_path / "b.tif", SegmentOptions(batch_size=5, probs=True, **QUIET))
    assert np.array_equal(_read(tmp_path / "a.tif"), _read(tmp_path / "b.tif"))
    assert np.array_equal(_read(Path(a.confidence)), _read(Path(b.confidence)))


class TileShift(LinearRuntime):
    """Each tile's logits shifted by an amount that depends on the tile's content, as two overlapping tiles of a
    real model disagree: a blend that switches between tiles abruptly shows the window grid."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        shift = np.einsum("kc,bc->bk", self.weights[::-1].copy(), batch.mean(axis=(2, 3)))
        return super().__call__(batch) + 3.0 * shift[:, :, None, None].astype(np.float32)


def _edge_jump_ratio(logits: np.ndarray, tile: int, overlap: int) -> float:
    """Mean |logit difference| between the two pixels at inner window edges over its mean everywhere (columns)."""
    jump = np.abs(np.diff(logits, axis=2)).mean(axis=(0, 1))
    edges = [o - 1 for o in grid_offsets(logits.shape[2], tile, overlap) if o > 0]
    edges += [o + tile - 1 for o in grid_offsets(logits.shape[2], tile, overlap) if o + tile < logits.shape[2]]
    return float(jump[edges].mean() / jump.mean())


def test_blended_logits_are_continuous_across_window_edges(tmp_path):
    """The engine's weights ramp each window out to ~0: no step where a window starts or ends (a plain average
    of the same tiles jumps there), and the class map's seam index stays at ~1."""
    from cdkd.inference.sliding import sliding_window_logits

    runtime = TileShift(tmp_path / "m", tile=64, overlap=16)
    image = synthetic_image((3, 256, 300), seed=3)
    x = runtime.meta.norm.normalize(image)
    ours = sliding_window_logits(lambda b: torch.from_numpy(runtime(b.numpy())), x, 64, 16, K).numpy()
    assert _edge_jump_ratio(ours, 64, 16) < 1.2
    rows = plan_rows(256, 300, 64, 16)
    flat_sum, count = np.zeros_like(ours), np.zeros(ours.shape[1:], np.float32)
    for w in (w for row in rows for w in row):
        flat_sum[(slice(None), *w.slices)] += runtime(x[(slice(None), *w.slices)][None])[0]
        count[w.slices] += 1
    assert _edge_jump_ratio(flat_sum / count, 64, 16) > 3  # the step this blend avoids
    segment_scene(make_geotiff(tmp_path / "s.tif", image), runtime, tmp_path / "out.tif", SegmentOptions(**QUIET))
    assert max(seam_index(_read(tmp_path / "out.tif"), 64, 16)) < 1.3


@pytest.mark.parametrize("margin", [0, 20])  # 20: an edge margin, windows reaching past the image
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_torch_blend_a_gpu_runs_equals_the_numpy_blend(device, margin):
    """The GPU's code path (torch tensors) against the CPU's (numpy): the same classes, confidence within 1."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rows = plan_rows(150, 203, 64, 16, margin)
    tops, cols = [r[0].row for r in rows], [w.col for w in rows[0]]
    outs = []
    for target, backend in (("cpu", "numpy"), (device, "torch")):
        blender = PlanBlender(K, tops, cols, (64, 64), (150, 203), target, probs=True, backend=backend)
        classes, conf = [], []
        for i, row in enumerate(rows):
            blender.begin(i)
            for w in row:
                r = np.random.default_rng((w.row + margin) * 1000 + w.col + margin)  # offsets from -margin
                logits = torch.from_numpy(r.normal(size=(K, 64, 64)).astype(np.float32)).to(target)
                valid = np.ones((64, 64), bool)
                valid[:5] = w.row > 0  # some nodata in the first row of windows
                if w == rows[1][-1]:
                    blender.add(w, None, None, np.zeros((64, 64), bool))  # a skipped window
                else:
                    weights = window_weights(w, 150, 203, 16, margin=margin)
                    blender.add(w, logits, torch.from_numpy(weights).to(target), valid)
            _, fin = blender.end(i)
            classes.append(fin.classes)
            conf.append(fin.confidence)
        outs.append((np.concatenate(classes), np.concatenate(conf)))
    assert np.array_equal(outs[0][0], outs[1][0]) and (outs[0][0] == NODATA).any()
    assert np.abs(outs[0][1].astype(int) - outs[1][1].astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------------- overviews


def _mode_reference(a: np.ndarray, nodata: int) -> np.ndarray:
    h, w = a.shape
    out = np.empty((h // 2, (w + 1) // 2), np.uint8)
    for i in range(h // 2):
        for j in range(out.shape[1]):
            vals = [a[2 * i, 2 * j], a[2 * i + 1, 2 * j]]
            if 2 * j + 1 < w:
                vals[1:1] = [a[2 * i, 2 * j + 1]]
                vals.append(a[2 * i + 1, 2 * j + 1])
            vals = [v for v in (vals if 2 * j + 1 < w else [vals[0], vals[1]]) if v != nodata]
            out[i, j] = max(vals, key=lambda v: (vals.count(v), -vals.index(v))) if vals else nodata
    return out


def test_mode_and_mean_overviews_against_references():
    rng = np.random.default_rng(1)
    a = rng.choice(np.array([0, 1, 2, NODATA], np.uint8), size=(10, 13), p=[0.4, 0.3, 0.2, 0.1])
    assert np.array_equal(reduce_mode(a, NODATA), _mode_reference(a, NODATA))
    b = np.array([[0, 10, 3, 0], [0, 11, 0, 0]], np.uint8)
    assert reduce_mean(b, 0).tolist() == [[11, 3]]  # (10 + 11) / 2 rounds up; nodata 0 is left out


def test_streamed_pyramid_equals_reducing_the_whole_raster():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, size=(203, 150), dtype=np.uint8)
    whole = [a]
    for _ in range(3):
        b = whole[-1]
        if b.shape[0] % 2:
            b = np.concatenate([b, np.full((1, b.shape[1]), NODATA, np.uint8)])
        whole.append(reduce_mode(b, NODATA))
    pyramid = Pyramid(150, 203, 3, "mode", NODATA)
    got = {1: [], 2: [], 3: []}
    for top, n in [(0, 37), (37, 50), (87, 1), (88, 115)]:  # odd bands: leftover rows carried between them
        for level, level_top, rows in pyramid.push(a[top : top + n]):
            assert level_top == sum(r.shape[0] for r in got[level])
            got[level].append(rows)
    for level, _level_top, rows in pyramid.finish():
        got[level].append(rows)
    for level in (1, 2, 3):
        assert np.array_equal(np.concatenate(got[level]), whole[level])


def test_output_overviews_are_the_streamed_modes(tmp_path, linear):
    scene = make_geotiff(tmp_path / "s.tif", synthetic_image((3, 1100, 700), seed=4))
    out = tmp_path / "out.tif"
    segment_scene(scene, linear, out, SegmentOptions(**QUIET))
    with rasterio.open(out) as dst:
        full = dst.read(1)
        assert dst.overviews(1) == [2, 4] and dst.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        level1 = dst.read(1, out_shape=(550, 350))
    assert np.array_equal(level1, reduce_mode(full, NODATA))


# ---------------------------------------------------------------------------------------------------- runs


class Interrupting:
    """Sends this process a real SIGINT (Ctrl-C) during its ``after``-th batch."""

    def __init__(self, runtime, after: int) -> None:
        self.inner, self.after, self.calls = runtime, after, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        self.calls += 1
        if self.calls == self.after:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner.forward(batch)


def test_ctrl_c_saves_a_checkpoint_that_resume_continues(collar_scene, linear, tmp_path):
    whole = tmp_path / "whole.tif"
    slow = dict(
        progress=False, probs=True, batch_size=2, checkpoint_seconds=3600, edge_context=0
    )  # no timed checkpoint
    segment_scene(collar_scene, linear, whole, SegmentOptions(**slow))
    out = tmp_path / "out.tif"
    with pytest.raises(KeyboardInterrupt):
        segment_scene(collar_scene, Interrupting(linear, after=4), out, SegmentOptions(**slow))
    state = json.loads((output_paths(out)[3] / "state.json").read_text())
    assert 0 < state["rows_done"] < 4 and not out.exists()
    report = segment_scene(collar_scene, linear, out, SegmentOptions(resume=True, **slow))
    assert report.resumed_from_row == state["rows_done"]
    assert np.array_equal(_read(out), _read(whole))
    assert np.array_equal(_read(Path(report.confidence)), _read(tmp_path / "whole_confidence.tif"))
    rows = plan_rows(173, 211, 64, 16)
    assert report.pixels_this_run == (173 - rows[state["rows_done"]][0].row) * 211  # this run's pixels only


def test_report_says_how_to_reproduce_the_run(tmp_path, linear):
    scene = make_geotiff(tmp_path / "four.tif", synthetic_image((4, 90, 90), seed=5))
    notes = []
    report = segment_scene(scene, linear, tmp_path / "out.tif", SegmentOptions(**QUIET), log=notes.append)
    assert notes == [f"{scene}: the model reads band(s) 1,2,3 of the scene's 4 (choose others with --bands)"]
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["bands"] == [1, 2, 3] and saved["scene_bands"] == 4
    assert saved["stats"] == {"mode": "model", "mean": [110.0] * 3, "std": [50.0] * 3, "dtype": "uint8"}
    import hashlib

    assert saved["model"]["sha256"] == hashlib.sha256(b"linear test model").hexdigest()
    assert saved["cdkd_version"] == cdkd.__version__ and saved["runtime_options"]["read_threads"] == 2
    assert set(saved["stages"]) >= {"read", "model", "blend", "write", "finish"}
    assert saved["pixels_this_run"] == 90 * 90 and report.mpx_per_s > 0


def test_output_must_be_a_geotiff(tmp_path, linear, collar_scene):
    with pytest.raises(CdkdValueError, match=r"out.png: the class raster is a GeoTIFF"):
        segment_scene(collar_scene, linear, tmp_path / "out.png", SegmentOptions(**QUIET))
    assert not list(tmp_path.glob("out*"))


# ---------------------------------------------------------------------------------------------------- blocks


def test_blocks_cut_only_where_one_row_reaches_the_shared_rows():
    tops = grid_offsets(2000, 1024, 64)  # [0, 960, 976]: the shifted last row overlaps row 0 too
    assert [(b.start, b.stop) for b in plan_blocks(tops, 1024, 1)] == [(0, 2), (2, 3)]
    tops = grid_offsets(5000, 256, 64)
    blocks = plan_blocks(tops, 256, 4)
    assert [b.start for b in blocks] == list(range(0, len(tops), 4))[: len(blocks)]
    assert blocks[0].head is False and blocks[-1].tail is False and all(b.head for b in blocks[1:])
    wide = grid_offsets(1000, 256, 200)  # overlap > tile / 2: only before the last row is one row in the head
    assert [(b.start, b.stop) for b in plan_blocks(wide, 256, 1)] == [(0, len(wide) - 1), (len(wide) - 1, len(wide))]
    with pytest.raises(CdkdValueError):
        plan_blocks(tops, 256, 0)


# ---------------------------------------------------------------------------------------------------- where scenes live


def test_a_scene_inside_a_zip(tmp_path, linear):
    scene = make_geotiff(tmp_path / "s.tif", synthetic_image((3, 80, 100), seed=6))
    with zipfile.ZipFile(tmp_path / "scenes.zip", "w") as z:
        z.write(scene, "inner/s.tif")
    direct = segment_scene(scene, linear, tmp_path / "direct.tif", SegmentOptions(**QUIET))
    zipped = segment_scene(
        f"/vsizip/{tmp_path}/scenes.zip/inner/s.tif", linear, tmp_path / "zipped.tif", SegmentOptions(**QUIET)
    )
    assert np.array_equal(_read(tmp_path / "direct.tif"), _read(tmp_path / "zipped.tif"))
    assert zipped.scene.startswith("/vsizip/") and zipped.valid_pixels == direct.valid_pixels
    with pytest.raises(CdkdIOError, match="not a readable raster"):
        segment_scene(f"/vsizip/{tmp_path}/scenes.zip/missing.tif", linear, tmp_path / "x.tif", SegmentOptions(**QUIET))


def test_a_cog_served_over_http_with_range_requests(tmp_path, linear, monkeypatch, http_folder):
    scene = make_geotiff(
        tmp_path / "s.tif", synthetic_image((3, 300, 260), seed=8), tiled=True, blockxsize=128, blockysize=128
    )
    cog = tmp_path / "served" / "scene.tif"
    cog.parent.mkdir()
    rasterio.shutil.copy(scene, cog, driver="COG", BLOCKSIZE=128)
    served = http_folder(cog.parent)
    monkeypatch.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    url = f"{served.url}/scene.tif"
    remote = segment_scene(url, linear, tmp_path / "remote.tif", SegmentOptions(**QUIET))
    segment_scene(cog, linear, tmp_path / "local.tif", SegmentOptions(**QUIET))
    assert np.array_equal(_read(tmp_path / "remote.tif"), _read(tmp_path / "local.tif"))
    assert remote.scene == url and served.ranges  # read by ranges, not downloaded whole by us
