"""``cdkd:segment`` (Segment scene: a class raster) and ``cdkd:segment_objects`` (Segment objects: polygons from
a detector), both ``cdkd segment`` underneath."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingOutputFile,
    QgsProcessingOutputRasterLayer,
    QgsProcessingParameterBand,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFile,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterVectorDestination,
)

from .base import POLYGONS, CdkdAlgorithm, style_on_load, vector_destination
from .runner import CdkdCanceledError
from .styles import style_class_raster, style_polygons

RUNTIMES = ("auto", "torch", "onnx", "tensorrt")  # "auto": from the model file's suffix
AMP = ("auto", "none", "bf16", "fp16")
STATS = ("model", "scene")
MODEL_FILTER = "cdkd models (*.pt *.onnx *.engine);;All files (*.*)"


def partial_state(out: str) -> Path:
    """Where cdkd keeps an interrupted run of ``out`` (``cdkd.scene.engine.output_paths``)."""
    out_path = Path(out)
    return out_path.with_name(out_path.name + ".partial") / "state.json"


class _SceneAlgorithm(CdkdAlgorithm):
    """The parameters and flags of ``cdkd segment`` that both algorithms share."""

    INPUT, MODEL, TILE_SIZE, OVERLAP, BATCH_SIZE = "INPUT", "MODEL", "TILE_SIZE", "OVERLAP", "BATCH_SIZE"
    DEVICE, BANDS, RESUME, RUNTIME, AMP, THREADS = "DEVICE", "BANDS", "RESUME", "RUNTIME", "AMP", "THREADS"
    STATS, READ_THREADS, OUTPUT = "STATS", "READ_THREADS", "OUTPUT"
    model_text = "Model"

    def add_scene_parameters(self) -> None:
        self.add_scene(self.INPUT, "Scene")
        self.add(QgsProcessingParameterFile(self.MODEL, self.model_text, fileFilter=MODEL_FILTER))

    def add_run_parameters(self) -> None:
        self.add_number(self.TILE_SIZE, "Tile size in px (empty: the model's)", minimum=16, optional=True)
        self.add_number(self.OVERLAP, "Overlap in px (empty: the model's)", minimum=0, optional=True)
        self.add_number(self.BATCH_SIZE, "Batch size (tiles per forward pass)", default=4, minimum=1)
        self.add_string(self.DEVICE, "Device (auto, cpu, cuda or cuda:N)", default="auto", optional=False)
        self.add(
            QgsProcessingParameterBand(
                self.BANDS, "Bands fed to the model, in order (empty: the model's)", None, self.INPUT, True, True
            )
        )
        self.add(QgsProcessingParameterBoolean(self.RESUME, "Resume an interrupted run (same output file)", False))
        self.add_choice(self.RUNTIME, "Runtime", RUNTIMES)
        self.add_choice(self.AMP, "Mixed precision on CUDA (PyTorch models)", AMP)
        self.add_choice(self.STATS, "Normalisation statistics", STATS)
        self.add_number(
            self.THREADS, "ONNX Runtime CPU threads (empty: its default)", minimum=1, optional=True, advanced=True
        )
        self.add_number(
            self.READ_THREADS, "Reader threads (empty: cdkd's default)", minimum=0, optional=True, advanced=True
        )

    def segment_args(
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback, out: str
    ) -> list[str]:
        """``segment SCENE --model|--engine M --out OUT ...`` for these parameters; ``--resume`` when asked for
        and there is an interrupted run of ``out``, else ``--overwrite`` (Processing asks before it replaces)."""
        model = self.parameterAsFile(parameters, self.MODEL, context)
        args = [
            "segment",
            self.file_of(parameters, self.INPUT, context),
            "--model" if model.lower().endswith(".pt") else "--engine",
            model,
            "--out",
            out,
            "--batch-size",
            str(self.parameterAsInt(parameters, self.BATCH_SIZE, context)),
            "--device",
            self.parameterAsString(parameters, self.DEVICE, context).strip() or "auto",
        ]
        self.flag(args, "--tile-size", self.optional_int(parameters, self.TILE_SIZE, context))
        self.flag(args, "--overlap", self.optional_int(parameters, self.OVERLAP, context))
        self.flag(args, "--threads", self.optional_int(parameters, self.THREADS, context))
        self.flag(args, "--read-threads", self.optional_int(parameters, self.READ_THREADS, context))
        bands = self.parameterAsInts(parameters, self.BANDS, context)
        if bands:
            args += ["--bands", ",".join(str(b) for b in bands)]
        runtime = RUNTIMES[self.parameterAsEnum(parameters, self.RUNTIME, context)]
        if runtime != "auto":
            args += ["--runtime", runtime]
        args += [
            "--amp",
            AMP[self.parameterAsEnum(parameters, self.AMP, context)],
            "--stats",
            STATS[self.parameterAsEnum(parameters, self.STATS, context)],
        ]
        resume = self.parameterAsBoolean(parameters, self.RESUME, context)
        if resume and partial_state(out).is_file():
            args.append("--resume")
        else:
            if resume:
                feedback.pushInfo(f"{out}: no interrupted run to resume; segmenting from the start")
            args.append("--overwrite")
        return args

    def cancel_message(self, out: str) -> Any:
        def message(error: CdkdCanceledError) -> str:
            if partial_state(out).is_file():
                return (
                    f"Canceled: cdkd saved a checkpoint of {out}. Run the algorithm again with the same output "
                    "file and 'Resume an interrupted run' ticked to continue from it."
                )
            return f"Canceled before cdkd saved any work ({error})."

        return message


class SegmentAlgorithm(_SceneAlgorithm):
    """Segment scene: ``cdkd segment SCENE --model M --out CLASSES.tif``."""

    PROBS, PREVIEW, CONFIDENCE, REPORT = "PROBS", "PREVIEW", "CONFIDENCE", "REPORT"
    model_text = "Model (segmenter.pt, model.onnx or model.engine)"

    def name(self) -> str:
        return "segment"

    def displayName(self) -> str:  # noqa: N802
        return "Segment scene"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "Land-cover classes of a raster scene of any size with a cdkd model (segmenter.pt from cdkd "
            "finetune, or its ONNX / TensorRT export), blended seamlessly across overlapping tiles and written "
            "as a Cloud-Optimized GeoTIFF with the model's class colours and names.\n\n"
            "Runs your cdkd installation (see 'cdkd qgis install'). Cancel stops at a checkpoint: run again "
            "with the same output and 'Resume an interrupted run' ticked to continue."
        )

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802
        self.add_scene_parameters()
        self.add_run_parameters()
        self.add(
            QgsProcessingParameterBoolean(self.PROBS, "Also write a confidence raster (<output>_confidence.tif)", False)
        )
        self.add(QgsProcessingParameterBoolean(self.PREVIEW, "Also write a preview PNG (<output>.png)", False))
        self.add(QgsProcessingParameterRasterDestination(self.OUTPUT, "Class raster"))
        self.addOutput(QgsProcessingOutputRasterLayer(self.CONFIDENCE, "Confidence raster"))
        self.addOutput(QgsProcessingOutputFile(self.PREVIEW, "Preview PNG"))
        self.addOutput(QgsProcessingOutputFile(self.REPORT, "Report (JSON)"))

    def processAlgorithm(
        self,
        parameters: dict,
        context: QgsProcessingContext,  # noqa: N802
        feedback: QgsProcessingFeedback,
    ) -> dict:
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        args = self.segment_args(parameters, context, feedback, out)
        probs = self.parameterAsBoolean(parameters, self.PROBS, context)
        preview = self.parameterAsBoolean(parameters, self.PREVIEW, context)
        args.append("--probs" if probs else "--no-probs")
        if preview:
            args.append("--preview")
        result = self.run_cdkd(args, feedback, self.cancel_message(out))
        style_on_load(context, out, style_class_raster)
        outputs = {self.OUTPUT: out, self.REPORT: str(Path(out).with_suffix(".json"))}
        if probs:
            confidence = next((p for p in result.outputs if p.endswith(f"_confidence{Path(out).suffix}")), None)
            outputs[self.CONFIDENCE] = confidence
            if confidence and context.project() is not None:
                context.addLayerToLoadOnCompletion(
                    confidence,
                    QgsProcessingContext.LayerDetails(
                        f"{Path(out).stem} confidence", context.project(), self.CONFIDENCE
                    ),
                )
        if preview:
            outputs[self.PREVIEW] = str(Path(out).with_suffix(".png"))
        return outputs


class SegmentObjectsAlgorithm(_SceneAlgorithm):
    """Segment objects: ``cdkd segment SCENE --model detector.pt --out OBJECTS.gpkg``."""

    MIN_SCORE, REPORT = "MIN_SCORE", "REPORT"
    model_text = "Detector (detector.pt or its model.onnx)"

    def name(self) -> str:
        return "segment_objects"

    def displayName(self) -> str:  # noqa: N802
        return "Segment objects"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "One polygon per object (buildings, vehicles, ...) found by a cdkd detector (detector.pt from "
            "cdkd finetune --task instance, or its ONNX export) over a raster scene of any size; objects cut "
            "by tile borders are joined. Fields: class_name, score, area_m2. Output: GeoPackage (styled), "
            "FlatGeobuf or GeoParquet.\n\nCancel stops at a checkpoint; 'Resume an interrupted run' continues."
        )

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802
        self.add_scene_parameters()
        self.add_number(
            self.MIN_SCORE,
            "Minimum score (detections scoring less are dropped)",
            integer=False,
            default=0.5,
            minimum=0.0,
            maximum=1.0,
        )
        self.add_run_parameters()
        self.add(QgsProcessingParameterVectorDestination(self.OUTPUT, "Objects", POLYGONS))
        self.addOutput(QgsProcessingOutputFile(self.REPORT, "Report (JSON)"))

    def processAlgorithm(
        self,
        parameters: dict,
        context: QgsProcessingContext,  # noqa: N802
        feedback: QgsProcessingFeedback,
    ) -> dict:
        destination = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        out, layer = vector_destination(destination)
        if layer is not None and layer != Path(out).stem:
            feedback.pushWarning(f"cdkd names the objects' layer after the file: {Path(out).stem}, not {layer}")
        args = self.segment_args(parameters, context, feedback, out)
        args += ["--min-score", str(self.parameterAsDouble(parameters, self.MIN_SCORE, context))]
        self.run_cdkd(args, feedback, self.cancel_message(out))
        style_on_load(context, destination, style_polygons, [Path(out).stem] if out.lower().endswith(".gpkg") else None)
        return {self.OUTPUT: out, self.REPORT: str(Path(out).with_suffix(".json"))}
