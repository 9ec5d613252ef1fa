"""Land-cover polygons from class rasters: ``vectorize`` streams a raster strip by strip into a vector file.

The names below load on first use, so that ``import cdkd.vector`` (and the command line, which reads the enums
in ``cdkd.vector.choices`` when it starts) does not pay for GDAL, GEOS and PROJ until a raster is vectorised.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import Any

_EXPORTS = {
    "AreaMode": "cdkd.vector.choices",
    "ClassResult": "cdkd.vector.vectorize",
    "MinArea": "cdkd.vector.sieve",
    "VectorizeConfig": "cdkd.vector.config",
    "VectorizeReport": "cdkd.vector.vectorize",
    "VectorizeSettings": "cdkd.vector.vectorize",
    "parse_min_area": "cdkd.vector.sieve",
    "vectorize": "cdkd.vector.vectorize",
}

__all__ = [
    "AreaMode",
    "ClassResult",
    "MinArea",
    "VectorizeConfig",
    "VectorizeReport",
    "VectorizeSettings",
    "parse_min_area",
    "vectorize",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        setattr(sys.modules[__name__], name, value)
        return value
    raise AttributeError(f"module 'cdkd.vector' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``cdkd.vector.vectorize`` is both a submodule and the function it holds. Importing the submodule makes
    Python set the package attribute to the module; this keeps the attribute the function once it is bound,
    so ``from cdkd.vector import vectorize`` gives the function whatever was imported first."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "vectorize" and isinstance(value, types.ModuleType):
            value = value.vectorize
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
