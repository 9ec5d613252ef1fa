"""Unlabeled-image pipeline: discovery, windowed reads, statistics, training tiles and the step sampler."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from conftest import MS_NODATA_CORNER, make_geotiff, synthetic_image

import cdkd.data.unlabeled as unlabeled_mod
from cdkd.data import (
    NormStats,
    RasterInfo,
    StepSampler,
    UnlabeledTiles,
    compute_stats,
    find_rasters,
    read_window,
)
from cdkd.errors import CdkdIOError, CdkdValueError, DataError

USABLE = ["geo/ms_uint16.tif", "geo/rgb.tif", "scenes/a/grass.jpg", "scenes/b/FIELD.JPG", "scenes/b/deep/river.png"]


def scan(root, **kwargs) -> tuple[list[RasterInfo], list[warnings.WarningMessage]]:
    """find_rasters plus every warning it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_rasters(root, **kwargs)
    return found, [w for w in caught if issubclass(w.category, UserWarning)]


def by_name(rasters: list[RasterInfo], name: str) -> RasterInfo:
    (info,) = [r for r in rasters if r.path.endswith(name)]
    return info


def full_read(info: RasterInfo, bands) -> tuple[np.ndarray, np.ndarray]:
    return read_window(info.path, bands, 0, 0, info.height, info.width)


@pytest.fixture
def rasters(tile_dir) -> list[RasterInfo]:
    found, _ = scan(tile_dir)
    return found


@pytest.fixture
def rgb_stats(rasters) -> NormStats:
    return compute_stats(rasters, (1, 2, 3), n_samples=8, window=128)


def dihedral(image: np.ndarray, valid: np.ndarray):
    """The 8 flips/rotations of a (C, T, T) image and its (T, T) mask."""
    for flip in (False, True):
        im, va = (image[:, :, ::-1], valid[:, ::-1]) if flip else (image, valid)
        for k in range(4):
            yield np.rot90(im, k, axes=(1, 2)), np.rot90(va, k)


# --------------------------------------------------------------------------------------------------------------
# discovery


def test_find_rasters_lists_usable_files_sorted_and_warns_once(tile_dir):
    found, warned = scan(tile_dir)
    assert [Path(r.path).relative_to(tile_dir).as_posix() for r in found] == USABLE
    assert len(warned) == 1
    message = str(warned[0].message)
    assert "skipped 2 of 7 files" in message and str(tile_dir) in message
    assert "geo/broken.tif: not a readable raster" in message

    ms = by_name(found, "ms_uint16.tif")
    assert (ms.width, ms.height, ms.count, ms.dtype) == (200, 200, 4, "uint16")
    png = by_name(found, "river.png")
    assert (png.width, png.height, png.count, png.dtype) == (120, 80, 3, "uint8")


def test_truncated_file_is_caught_by_the_bottom_right_probe(tile_dir):
    # its header and top-left window are fine: only a probe beyond the first half finds the damage
    path = str(tile_dir / "geo/truncated.tif")
    pixels, valid = read_window(path, (1, 2, 3), 0, 0, 64, 64)
    assert pixels.shape == (3, 64, 64) and valid.all()
    with pytest.raises(CdkdIOError, match="truncated.tif: cannot read pixels"):
        read_window(path, (1, 2, 3), 64, 64, 64, 64)
    found, _ = scan(tile_dir)
    assert not any(r.path.endswith("truncated.tif") for r in found)


@pytest.mark.parametrize("kwargs", [{"bands": [4]}, {"bands": (2, 4)}, {"min_bands": 4}])
def test_files_with_too_few_bands_are_skipped(tile_dir, kwargs):
    found, warned = scan(tile_dir, **kwargs)
    assert [Path(r.path).name for r in found] == ["ms_uint16.tif"]
    assert len(warned) == 1 and "skipped 6 of 7 files" in str(warned[0].message)


def test_single_band_file_is_usable_with_min_bands_1(tmp_path):
    make_geotiff(tmp_path / "pan.tif", synthetic_image((1, 40, 40), dtype="uint16"))
    found, warned = scan(tmp_path, min_bands=1)
    assert len(found) == 1 and found[0].count == 1 and not warned
    with pytest.raises(DataError, match="has 1 band, needs 3"):
        find_rasters(tmp_path)


def test_find_rasters_errors(tmp_path, tile_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: no usable image found.*no candidate file"):
        find_rasters(empty)
    with pytest.raises(DataError, match="missing.*not found"):
        find_rasters(tmp_path / "missing")
    with pytest.raises(DataError, match="not a folder"):
        find_rasters(tile_dir / "notes.txt")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.tif").write_bytes(b"II*\x00garbage")
    (bad / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(DataError, match=r"no usable image found \(looked for JPEG, PNG, TIFF and GeoTIFF.*2 candidate"):
        find_rasters(bad)

    for bands in ([0], [1, -2], []):
        with pytest.raises(CdkdValueError):
            find_rasters(tile_dir, bands=bands)


def test_real_corrupt_geotiff_is_skipped(shared_data, tmp_path):
    corrupt = shared_data / "scenes" / "corrupt.tif"
    if not corrupt.exists():
        pytest.skip(f"real data not available: {corrupt}")
    (tmp_path / "corrupt.tif").symlink_to(corrupt)  # a link, not a copy of the data
    make_geotiff(tmp_path / "ok.tif", synthetic_image((3, 32, 32)))
    found, warned = scan(tmp_path)
    assert [Path(r.path).name for r in found] == ["ok.tif"]
    assert len(warned) == 1 and "corrupt.tif: pixel data cannot be read" in str(warned[0].message)
    with pytest.raises(CdkdIOError, match=r"corrupt.tif: cannot read pixels \(.*TIFF"):
        read_window(str(corrupt), (1, 2, 3), 512, 512, 64, 64)


# --------------------------------------------------------------------------------------------------------------
# windowed reads


def test_read_window_pixels_and_nodata_mask(tile_dir, rasters):
    ms = by_name(rasters, "ms_uint16.tif")
    with rasterio.open(ms.path) as src:
        expected = src.read((4, 2), window=((30, 60), (20, 70)))
    pixels, valid = read_window(ms.path, (4, 2), 30, 20, 30, 50)
    assert pixels.dtype == np.uint16 and pixels.shape == (2, 30, 50) and valid.shape == (30, 50)
    np.testing.assert_array_equal(pixels, expected)
    # rows 30..39 x cols 20..39 fall in the nodata corner
    corner = np.zeros((30, 50), dtype=bool)
    corner[: MS_NODATA_CORNER - 30, : MS_NODATA_CORNER - 20] = True
    np.testing.assert_array_equal(valid, ~corner)


def test_read_window_errors(tile_dir, rasters):
    broken = str(tile_dir / "geo/broken.tif")
    with pytest.raises(CdkdIOError, match=r"broken.tif: cannot read pixels \(") as info:
        read_window(broken, (1,), 0, 0, 8, 8)
    assert isinstance(info.value, OSError)
    with pytest.raises(CdkdIOError, match="nope.tif: cannot read pixels"):
        read_window(str(tile_dir / "nope.tif"), (1,), 0, 0, 8, 8)
    rgb = by_name(rasters, "rgb.tif")
    with pytest.raises(DataError, match="has 3 bands, band 4 requested"):
        read_window(rgb.path, (1, 4), 0, 0, 8, 8)
    with pytest.raises(CdkdValueError, match="outside"):
        read_window(rgb.path, (1,), 250, 0, 16, 16)
    with pytest.raises(CdkdValueError, match="1-based"):
        read_window(rgb.path, (0,), 0, 0, 8, 8)


# --------------------------------------------------------------------------------------------------------------
# statistics


def test_stats_match_numpy_when_windows_cover_the_image(rasters):
    rgb = by_name(rasters, "rgb.tif")
    stats = compute_stats([rgb], (3, 1), n_samples=3, window=512, seed=5)
    pixels, _ = full_read(rgb, (3, 1))
    x = pixels.astype(np.float64).reshape(2, -1)
    np.testing.assert_allclose(stats.mean, x.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.std, x.std(axis=1), rtol=1e-9)
    assert stats.bands == (3, 1) and stats.dtype == "uint8"


def test_uint16_stats_exclude_nodata_and_normalise_tiles(rasters):
    ms = by_name(rasters, "ms_uint16.tif")
    bands = (1, 2, 3, 4)
    stats = compute_stats([ms], bands, n_samples=2, window=256)
    pixels, valid = full_read(ms, bands)
    assert not valid[:MS_NODATA_CORNER, :MS_NODATA_CORNER].any() and valid.sum() == 200 * 200 - 40 * 40
    x = pixels[:, valid].astype(np.float64)
    np.testing.assert_allclose(stats.mean, x.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.std, x.std(axis=1), rtol=1e-9)
    assert stats.dtype == "uint16" and min(stats.mean) > 500  # the zeros did not pull the mean down

    item = UnlabeledTiles([ms], stats, tile_size=208, augment=False)[0]  # 200 px image in a 208 px tile
    image, ok = item["image"].numpy(), item["valid"].numpy()
    assert image.dtype == np.float32 and image.shape == (4, 208, 208)
    expected = (x - np.asarray(stats.mean)[:, None]) / np.asarray(stats.std)[:, None]
    np.testing.assert_allclose(image[:, :200, :200][:, valid], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(image[:, :200, :200][:, valid].mean(axis=1), 0, atol=1e-4)
    np.testing.assert_array_equal(ok[:200, :200], valid)
    assert not ok[200:].any() and not ok[:, 200:].any()
    assert (image[:, ~ok] == 0).all()


def test_stats_are_deterministic_and_use_the_seed(rasters):
    a = compute_stats(rasters, (1, 2, 3), n_samples=6, window=32, seed=1)
    b = compute_stats(rasters, (1, 2, 3), n_samples=6, window=32, seed=1)
    c = compute_stats(rasters, (1, 2, 3), n_samples=6, window=32, seed=2)
    assert a == b and a != c


def test_stats_without_any_valid_pixel_is_an_error(tmp_path):
    path = make_geotiff(tmp_path / "empty.tif", np.zeros((3, 24, 24), np.uint16), nodata=0)
    info = RasterInfo(str(path), 24, 24, 3, "uint16")
    with pytest.raises(DataError, match="no valid pixel"):
        compute_stats([info], (1, 2, 3), n_samples=4)
    with pytest.raises(DataError):
        compute_stats([], (1, 2, 3))


def test_norm_stats_roundtrip_and_constant_band():
    stats = NormStats(mean=(10, 20.5), std=(0.0, 4), bands=[2, 1], dtype="uint16")
    assert stats.std[0] > 0 and stats.bands == (2, 1)
    d = stats.to_dict()
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    assert NormStats.from_dict(d) == stats
    out = stats.normalize(np.full((2, 3, 3), 10, dtype=np.uint16))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out[1], (10 - 20.5) / 4)
    with pytest.raises(CdkdValueError, match=r"shape \(2, H, W\)"):
        stats.normalize(np.zeros((3, 3, 3)))
    with pytest.raises(CdkdValueError):
        NormStats.from_dict({"mean": [1.0]})
    with pytest.raises(CdkdValueError):
        NormStats(mean=(1.0,), std=(1.0, 2.0), bands=(1,), dtype="uint8")


# --------------------------------------------------------------------------------------------------------------
# training tiles


def test_items_are_a_pure_function_of_seed_and_sample_number(rasters, rgb_stats):
    three_band = [r for r in rasters if r.count == 3]

    def mask_fn(rng):
        return rng.random((4, 4)) < 0.5

    a = UnlabeledTiles(three_band, rgb_stats, 64, seed=3, mask_fn=mask_fn)
    b = UnlabeledTiles(three_band, rgb_stats, 64, seed=3, mask_fn=mask_fn)
    n = len(a)
    assert n == 4
    order = [17, 2, 9, 0, 5]
    first = {i: a[i] for i in order}  # out of order, beyond one epoch
    for i in sorted(order):
        again = b[i]
        for key in ("image", "valid", "mask"):
            assert torch.equal(first[i][key], again[key]), (i, key)
    assert not torch.equal(first[0]["image"], first[5]["image"])
    other_seed = UnlabeledTiles(three_band, rgb_stats, 64, seed=4, mask_fn=mask_fn)
    assert not torch.equal(first[0]["image"], other_seed[0]["image"])

    # every epoch visits each file once, in a new order
    epochs = [[a.raster_for(e * n + k).path for k in range(n)] for e in range(4)]
    assert all(sorted(p) == sorted(r.path for r in three_band) for p in epochs)
    assert len({tuple(p) for p in epochs}) > 1


def test_dataloader_workers_reproduce_the_single_process_stream(rasters, rgb_stats):
    ds = UnlabeledTiles([r for r in rasters if r.count == 3], rgb_stats, 32)

    def stream(num_workers):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=2, sampler=StepSampler(2, num_micro_steps=4), num_workers=num_workers
        )
        return [batch["image"] for batch in loader]

    single, workers = stream(0), stream(2)
    assert len(single) == 4 and all(torch.equal(x, y) for x, y in zip(single, workers))


def test_large_images_are_read_as_one_tile_sized_window(rasters, rgb_stats, monkeypatch):
    rgb = by_name(rasters, "rgb.tif")  # 260 x 300
    calls = []

    def spy(path, bands, row, col, height, width):
        calls.append((row, col, height, width))
        return read_window(path, bands, row, col, height, width)

    monkeypatch.setattr(unlabeled_mod, "read_window", spy)
    ds = UnlabeledTiles([rgb], rgb_stats, 64, augment=False)
    for i in range(40):
        item = ds[i]
        assert item["image"].shape == (3, 64, 64) and item["valid"].all()
    assert {(h, w) for _, _, h, w in calls} == {(64, 64)}
    rows, cols = {c[0] for c in calls}, {c[1] for c in calls}
    assert min(rows) >= 0 and max(rows) <= 260 - 64 and min(cols) >= 0 and max(cols) <= 300 - 64
    assert len(rows) > 20 and len(cols) > 20  # positions really vary

    row, col = calls[-1][:2]
    pixels, _ = read_window(rgb.path, (1, 2, 3), row, col, 64, 64)
    np.testing.assert_allclose(item["image"].numpy(), rgb_stats.normalize(pixels), rtol=1e-6)


def test_small_images_are_padded_at_the_bottom_right(rasters, rgb_stats):
    png = by_name(rasters, "river.png")  # 80 rows x 120 columns
    full, _ = full_read(png, (1, 2, 3))

    item = UnlabeledTiles([png], rgb_stats, 128, augment=False)[0]  # smaller in both dimensions
    image, valid = item["image"].numpy(), item["valid"].numpy()
    assert image.shape == (3, 128, 128) and valid.shape == (128, 128) and item["valid"].dtype == torch.bool
    assert valid[:80, :120].all() and valid.sum() == 80 * 120
    assert (image[:, ~valid] == 0).all()
    np.testing.assert_allclose(image[:, :80, :120], rgb_stats.normalize(full), rtol=1e-6)

    ds = UnlabeledTiles([png], rgb_stats, 96, augment=False)  # smaller in rows only: random columns
    offsets = set()
    for i in range(12):
        image, valid = ds[i]["image"].numpy(), ds[i]["valid"].numpy()
        assert valid[:80].all() and not valid[80:].any() and (image[:, 80:] == 0).all()
        windows = [rgb_stats.normalize(full[..., c : c + 96]) for c in range(120 - 96 + 1)]
        cols = [c for c, w in enumerate(windows) if np.allclose(image[:, :80], w)]
        assert len(cols) == 1
        offsets.add(cols[0])
    assert len(offsets) > 1


def test_augmentation_is_a_flip_or_rotation_of_the_same_window(rasters, rgb_stats):
    png = by_name(rasters, "river.png")
    plain = UnlabeledTiles([png], rgb_stats, 96, augment=False, seed=7)
    aug = UnlabeledTiles([png], rgb_stats, 96, augment=True, seed=7)
    moved = 0
    for i in range(12):
        p, a = plain[i], aug[i]
        image, valid = a["image"].numpy(), a["valid"].numpy()
        # same window drawn first, so the multiset of values is preserved
        np.testing.assert_array_equal(np.sort(image, axis=None), np.sort(p["image"].numpy(), axis=None))
        matches = [
            k
            for k, (im, va) in enumerate(dihedral(p["image"].numpy(), p["valid"].numpy()))
            if np.array_equal(im, image) and np.array_equal(va, valid)
        ]
        assert matches, i
        moved += 0 not in matches
        assert a["image"].is_contiguous() and a["valid"].is_contiguous()
    assert moved >= 6  # 7 of 8 transforms move the padded tile


def test_mask_fn_output_is_passed_through_and_drawn_last(rasters, rgb_stats):
    rgb = by_name(rasters, "rgb.tif")
    seen = []

    def mask_fn(rng):
        seen.append(isinstance(rng, np.random.Generator))
        return (rng.permutation(16) < 12).reshape(4, 4)

    with_mask = UnlabeledTiles([rgb], rgb_stats, 32, seed=1, mask_fn=mask_fn)[5]
    without = UnlabeledTiles([rgb], rgb_stats, 32, seed=1)[5]
    assert seen == [True] and "mask" not in without
    assert with_mask["mask"].dtype == torch.bool and with_mask["mask"].shape == (4, 4)
    assert int(with_mask["mask"].sum()) == 12
    assert torch.equal(with_mask["image"], without["image"])


@pytest.mark.parametrize("size", [100, 8, 0, -16])
def test_tile_size_must_be_a_multiple_of_the_patch_size(rasters, rgb_stats, size):
    with pytest.raises(CdkdValueError, match=f"tile size {size} is not a multiple of the patch size 16"):
        UnlabeledTiles(rasters, rgb_stats, size)


def test_dataset_rejects_files_without_the_stats_bands(rasters):
    stats = NormStats(mean=(1.0,) * 4, std=(1.0,) * 4, bands=(1, 2, 3, 4), dtype="uint16")
    with pytest.raises(DataError, match="has 3 bands"):
        UnlabeledTiles(rasters, stats, 32)
    with pytest.raises(DataError):
        UnlabeledTiles([], stats, 32)
    with pytest.raises(CdkdValueError):
        UnlabeledTiles([by_name(rasters, "ms_uint16.tif")], stats, 32)[-1]


# --------------------------------------------------------------------------------------------------------------
# sampler


def test_one_process_with_batch_2b_sees_the_union_of_two_ranks():
    b, steps = 3, 5
    single = list(StepSampler(2 * b, num_micro_steps=steps))
    ranks = [list(StepSampler(b, world_size=2, rank=r, num_micro_steps=steps)) for r in range(2)]
    assert single == list(range(2 * b * steps))
    for m in range(steps):
        step = single[m * 2 * b : (m + 1) * 2 * b]
        assert step == ranks[0][m * b : (m + 1) * b] + ranks[1][m * b : (m + 1) * b]
    assert not set(ranks[0]) & set(ranks[1])


def test_resuming_continues_the_exact_stream():
    full = list(StepSampler(4, world_size=3, rank=1, num_micro_steps=10))
    resumed = StepSampler(4, world_size=3, rank=1, start_micro_step=6, num_micro_steps=10)
    assert list(resumed) == full[6 * 4 :] and len(resumed) == 4 * 4 and len(full) == 40
    infinite = StepSampler(4, world_size=3, rank=1, start_micro_step=6)
    assert list(itertools.islice(infinite, 16)) == full[6 * 4 :]
    assert list(itertools.islice(StepSampler(4, world_size=3, rank=1), 40)) == full
    assert len(StepSampler(2, start_micro_step=5, num_micro_steps=3)) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": 1, "world_size": 0},
        {"batch_size": 1, "world_size": 2, "rank": 2},
        {"batch_size": 1, "start_micro_step": -1},
        {"batch_size": 1, "num_micro_steps": -1},
    ],
)
def test_sampler_rejects_bad_arguments(kwargs):
    with pytest.raises(CdkdValueError):
        StepSampler(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# real data


def test_rsscn7_real_tiles(rsscn7_dir):
    found, warned = scan(rsscn7_dir)
    assert len(found) == 350 and not warned
    assert {(r.width, r.height, r.count, r.dtype) for r in found} == {(400, 400, 3, "uint8")}
    stats = compute_stats(found, (1, 2, 3), n_samples=16, seed=0)
    assert stats.dtype == "uint8"
    assert all(20 < m < 230 for m in stats.mean) and all(5 < s < 128 for s in stats.std)

    item = UnlabeledTiles(found, stats, 256)[123]
    assert item["image"].shape == (3, 256, 256) and item["valid"].all()
    assert abs(float(item["image"].mean())) < 3 and item["image"].std() > 0.05

    item = UnlabeledTiles(found, stats, 512, augment=False)[7]
    valid = item["valid"]
    assert valid[:400, :400].all() and int(valid.sum()) == 400 * 400
    assert (item["image"][:, 400:, :] == 0).all() and (item["image"][:, :, 400:] == 0).all()
