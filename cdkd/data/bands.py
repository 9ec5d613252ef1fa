"""Band metadata: what each input channel measures (centre wavelength, width, name).

A ``BandSet`` travels with the data and the models: ``NormStats.spectral`` carries it into ``student.pt``,
``segmenter.pt``, ``detector.pt``, checkpoints and ``InferenceMeta`` (ONNX metadata, engine sidecars), and the
scene reader checks a scene's bands against it (``choose_scene_bands``). It is optional everywhere: data and
artifacts without it behave as before.

Where a raster's band set comes from (``band_set_of``), per band, the first that is present:

- GeoTIFF band tags ``wavelength_nm`` and ``fwhm_nm`` (``band_name`` for the name);
- GDAL's ``IMAGERY`` metadata domain: ``CENTRAL_WAVELENGTH_UM`` and ``FWHM_UM`` (GDAL >= 3.10 fills it for
  ENVI, Sentinel-2 SAFE and other drivers);
- the ENVI driver's band items ``wavelength`` / ``fwhm`` with ``wavelength_units``;
- an ENVI-style header beside the file (``scene.hdr`` or ``scene.tif.hdr``: ``wavelength = {...}``,
  ``fwhm = {...}``, ``wavelength units``, ``band names``);
- band names a sensor preset knows (a band described ``B04`` on a 12/13-band raster is Sentinel-2's red).

``--wavelengths`` (``parse_wavelengths``) overrides them all: a sensor preset (``cdkd.data.sensors``) or a list of
centres in nm, each optionally ``centre:width``.
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

__all__ = ["Band", "BandSet", "band_set_of", "choose_scene_bands", "match_bands", "parse_wavelengths",
           "read_band_set", "resolve_band_set"]

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
            bands = tuple(Band(center_nm=float(b["center_nm"]), width_nm=b.get("width_nm"), name=b.get("name", ""))
                          for b in d["bands"])
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
# parsing --wavelengths and preset names


def normalize_band_name(name: str) -> str:
    """``B01`` -> ``B1``, ``b08a`` -> ``B8A``, ``Red`` -> ``RED``: how names are compared."""
    text = str(name).strip().upper()
    m = re.fullmatch(r"B0*(\d+)(A?)", text)
    return f"B{m.group(1)}{m.group(2)}" if m else text


def preset_for_names(names: Sequence[str], preset: BandSet) -> BandSet | None:
    """The preset's bands named ``names`` (in that order), or None when a name is not in the preset."""
    index = {normalize_band_name(b.name): b for b in preset.bands}
    keys = [normalize_band_name(n) for n in names]
    if not keys or any(k not in index for k in keys):
        return None
    return BandSet(tuple(index[k] for k in keys), preset.sensor)


def band_set_from_names(names: Sequence[str]) -> BandSet | None:
    """The bands a sensor preset gives these band names (``B01`` .. ``B12``, ``B8A``), or None when no preset
    knows them all, or when presets that do disagree about their wavelengths (``Red`` is 660 nm on WorldView-3
    and 635 nm on NAIP's camera: a bare colour name does not say which)."""
    from cdkd.data.sensors import SENSOR_PRESETS

    if not names or not all(names):
        return None
    picks = [p for p in (preset_for_names(names, preset) for preset in SENSOR_PRESETS.values()) if p is not None]
    if not picks or any(np.abs(np.subtract(p.centers, picks[0].centers)).max() > 1.0 for p in picks[1:]):
        return None
    return picks[0]


def parse_wavelengths(spec: str, count: int | None = None, names: Sequence[str] | None = None) -> BandSet:
    """``--wavelengths``: a sensor preset name (``sentinel2``, ``naip``, ...) or comma-separated centres in nm,
    each optionally ``centre:width`` (``443:20,490:65``); values below 100 are read as micrometres.

    ``count``: the number of bands the data has; a preset with more bands is narrowed to the bands ``names``
    (the raster's band names) pick, and a list must have exactly ``count`` entries.
    """
    from cdkd.data.sensors import SENSOR_PRESETS

    text = str(spec).strip()
    presets = {re.sub(r"[-_\s]", "", k): v for k, v in SENSOR_PRESETS.items()}  # Sentinel-2 = sentinel2
    key = re.sub(r"[-_\s]", "", text.lower())
    if key in presets:
        preset = presets[key]
        if count is None or len(preset) == count:
            return preset
        picked = preset_for_names(names or (), preset)
        if picked is not None and len(picked) == count:
            return picked
        raise CdkdValueError(f"--wavelengths {text}: the preset has {len(preset)} bands but the data has {count} "
                             f"and no band names that pick them ({preset.describe()}); give the centres instead, "
                             "e.g. --wavelengths 443,490,560")
    if not text or not re.fullmatch(r"[\d.:,\s]+", text):
        raise CdkdValueError(f"--wavelengths {text!r}: expected a sensor preset ({', '.join(SENSOR_PRESETS)}) or "
                             "comma-separated centres in nm such as 443,490:65,560")
    bands = []
    for item in (t for t in text.split(",") if t.strip()):
        parts = item.split(":")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise CdkdValueError(f"--wavelengths: {item.strip()!r} is not a number (or centre:width)") from None
        if len(values) > 2:
            raise CdkdValueError(f"--wavelengths: {item.strip()!r} has more than centre:width")
        scale = 1000.0 if values[0] < 100 else 1.0  # micrometres
        bands.append(Band(values[0] * scale, values[1] * scale if len(values) == 2 else None))
    out = BandSet(tuple(bands))
    if count is not None and len(out) != count:
        raise CdkdValueError(f"--wavelengths gives {len(out)} centres but the data has {count} band(s)")
    return out


# --------------------------------------------------------------------------------------------------------------
# reading band metadata from rasters


def _float(value: Any) -> float | None:
    try:
        v = float(str(value).strip().strip("{}"))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _to_nm(value: float, units: str | None) -> float:
    u = (units or "").strip().lower()
    if u.startswith(("micro", "um", "µm")):
        return value * 1000.0
    if u.startswith(("nano", "nm")):
        return value
    if u in ("wavenumber", "ghz", "mhz", "index", "unknown"):
        raise ValueError(f"wavelength units {units!r} are not a length")
    return value * 1000.0 if value < 100 else value  # no unit given: micrometres are small numbers


def _envi_list(text: str) -> list[str]:
    return [t.strip() for t in text.strip().strip("{}").split(",") if t.strip()]


def read_envi_header(path: str | Path) -> dict[str, str]:
    """The ``key = value`` items of an ENVI header (``{...}`` values may span lines); keys lower-cased."""
    items: dict[str, str] = {}
    key, buf = None, []
    for line in Path(path).read_text(errors="replace").splitlines():
        if key is not None:
            buf.append(line)
            if "}" in line:
                items[key] = " ".join(buf)
                key = None
            continue
        if "=" not in line:
            continue
        k, v = line.split("=", 1)
        k, v = k.strip().lower(), v.strip()
        if v.startswith("{") and "}" not in v:
            key, buf = k, [v]
        else:
            items[k] = v
    return items


def _envi_sidecar(path: str | Path) -> Path | None:
    p = Path(path)
    for hdr in (p.with_suffix(".hdr"), p.with_name(p.name + ".hdr")):
        if hdr.is_file() and hdr != p:
            return hdr
    return None


def _band_set_from_envi(header: Mapping[str, str], count: int) -> BandSet | None:
    if "wavelength" not in header:
        return None
    units = header.get("wavelength units")
    centers = [_float(v) for v in _envi_list(header["wavelength"])]
    widths = [_float(v) for v in _envi_list(header.get("fwhm", ""))] or [None] * len(centers)
    names = _envi_list(header.get("band names", "")) or [""] * len(centers)
    if len(centers) != count or any(c is None for c in centers) or len(widths) != count or len(names) != count:
        return None
    return BandSet(tuple(Band(_to_nm(c, units), None if w is None else _to_nm(w, units), n)  # type: ignore[arg-type]
                         for c, w, n in zip(centers, widths, names)))


def _band_from_tags(tags: Mapping[str, str], imagery: Mapping[str, str], name: str) -> Band | None:
    center = _float(tags.get("wavelength_nm"))
    width = _float(tags.get("fwhm_nm"))
    if center is None and _float(imagery.get("CENTRAL_WAVELENGTH_UM")) is not None:
        center = 1000.0 * float(imagery["CENTRAL_WAVELENGTH_UM"])
    if width is None and _float(imagery.get("FWHM_UM")) is not None:
        width = 1000.0 * float(imagery["FWHM_UM"])
    units = tags.get("wavelength_units")
    if center is None and _float(tags.get("wavelength")) is not None:
        center = _to_nm(float(tags["wavelength"]), units)
    if width is None and _float(tags.get("fwhm")) is not None:
        width = _to_nm(float(tags["fwhm"]), units)
    return None if center is None else Band(center, width, name)


def band_set_of(src: Any, path: str | Path | None = None) -> BandSet | None:
    """The band set an open rasterio dataset describes (see the module docstring), or None when it says nothing
    about wavelengths. A raster that gives wavelengths for some bands and not others is a DataError."""
    where = path if path is not None else getattr(src, "name", "raster")
    names = []
    found: list[Band | None] = []
    for i in range(1, src.count + 1):
        tags = src.tags(i)
        name = tags.get("band_name") or (src.descriptions[i - 1] or "")
        names.append(name)
        try:
            found.append(_band_from_tags(tags, src.tags(i, ns="IMAGERY"), name))
        except ValueError as e:
            raise DataError(f"{where}: band {i}: {e}") from None
    if all(b is not None for b in found):
        return _with_preset_widths(BandSet(tuple(found)))  # type: ignore[arg-type]
    if any(b is not None for b in found):
        missing = [i + 1 for i, b in enumerate(found) if b is None]
        raise DataError(f"{where}: bands {missing} carry no wavelength while the others do; tag every band "
                        "(wavelength_nm) or pass --wavelengths")
    if path is not None and not str(path).startswith("/vsi") and (hdr := _envi_sidecar(path)) is not None:
        try:
            envi = _band_set_from_envi(read_envi_header(hdr), src.count)
        except ValueError as e:
            raise DataError(f"{hdr}: {e}") from None
        if envi is not None:
            return envi
    return band_set_from_names(names)


def _with_preset_widths(found: BandSet) -> BandSet:
    """Widths the tags leave out, taken from the sensor preset whose bands have these names and centres (a
    Sentinel-2 stack tagged ``B04`` at 665 nm is B04 of 30 nm): overlap-based alignment needs them."""
    from cdkd.data.sensors import SENSOR_PRESETS

    if all(b.width_nm is not None for b in found.bands) or not all(found.names):
        return found
    for preset in SENSOR_PRESETS.values():
        picked = preset_for_names(found.names, preset)
        if picked is not None and same_bands(found, picked):
            return BandSet(tuple(Band(b.center_nm, b.width_nm if b.width_nm is not None else p.width_nm, b.name)
                                 for b, p in zip(found.bands, picked.bands)), found.sensor)
    return found


def read_band_set(path: str | Path) -> BandSet | None:
    """``band_set_of`` for a raster path (any path ``cdkd.data.files.open_raster`` opens, band stacks too)."""
    from cdkd.data.files import open_raster

    with open_raster(path) as src:
        return band_set_of(src, path)


def resolve_band_set(paths: Sequence[str], bands: Sequence[int], wavelengths: str | None = None) -> BandSet | None:
    """The band set of the selected ``bands`` (1-based) of the rasters at ``paths``: ``wavelengths`` (a preset or
    list, see ``parse_wavelengths``) when given, else what the files say, or None when they say nothing.

    Every file must say the same (DataError naming two that differ): one model, one set of bands.
    """
    if not paths:
        return None
    first = read_band_set(paths[0])
    if wavelengths:
        from cdkd.data.files import open_raster

        with open_raster(paths[0]) as src:
            count, names = src.count, [d or "" for d in src.descriptions]
        names = list(first.names) if first is not None else names
        return parse_wavelengths(wavelengths, count, names).select(bands)
    for p in paths[1:]:
        other = read_band_set(p)
        if not same_bands(first, other):
            a = first.describe() if first else "no wavelengths"
            b = other.describe() if other else "no wavelengths"
            raise DataError(f"{p}: its bands ({b}) differ from those of {paths[0]} ({a}); one model reads one set "
                            "of bands: put each sensor in its own folder")
    return None if first is None else first.select(bands)


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
    pairs = sorted((abs(m.center_nm - s.center_nm), i, j)
                   for i, m in enumerate(model.bands) for j, s in enumerate(scene.bands)
                   if abs(m.center_nm - s.center_nm) <= tolerance_nm(m))
    out: list[int | None] = [None] * len(model)
    used: set[int] = set()
    for _, i, j in pairs:
        if out[i] is None and j not in used:
            out[i], used = j + 1, used | {j}
    return out


def choose_scene_bands(model: BandSet | None, scene: BandSet | None, requested: Sequence[int] | None,
                       where: str | Path) -> tuple[int, ...] | None:
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
            raise DataError(f"{where}: {'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}; the model reads "
                            f"{model.describe()}")
        return None
    matched = match_bands(model, scene)
    missing = [m.label() for m, j in zip(model.bands, matched) if j is None]
    if missing:
        raise DataError(f"{where}: the scene has no band for {', '.join(missing[:6])}"
                        f"{' ...' if len(missing) > 6 else ''} (the model reads {model.describe()}; the scene has "
                        f"{scene.describe()}); give a scene with those bands, or map bands with --bands")
    return tuple(int(j) for j in matched)  # type: ignore[arg-type]
