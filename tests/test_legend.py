"""The class raster's GIS legend: category names and a raster attribute table that GDAL (and so QGIS) reads."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import make_geotiff, make_segmenter, synthetic_image

from cdkd.data.classes import BUILTIN_SCHEMAS
from cdkd.data.classraster import (
    CLASSES_TAG,
    NODATA,
    colormap,
    gis_legend_xml,
    legend_sidecar,
    read_class_schema,
    write_gis_legend,
)
from cdkd.errors import CdkdIOError
from cdkd.inference.runtimes import open_runtime
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.engine import segment_scene

SCHEMA = BUILTIN_SCHEMAS["dubai"]


@pytest.fixture(scope="module")
def class_cog(tmp_path_factory) -> Path:
    """A real ``segment_scene`` output (tiny random segmenter), with a nodata corner, then its legend."""
    root = tmp_path_factory.mktemp("legend")
    model = make_segmenter(root / "segmenter.pt", tile=64, overlap=16, schema=SCHEMA)
    pixels = synthetic_image((3, 96, 130), seed=3)
    pixels[:, :20, :20] = 0
    scene = make_geotiff(root / "scene.tif", pixels, nodata=0)
    out = root / "lc.tif"
    segment_scene(scene, open_runtime(model), out, SegmentOptions(progress=False, checkpoint_seconds=0))
    return out


def _rat(xml_text: str) -> tuple[list[str], list[tuple[str, int, int]], list[list[str]]]:
    """(category names, RAT columns (name, type, usage), RAT rows) parsed from PAM XML."""
    band = ET.fromstring(xml_text).find("PAMRasterBand[@band='1']")
    assert band is not None
    categories = [c.text or "" for c in band.find("CategoryNames").findall("Category")]
    rat = band.find("GDALRasterAttributeTable")
    assert rat.get("tableType") == "thematic"
    columns = [
        (f.findtext("Name"), int(f.findtext("Type")), int(f.findtext("Usage"))) for f in rat.findall("FieldDefn")
    ]
    rows = [[f.text for f in row.findall("F")] for row in sorted(rat.findall("Row"), key=lambda r: int(r.get("index")))]
    return categories, columns, rows


def test_legend_xml_names_every_class_with_its_colour() -> None:
    categories, columns, rows = _rat(gis_legend_xml(SCHEMA))
    assert categories == list(SCHEMA.names)
    # GDAL's codes: Integer 0 / String 2; usages MinMax 5, Name 2, Red..Alpha 6..9
    assert columns == [
        ("Value", 0, 5),
        ("Class_Name", 2, 2),
        ("Red", 0, 6),
        ("Green", 0, 7),
        ("Blue", 0, 8),
        ("Alpha", 0, 9),
    ]
    assert rows == [[str(c.id), c.name, *map(str, c.color), "255"] for c in SCHEMA.classes]
    assert str(NODATA) not in [r[0] for r in rows]


def test_sidecar_beside_the_cog_keeps_colour_table_and_tags(class_cog: Path) -> None:
    with rasterio.open(class_cog) as src:
        before = (src.tags(), src.tags(1), src.colormap(1))
    sidecar = write_gis_legend(class_cog, SCHEMA)
    assert sidecar == legend_sidecar(class_cog) == class_cog.with_name("lc.tif.aux.xml")
    categories, _, rows = _rat(sidecar.read_text())
    assert categories == list(SCHEMA.names) and len(rows) == SCHEMA.num_classes
    with rasterio.open(class_cog) as src:  # GDAL now reads the sidecar too: nothing it had may change
        assert (src.tags(), src.tags(1), src.colormap(1)) == before
        legend = read_class_schema(src)  # what cdkd vectorize looks class names up in
        assert (legend.names, legend.colors) == (SCHEMA.names, SCHEMA.colors)
        assert src.colormap(1)[0] == colormap(SCHEMA)[0]
        assert CLASSES_TAG in src.tags()


def test_gdalinfo_shows_categories_and_rat(class_cog: Path) -> None:
    if shutil.which("gdalinfo") is None:
        pytest.skip("gdalinfo not on PATH (apt-get install gdal-bin)")
    write_gis_legend(class_cog, SCHEMA)
    info = json.loads(
        subprocess.run(["gdalinfo", "-json", str(class_cog)], check=True, capture_output=True, text=True).stdout
    )
    band = info["bands"][0]
    assert band["categories"] == list(SCHEMA.names)
    rat = band.get("rat") or info.get("rat")  # GDAL < 3.7 puts band 1's table at the top level
    names = [f["name"] for f in rat["fieldDefn"]]
    assert names == ["Value", "Class_Name", "Red", "Green", "Blue", "Alpha"]
    assert [f["usage"] for f in rat["fieldDefn"]] == [5, 2, 6, 7, 8, 9]
    assert [r["f"] for r in rat["row"]] == [[c.id, c.name, *c.color, 255] for c in SCHEMA.classes]
    assert band["colorTable"]["entries"][0][:3] == list(SCHEMA.classes[0].color)  # the colour table stays


def test_vectorize_reads_the_same_class_names(class_cog: Path, tmp_path: Path) -> None:
    from cdkd.vector.vectorize import vectorize

    write_gis_legend(class_cog, SCHEMA)
    out = tmp_path / "lc.gpkg"
    vectorize(class_cog, out, progress=False)
    import pyogrio

    names = set(pyogrio.read_dataframe(out)["class_name"])
    with rasterio.open(class_cog) as src:
        present = {SCHEMA.names[v] for v in np.unique(src.read(1)) if v != NODATA}
    assert names == present and names


def test_stale_sidecar_is_replaced_and_missing_raster_refused(class_cog: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.tif"
    shutil.copy(class_cog, copy)
    legend_sidecar(copy).write_text(
        '<PAMDataset><PAMRasterBand band="1"><CategoryNames><Category>old</Category>'
        "</CategoryNames></PAMRasterBand></PAMDataset>"
    )
    write_gis_legend(copy, SCHEMA)
    assert _rat(legend_sidecar(copy).read_text())[0] == list(SCHEMA.names)
    with pytest.raises(CdkdIOError, match="missing.tif"):
        write_gis_legend(tmp_path / "missing.tif", SCHEMA)
    assert not legend_sidecar(tmp_path / "missing.tif").exists()
