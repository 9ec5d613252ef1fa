"""Tile planning (cdkd.inference.tiler), overlap blending (cdkd.inference.blend) and sliding-window inference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cdkd.errors import CdkdValueError
from cdkd.inference.blend import axis_profile, seam_index, window_weights
from cdkd.inference.sliding import sliding_window_logits
from cdkd.inference.tiler import TileWindow, grid_offsets, pad_to_tile, plan_rows, plan_windows, window_edges

# --------------------------------------------------------------------------------------------------------------
# grid_offsets


def _check_offsets(size: int, tile: int, overlap: int) -> list[int]:
    """grid_offsets with every documented property asserted."""
    offsets = grid_offsets(size, tile, overlap)
    assert offsets[0] == 0
    assert all(b > a for a, b in zip(offsets, offsets[1:])), "strictly increasing, no duplicates"
    if size <= tile:
        assert offsets == [0]
        return offsets
    assert offsets[-1] + tile == size, "the last window ends exactly at the image border"
    assert all(o + tile <= size for o in offsets), "no window runs past the image"
    steps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert all(s == tile - overlap for s in steps[:-1]), "regular stride except before the last window"
    assert 0 < steps[-1] <= tile - overlap
    covered = np.zeros(size, dtype=int)
    for o in offsets:
        covered[o : o + tile] += 1
    assert covered.min() >= 1
    return offsets


@pytest.mark.parametrize("size", [1, 5, 63, 64, 65, 100, 127, 128, 129, 200, 1000])
@pytest.mark.parametrize("overlap", [0, 1, 16, 17, 63])
def test_grid_offsets_properties(size, overlap):
    _check_offsets(size, 64, overlap)


def test_grid_offsets_examples():
    assert grid_offsets(64, 64, 16) == [0]
    assert grid_offsets(10, 64, 16) == [0]
    assert grid_offsets(128, 64, 0) == [0, 64]
    assert grid_offsets(130, 64, 0) == [0, 64, 66]  # last window shifted inward
    assert grid_offsets(112, 64, 16) == [0, 48]  # regular grid already ends flush: no extra window
    assert grid_offsets(113, 64, 16) == [0, 48, 49]


def test_grid_offsets_big_image_is_cheap():
    offsets = _check_offsets(100_000, 1024, 128)
    assert len(offsets) == math.ceil((100_000 - 1024) / (1024 - 128)) + 1
    assert offsets[-1] == 100_000 - 1024


def test_grid_offsets_accepts_numpy_integers():
    assert grid_offsets(np.int64(130), np.int32(64), np.int16(0)) == [0, 64, 66]


@pytest.mark.parametrize(
    "size, tile, overlap, names",
    [
        (100, 64, 64, ["overlap=64", "tile=64"]),
        (100, 64, 80, ["overlap=80"]),
        (100, 64, -1, ["overlap=-1"]),
        (100, 0, 0, ["tile=0"]),
        (100, -8, 0, ["tile=-8"]),
        (0, 64, 0, ["size=0"]),
    ],
)
def test_grid_offsets_bad_parameters(size, tile, overlap, names):
    with pytest.raises(CdkdValueError) as info:
        grid_offsets(size, tile, overlap)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize("bad", [64.0, "64", True, None])
def test_grid_offsets_refuses_non_integers(bad):
    with pytest.raises(CdkdValueError, match="integer"):
        grid_offsets(100, bad, 0)


# --------------------------------------------------------------------------------------------------------------
# plan_windows / plan_rows / TileWindow


@pytest.mark.parametrize("height, width", [(200, 300), (64, 64), (40, 40), (40, 150), (150, 40), (1, 1), (65, 129)])
@pytest.mark.parametrize("overlap", [0, 16, 17])
def test_plan_windows_cover_the_image(height, width, overlap):
    tile = 64
    windows = plan_windows(height, width, tile, overlap)
    rows, cols = grid_offsets(height, tile, overlap), grid_offsets(width, tile, overlap)
    assert len(windows) == len(rows) * len(cols)
    assert [(w.row, w.col) for w in windows] == [(r, c) for r in rows for c in cols]  # row-major
    coverage = np.zeros((height, width), dtype=int)
    for w in windows:
        assert w.row >= 0 and w.col >= 0
        assert w.row + w.height <= height and w.col + w.width <= width
        assert w.height == min(tile, height) and w.width == min(tile, width)
        coverage[w.slices] += 1
    assert coverage.min() >= 1


def test_plan_rows_groups_plan_windows_by_row():
    rows = plan_rows(200, 300, 64, 16)
    assert [w for row in rows for w in row] == plan_windows(200, 300, 64, 16)
    assert len(rows) == len(grid_offsets(200, 64, 16))
    for row in rows:
        assert len({w.row for w in row}) == 1
        assert [w.col for w in row] == grid_offsets(300, 64, 16)


@pytest.mark.parametrize("tile, overlap", [(64, 64), (64, 100), (0, 0), (-1, 0), (64, -2)])
def test_plan_windows_bad_parameters(tile, overlap):
    with pytest.raises(CdkdValueError, match=f"{overlap}|{tile}"):
        plan_windows(100, 100, tile, overlap)
    with pytest.raises(CdkdValueError):
        plan_rows(100, 100, tile, overlap)


def test_plan_windows_bad_image_size():
    with pytest.raises(CdkdValueError, match="size=0"):
        plan_windows(0, 100, 64, 0)


def test_tile_window_slices_and_rasterio():
    window = TileWindow(row=10, col=20, height=30, width=40)
    array = np.arange(3 * 100 * 100).reshape(3, 100, 100)
    assert array[(..., *window.slices)].shape == (3, 30, 40)
    assert array[0][window.slices][0, 0] == array[0, 10, 20]
    rio = window.to_rasterio()
    assert (rio.col_off, rio.row_off, rio.width, rio.height) == (20, 10, 40, 30)
    assert TileWindow(row=-1, col=0, height=4, width=4).row == -1  # an edge margin reaches past the image
    with pytest.raises(CdkdValueError):
        TileWindow(row=0, col=0, height=0, width=4)


# --------------------------------------------------------------------------------------------------------------
# pad_to_tile


def test_pad_to_tile_5px_in_64_reflects_repeatedly():
    array = np.arange(3 * 5 * 5, dtype=np.float32).reshape(3, 5, 5)
    padded, (h, w) = pad_to_tile(array, 64)
    assert padded.shape == (3, 64, 64) and padded.dtype == array.dtype
    assert (h, w) == (5, 5)
    np.testing.assert_array_equal(padded[:, :5, :5], array)
    # reflect without repeating the edge: a triangle wave 0 1 2 3 4 3 2 1 0 1 ... along each axis
    triangle = [0, 1, 2, 3, 4, 3, 2, 1] * 8
    np.testing.assert_array_equal(padded[0, 0, :], array[0, 0, triangle])
    np.testing.assert_array_equal(padded[1, :, 2], array[1, triangle, 2])
    assert padded.min() >= array.min() and padded.max() <= array.max()


def test_pad_to_tile_one_pixel_repeats_it():
    padded, size = pad_to_tile(np.full((1, 1), 7, dtype=np.uint8), 16)
    assert size == (1, 1)
    assert padded.shape == (16, 16) and (padded == 7).all()


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
@pytest.mark.parametrize("shape", [(40, 64), (64, 10), (30, 50), (2, 33, 64)])
def test_pad_to_tile_keeps_original_pixels(mode, shape):
    rng = np.random.default_rng(0)
    array = rng.normal(size=shape).astype(np.float32)
    padded, (h, w) = pad_to_tile(array, 64, mode=mode, value=-5)
    assert padded.shape == shape[:-2] + (64, 64)
    assert (h, w) == shape[-2:]
    np.testing.assert_array_equal(padded[..., :h, :w], array)
    if mode == "constant":
        assert (padded[..., h:, :] == -5).all() and (padded[..., :, w:] == -5).all()


def test_pad_to_tile_full_tile_is_returned_unchanged():
    array = np.ones((3, 64, 64), dtype=np.float32)
    padded, size = pad_to_tile(array, 64)
    assert padded is array and size == (64, 64)


def test_pad_to_tile_errors():
    with pytest.raises(CdkdValueError, match="larger"):
        pad_to_tile(np.zeros((65, 10)), 64)
    with pytest.raises(CdkdValueError, match="pad mode"):
        pad_to_tile(np.zeros((5, 5)), 64, mode="wrapp")
    with pytest.raises(CdkdValueError, match="shape"):
        pad_to_tile(np.zeros((1, 2, 5, 5)), 64)
    with pytest.raises(CdkdValueError, match="empty"):
        pad_to_tile(np.zeros((0, 5)), 64)


# --------------------------------------------------------------------------------------------------------------
# window_weights


@pytest.mark.parametrize("size, tile, overlap", [(200, 64, 16), (150, 64, 17), (130, 64, 1), (90, 32, 15), (7, 7, 3)])
def test_profiles_of_a_plan_sum_to_one_in_the_interior_and_ramp_to_zero_at_inner_edges(size, tile, overlap):
    offsets = grid_offsets(size, tile, overlap)
    length = min(tile, size)
    total = np.zeros(size)
    for o in offsets:
        p = axis_profile(o, length, size, overlap)
        assert p.shape == (length,) and (p > 0).all() and (p <= 1).all()
        first = 0.5 - 0.5 * np.cos(np.pi * 0.5 / overlap)  # the Hann ramp's first sample: ~0 for wide overlaps
        if o > 0:  # a neighbour before: the window's first pixel counts (almost) nothing
            assert p[0] == pytest.approx(first) and (np.diff(p[:overlap]) > 0).all()
        else:  # the image border: full weight, border pixels keep their prediction
            assert p[0] == 1
        if o + length < size:
            assert p[-1] == pytest.approx(first)
        else:
            assert p[-1] == 1
        total[o : o + length] += p
    # every pixel is covered with weight >= ~1: the plan's windows take over from each other
    assert total.min() > 0.999
    # with the regular stride two neighbours' ramps sum to exactly 1 (the shifted last window overlaps more)
    regular_end = offsets[-1] if len(offsets) > 1 and offsets[-1] - offsets[-2] != tile - overlap else size
    np.testing.assert_allclose(total[:regular_end], 1.0, atol=1e-9)


def test_window_weights_are_separable_and_flat_at_image_borders():
    h, w, tile, overlap = 150, 203, 64, 16
    rows = plan_rows(h, w, tile, overlap)
    corner = window_weights(rows[0][0], h, w, overlap)
    assert corner.dtype == np.float32 and corner.shape == (64, 64)
    assert corner[0, 0] == 1 and corner[-1, -1] < 1e-3  # outer corner at the border, inner corner ramps out
    middle = window_weights(rows[1][1], h, w, overlap)
    np.testing.assert_allclose(middle, np.outer(middle[32], middle[:, 32]).T / middle[32, 32], rtol=1e-6)
    assert middle.min() > 0 and middle.min() < 1e-4
    assert (window_weights(rows[1][1], h, w, overlap, kind="flat") == 1).all()
    assert (window_weights(rows[1][1], h, w, 0) == 1).all()
    with pytest.raises(CdkdValueError, match="kind"):
        window_weights(rows[0][0], h, w, overlap, kind="gauss")


def test_blended_weights_have_no_step_at_window_edges():
    """The sum of the plan's weights is continuous: no window contributes a jump where it starts or ends."""
    size, tile, overlap = 300, 64, 16
    total = np.zeros(size)
    share = np.zeros(size)  # the share of the second window along the axis, 0..1
    offsets = grid_offsets(size, tile, overlap)
    for i, o in enumerate(offsets):
        p = axis_profile(o, tile, size, overlap)
        total[o : o + tile] += p
        if i == 1:
            share[o : o + tile] += p
    share /= total
    assert np.abs(np.diff(share)).max() < 0.1  # a window fades in over the overlap instead of switching on


# --------------------------------------------------------------------------------------------------------------
# sliding_window_logits

K = 3


def pixelwise(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, K, H, W) logits that depend on each pixel's own values only (C >= 2)."""
    return torch.stack([x[:, 0], 2 * x[:, 1] - x[:, 0] ** 2, -x[:, 0] * x[:, 1]], dim=1)


@pytest.mark.parametrize("height, width", [(150, 170), (64, 64), (40, 40), (40, 150), (150, 40), (5, 5)])
@pytest.mark.parametrize("overlap", [0, 16, 17, 40])
def test_sliding_has_no_seams(height, width, overlap):
    image = torch.rand(2, height, width, generator=torch.Generator().manual_seed(height * 1000 + width))
    out = sliding_window_logits(pixelwise, image, tile=64, overlap=overlap, num_classes=K, batch_size=3)
    assert out.shape == (K, height, width) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, pixelwise(image[None])[0], atol=1e-5, rtol=1e-5)


def test_sliding_accepts_numpy_and_pad_modes():
    image = np.random.default_rng(1).random((2, 30, 90), dtype=np.float32)
    expected = pixelwise(torch.from_numpy(image)[None])[0]
    for mode in ("reflect", "symmetric", "edge", "constant"):
        out = sliding_window_logits(pixelwise, image, tile=64, overlap=8, num_classes=K, pad_mode=mode)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


class CountingPredict:
    """Predicts a constant per tile: the n-th tile seen gets ``values[n]`` for every class and pixel."""

    def __init__(self, values):
        self.values = list(values)
        self.seen = 0
        self.batch_shapes = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "predict runs under inference mode"
        self.batch_shapes.append(tuple(batch.shape))
        b = batch.shape[0]
        consts = torch.tensor(self.values[self.seen : self.seen + b], dtype=torch.float32)
        self.seen += b
        return consts.view(b, 1, 1, 1).expand(b, K, batch.shape[2], batch.shape[3]).clone()


@pytest.mark.parametrize("overlap", [0, 16, 40])
def test_sliding_blend_is_a_convex_combination(overlap):
    height, width, tile = 150, 200, 64
    n = len(plan_windows(height, width, tile, overlap))
    values = np.random.default_rng(overlap).uniform(-10, 10, size=n)
    predict = CountingPredict(values)
    image = torch.zeros(4, height, width)  # the plan without an edge margin: plan_windows's
    out = sliding_window_logits(predict, image, tile, overlap, num_classes=K, batch_size=4, edge_context=0)
    assert predict.seen == n
    assert all(s[1:] == (4, tile, tile) for s in predict.batch_shapes) and predict.batch_shapes[0][0] == 4
    assert out.min() >= values.min() - 1e-4 and out.max() <= values.max() + 1e-4
    # a pixel inside the first window only takes that window's value; blending is local
    torch.testing.assert_close(out[:, 0, 0], torch.full((K,), float(values[0])))
    # stronger: every pixel lies between the smallest and largest value of the windows covering it
    windows = plan_windows(height, width, tile, overlap)
    coverage_min = np.full((height, width), np.inf)
    coverage_max = np.full((height, width), -np.inf)
    for window, value in zip(windows, values):
        coverage_min[window.slices] = np.minimum(coverage_min[window.slices], value)
        coverage_max[window.slices] = np.maximum(coverage_max[window.slices], value)
    assert (out.numpy() >= coverage_min - 1e-4).all() and (out.numpy() <= coverage_max + 1e-4).all()


def test_sliding_batch_size_does_not_matter():
    image = torch.rand(2, 170, 130, generator=torch.Generator().manual_seed(3))

    def predict(x):
        # position-free but non-trivial: logits mix a pixel with its neighbours (a small blur), so tile borders
        # differ from the whole-image result and blending matters
        y = pixelwise(x)
        return torch.nn.functional.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=False)

    one = sliding_window_logits(predict, image, tile=64, overlap=16, num_classes=K, batch_size=1)
    three = sliding_window_logits(predict, image, tile=64, overlap=16, num_classes=K, batch_size=3)
    assert torch.equal(one, three)


def test_sliding_errors():
    image = torch.zeros(2, 40, 40)
    with pytest.raises(CdkdValueError, match="expected"):
        sliding_window_logits(pixelwise, image, tile=64, overlap=0, num_classes=4)
    with pytest.raises(CdkdValueError, match="batch_size"):
        sliding_window_logits(pixelwise, image, tile=64, overlap=0, num_classes=K, batch_size=0)
    with pytest.raises(CdkdValueError, match="overlap=64"):
        sliding_window_logits(pixelwise, image, tile=64, overlap=64, num_classes=K)
    with pytest.raises(CdkdValueError, match="pad mode"):
        sliding_window_logits(pixelwise, image, tile=64, overlap=0, num_classes=K, pad_mode="wrap")
    with pytest.raises(CdkdValueError, match=r"\(C, H, W\)"):
        sliding_window_logits(pixelwise, torch.zeros(40, 40), tile=64, overlap=0, num_classes=K)


@pytest.mark.parametrize("margin", [0, 20])
def test_window_edges_are_where_the_plans_windows_start_and_end(margin):
    cols = plan_rows(64, 203, 64, 16, margin)[0]
    starts = {w.col - 1 for w in cols if w.col > 0}
    ends = {w.col + w.width - 1 for w in cols if w.col + w.width < 203}
    assert window_edges(203, 64, 16, margin) == sorted(starts | ends)
    assert window_edges(50, 64, 16, margin) == []  # one window, the image's own size


def test_seam_index_follows_the_grid_an_edge_margin_shifts():
    """A class raster that changes only at the edges of a plan with margin 20: the index sees those seams when told
    the margin, and not at the unshifted grid's edges."""
    classes = np.zeros((120, 203), np.uint8)
    rng = np.random.default_rng(0)
    classes[:] = rng.integers(0, 2, 120)[:, None]  # changes across rows everywhere, none across columns...
    for p in window_edges(203, 64, 16, 20):  # ...except at the shifted grid's column edges
        classes[:, p + 1 :] ^= 1
    with_margin, _ = seam_index(classes, 64, 16, margin=20)
    without, _ = seam_index(classes, 64, 16)
    assert with_margin > 10 and without < 1
