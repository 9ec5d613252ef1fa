"""Sensor presets: published band tables as ``BandSet``s (``--wavelengths NAME``), and the teacher's RGB ranges.

Sources (centres and widths in nm; a range lo-hi is stored as centre (lo+hi)/2 and width hi-lo):

- ``sentinel2`` (13 bands, L1C order) and ``sentinel2_l2a`` (12: L2A drops the cirrus band B10): the MSI band
  table in GDAL's SENTINEL2 driver documentation (centre, band width; Sentinel-2A values; 2B differs by up to
  ~17 nm in B12, within ``cdkd.data.bands.tolerance_nm``).
- ``worldview3``: the eight VNIR multispectral bands of WorldView-3 (Coastal 400-450 ... NIR2 860-1040), as listed
  by the International Charter's mission page and PCI Catalyst's WorldView-3 reference.
- ``naip``: four bands in NAIP's file order R, G, B, NIR. NAIP is flown with several cameras whose bands differ by
  tens of nm; these are the nominal bands of the Leica ADS100, which flew most recent NAIP years. The alignment
  only needs each band inside the right teacher range, which every NAIP camera satisfies.
- ``enmap``: the 224 EnMAP HSI centre wavelengths (91 VNIR 418-993 nm, then 133 SWIR 902-2445 nm, in product
  order) from DLR's ``EnMAP_Spectral_Bands_update.xlsx`` table; widths are not in that table and are inferred
  from the band spacing (``BandSet.intervals``; EnMAP samples 6.5 nm in the VNIR and 10 nm in the SWIR).

``TEACHER_RGB``: the spectral ranges the SAM teacher's three input channels stand for, in its input order R, G, B.
SAM learnt from consumer photographs; for overhead imagery the natural reading of "red, green, blue" is a VHR
satellite's visible bands, so these are WorldView-3's Red 630-690, Green 510-580 and Blue 450-510 nm.
``hyperkd.teacher_ranges`` changes them.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from cdkd.data.bands import Band, BandSet, normalize_band_name
from cdkd.errors import CdkdValueError


def _ranges(sensor: str, table: Sequence[tuple[str, float, float]]) -> BandSet:
    return BandSet(tuple(Band((lo + hi) / 2, hi - lo, name) for name, lo, hi in table), sensor)


def _centres(sensor: str, table: Sequence[tuple[str, float, float]]) -> BandSet:
    return BandSet(tuple(Band(c, w, name) for name, c, w in table), sensor)


_S2 = [  # name, centre nm, band width nm
    ("B01", 443, 20),
    ("B02", 490, 65),
    ("B03", 560, 35),
    ("B04", 665, 30),
    ("B05", 705, 15),
    ("B06", 740, 15),
    ("B07", 783, 20),
    ("B08", 842, 115),
    ("B8A", 865, 20),
    ("B09", 945, 20),
    ("B10", 1375, 30),
    ("B11", 1610, 90),
    ("B12", 2190, 180),
]

_WV3 = [  # name, lo nm, hi nm
    ("Coastal", 400, 450),
    ("Blue", 450, 510),
    ("Green", 510, 580),
    ("Yellow", 585, 625),
    ("Red", 630, 690),
    ("RedEdge", 705, 745),
    ("NIR1", 770, 895),
    ("NIR2", 860, 1040),
]

_NAIP = [("Red", 619, 651), ("Green", 525, 585), ("Blue", 435, 495), ("NIR", 808, 882)]  # file order R, G, B, N

_ENMAP_VNIR = (
    418.416,
    424.043,
    429.457,
    434.686,
    439.758,
    444.699,
    449.539,
    454.306,
    459.031,
    463.730,
    468.411,
    473.080,
    477.744,
    482.411,
    487.087,
    491.780,
    496.497,
    501.243,
    506.020,
    510.829,
    515.672,
    520.551,
    525.467,
    530.424,
    535.422,
    540.463,
    545.551,
    550.687,
    555.873,
    561.112,
    566.405,
    571.756,
    577.166,
    582.636,
    588.171,
    593.773,
    599.446,
    605.193,
    611.017,
    616.923,
    622.921,
    628.987,
    635.112,
    641.294,
    647.537,
    653.841,
    660.207,
    666.637,
    673.131,
    679.691,
    686.319,
    693.014,
    699.780,
    706.617,
    713.524,
    720.501,
    727.545,
    734.654,
    741.826,
    749.060,
    756.353,
    763.703,
    771.108,
    778.567,
    786.078,
    793.639,
    801.249,
    808.905,
    816.608,
    824.355,
    832.145,
    839.976,
    847.847,
    855.757,
    863.703,
    871.683,
    879.693,
    887.729,
    895.789,
    903.870,
    911.968,
    920.081,
    928.204,
    936.335,
    944.470,
    952.608,
    960.748,
    968.892,
    977.037,
    985.186,
    993.338,
)
_ENMAP_SWIR = (
    901.961,
    911.571,
    921.320,
    931.203,
    941.218,
    951.360,
    961.628,
    972.016,
    982.523,
    993.144,
    1003.88,
    1014.72,
    1025.66,
    1036.70,
    1047.84,
    1059.07,
    1070.39,
    1081.78,
    1093.26,
    1104.81,
    1116.43,
    1128.10,
    1139.84,
    1151.62,
    1163.44,
    1175.30,
    1187.20,
    1199.11,
    1211.05,
    1223.00,
    1234.97,
    1246.94,
    1258.93,
    1270.92,
    1282.92,
    1294.91,
    1306.90,
    1318.88,
    1330.85,
    1342.82,
    1354.76,
    1366.69,
    1378.60,
    1390.48,
    1461.10,
    1472.74,
    1484.34,
    1495.89,
    1507.40,
    1518.87,
    1530.29,
    1541.67,
    1553.01,
    1564.30,
    1575.55,
    1586.76,
    1597.91,
    1609.02,
    1620.09,
    1631.11,
    1642.07,
    1653.00,
    1663.87,
    1674.70,
    1685.47,
    1696.20,
    1706.87,
    1717.50,
    1728.08,
    1738.60,
    1749.08,
    1759.51,
    1939.14,
    1948.69,
    1958.20,
    1967.66,
    1977.08,
    1986.45,
    1995.79,
    2005.08,
    2014.33,
    2023.54,
    2032.70,
    2041.83,
    2050.92,
    2059.96,
    2068.97,
    2077.93,
    2086.86,
    2095.74,
    2104.59,
    2113.40,
    2122.17,
    2130.90,
    2139.60,
    2148.26,
    2156.88,
    2165.47,
    2174.02,
    2182.53,
    2191.01,
    2199.45,
    2207.86,
    2216.24,
    2224.58,
    2232.89,
    2241.16,
    2249.40,
    2257.61,
    2265.79,
    2273.93,
    2282.04,
    2290.12,
    2298.17,
    2306.19,
    2314.17,
    2322.13,
    2330.05,
    2337.94,
    2345.81,
    2353.64,
    2361.44,
    2369.21,
    2376.95,
    2384.66,
    2392.34,
    2400.00,
    2407.62,
    2415.21,
    2422.78,
    2430.32,
    2437.82,
    2445.30,
)


def _enmap() -> BandSet:
    vnir = [Band(c, None, f"VNIR{i + 1:02d}") for i, c in enumerate(_ENMAP_VNIR)]
    swir = [Band(c, None, f"SWIR{i + 1:03d}") for i, c in enumerate(_ENMAP_SWIR)]
    return BandSet(tuple(vnir + swir), "enmap")


SENSOR_PRESETS: dict[str, BandSet] = {
    "sentinel2": _centres("sentinel2", _S2),
    "sentinel2_l2a": _centres("sentinel2_l2a", [b for b in _S2 if b[0] != "B10"]),
    "worldview3": _ranges("worldview3", _WV3),
    "naip": _ranges("naip", _NAIP),
    "enmap": _enmap(),
}

TEACHER_RGB = _ranges("teacher_rgb", [("R", 630, 690), ("G", 510, 580), ("B", 450, 510)])


def teacher_bands(ranges: tuple[float, ...] | None) -> BandSet:
    """The teacher's channels from flat (lo, hi) nm pairs in its input order (``hyperkd.teacher_ranges``), or
    ``TEACHER_RGB`` for None."""
    from cdkd.errors import CdkdValueError

    if ranges is None:
        return TEACHER_RGB
    if len(ranges) % 2 or not ranges:
        raise CdkdValueError(f"teacher ranges must be (lo, hi) nm pairs, one per teacher channel, got {ranges}")
    pairs = [(float(ranges[i]), float(ranges[i + 1])) for i in range(0, len(ranges), 2)]
    if any(hi <= lo for lo, hi in pairs):
        raise CdkdValueError(f"teacher ranges {pairs}: each needs lo < hi (nm)")
    names = ["R", "G", "B"] if len(pairs) == 3 else [f"T{i + 1}" for i in range(len(pairs))]
    return _ranges("teacher", [(n, lo, hi) for n, (lo, hi) in zip(names, pairs)])


# --------------------------------------------------------------------------------------------------------------
# band names and --wavelengths through the presets


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
        raise CdkdValueError(
            f"--wavelengths {text}: the preset has {len(preset)} bands but the data has {count} "
            f"and no band names that pick them ({preset.describe()}); give the centres instead, "
            "e.g. --wavelengths 443,490,560"
        )
    if not text or not re.fullmatch(r"[\d.:,\s]+", text):
        raise CdkdValueError(
            f"--wavelengths {text!r}: expected a sensor preset ({', '.join(SENSOR_PRESETS)}) or "
            "comma-separated centres in nm such as 443,490:65,560"
        )
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
