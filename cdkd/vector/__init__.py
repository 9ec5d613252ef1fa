"""Land-cover polygons from class rasters: ``vectorize`` streams a raster strip by strip into a GeoPackage."""

from cdkd.vector.sieve import MinArea, parse_min_area
from cdkd.vector.vectorize import (
    ClassResult,
    VectorizeReport,
    VectorizeSettings,
    vectorize,
)

__all__ = ["ClassResult", "MinArea", "VectorizeReport", "VectorizeSettings", "parse_min_area", "vectorize"]
