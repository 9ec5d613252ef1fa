"""Finding usable image files and reading pixel windows from them.

Every read goes through rasterio (GDAL), which handles JPEG, PNG, TIFF and GeoTIFF alike and gives one notion
of validity for all of them: ``dataset_mask()`` (nodata value, alpha band or internal mask). Files are never
read whole: callers ask for windows, so a 20 000 px scene costs no more than a 400 px tile.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from cdkd.data.bandmeta import band_set_of
from cdkd.data.bands import BandSet, same_bands
from cdkd.data.bandstack import (
    is_band_stack,
    is_manifest,
    manifest_members,
    open_band_stack,
)
from cdkd.data.gdal import gdal_reason, open_file, raster_path
from cdkd.data.sensors import parse_wavelengths
from cdkd.data.stac import is_stac, open_stac
from cdkd.errors import CdkdError, CdkdIOError, CdkdValueError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")

PROBE_SIZE = 64  # side of the windows read to check that a file's pixel data decodes

_FORMATS_HELP = (
    "looked for JPEG, PNG, TIFF and GeoTIFF files and band-stack manifests: "
    + ", ".join(f"*{s}" for s in IMAGE_SUFFIXES)
    + ", *.bands.yaml"
)


@dataclass(frozen=True)
class RasterInfo:
    """Header facts about one usable image file (sizes in pixels, ``dtype`` as numpy spells it)."""

    path: str
    width: int
    height: int
    count: int  # number of bands
    dtype: str  # e.g. "uint8", "uint16"


# --------------------------------------------------------------------------------------------------------------
# helpers


def check_bands(bands: Sequence[int]) -> tuple[int, ...]:
    """Validate 1-based band indexes (rasterio's convention) and return them as a tuple."""
    out = tuple(bands)
    if not out:
        raise CdkdValueError("no band selected: give at least one 1-based band index")
    for b in out:
        # bool is an int subclass, and numpy integers are not ints: accept integral numbers only
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
            raise CdkdValueError(f"band index {b!r} is not an integer (band indexes are 1-based)")
        if b < 1:
            raise CdkdValueError(f"band index {b} is invalid: band indexes are 1-based (the first band is 1)")
    return tuple(int(b) for b in out)


@contextmanager
def reading(path: str | Path) -> Iterator[rasterio.io.DatasetReader]:
    """Open ``path`` read-only; plain JPEG/PNG files have no georeferencing, which is fine here. A band stack
    (``cdkd.data.bandstack``: a ``*.bands.yaml`` manifest or a folder of single-band files) opens as one raster,
    and so does a STAC item (``cdkd.data.stac``: with no model to choose for, its red, green and blue assets)."""
    if is_band_stack(path):
        src = open_band_stack(path)
    elif is_stac(path):
        src = open_stac(path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    with src:
        yield src


def raster_header(path: str | Path) -> tuple[int, int, int, str]:
    """(height, width, band count, dtype of band 1) of the raster ``path``; CdkdIOError when it cannot be opened."""
    try:
        with reading(path) as src:
            return src.height, src.width, src.count, src.dtypes[0]
    except (RasterioError, OSError) as e:
        raise CdkdIOError(f"{path}: cannot open ({gdal_reason(e)})") from None


def open_raster(path: str | Path) -> rasterio.io.DatasetReader:
    """Any raster cdkd reads by path, open: a file or GDAL virtual path (``cdkd.data.gdal.open_file``), a band
    stack (``cdkd.data.bandstack``) or a STAC item, which opens as its red, green and blue assets
    (``cdkd.data.stac``; ``SceneSource`` chooses the assets that hold a model's bands instead). A one-line
    CdkdIOError when it cannot be read."""
    if is_stac(path):
        return open_stac(path)
    if is_band_stack(raster_path(path)):
        return open_band_stack(path)
    return open_file(path)


def read_pixels(
    src: rasterio.io.DatasetReader, bands: tuple[int, ...], window: Window
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (C, h, w) and validity (h, w) of ``window`` in an open dataset."""
    pixels = src.read(indexes=list(bands), window=window)
    # GDAL semantics: a pixel is invalid where the nodata value / alpha / internal mask says so
    valid = src.dataset_mask(window=window) > 0
    if pixels.dtype.kind == "f":
        # a NaN or inf that no nodata value declares would still poison statistics and losses
        valid &= np.isfinite(pixels).all(axis=0)
    return pixels, valid


def _missing_bands(count: int, bands: tuple[int, ...] | None, min_bands: int) -> str | None:
    """Why a file with ``count`` bands cannot be used, or None if it can."""
    needed = max(bands) if bands is not None else min_bands
    if count < needed:
        return f"has {count} band{'s' if count != 1 else ''}, needs {needed}"
    return None


def probe_windows(height: int, width: int, size: int) -> list[Window]:
    """The top-left and bottom-right ``size`` px windows (clipped to the image) that a probe decodes.

    A file can open (its header is intact) and still have broken pixel data, and truncation loses the end of a
    file first; decoding these two is cheap, where reading the whole file would cost a full decode.
    """
    h, w = min(size, height), min(size, width)
    return [Window(0, 0, w, h), Window(width - w, height - h, w, h)]


def _probe(path: Path, bands: tuple[int, ...] | None, min_bands: int) -> tuple[RasterInfo | None, str]:
    """Open ``path`` and decode two small windows; return its RasterInfo, or None and the reason it is unusable.

    The top-left and bottom-right windows are read: a file can open (its header is intact) and still have
    broken pixel data, and truncation loses the end of a file first. Reading the whole file would catch more
    but costs a full decode of every image on every scan.
    """
    try:
        with reading(path) as src:
            reason = _missing_bands(src.count, bands, min_bands)
            if reason:
                return None, reason
            info = RasterInfo(str(path), src.width, src.height, src.count, src.dtypes[0])
            indexes = bands if bands is not None else tuple(range(1, src.count + 1))
            try:
                for window in probe_windows(src.height, src.width, PROBE_SIZE):
                    read_pixels(src, indexes, window)
            except (RasterioError, OSError) as e:
                return None, f"pixel data cannot be read: {gdal_reason(e)}"
    except (RasterioError, OSError):
        return None, "not a readable raster"
    return info, ""


def _candidates(root: Path) -> list[Path]:
    """Image files and band-stack manifests under ``root`` (recursive), sorted by path so every run sees the same
    order; files a manifest stacks are not also taken on their own."""
    found = [p for p in root.rglob("*") if (p.suffix.lower() in IMAGE_SUFFIXES or is_manifest(p)) and p.is_file()]
    stacked = {m.resolve() for p in found if is_manifest(p) for m in manifest_members(p)}
    if stacked:
        found = [p for p in found if is_manifest(p) or p.resolve() not in stacked]
    return sorted(found, key=str)


# --------------------------------------------------------------------------------------------------------------
# public API


def find_rasters(root: str | Path, bands: Sequence[int] | None = None, min_bands: int = 3) -> list[RasterInfo]:
    """Every usable image under ``root`` (recursive), sorted by path.

    Args:
        root: folder searched for ``IMAGE_SUFFIXES`` files (case-insensitive).
        bands: 1-based band indexes that will be read; a file needs at least ``max(bands)`` bands.
        min_bands: band count a file needs when ``bands`` is None.

    A file is usable when rasterio opens it, it has enough bands and two small probe windows decode. Unusable
    files are skipped with one ``UserWarning`` that counts them and names the first.

    Raises:
        DataError: ``root`` is missing or not a folder, or no usable image is found.
        CdkdValueError: a band index is < 1 or ``min_bands`` < 1.
    """
    checked = check_bands(bands) if bands is not None else None
    if min_bands < 1:
        raise CdkdValueError(f"min_bands must be at least 1, got {min_bands}")
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (give the folder that holds the image files)")

    candidates = _candidates(root)
    found: list[RasterInfo] = []
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        info, reason = _probe(path, checked, min_bands)
        if info is None:
            skipped.append((path, reason))
        else:
            found.append(info)

    first = f"first: {skipped[0][0].relative_to(root)}: {skipped[0][1]}" if skipped else ""
    if not found:
        detail = f"{len(skipped)} candidate file(s) skipped, {first}" if skipped else "no candidate file"
        raise DataError(f"{root}: no usable image found ({_FORMATS_HELP}; {detail})")
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} of {len(candidates)} files in {root} that could not be used ({first})",
            UserWarning,
            stacklevel=2,
        )
    return found


def read_window(
    path: str, bands: Sequence[int], row: int, col: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read one pixel window of ``path``.

    Args:
        path: image file.
        bands: 1-based band indexes, in the order wanted.
        row, col: top-left corner of the window in pixels (0-based).
        height, width: window size in pixels; the window must lie inside the image.

    Returns:
        ``(pixels, valid)``: pixels (C, height, width) in the file's dtype, C = len(bands); valid (height, width)
        bool, False where GDAL's dataset mask (nodata value, alpha band, internal mask) marks a pixel invalid,
        and for float data also where a value is NaN or infinite.

    Raises:
        CdkdIOError: the file cannot be opened or its pixels cannot be decoded (message names the file).
        DataError: the file has fewer bands than requested.
        CdkdValueError: bad band index or a window outside the image.
    """
    indexes = check_bands(bands)
    if height < 1 or width < 1 or row < 0 or col < 0:
        raise CdkdValueError(f"{path}: invalid window row={row} col={col} height={height} width={width}")
    try:
        with reading(path) as src:
            if max(indexes) > src.count:
                raise DataError(f"{path}: has {src.count} bands, band {max(indexes)} requested")
            if row + height > src.height or col + width > src.width:
                raise CdkdValueError(
                    f"{path}: window rows {row}..{row + height} cols {col}..{col + width} lies outside the "
                    f"{src.height}x{src.width} image"
                )
            return read_pixels(src, indexes, Window(col, row, width, height))
    except CdkdError:
        raise
    except (RasterioError, OSError) as e:
        raise CdkdIOError(f"{path}: cannot read pixels ({gdal_reason(e)})") from e


def require_one_dtype(rasters: Sequence[RasterInfo], root: str | Path) -> str:
    """The data type all ``rasters`` share; mixed types are a ``DataError``.

    One set of normalisation statistics cannot serve uint8 and uint16 imagery at once (their value ranges differ
    by two orders of magnitude), so a mixed folder would train on mis-scaled inputs without any sign of it.
    """
    by_dtype: dict[str, list[RasterInfo]] = {}
    for r in rasters:
        by_dtype.setdefault(r.dtype, []).append(r)
    if len(by_dtype) > 1:
        counts = ", ".join(f"{d}: {len(v)} files" for d, v in sorted(by_dtype.items(), key=lambda kv: -len(kv[1])))
        minority = min(by_dtype.values(), key=len)[0]
        raise DataError(
            f"{root}: images of different data types ({counts}, e.g. {Path(minority.path).name}); "
            "one set of normalisation statistics cannot serve them all: put each type in its own folder"
        )
    return next(iter(by_dtype))


def read_band_set(path: str | Path) -> BandSet | None:
    """``cdkd.data.bandmeta.band_set_of`` for a raster path (any path ``open_raster`` opens, band stacks too)."""
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
        with open_raster(paths[0]) as src:
            count, names = src.count, [d or "" for d in src.descriptions]
        names = list(first.names) if first is not None else names
        return parse_wavelengths(wavelengths, count, names).select(bands)
    for p in paths[1:]:
        other = read_band_set(p)
        if not same_bands(first, other):
            a = first.describe() if first else "no wavelengths"
            b = other.describe() if other else "no wavelengths"
            raise DataError(
                f"{p}: its bands ({b}) differ from those of {paths[0]} ({a}); one model reads one set "
                "of bands: put each sensor in its own folder"
            )
    return None if first is None else first.select(bands)
