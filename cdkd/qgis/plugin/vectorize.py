"""``cdkd:vectorize`` (Vectorize classes): ``cdkd vectorize CLASSES.tif --out POLYGONS.gpkg|.fgb|.parquet``."""

from __future__ import annotations

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputFile,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFile,
    QgsProcessingParameterVectorDestination,
)

from .base import POLYGONS, CdkdAlgorithm, report_layers, style_on_load, vector_destination
from .styles import style_polygons

AREA = ("auto", "planar", "ellipsoidal")  # cdkd.vector.choices.AreaMode


class VectorizeAlgorithm(CdkdAlgorithm):
    INPUT, MIN_AREA, SIMPLIFY, AREA, LAYER = "INPUT", "MIN_AREA", "SIMPLIFY", "AREA", "LAYER"
    LAYER_PER_CLASS, CLASSES, WINDOW_ROWS, OUTPUT, REPORT = (
        "LAYER_PER_CLASS",
        "CLASSES",
        "WINDOW_ROWS",
        "OUTPUT",
        "REPORT",
    )

    def name(self) -> str:
        return "vectorize"

    def displayName(self) -> str:  # noqa: N802
        return "Vectorize classes"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "Land-cover polygons from a class raster (the output of Segment scene, or any single-band integer "
            "raster with a class file): one polygon per region with class_id, class_name, area_m2 and "
            "perimeter_m, styled with the class colours. Regions smaller than the minimum area join their "
            "largest neighbour (a sieve); simplification keeps neighbours sharing their edges. The raster is "
            "read strip by strip, so its size is not limited by memory.\n\n"
            "Output by extension: GeoPackage (.gpkg), FlatGeobuf (.fgb) or GeoParquet (.parquet). An existing "
            "file is replaced as a whole."
        )

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802
        self.add_scene(self.INPUT, "Class raster")
        self.add_string(self.MIN_AREA, "Minimum area: merge smaller regions into a neighbour (e.g. 100m2 or 25px)")
        self.add_number(
            self.SIMPLIFY,
            "Simplify tolerance in CRS units (empty or 0: none)",
            integer=False,
            minimum=0.0,
            optional=True,
        )
        self.add_choice(self.AREA, "How areas are measured", AREA, advanced=False)
        self.add_string(self.LAYER, "Layer name (empty: the raster's file name)", advanced=True)
        self.add(
            QgsProcessingParameterBoolean(self.LAYER_PER_CLASS, "One layer per class (GeoPackage only)", False),
            advanced=True,
        )
        self.add(
            QgsProcessingParameterFile(
                self.CLASSES,
                "Class file (YAML) for rasters without cdkd classes",
                fileFilter="YAML (*.yaml *.yml)",
                optional=True,
            ),
            advanced=True,
        )
        self.add_number(
            self.WINDOW_ROWS,
            "Rows per strip (empty: about 2 M pixels a strip)",
            minimum=1,
            optional=True,
            advanced=True,
        )
        self.add(QgsProcessingParameterVectorDestination(self.OUTPUT, "Polygons", POLYGONS))
        self.addOutput(QgsProcessingOutputFile(self.REPORT, "Report (JSON)"))

    def processAlgorithm(
        self,
        parameters: dict,
        context: QgsProcessingContext,  # noqa: N802
        feedback: QgsProcessingFeedback,
    ) -> dict:
        destination = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        out, table = vector_destination(destination)
        layer = self.parameterAsString(parameters, self.LAYER, context).strip() or table
        per_class = self.parameterAsBoolean(parameters, self.LAYER_PER_CLASS, context)
        if per_class and layer and self.given(parameters, self.LAYER):
            raise QgsProcessingException("Give a layer name or one layer per class, not both")
        args = [
            "vectorize",
            self.file_of(parameters, self.INPUT, context),
            "--out",
            out,
            "--overwrite",
            "--area",
            AREA[self.parameterAsEnum(parameters, self.AREA, context)],
        ]
        min_area = self.parameterAsString(parameters, self.MIN_AREA, context).strip()
        if min_area:
            args += ["--min-area", min_area]
        simplify = self.optional_double(parameters, self.SIMPLIFY, context)
        if simplify:
            args += ["--simplify", repr(simplify)]
        if per_class:
            args.append("--layer-per-class")
        elif layer:
            args += ["--layer", layer]
        classes = self.parameterAsFile(parameters, self.CLASSES, context)
        if classes:
            args += ["--classes", classes]
        self.flag(args, "--window-rows", self.optional_int(parameters, self.WINDOW_ROWS, context))
        self.run_cdkd(args, feedback, lambda e: f"Canceled ({e}); nothing was written")
        layers = report_layers(out) if out.lower().endswith(".gpkg") else []
        style_on_load(context, destination, style_polygons, layers or None)
        result = f"{out}|layername={table}" if table and table in layers else out
        return {self.OUTPUT: result, self.REPORT: f"{out}.json"}
