"""The quick-look PNG: size, the class map in the class colours, the legend's entries and swatches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import make_geotiff, synthetic_image
from PIL import Image

from cdkd.data.classes import BUILTIN_SCHEMAS
from cdkd.data.classraster import NODATA, write_class_metadata
from cdkd.errors import CdkdValueError, OutputExistsError
from cdkd.scene.preview import LEGEND_KEY, panel_shape, preview_layout, write_preview

SCHEMA = BUILTIN_SCHEMAS["dubai"]
H, W = 300, 450


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A 4-band scene with a nodata corner and a labelled class raster of its size: stripes of all 5 classes."""
    pixels = synthetic_image((4, H, W), seed=4, dtype="uint16")
    pixels[:, :30, :60] = 0
    scene = make_geotiff(tmp_path / "scene.tif", pixels, nodata=0)
    ids = np.repeat((np.arange(W)[None, :] // 90).astype(np.uint8), H, axis=0)
    ids[:30, :60] = NODATA
    with rasterio.open(scene) as src:
        profile = dict(
            driver="GTiff",
            width=W,
            height=H,
            count=1,
            dtype="uint8",
            crs=src.crs,
            transform=src.transform,
            nodata=NODATA,
        )
    classes = tmp_path / "scene_lc.tif"
    with rasterio.open(classes, "w", **profile) as dst:
        dst.write(ids, 1)
        write_class_metadata(dst, SCHEMA)
    return scene, classes, ids


def _png(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def test_preview_size_classes_and_legend(pair, tmp_path: Path) -> None:
    scene, classes, ids = pair
    out = write_preview(scene, classes, tmp_path / "quick.png", max_size=150)
    png, text = _png(out)
    rows, cols = panel_shape(W, H, 150)
    assert (rows, cols) == (100, 150)  # the longer side at max_size, aspect kept
    layout = preview_layout(rows, cols, SCHEMA.names)
    assert (png.shape[1], png.shape[0]) == layout.size
    # legend: every class by name and colour, in the PNG's text chunk and as a swatch in the image
    assert json.loads(text[LEGEND_KEY]) == [
        {"id": c.id, "name": c.name, "color": list(c.color)} for c in SCHEMA.classes
    ]
    for (left, top, size, _), c in zip(layout.swatches, SCHEMA.classes):
        inner = png[top + 2 : top + size - 2, left + 2 : left + size - 2].reshape(-1, 3)
        assert (inner == c.color).all(), c.name
    # the class panel: one PNG pixel per decimated raster pixel, exactly the class colour; nodata white
    left, top, w, h = layout.classes
    panel = png[top : top + h, left : left + w]
    expected = ids[:: H // rows, :: W // cols]  # 3x decimation of stripes and corner: nearest picks these
    palette = np.vstack([SCHEMA.palette(), np.full((256 - SCHEMA.num_classes, 3), 255, np.uint8)])
    assert np.array_equal(panel, palette[expected])
    for c in SCHEMA.classes:
        assert (panel.reshape(-1, 3) == c.color).all(axis=1).any(), c.name
    # the scene panel is stretched (2-98 % per band), its nodata corner white
    left, top, w, h = layout.scene
    scene_panel = png[top : top + h, left : left + w].astype(int)
    assert (scene_panel[:10, :20] == 255).all()
    valid = scene_panel[20:].reshape(-1, 3)
    assert (valid.min(axis=0) <= 5).all() and (valid.max(axis=0) >= 250).all()  # each band spans 0..255


def test_small_scene_is_not_enlarged_and_bands_are_checked(pair, tmp_path: Path) -> None:
    scene, classes, _ = pair
    out = write_preview(scene, classes, tmp_path / "big.png", max_size=2000, bands=[4])
    png, text = _png(out)
    assert (png.shape[1], png.shape[0]) == preview_layout(H, W, SCHEMA.names).size
    assert "(bands 4)" in text["Title"]
    with pytest.raises(CdkdValueError, match="preview bands"):
        write_preview(scene, classes, tmp_path / "x.png", bands=[1, 5, 2])


def test_preview_refusals(pair, tmp_path: Path) -> None:
    scene, classes, _ = pair
    out = write_preview(scene, classes, tmp_path / "p.png", max_size=64)
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_preview(scene, classes, out, max_size=64)
    assert out.read_bytes() == before
    with pytest.raises(CdkdValueError, match=r"\.png"):
        write_preview(scene, classes, tmp_path / "p.jpg")
    with pytest.raises(CdkdValueError, match="no CDKD_CLASSES"):
        write_preview(scene, scene, tmp_path / "q.png")  # the scene is no class raster
    other = make_geotiff(tmp_path / "other.tif", synthetic_image((3, 50, 50)))
    with pytest.raises(CdkdValueError, match="made from"):
        write_preview(other, classes, tmp_path / "r.png")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["p.png"]
