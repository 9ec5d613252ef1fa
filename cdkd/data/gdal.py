"""GDAL's side of reading: which paths GDAL opens that the file system does not hold, and GDAL's own reason
when it fails. Below every reader (``files``, ``bandstack``, ``stac``), so each can use them."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from cdkd.errors import CdkdIOError

__all__ = ["gdal_reason", "is_virtual_path", "open_file", "raster_path"]


_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def is_virtual_path(path: str | Path) -> bool:
    """True for what GDAL opens but the local file system does not hold: ``/vsizip/...``, ``/vsis3/...``,
    ``/vsicurl/...`` and URLs (``https://``, ``s3://``, ...). Keep such paths as strings: ``pathlib`` would fold
    the ``//`` of a URL."""
    text = str(path)
    return text.startswith("/vsi") or bool(_URL.match(text))


def raster_path(path: str | Path) -> str | Path:
    """``path`` as a ``Path`` for a local file, unchanged (a string) for a GDAL virtual path or URL."""
    return str(path) if is_virtual_path(path) else Path(path)


def gdal_reason(err: BaseException) -> str:
    """The most specific message in an exception chain.

    rasterio raises ``RasterioIOError("Read failed. See previous exception for details.")`` and chains GDAL's
    own message (``... TIFFReadEncodedTile() failed``) as the cause; the user needs the latter.
    """
    messages = []
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).strip()
        if text:
            messages.append(text)
        e = e.__cause__ or e.__context__
    generic = "see previous exception"
    specific = [m for m in messages if generic not in m.lower()]
    if specific:
        return specific[-1]
    return messages[0] if messages else type(err).__name__


def open_file(path: str | Path) -> Any:
    """``rasterio.open(path)`` for one file GDAL reads (no band stack or STAC routing: ``cdkd.data.files.open_raster``
    does that), else a one-line CdkdIOError. GDAL virtual paths and URLs go to GDAL as they are: only it can tell
    whether they exist. Plain JPEG/PNG files have no georeferencing, which is fine for reading."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    path = raster_path(path)
    if isinstance(path, Path) and not path.is_file():
        raise CdkdIOError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except (RasterioError, OSError) as e:
        raise CdkdIOError(f"{path}: not a readable raster ({gdal_reason(e)})") from None
