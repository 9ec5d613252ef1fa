"""Run by tests/test_qgis.py with QGIS's Python (not cdkd's): the provider in a PyQGIS session, as the QGIS
desktop drives it.

    python3 qgis_session.py PLUGINS_DIR SCENE MODEL OUT

The plugin is imported from ``PLUGINS_DIR`` (where ``cdkd qgis install`` put it) and started as QGIS starts it.

1. ``cdkd:segment`` through ``processing.run`` with a ``QgsProcessingFeedback`` whose Cancel is pressed once cdkd
   reports its start, as the Cancel button of the algorithm dialog does;
2. the same algorithm with Resume ticked, through ``processing.runAndLoadResults``: the output is loaded into the
   project and styled by the provider, as after a run from the toolbox;
3. ``cdkd:vectorize`` of that class raster with one layer per class, loaded the same way.

Prints one JSON line: the cancel message, whether a checkpoint was left, the resumed run's results, the layers in
the project with their renderers and legend labels, and the parameters of the shipped model.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import QgsApplication, QgsProcessingException, QgsProcessingFeedback, QgsProject  # noqa: E402


def main(plugins: str, scene: str, model: str, out: str) -> dict:
    sys.path[:0] = [plugins, "/usr/share/qgis/python/plugins"]
    import processing
    from processing.core.Processing import Processing

    Processing.initialize()
    import cdkd_processing

    plugin = cdkd_processing.classFactory(None)
    plugin.initProcessing()

    params = {"INPUT": scene, "MODEL": model, "DEVICE": "cpu", "BATCH_SIZE": 1, "OUTPUT": out, "RESUME": False}
    seen: list[float] = []
    feedback = QgsProcessingFeedback()

    def cancel_after_first_tiles(percent: float) -> None:
        # at cdkd's first report (0 %, the pipeline started): a run of a small scene on a free CPU can finish
        # between two reports, so a later Cancel would race it
        seen.append(percent)
        if percent < 100:
            feedback.cancel()

    feedback.progressChanged.connect(cancel_after_first_tiles)
    record: dict = {}
    try:
        processing.run("cdkd:segment", params, feedback=feedback)
        record["canceled"] = None
    except QgsProcessingException as e:
        record["canceled"] = str(e)
    record["progress_seen"] = seen
    record["checkpoint"] = os.path.isfile(out + ".partial/state.json")
    record["finished_early"] = os.path.exists(out)
    resumed = processing.runAndLoadResults("cdkd:segment", dict(params, RESUME=True), feedback=QgsProcessingFeedback())
    record["resumed"] = {k: v for k, v in resumed.items() if isinstance(v, (str, type(None)))}
    polygons = out[: -len(".tif")] + ".gpkg"
    processing.runAndLoadResults(
        "cdkd:vectorize", {"INPUT": out, "OUTPUT": polygons, "LAYER_PER_CLASS": True}, feedback=QgsProcessingFeedback()
    )
    record["layers"] = sorted(describe(layer) for layer in QgsProject.instance().mapLayers().values())
    model = QgsApplication.processingRegistry().createAlgorithmById("cdkd:Segment and vectorize")
    record["model"] = [p.name() for p in model.parameterDefinitions()] if model is not None else []
    plugin.unload()
    return record


def describe(layer) -> list:  # noqa: ANN001
    """[source, renderer type, legend labels] of a layer in the project."""
    renderer = layer.renderer()
    if hasattr(renderer, "categories"):
        labels = [c.label() for c in renderer.categories()]
    elif hasattr(renderer, "classes"):
        labels = [c.label for c in renderer.classes()]
    else:
        labels = []
    return [layer.source(), renderer.type(), labels]


if __name__ == "__main__":
    app = QgsApplication([], False)
    app.initQgis()
    result = main(*sys.argv[1:5])
    print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # QGIS's exit handlers can crash a headless Python at shutdown; the result is out
