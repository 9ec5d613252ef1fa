"""What every cdkd algorithm shares: running cdkd with the feedback wired in, parameters as cdkd flags, and the
outputs loaded with their class styles."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from .runner import CdkdCanceledError, CdkdRunError, Listener, RunResult, run_cdkd


class FeedbackListener(Listener):
    """A cdkd run's reports, forwarded to Processing's feedback (log, progress bar, Cancel)."""

    def __init__(self, feedback: QgsProcessingFeedback) -> None:
        self.feedback = feedback
        self.stage = ""

    def is_canceled(self) -> bool:
        return self.feedback.isCanceled()

    def progress(self, percent: float, text: str) -> None:
        if text != self.stage:
            self.stage = text
            self.feedback.setProgressText(text)
        self.feedback.setProgress(percent)

    def info(self, text: str) -> None:
        self.feedback.pushInfo(text)

    def warning(self, text: str) -> None:
        self.feedback.pushWarning(text)

    def command(self, text: str) -> None:
        self.feedback.pushCommandInfo(text)


class CdkdAlgorithm(QgsProcessingAlgorithm):
    """A Processing algorithm that is one ``cdkd`` command line."""

    def createInstance(self) -> CdkdAlgorithm:  # noqa: N802
        return type(self)()

    def group(self) -> str:
        return ""

    def groupId(self) -> str:  # noqa: N802
        return ""

    def run_cdkd(
        self, args: list[str], feedback: QgsProcessingFeedback, on_cancel: Callable[[CdkdCanceledError], str]
    ) -> RunResult:
        """Run ``cdkd ARGS`` for this algorithm; cdkd's error becomes the algorithm's error message."""
        try:
            return run_cdkd(args, FeedbackListener(feedback))
        except CdkdCanceledError as e:
            raise QgsProcessingException(on_cancel(e)) from None
        except CdkdRunError as e:
            raise QgsProcessingException(f"cdkd: {e}") from None

    # --------------------------------------------------------------------------------------------- parameters

    def add(
        self, param: QgsProcessingParameterDefinition, advanced: bool = False, help_text: str | None = None
    ) -> None:
        if advanced:
            param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        if help_text and hasattr(param, "setHelp"):  # QGIS >= 3.16
            param.setHelp(help_text)
        self.addParameter(param)

    def add_number(
        self,
        name: str,
        text: str,
        integer: bool = True,
        default: Any = None,
        minimum: Any = None,
        maximum: Any = None,
        optional: bool = False,
        advanced: bool = False,
    ) -> None:
        kind = QgsProcessingParameterNumber.Integer if integer else QgsProcessingParameterNumber.Double
        param = QgsProcessingParameterNumber(name, text, kind, default, optional)
        if minimum is not None:
            param.setMinimum(minimum)
        if maximum is not None:
            param.setMaximum(maximum)
        self.add(param, advanced)

    def add_choice(self, name: str, text: str, choices: tuple[str, ...], advanced: bool = True) -> None:
        self.add(QgsProcessingParameterEnum(name, text, list(choices), False, 0, False), advanced)

    def add_scene(self, name: str, text: str) -> None:
        self.add(QgsProcessingParameterRasterLayer(name, text))

    def add_string(
        self, name: str, text: str, default: str | None = None, optional: bool = True, advanced: bool = False
    ) -> None:
        self.add(QgsProcessingParameterString(name, text, default, False, optional), advanced)

    def file_of(self, parameters: dict, name: str, context: QgsProcessingContext) -> str:
        """The file behind a raster layer parameter (cdkd reads files, not QGIS layers)."""
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None:
            raise QgsProcessingException(self.invalidRasterError(parameters, name))
        if layer.providerType() != "gdal":
            raise QgsProcessingException(
                f"{layer.name()}: cdkd reads raster files (GDAL); this layer comes from "
                f"the {layer.providerType()} provider. Save it as a GeoTIFF first."
            )
        return layer.source()

    @staticmethod
    def given(parameters: dict, name: str) -> bool:
        """Whether an optional parameter holds a value (not absent, empty or NULL)."""
        value = parameters.get(name)
        if value is None or value == "":
            return False
        return not (hasattr(value, "isNull") and value.isNull())

    def optional_int(self, parameters: dict, name: str, context: QgsProcessingContext) -> int | None:
        return self.parameterAsInt(parameters, name, context) if self.given(parameters, name) else None

    def optional_double(self, parameters: dict, name: str, context: QgsProcessingContext) -> float | None:
        return self.parameterAsDouble(parameters, name, context) if self.given(parameters, name) else None

    @staticmethod
    def flag(args: list[str], option: str, value: Any) -> None:
        """Append ``option value`` when ``value`` is not None."""
        if value is not None:
            args += [option, str(value)]


# ------------------------------------------------------------------------------------------------ outputs


def vector_destination(destination: str) -> tuple[str, str | None]:
    """(file, layer name or None) of a vector destination: a path, or ``ogr:dbname='x.gpkg' table="t" (geom)``
    as Processing writes "Save to GeoPackage"."""
    if not destination.startswith("ogr:"):
        return destination, None
    db = re.search(r"dbname='((?:[^']|'')*)'", destination)
    table = re.search(r'table="((?:[^"]|"")*)"', destination)
    if db is None:
        raise QgsProcessingException(f"{destination}: not a file cdkd can write")
    return db.group(1).replace("''", "'"), table.group(1).replace('""', '"') if table else None


class _Styler(QgsProcessingLayerPostProcessorInterface):
    """Applies cdkd's class style to an output layer once Processing has loaded it."""

    def __init__(self, apply: Callable[[Any], bool]) -> None:
        super().__init__()
        self.apply = apply

    def postProcessLayer(self, layer, context, feedback) -> None:  # noqa: N802, ANN001
        if layer is not None and layer.isValid() and not self.apply(layer):
            feedback.pushInfo(f"{layer.source()}: no cdkd class style found; QGIS's default style is used")


def style_on_load(
    context: QgsProcessingContext, destination: str, apply: Callable[[Any], bool], layers: list[str] | None = None
) -> None:
    """When Processing loads ``destination`` into the project, style it with ``apply`` (``style_class_raster``,
    ``style_polygons``). ``layers``: load these layers of the GeoPackage instead of its first one.

    Each layer gets a post-processor of its own: the context owns the C++ object and deletes it with itself
    (one shared by two layers is deleted twice: QGIS crashes), and ``_STYLERS`` keeps its Python side alive,
    without which the context would call an empty C++ shell (QGIS's own examples keep such a reference too).
    """
    if not context.willLoadLayerOnCompletion(destination):
        return
    loads = context.layersToLoadOnCompletion()
    if layers and not any(d.postProcessor() for d in loads.values()):  # replacing the list deletes those
        template = loads.pop(destination)
        path = vector_destination(destination)[0]
        keys = []
        for name in layers:
            keys.append(f"{path}|layername={name}")
            loads[keys[-1]] = QgsProcessingContext.LayerDetails(
                name, template.project, template.outputName, template.layerTypeHint
            )
        context.setLayersToLoadOnCompletion(loads)
    else:
        keys = [destination]
    for key in keys:
        styler = _Styler(apply)
        _STYLERS.append(styler)
        context.layerToLoadOnCompletionDetails(key).setPostProcessor(styler)


_STYLERS: list[_Styler] = []  # a few hundred bytes each, one per output loaded in this QGIS session


def report_layers(out: str) -> list[str]:
    """The layers ``cdkd vectorize`` wrote, from its report ``OUT.json`` ([] when unreadable)."""
    import json

    try:
        return [str(n) for n in json.loads(Path(out + ".json").read_text(encoding="utf-8")).get("layers", [])]
    except (OSError, ValueError, AttributeError):
        return []


POLYGONS = QgsProcessing.TypeVectorPolygon
