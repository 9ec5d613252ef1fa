"""Write the Processing model "Segment and vectorize" that the cdkd provider ships (``models/*.model3``).

    /usr/bin/python3 docs/scripts/build_qgis_model.py

Built with PyQGIS rather than by hand so the file is exactly what QGIS's own modeler saves; run it again after
changing the parameters of ``cdkd:segment`` or ``cdkd:vectorize``.
"""

from __future__ import annotations

from qgis_env import PLUGIN_DIR, start_qgis


def build():
    from qgis.core import (
        QgsProcessingModelAlgorithm,
        QgsProcessingModelChildAlgorithm,
        QgsProcessingModelChildParameterSource as Source,
        QgsProcessingModelOutput,
        QgsProcessingModelParameter,
        QgsProcessingParameterFile,
        QgsProcessingParameterNumber,
        QgsProcessingParameterRasterLayer,
        QgsProcessingParameterString,
    )
    from qgis.PyQt.QtCore import QPointF

    model = QgsProcessingModelAlgorithm("Segment and vectorize", "", "")
    model.setHelpContent({"ALG_DESC": "Segment a scene into land-cover classes (cdkd:segment), then turn the class "
                          "raster into polygons (cdkd:vectorize). Both outputs open with the class colours."})
    inputs = [
        QgsProcessingParameterRasterLayer("scene", "Scene"),
        QgsProcessingParameterFile("model", "Model (segmenter.pt, model.onnx or model.engine)",
                                   fileFilter="cdkd models (*.pt *.onnx *.engine);;All files (*.*)"),
        QgsProcessingParameterString("device", "Device (auto, cpu, cuda or cuda:N)", "auto"),
        QgsProcessingParameterString("min_area", "Minimum polygon area (e.g. 100m2 or 25px)", optional=True),
        QgsProcessingParameterNumber("simplify", "Simplify tolerance in CRS units (0: none)",
                                     QgsProcessingParameterNumber.Double, 0.0, True, 0.0),
    ]
    for y, param in enumerate(inputs):
        component = QgsProcessingModelParameter(param.name())
        component.setPosition(QPointF(120, 60 + 70 * y))
        model.addModelParameter(param, component)

    segment = QgsProcessingModelChildAlgorithm("cdkd:segment")
    segment.setChildId("segment")
    segment.setDescription("Segment scene")
    segment.setPosition(QPointF(420, 140))
    for name, source in {"INPUT": Source.fromModelParameter("scene"), "MODEL": Source.fromModelParameter("model"),
                         "DEVICE": Source.fromModelParameter("device"), "BATCH_SIZE": Source.fromStaticValue(4),
                         "RESUME": Source.fromStaticValue(False), "PROBS": Source.fromStaticValue(False),
                         "PREVIEW": Source.fromStaticValue(False)}.items():
        segment.addParameterSources(name, [source])
    classes = QgsProcessingModelOutput("Class raster", "Class raster")
    classes.setChildId("segment")
    classes.setChildOutputName("OUTPUT")
    classes.setPosition(QPointF(620, 100))
    segment.setModelOutputs({"Class raster": classes})
    with_defaults(segment)
    model.addChildAlgorithm(segment)

    vectorize = QgsProcessingModelChildAlgorithm("cdkd:vectorize")
    vectorize.setChildId("vectorize")
    vectorize.setDescription("Vectorize classes")
    vectorize.setPosition(QPointF(420, 300))
    for name, source in {"INPUT": Source.fromChildOutput("segment", "OUTPUT"),
                         "MIN_AREA": Source.fromModelParameter("min_area"),
                         "SIMPLIFY": Source.fromModelParameter("simplify"),
                         "AREA": Source.fromStaticValue(0)}.items():
        vectorize.addParameterSources(name, [source])
    polygons = QgsProcessingModelOutput("Polygons", "Polygons")
    polygons.setChildId("vectorize")
    polygons.setChildOutputName("OUTPUT")
    polygons.setPosition(QPointF(620, 340))
    vectorize.setModelOutputs({"Polygons": polygons})
    with_defaults(vectorize)
    model.addChildAlgorithm(vectorize)
    return model


def with_defaults(child) -> None:
    """Every parameter the model does not feed gets the algorithm's default (what the modeler's dialog does)."""
    from qgis.core import QgsApplication, QgsProcessingModelChildParameterSource as Source

    algorithm = QgsApplication.processingRegistry().algorithmById(child.algorithmId())
    for param in algorithm.parameterDefinitions():
        if param.isDestination() or param.name() in child.parameterSources():
            continue
        child.addParameterSources(param.name(), [Source.fromStaticValue(param.defaultValue())])


if __name__ == "__main__":
    app, _ = start_qgis()
    path = PLUGIN_DIR / "models" / "segment_and_vectorize.model3"
    model = build()
    problems = model.validate()
    if not problems[0]:
        raise SystemExit(f"the model is not valid: {problems[1]}")
    if not model.toFile(str(path)):
        raise SystemExit(f"{path}: could not be written")
    print(f"wrote {path}")
    app.exitQgis()
