"""Band metadata: what each input channel measures (centre wavelength, width, name), and matching a scene's bands
to a model's.

A ``BandSet`` travels with the data and the models: ``NormStats.spectral`` carries it into ``student.pt``,
``segmenter.pt``, ``detector.pt``, checkpoints and ``InferenceMeta`` (ONNX metadata, engine sidecars), and the
scene reader checks a scene's bands against it (``choose_scene_bands``). It is optional everywhere: data and
artifacts without it behave as before.

Where the band sets come from: a raster's own metadata (``cdkd.data.bandmeta``), sensor presets and
``--wavelengths`` (``cdkd.data.sensors``), and for files by path ``cdkd.data.files.read_band_set`` /
``resolve_band_set``. This module holds the types and the matching only, so everything else can build on it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cdkd.errors import CdkdValueError, DataError

__all__ = ["Band", "BandSet", "choose_scene_bands", "match_bands", "normalize_band_name", "same_bands", "tolerance_nm"]

DEFAULT_WIDTH_NM = 10.0  # assumed width of a lone band whose width is unknown
MATCH_TOLERANCE_NM = 10.0  # least centre difference a scene band may have from the model's and still match


@dataclass(frozen=True)
class Band:
    """One spectral band: centre wavelength and width (full width at half maximum, or the nominal band width) in
    nanometres, and a name (``B04``, ``Red``; may be empty)."""

    center_nm: float
    width_nm: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        c = float(self.center_nm)
        if not math.isfinite(c) or c <= 0:
            raise CdkdValueError(f"band centre wavelength must be a positive number of nm, got {self.center_nm!r}")
        w = None if self.width_nm is None else float(self.width_nm)
        if w is not None and (not math.isfinite(w) or w <= 0):
            raise CdkdValueError(f"band width must be a positive number of nm, got {self.width_nm!r}")
        object.__setattr__(self, "center_nm", c)
        object.__setattr__(self, "width_nm", w)
        object.__setattr__(self, "name", str(self.name or ""))

    def label(self) -> str:
        """``B04 (665 nm)`` or ``665 nm``."""
        nm = f"{self.center_nm:g} nm"
        return f"{self.name} ({nm})" if self.name else nm

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"center_nm": self.center_nm}
        if self.width_nm is not None:
            d["width_nm"] = self.width_nm
        if self.name:
            d["name"] = self.name
        return d


@dataclass(frozen=True)
class BandSet:
    """The bands of a raster or of a model's input channels, in channel order; ``sensor`` names a preset or is
    empty. Plain-data round trips: ``to_dict``/``from_dict``, ``to_json``/``from_json``, ``to_yaml``/``from_yaml``."""

    bands: tuple[Band, ...]
    sensor: str = ""

    def __post_init__(self) -> None:
        bands = tuple(b if isinstance(b, Band) else Band(**b) for b in self.bands)
        if not bands:
            raise CdkdValueError("a band set needs at least one band")
        object.__setattr__(self, "bands", bands)
        object.__setattr__(self, "sensor", str(self.sensor or ""))

    def __len__(self) -> int:
        return len(self.bands)

    @property
    def centers(self) -> tuple[float, ...]:
        return tuple(b.center_nm for b in self.bands)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    def select(self, indexes: Sequence[int]) -> BandSet:
        """The bands at 1-based ``indexes`` (rasterio's convention), in that order."""
        if any(not 1 <= i <= len(self) for i in indexes):
            raise CdkdValueError(f"band indexes {list(indexes)} outside 1..{len(self)} of {self.describe()}")
        return BandSet(tuple(self.bands[i - 1] for i in indexes), self.sensor)

    def intervals(self) -> np.ndarray:
        """(C, 2) float64 [low, high] nm of every band. Unknown widths are taken from the neighbouring centres
        (half the gap on each side, as for contiguous hyperspectral sampling), or ``DEFAULT_WIDTH_NM`` for a band
        with no neighbour."""
        centers = np.asarray(self.centers, dtype=np.float64)
        out = np.empty((len(self), 2), dtype=np.float64)
        order = np.argsort(centers, kind="stable")
        srt = centers[order]
        gaps = np.diff(srt)
        for rank, i in enumerate(order):
            b = self.bands[i]
            if b.width_nm is not None:
                out[i] = (b.center_nm - b.width_nm / 2, b.center_nm + b.width_nm / 2)
                continue
            lo_gap = gaps[rank - 1] if rank > 0 else None
            hi_gap = gaps[rank] if rank < len(gaps) else None
            lo_half = (lo_gap if lo_gap else hi_gap or DEFAULT_WIDTH_NM) / 2
            hi_half = (hi_gap if hi_gap else lo_gap or DEFAULT_WIDTH_NM) / 2
            out[i] = (b.center_nm - lo_half, b.center_nm + hi_half)
        return out

    def describe(self, limit: int = 16) -> str:
        """A short human description: ``sentinel2: B01 (443 nm), B02 (490 nm), ...``."""
        labels = [b.label() for b in self.bands]
        shown = ", ".join(labels[:limit]) + (f", ... ({len(labels)} bands)" if len(labels) > limit else "")
        return f"{self.sensor}: {shown}" if self.sensor else shown

    # ------------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bands": [b.to_dict() for b in self.bands]}
        if self.sensor:
            d["sensor"] = self.sensor
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BandSet:
        try:
            bands = tuple(
                Band(center_nm=float(b["center_nm"]), width_nm=b.get("width_nm"), name=b.get("name", ""))
                for b in d["bands"]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CdkdValueError(f"not a band set ({type(e).__name__}: {e}): {dict(d)!r}") from None
        return cls(bands, str(d.get("sensor", "")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> BandSet:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> BandSet:
        import yaml

        return cls.from_dict(yaml.safe_load(text) or {})


# --------------------------------------------------------------------------------------------------------------
# names


def normalize_band_name(name: str) -> str:
    """``B01`` -> ``B1``, ``b08a`` -> ``B8A``, ``Red`` -> ``RED``: how names are compared."""
    text = str(name).strip().upper()
    m = re.fullmatch(r"B0*(\d+)(A?)", text)
    return f"B{m.group(1)}{m.group(2)}" if m else text


# --------------------------------------------------------------------------------------------------------------
# matching a scene's bands to a model's


def tolerance_nm(band: Band) -> float:
    """How far a scene band's centre may lie from ``band``'s and still be taken for it: ``MATCH_TOLERANCE_NM``,
    or half the band's width when that is larger (Sentinel-2A and 2B centres differ by up to ~17 nm in B12)."""
    return max(MATCH_TOLERANCE_NM, 0.5 * (band.width_nm or 0.0))


def same_bands(a: BandSet | None, b: BandSet | None) -> bool:
    """Both None, or the same number of bands with matching centres, channel by channel."""
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(abs(x.center_nm - y.center_nm) <= tolerance_nm(x) for x, y in zip(a.bands, b.bands))


def match_bands(model: BandSet, scene: BandSet) -> list[int | None]:
    """For every model band, the 1-based scene band that measures it (nearest centre within ``tolerance_nm``,
    each scene band used once, closest pairs first), or None when the scene has no such band."""
    pairs = sorted(
        (abs(m.center_nm - s.center_nm), i, j)
        for i, m in enumerate(model.bands)
        for j, s in enumerate(scene.bands)
        if abs(m.center_nm - s.center_nm) <= tolerance_nm(m)
    )
    out: list[int | None] = [None] * len(model)
    used: set[int] = set()
    for _, i, j in pairs:
        if out[i] is None and j not in used:
            out[i], used = j + 1, used | {j}
    return out


def choose_scene_bands(
    model: BandSet | None, scene: BandSet | None, requested: Sequence[int] | None, where: str | Path
) -> tuple[int, ...] | None:
    """The scene bands (1-based) to feed a model whose input bands are ``model``, or None to keep the count-based
    default (either side says nothing about wavelengths).

    With ``requested`` (``--bands``) the choice is the user's, but each chosen band must measure the model band it
    feeds. Without it the scene's bands are mapped onto the model's by wavelength, so a scene whose bands come in
    another order, or with extra bands, still works. A band the model needs and the scene lacks, or one fed to
    the wrong channel, is a DataError naming the difference.
    """
    if model is None or scene is None:
        return None
    if requested is not None:
        wrong = []
        for k, (m, j) in enumerate(zip(model.bands, requested)):
            if j > len(scene):
                return None  # the count check names this better
            s = scene.bands[j - 1]
            if abs(m.center_nm - s.center_nm) > tolerance_nm(m):
                wrong.append(f"--bands gives scene band {j} ({s.label()}) to model channel {k + 1} ({m.label()})")
        if wrong:
            raise DataError(
                f"{where}: {'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}; the model reads {model.describe()}"
            )
        return None
    matched = match_bands(model, scene)
    missing = [m.label() for m, j in zip(model.bands, matched) if j is None]
    if missing:
        raise DataError(
            f"{where}: the scene has no band for {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''} (the model reads {model.describe()}; the scene has "
            f"{scene.describe()}); give a scene with those bands, or map bands with --bands"
        )
    return tuple(int(j) for j in matched)  # type: ignore[arg-type]
