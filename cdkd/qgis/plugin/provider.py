"""The ``cdkd`` Processing provider: the algorithms, and the models shipped in ``models/*.model3``."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsMessageLog, QgsProcessingModelAlgorithm, QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .segment import SegmentAlgorithm, SegmentObjectsAlgorithm
from .vectorize import VectorizeAlgorithm

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"


class CdkdProvider(QgsProcessingProvider):
    def id(self) -> str:  # noqa: A003
        return "cdkd"

    def name(self) -> str:
        return "cdkd"

    def longName(self) -> str:  # noqa: N802
        return "cdkd land-cover segmentation"

    def icon(self) -> QIcon:
        return QIcon(str(HERE / "icon.svg"))

    def loadAlgorithms(self) -> None:  # noqa: N802
        for algorithm in (SegmentAlgorithm(), VectorizeAlgorithm(), SegmentObjectsAlgorithm()):
            self.addAlgorithm(algorithm)
        for path in sorted(MODELS.glob("*.model3")):
            model = QgsProcessingModelAlgorithm()
            if model.fromFile(str(path)):
                self.addAlgorithm(model)
            else:
                QgsMessageLog.logMessage(f"{path}: not a readable Processing model", "cdkd")

    # cdkd writes GeoTIFF class rasters and GeoPackage, FlatGeobuf or GeoParquet polygons, nothing else: the
    # output dialogs offer these, and temporary outputs get these extensions.
    def supportedOutputRasterLayerExtensions(self) -> list[str]:  # noqa: N802
        return ["tif"]

    def supportedOutputVectorLayerExtensions(self) -> list[str]:  # noqa: N802
        return ["gpkg", "fgb", "parquet"]

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:  # noqa: N802, N803
        return "gpkg"

    def defaultRasterFileExtension(self) -> str:  # noqa: N802
        return "tif"

    def supportsNonFileBasedOutput(self) -> bool:  # noqa: N802
        return False
