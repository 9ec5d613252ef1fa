"""The picture in docs/qgis.md: a scene segmented by the cdkd provider and drawn by QGIS itself, with its legend.

    /usr/bin/python3 docs/scripts/render_qgis.py SCENE MODEL [--out docs/img/qgis_segment.png] [--cdkd cdkd]

Run with QGIS's Python (PyQGIS; Debian: ``apt install qgis``), headless. It does what a QGIS user does:
``cdkd qgis install`` (into a temporary QGIS settings folder, with the ``--cdkd`` executable given), the
algorithm ``cdkd:segment`` through Processing, the class raster loaded and styled by the plugin (class colours
and names from cdkd's raster attribute table), and a print layout (the scene, its classes, the legend) exported
by QGIS's own renderer. A PNG over 300 KB is reduced to 256 colours.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qgis_env import REPO, start_qgis

MAX_BYTES = 300_000  # the PNG goes into the repository



def install(cdkd: str, config_root: Path) -> Path:
    """``cdkd qgis install`` into ``config_root``; the plugin folder it made."""
    subprocess.run([*cdkd.split(), "qgis", "install", "--config-path", str(config_root)], check=True)
    return config_root / "profiles" / "default" / "python" / "plugins" / "cdkd_processing"


def segment(scene: Path, model: Path, out: Path) -> None:
    import processing
    from qgis.core import QgsProcessingFeedback

    class Log(QgsProcessingFeedback):
        def pushInfo(self, info: str) -> None:  # noqa: N802
            print(info)

    processing.run("cdkd:segment", {"INPUT": str(scene), "MODEL": str(model), "DEVICE": "cpu", "OUTPUT": str(out)},
                   feedback=Log())


def layout_png(scene: Path, classes: Path, out: Path, title: str, width_px: int) -> None:
    from qgis.core import (
        QgsLayoutExporter,
        QgsLayoutItemLabel,
        QgsLayoutItemLegend,
        QgsLayoutItemMap,
        QgsLayoutPoint,
        QgsLayoutSize,
        QgsLegendRenderer,
        QgsLegendStyle,
        QgsMapLayerLegendUtils,
        QgsPrintLayout,
        QgsProject,
        QgsRasterLayer,
        QgsUnitTypes,
    )
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtGui import QFont, QImage

    from cdkd_processing.styles import style_class_raster

    mm = QgsUnitTypes.LayoutMillimeters
    project = QgsProject.instance()
    image = QgsRasterLayer(str(scene), "scene")
    labels = QgsRasterLayer(str(classes), "classes")
    if not (image.isValid() and labels.isValid() and style_class_raster(labels)):
        raise SystemExit(f"{classes}: could not be loaded with its class legend")
    project.addMapLayers([image, labels])
    project.setCrs(image.crs())  # the maps draw in the scene's own CRS
    extent = image.extent()
    side = 100.0  # mm, the longer side of each map
    w, h = (side, side * extent.height() / extent.width()) if extent.width() >= extent.height() else \
        (side * extent.width() / extent.height(), side)
    top, legend_w = 12.0, 42.0
    layout = QgsPrintLayout(project)
    layout.initializeDefaults()
    page_w = 5 + w + 4 + w + 4 + legend_w
    layout.pageCollection().page(0).setPageSize(QgsLayoutSize(page_w, top + h + 5, mm))

    for x, layer in ((5.0, image), (5.0 + w + 4, labels)):
        item = QgsLayoutItemMap(layout)
        item.attemptMove(QgsLayoutPoint(x, top, mm))
        item.attemptResize(QgsLayoutSize(w, h, mm))
        item.setLayers([layer])
        item.setCrs(image.crs())
        item.setExtent(extent)
        item.setFrameEnabled(True)
        layout.addLayoutItem(item)
        classes_map = item

    legend = QgsLayoutItemLegend(layout)
    legend.setLinkedMap(classes_map)
    legend.setAutoUpdateModel(False)
    root = legend.model().rootGroup()
    root.clear()
    node = root.addLayer(labels)
    QgsLegendRenderer.setNodeLegendStyle(node, QgsLegendStyle.Hidden)  # no layer title: the legend has one
    items = legend.model().layerLegendNodes(node)
    # the paletted renderer heads its classes with the band's name ("Band 1: land-cover class"): leave it out
    QgsMapLayerLegendUtils.setLegendNodeOrder(node, [i for i, n in enumerate(items) if n.data(Qt.DecorationRole)])
    legend.model().refreshLayerLegend(node)
    legend.setTitle("Land cover")
    legend.setStyleFont(QgsLegendStyle.Title, QFont("DejaVu Sans", 11, QFont.Bold))
    legend.setStyleFont(QgsLegendStyle.SymbolLabel, QFont("DejaVu Sans", 9))
    legend.attemptMove(QgsLayoutPoint(5 + 2 * w + 8, top, mm))
    layout.addLayoutItem(legend)

    label = QgsLayoutItemLabel(layout)
    label.setText(title)
    label.setFont(QFont("DejaVu Sans", 10))
    label.setVAlign(Qt.AlignVCenter)
    label.attemptMove(QgsLayoutPoint(5, 2, mm))
    label.attemptResize(QgsLayoutSize(page_w - 10, 8, mm))
    layout.addLayoutItem(label)

    dpi = width_px / (page_w / 25.4)
    rendered = QgsLayoutExporter(layout).renderPageToImage(0, dpi=dpi)
    if not rendered.save(str(out), "PNG"):
        raise SystemExit(f"{out}: could not be written")
    if out.stat().st_size > MAX_BYTES:  # the photo makes it large: 256 colours, dithered, do for the docs
        rendered.convertToFormat(QImage.Format_Indexed8, Qt.DiffuseDither).save(str(out), "PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scene", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "qgis_segment.png")
    parser.add_argument("--cdkd", default="cdkd", help="the cdkd command QGIS should run")
    parser.add_argument("--title", default=None)
    parser.add_argument("--width", type=int, default=1100, help="width of the PNG in pixels")
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    with tempfile.TemporaryDirectory() as tmp:
        plugin_dir = install(args.cdkd, Path(tmp) / "qgis")
        app, _ = start_qgis(plugin_dir)
        from qgis.core import Qgis

        classes = Path(tmp) / f"{args.scene.stem}_classes.tif"
        segment(args.scene.resolve(), args.model.resolve(), classes)
        title = args.title or (f"{args.scene.name} segmented with cdkd:segment and drawn by QGIS "
                               f"{Qgis.QGIS_VERSION.split('-')[0]}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        layout_png(args.scene.resolve(), classes, args.out, title, args.width)
        print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")
    sys.stdout.flush()
    os._exit(0)  # QGIS's exit handlers can crash a headless Python at shutdown; the picture is written


if __name__ == "__main__":
    main()
