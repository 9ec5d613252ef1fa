"""Band metadata (cdkd.data.bands), sensor presets, spectral alignment and mixed-resolution band stacks."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from conftest import SHARED_DATA, make_geotiff, synthetic_image
from rasterio.transform import Affine
from rasterio.warp import Resampling, reproject

from cdkd.data.alignment import (
    alignment_weights,
    format_alignment,
    patch_embed_from_teacher,
)
from cdkd.data.bands import Band, BandSet, choose_scene_bands, match_bands
from cdkd.data.bandstack import BandStack, write_manifest
from cdkd.data.files import (
    find_rasters,
    open_raster,
    read_band_set,
    read_window,
    resolve_band_set,
)
from cdkd.data.sensors import (
    SENSOR_PRESETS,
    TEACHER_RGB,
    parse_wavelengths,
    teacher_bands,
)
from cdkd.data.stats import NormStats
from cdkd.errors import CdkdValueError, DataError

S2 = SENSOR_PRESETS["sentinel2_l2a"]
S2_DIR = SHARED_DATA / "multispectral" / "bigearthnet_s2"


def _row(weights: np.ndarray, bands: BandSet, channel: int) -> dict[str, float]:
    return {bands.bands[i].name: float(w) for i, w in enumerate(weights[channel]) if w > 0}


# ---------------------------------------------------------------------------------------------- alignment


def test_naip_alignment_takes_one_band_per_teacher_channel():
    naip = SENSOR_PRESETS["naip"]  # file order R, G, B, NIR
    w = alignment_weights(naip, TEACHER_RGB)
    np.testing.assert_allclose(w, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])  # NIR feeds no teacher channel


def test_sentinel2_alignment_weights_sum_to_one_and_pick_the_visible_bands():
    w = alignment_weights(S2, TEACHER_RGB)
    assert w.shape == (3, 12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert _row(w, S2, 0) == {"B04": 1.0}  # red: B04 alone (650-680 nm lies inside 630-690)
    green, blue = _row(w, S2, 1), _row(w, S2, 2)
    assert set(green) == {"B02", "B03"} and green["B03"] > 0.7  # B02's 65 nm width reaches into green
    assert set(blue) == {"B01", "B02"} and blue["B02"] > 0.9
    assert not w[:, 4:].any()  # red edge, NIR, SWIR: nothing
    text = format_alignment(w, S2, TEACHER_RGB)
    assert "R (630-690 nm) <- 1.000 B04 (665 nm)" in text


def test_enmap_like_224_band_alignment_averages_the_bands_in_range():
    enmap = SENSOR_PRESETS["enmap"]
    assert (
        len(enmap) == 224 and enmap.centers[0] == pytest.approx(418.416) and enmap.centers[-1] == pytest.approx(2445.3)
    )
    w = alignment_weights(enmap, TEACHER_RGB)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    centres = np.asarray(enmap.centers)
    for k, (lo, hi) in enumerate([(630, 690), (510, 580), (450, 510)]):
        used = centres[w[k] > 0]
        assert len(used) >= 8  # ~6.5 nm sampling: about ten bands per 60-70 nm range
        assert used.min() > lo - 7 and used.max() < hi + 7  # only bands that reach into the range
        inner = w[k][(centres > lo + 7) & (centres < hi - 7)]
        assert inner.min() > 0 and inner.max() / inner.min() < 1.6  # inner bands weigh about alike


def test_teacher_channel_without_a_band_is_a_clear_error():
    swir = BandSet((Band(1610, 90, "B11"), Band(2190, 180, "B12")))
    with pytest.raises(CdkdValueError, match=r"teacher channel R \(630-690 nm\) has no student band.*nearest: B11"):
        alignment_weights(swir, TEACHER_RGB)
    with pytest.raises(CdkdValueError, match="lo < hi"):
        teacher_bands((690, 630, 510, 580, 450, 510))
    assert teacher_bands((600, 700)).bands[0].center_nm == 650


def test_patch_embed_from_teacher_embeds_like_the_teacher_on_aligned_input():
    rng = np.random.default_rng(0)
    teacher_w = rng.normal(size=(8, 3, 4, 4))
    w = alignment_weights(S2, TEACHER_RGB)
    x = rng.normal(size=(12, 4, 4))  # one 12-band patch
    student_w = patch_embed_from_teacher(teacher_w, w, out_dim=8)
    aligned = np.einsum("tc,cpq->tpq", w, x)
    np.testing.assert_allclose(np.einsum("dcpq,cpq->d", student_w, x), np.einsum("dtpq,tpq->d", teacher_w, aligned))
    base = rng.normal(size=(5, 12, 4, 4))
    small = patch_embed_from_teacher(teacher_w, w, out_dim=5, base=base)
    np.testing.assert_array_equal(small[:, 4:], base[:, 4:])  # bands no teacher channel uses keep their own init
    assert not np.allclose(small[:, :3], base[:, :3])


# ---------------------------------------------------------------------------------------------- band sets


def test_band_set_round_trips_and_selects():
    bs = BandSet((Band(443, 20, "B01"), Band(490, None, "B02"), Band(560)), sensor="x")
    assert BandSet.from_dict(bs.to_dict()) == bs
    assert BandSet.from_json(bs.to_json()) == bs
    assert BandSet.from_yaml(bs.to_yaml()) == bs
    assert bs.select([3, 1]).centers == (560.0, 443.0)
    with pytest.raises(CdkdValueError, match="outside 1..3"):
        bs.select([4])
    np.testing.assert_allclose(bs.intervals(), [[433, 453], [466.5, 525], [525, 595]])  # unknown widths: half gaps


def test_parse_wavelengths_presets_lists_and_errors():
    assert parse_wavelengths("sentinel2").sensor == "sentinel2" and len(parse_wavelengths("Sentinel-2")) == 13
    names = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
    assert parse_wavelengths("sentinel2", 12, names).names == S2.names  # the 13-band preset narrowed by names
    bs = parse_wavelengths("443:20, 0.49, 560")
    assert bs.centers == (443.0, 490.0, 560.0) and bs.bands[0].width_nm == 20.0  # < 100: micrometres
    with pytest.raises(CdkdValueError, match="preset has 13 bands but the data has 12"):
        parse_wavelengths("sentinel2", 12)
    with pytest.raises(CdkdValueError, match="gives 2 centres but the data has 3"):
        parse_wavelengths("443,490", 3)
    with pytest.raises(CdkdValueError, match="sensor preset"):
        parse_wavelengths("landsat99")


def test_band_metadata_from_tags_imagery_domain_and_envi_header(tmp_path):
    arr = synthetic_image((3, 16, 16), dtype="uint16")
    tagged = make_geotiff(tmp_path / "tagged.tif", arr)
    with rasterio.open(tagged, "r+") as dst:
        for i, (c, w) in enumerate([(490, 65), (560, 35), (665, 30)], start=1):
            dst.update_tags(i, wavelength_nm=str(c), fwhm_nm=str(w))
            dst.set_band_description(i, f"B0{i + 1}")
    bs = read_band_set(tagged)
    assert bs.centers == (490, 560, 665) and bs.names == ("B02", "B03", "B04") and bs.bands[0].width_nm == 65

    imagery = make_geotiff(tmp_path / "imagery.tif", arr)
    with rasterio.open(imagery, "r+") as dst:
        for i, um in enumerate((0.49, 0.56, 0.665), start=1):
            dst.update_tags(i, ns="IMAGERY", CENTRAL_WAVELENGTH_UM=str(um), FWHM_UM="0.03")
    bs = read_band_set(imagery)
    assert bs.centers == pytest.approx((490, 560, 665)) and bs.bands[2].width_nm == pytest.approx(30)

    envi = make_geotiff(tmp_path / "cube.tif", arr)
    (tmp_path / "cube.hdr").write_text(
        "ENVI\nbands = 3\nwavelength units = Micrometers\n"
        "wavelength = {0.45,\n 0.55, 0.65}\nfwhm = {0.01, 0.01, 0.01}\n"
    )
    bs = read_band_set(envi)
    assert bs.centers == pytest.approx((450, 550, 650)) and bs.bands[0].width_nm == pytest.approx(10)

    partial = make_geotiff(tmp_path / "partial.tif", arr)
    with rasterio.open(partial, "r+") as dst:
        dst.update_tags(1, wavelength_nm="490")
    with pytest.raises(DataError, match=r"bands \[2, 3\] carry no wavelength"):
        read_band_set(partial)
    assert read_band_set(make_geotiff(tmp_path / "plain.tif", arr)) is None
    rgb = make_geotiff(tmp_path / "rgb.tif", arr)
    with rasterio.open(rgb, "r+") as dst:
        for i, name in enumerate(("Red", "Green", "Blue"), start=1):
            dst.set_band_description(i, name)
    assert read_band_set(rgb) is None  # colour names alone: WorldView-3's red or NAIP's? not guessed

    assert resolve_band_set([str(tagged), str(imagery)], (3, 1)).centers == pytest.approx((665, 490))
    assert resolve_band_set([str(tagged)], (3,), "480,550,660:20").bands[0] == Band(660, 20)  # --wavelengths wins
    with pytest.raises(DataError, match="differ from those of"):
        resolve_band_set([str(tagged), str(envi)], (1, 2, 3))


def test_norm_stats_carry_the_band_set_and_read_old_files():
    norm = NormStats((1.0, 2.0), (3.0, 4.0), (1, 2), "uint16", spectral=S2.select([4, 3]))
    assert NormStats.from_dict(norm.to_dict()) == norm
    old = {k: v for k, v in norm.to_dict().items() if k != "spectral"}  # written before band metadata existed
    assert NormStats.from_dict(old).spectral is None
    with pytest.raises(CdkdValueError, match="carry wavelengths for 3"):
        NormStats((1.0, 2.0), (3.0, 4.0), (1, 2), "uint16", spectral=S2.select([1, 2, 3]))


# ---------------------------------------------------------------------------------------------- scenes


def test_scene_bands_are_matched_by_wavelength_or_refused():
    model = S2.select([2, 3, 4, 8])  # B02, B03, B04, B08
    shuffled = S2.select([8, 4, 1, 3, 2])  # another order, one extra band
    assert match_bands(model, shuffled) == [5, 4, 2, 1]
    assert choose_scene_bands(model, shuffled, None, "s.tif") == (5, 4, 2, 1)
    naip = SENSOR_PRESETS["naip"]
    with pytest.raises(DataError, match=r"s.tif: the scene has no band for B04 \(665 nm\), B08 \(842 nm\), B11"):
        choose_scene_bands(S2.select([2, 3, 4, 8, 11]), naip.select([1, 2, 3]), None, "s.tif")
    with pytest.raises(DataError, match=r"--bands gives scene band 1 \(B08 \(842 nm\)\) to model channel 1"):
        choose_scene_bands(model, shuffled, (1, 2, 3, 4), "s.tif")
    assert choose_scene_bands(model, None, None, "s.tif") is None  # a scene without metadata: count rules
    s2b = BandSet(tuple(Band(c + 8, b.width_nm, b.name) for c, b in zip(model.centers, model.bands)))
    assert match_bands(model, s2b) == [1, 2, 3, 4]  # Sentinel-2B's centres differ by a few nm: same bands


def test_scene_source_refuses_a_scene_with_the_wrong_bands_and_maps_a_reordered_one(tmp_path):
    from cdkd.scene.core.source import SceneSource

    model = S2.select([2, 3, 4, 8])
    norm = NormStats((1000.0,) * 4, (500.0,) * 4, (1, 2, 3, 4), "uint16", spectral=model)
    naip = make_geotiff(tmp_path / "naip.tif", synthetic_image((4, 32, 32), dtype="uint16"))
    with rasterio.open(naip, "r+") as dst:
        for i, b in enumerate(SENSOR_PRESETS["naip"].bands, start=1):
            dst.update_tags(i, wavelength_nm=f"{b.center_nm:g}")
    # NAIP's red (ADS100, 619-651 nm) is 30 nm from Sentinel-2's B04: not the band the model learnt
    with pytest.raises(DataError, match=r"naip.tif: the scene has no band for B04 \(665 nm\) \(the model reads"):
        SceneSource(naip, 4, norm)
    reordered = make_geotiff(tmp_path / "nrgb.tif", synthetic_image((4, 32, 32), dtype="uint16"))
    with rasterio.open(reordered, "r+") as dst:
        for i, c in enumerate((842, 665, 560, 490), start=1):
            dst.update_tags(i, wavelength_nm=str(c))
    with SceneSource(reordered, 4, norm) as src:
        assert src.bands == (4, 3, 2, 1) and src.norm.spectral == model
    plain = make_geotiff(tmp_path / "plain.tif", synthetic_image((4, 32, 32), dtype="uint16"))
    with SceneSource(plain, 4, norm) as src:  # no metadata: the count-based default, as before
        assert src.bands == (1, 2, 3, 4)


# ---------------------------------------------------------------------------------------------- band stacks


def _mixed_resolution_folder(root, with_b8a_name: bool = True):
    """B02/B03 at 10 m (40x40) and B05/B8A at 20 m (20x20), same footprint, Sentinel-2 style names."""
    fine = synthetic_image((2, 40, 40), seed=1, dtype="uint16")
    coarse = synthetic_image((2, 20, 20), seed=2, dtype="uint16")
    t10, t20 = Affine(10, 0, 500_000, 0, -10, 5_000_000), Affine(20, 0, 500_000, 0, -20, 5_000_000)
    files = {
        "x_B02.tif": (fine[:1], t10),
        "x_B03.tif": (fine[1:], t10),
        "x_B05.tif": (coarse[:1], t20),
        "x_B8A.tif" if with_b8a_name else "x_nir.tif": (coarse[1:], t20),
    }
    for name, (arr, t) in files.items():
        make_geotiff(root / name, arr, transform=t)
    return fine, coarse, t10, t20


def test_band_stack_folder_reads_one_grid_in_wavelength_order(tmp_path):
    fine, coarse, t10, t20 = _mixed_resolution_folder(tmp_path / "scene")
    with open_raster(tmp_path / "scene") as src:
        assert (src.count, src.height, src.width, src.res) == (4, 40, 40, (10.0, 10.0))
        assert src.descriptions == ("B02", "B03", "B05", "B8A")  # file names sort B8A before B05: wavelength wins
        pixels = src.read()
    np.testing.assert_array_equal(pixels[:2], fine)  # the grid bands are read unchanged
    expected = np.zeros((2, 40, 40), dtype=np.float32)
    reproject(
        coarse.astype(np.float32),
        expected,
        src_transform=t20,
        dst_transform=t10,
        src_crs="EPSG:32633",
        dst_crs="EPSG:32633",
        resampling=Resampling.bilinear,
    )
    assert np.abs(pixels[2:].astype(np.float32) - expected).max() <= 1.0  # rasterio's bilinear, within rounding
    assert read_band_set(tmp_path / "scene").names == ("B02", "B03", "B05", "B8A")
    win, valid = read_window(str(tmp_path / "scene"), (4, 1), 8, 4, 16, 12)
    np.testing.assert_array_equal(win, pixels[[3, 0], 8:24, 4:16])
    assert valid.all()


def test_band_stack_manifest_is_found_by_discovery_and_keeps_its_order(tmp_path):
    _mixed_resolution_folder(tmp_path / "raw" / "scene", with_b8a_name=False)
    files = [f"raw/scene/x_{n}.tif" for n in ("nir", "B03", "B02", "B05")]
    write_manifest(tmp_path / "a.bands.yaml", files=files, grid="B02", wavelengths="865,560,490,705")
    found = find_rasters(tmp_path, min_bands=4)
    assert [r.path for r in found] == [str(tmp_path / "a.bands.yaml")]  # the stacked files are not images too
    assert (found[0].count, found[0].height) == (4, 40)
    assert read_band_set(found[0].path).centers == (865, 560, 490, 705)
    (tmp_path / "bad.bands.yaml").write_text("folder: x\nfiles: [a.tif]\n")
    with pytest.raises(CdkdValueError, match="exactly one of 'folder' or 'files'"):
        BandStack.from_manifest(tmp_path / "bad.bands.yaml")
    make_geotiff(tmp_path / "raw" / "utm34.tif", synthetic_image((1, 20, 20), dtype="uint16"), crs="EPSG:32634")
    write_manifest(tmp_path / "crs.bands.yaml", files=["raw/scene/x_B02.tif", "raw/utm34.tif"])
    with pytest.raises(DataError, match="a band stack needs one CRS"):
        open_raster(tmp_path / "crs.bands.yaml")


def test_sentinel2_band_files_read_as_the_stacked_file():
    if not S2_DIR.is_dir():
        pytest.skip(f"real data not available: {S2_DIR}")
    patch = sorted(p for p in S2_DIR.iterdir() if p.is_dir() and p.name != "stacked")[0]
    with open_raster(patch) as a, rasterio.open(S2_DIR / "stacked" / f"{patch.name}.tif") as b:
        assert a.count == b.count == 12 and a.descriptions == b.descriptions
        diff = np.abs(a.read().astype(np.int32) - b.read().astype(np.int32))
    assert diff[[1, 2, 3, 7]].max() == 0  # 10 m bands: the same pixels
    assert diff.max() <= 1  # 20 m and 60 m bands: rasterio's bilinear resampling, up to rounding
    assert read_band_set(patch).centers == read_band_set(S2_DIR / "stacked" / f"{patch.name}.tif").centers


def test_segment_refuses_a_scene_without_the_models_bands_in_one_line(tmp_path):
    from conftest import make_segmenter, one_clean_error
    from typer.testing import CliRunner

    from cli.main import app

    norm = NormStats((1000.0,) * 4, (500.0,) * 4, (1, 2, 3, 4), "uint16", spectral=S2.select([2, 3, 4, 8]))
    seg = make_segmenter(tmp_path / "segmenter.pt", in_chans=4, norm=norm)
    scene = make_geotiff(tmp_path / "naip.tif", synthetic_image((4, 64, 64), dtype="uint16"))
    with rasterio.open(scene, "r+") as dst:
        for i, b in enumerate(SENSOR_PRESETS["naip"].bands, start=1):
            dst.update_tags(i, wavelength_nm=f"{b.center_nm:g}")
    res = CliRunner().invoke(app, ["segment", str(scene), "--model", str(seg), "--out", str(tmp_path / "lc.tif")])
    assert res.exit_code != 0 and "the scene has no band for B04 (665 nm)" in one_clean_error(res.output)
    assert not (tmp_path / "lc.tif").exists()
