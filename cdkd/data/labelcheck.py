"""Labeled data checked when a data set is opened, not when a tile happens to be sampled.

A mask value outside the classes in a 24 x 24 corner of one mask among thousands would otherwise surface hours
into training, or never, as a DataLoader worker's traceback. ``check_labels`` reads every mask once, whole (in
bands of rows, so memory stays small), and checks that it has the layout its format promises (colour-coded masks
for ``dubai`` and ``deepglobe``, index masks for the mmsegmentation formats), that it is its image's size, and
that every value or colour is a class or an ignore value. What passed is remembered per file version (path,
size, modification time) and class schema in a small cache file, so a large set is scanned once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

from rasterio.enums import ColorInterp

from cdkd.data.classes import ClassSchema
from cdkd.data.files import raster_header, reading
from cdkd.data.labeled import LabeledPair, mask_kind, read_label
from cdkd.errors import DataError
from cdkd.utils.atomic import atomic_write_text

ROWS = 1024  # rows of a mask decoded at a time


def cache_dir() -> Path:
    """Where checks are remembered: ``$CDKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/cdkd``, else ``~/.cache/cdkd``."""
    if os.environ.get("CDKD_CACHE_DIR"):
        return Path(os.environ["CDKD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cdkd"


def check_labels(
    pairs: Sequence[LabeledPair], schema: ClassSchema, fmt: str, log: Callable[[str], None] | None = None
) -> None:
    """Raise a one-line DataError for the first pair whose mask does not fit ``fmt`` and ``schema`` (see the
    module docstring); pairs checked before, unchanged, are not read again."""
    digest = hashlib.sha256(json.dumps([fmt, schema.to_dict()], sort_keys=True).encode()).hexdigest()[:16]
    cache = cache_dir() / f"labels-{digest}.json"
    known = _load(cache)
    todo = [(p, key) for p in pairs if (key := _key(p)) not in known]
    if not todo:
        return
    if log is not None and len(todo) > 1:
        log(f"checking {len(todo)} mask(s) once (classes, layout, size; remembered in {cache.parent})")
    try:
        for pair, key in todo:
            check_pair(pair, schema, fmt)
            known.add(key)
    finally:
        _save(cache, known)


def check_pair(pair: LabeledPair, schema: ClassSchema, fmt: str) -> None:
    """One pair: mask layout for ``fmt``, size equal to the image's, every value known to ``schema``."""
    img_h, img_w, _, _ = raster_header(pair.image)
    mask_h, mask_w, count, _ = raster_header(pair.mask)
    if (img_h, img_w) != (mask_h, mask_w):
        raise DataError(
            f"{pair.image} is {img_h}x{img_w} (rows x columns) but its mask {pair.mask} is "
            f"{mask_h}x{mask_w}: image and mask must have the same size"
        )
    _check_layout(pair.mask, count, fmt)
    for row in range(0, mask_h, ROWS):
        read_label(pair, schema, (row, 0, min(ROWS, mask_h - row), mask_w))


def _check_layout(mask: str, count: int, fmt: str) -> None:
    kind = mask_kind(fmt)
    if kind == "rgb" and count < 3:
        with reading(mask) as src:
            paletted = src.colorinterp[0] == ColorInterp.palette
        if not paletted:
            raise DataError(
                f"{mask}: is a single-band index mask, but --format {fmt} masks are colour-coded "
                "(R, G, B); for index masks use --format folder with a class file"
            )
    if kind == "index" and count >= 3:
        raise DataError(
            f"{mask}: is a {count}-band (colour-coded) mask, but --format {fmt} masks hold class "
            "values in one band; for colour-coded masks use --format folder with a class file"
        )


def _key(pair: LabeledPair) -> str:
    parts = []
    for path in (pair.image, pair.mask):
        try:
            st = os.stat(path)
            parts.append(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{path}:missing")
    return "|".join(parts)


def _load(cache: Path) -> set[str]:
    try:
        return set(json.loads(cache.read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def _save(cache: Path, known: set[str]) -> None:
    try:
        atomic_write_text(cache, json.dumps(sorted(known)))
    except OSError:
        pass  # a read-only home: the checks run again next time, which is only slower


__all__ = ["cache_dir", "check_labels", "check_pair"]
