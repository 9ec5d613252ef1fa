"""Handing freed memory back to the operating system between the vectorizer's big steps.

The polygon stages allocate and free hundreds of MB per strip (GDAL's polygons, numpy vertex arrays, GEOS
geometries). glibc keeps freed heap pages mapped for reuse, so the resident size would climb to the largest
step's peak and stay there, and the next step's peak would come on top. ``release_freed_memory`` calls glibc's
``malloc_trim(0)``, which returns every free page; it costs about a millisecond. Elsewhere (macOS, Windows,
musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# vertices that one step (joining, moving to the CRS, measuring, WKB, a GeoPackage append) handles at once: a
# strip can finish polygons of millions of vertices, and each step copies what it is given (4 MB of coordinates)
BATCH_VERTICES = 1 << 18


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def release_freed_memory() -> None:
    """Return freed heap pages to the operating system (glibc only; see the module docstring)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
