"""Band metadata in a raster's own files: which wavelengths an open dataset says its bands measure.

Per band, the first that is present:

- GeoTIFF band tags ``wavelength_nm`` and ``fwhm_nm`` (``band_name`` for the name);
- GDAL's ``IMAGERY`` metadata domain: ``CENTRAL_WAVELENGTH_UM`` and ``FWHM_UM`` (GDAL >= 3.10 fills it for
  ENVI, Sentinel-2 SAFE and other drivers);
- the ENVI driver's band items ``wavelength`` / ``fwhm`` with ``wavelength_units``;
- an ENVI-style header beside the file (``scene.hdr`` or ``scene.tif.hdr``: ``wavelength = {...}``,
  ``fwhm = {...}``, ``wavelength units``, ``band names``);
- band names a sensor preset knows (a band described ``B04`` on a 12/13-band raster is Sentinel-2's red).

``--wavelengths`` (``cdkd.data.sensors.parse_wavelengths``) overrides them all.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from cdkd.data.bands import Band, BandSet, same_bands
from cdkd.data.sensors import SENSOR_PRESETS, band_set_from_names, preset_for_names
from cdkd.errors import DataError

__all__ = ["band_set_of", "read_envi_header"]


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
    return BandSet(
        tuple(
            Band(_to_nm(c, units), None if w is None else _to_nm(w, units), n)  # type: ignore[arg-type]
            for c, w, n in zip(centers, widths, names)
        )
    )


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
        raise DataError(
            f"{where}: bands {missing} carry no wavelength while the others do; tag every band "
            "(wavelength_nm) or pass --wavelengths"
        )
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
    if all(b.width_nm is not None for b in found.bands) or not all(found.names):
        return found
    for preset in SENSOR_PRESETS.values():
        picked = preset_for_names(found.names, preset)
        if picked is not None and same_bands(found, picked):
            return BandSet(
                tuple(
                    Band(b.center_nm, b.width_nm if b.width_nm is not None else p.width_nm, b.name)
                    for b, p in zip(found.bands, picked.bands)
                ),
                found.sensor,
            )
    return found
