"""``cdkd vectorize --config FILE.yaml``: the command's settings as one frozen dataclass.

The file holds any of the fields below (YAML through ``cdkd.config``: unknown keys and wrong types are refused);
flags given on the command line override it, as for ``cdkd distill``::

    min_area: 500m2        # or 25px
    simplify: 5.0          # CRS units
    layer: land_cover      # or layer_per_class: true
    classes: classes.yaml  # for rasters without cdkd class metadata
    area: auto             # auto | planar | ellipsoidal
    window_rows: 1024

Values are checked as ``vectorize`` checks its arguments; ``load`` names the file in the error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cdkd.errors import CdkdValueError, ConfigError


@dataclass(frozen=True)
class VectorizeConfig:
    """Settings of ``cdkd.vector.vectorize`` (see its docstring); ``kwargs()`` passes them on."""

    min_area: str | None = None  # "100m2" or "25px": smaller regions join their largest neighbour
    simplify: float | None = None  # coverage simplification tolerance, CRS units
    layer: str | None = None  # layer name (default: the raster's file stem)
    layer_per_class: bool = False  # one layer per class (GeoPackage only)
    classes: str | None = None  # class file (YAML) for rasters without cdkd class metadata
    area: str = "auto"  # auto | planar | ellipsoidal (cdkd.vector.measure.AreaMode)
    window_rows: int | None = None  # core rows per strip (default ~2 M pixels per strip)

    def check(self) -> VectorizeConfig:
        """Raise ``CdkdValueError`` for a value ``vectorize`` would refuse; returns ``self``."""
        from cdkd.vector.measure import check_area_mode
        from cdkd.vector.sieve import parse_min_area
        from cdkd.vector.vectorize import check_simplify

        check_area_mode(self.area)
        if self.min_area is not None:
            parse_min_area(self.min_area)
        check_simplify(self.simplify)
        if self.window_rows is not None and self.window_rows <= 0:
            raise CdkdValueError(f"window_rows must be a positive integer, got {self.window_rows}")
        if self.layer is not None and self.layer_per_class:
            raise CdkdValueError("give --layer or --layer-per-class (layer, layer_per_class), not both")
        return self

    def kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of ``vectorize``."""
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> VectorizeConfig:
        """Read and check a YAML file; any problem is a ``ConfigError`` naming the file."""
        from cdkd.config import load_config

        cfg = load_config(cls, path)
        try:
            return cfg.check()
        except CdkdValueError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write as YAML (atomically), readable by ``load``."""
        from cdkd.config import save_config

        save_config(self, path)
