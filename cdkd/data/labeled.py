"""Labeled image/mask pairs: finding them in the usual data-set layouts, reading them, and training tiles.

Supported layouts (``fmt``), every path below ``root``:

- ``dubai``: ``<tile>/images/<name>.jpg`` with ``<tile>/masks/<name>.png`` (colour-coded masks).
- ``deepglobe``: ``<id>_sat.jpg`` with ``<id>_mask.png`` in the same folder (colour-coded masks).
- ``loveda``, ``isprs``: mmsegmentation layout ``img_dir/[<split>/]<name>`` with ``ann_dir/[<split>/]<name>``
  (index masks); LoveDA's own ``images_png/`` + ``masks_png/`` folders are accepted too.
- ``openearthmap``: ``<region>/images/<name>.tif`` with ``<region>/labels/<name>.tif`` (index masks).
- ``folder``: ``images/**/<name>.<ext>`` with ``masks/**/<name>.<ext>`` (same relative path and stem, any
  suffix in ``IMAGE_SUFFIXES``) and a class file (see ``cdkd.data.classes``).

Everything is read through rasterio, in windows, like the unlabeled data (``cdkd.data.files``). Masks decode to
(H, W) int64 class ids with ``schema.ignore_index`` on pixels without a usable label. ``LabeledTiles`` follows
``UnlabeledTiles``: an item is a pure function of ``(seed, i)`` for a global sample number ``i``.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, cast

import numpy as np
import torch
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError
from rasterio.windows import Window
from torch.utils.data import Dataset

from cdkd.data.classes import BUILTIN_SCHEMAS, ClassSchema
from cdkd.data.files import (
    IMAGE_SUFFIXES,
    check_bands,
    raster_header,
    read_window,
    reading,
)
from cdkd.data.gdal import gdal_reason
from cdkd.data.stats import NormStats
from cdkd.data.unlabeled import check_index, check_tile_size, flip_rotate
from cdkd.errors import CdkdError, CdkdIOError, CdkdValueError, DataError

FORMATS = ("dubai", "deepglobe", "loveda", "isprs", "openearthmap", "folder")

# how each format encodes its masks: "rgb" colour-coded, "index" raw values, "auto" decided per file
_MASK_KINDS = {
    "dubai": "rgb",
    "deepglobe": "rgb",
    "loveda": "index",
    "isprs": "index",
    "openearthmap": "index",
    "folder": "auto",
}

_LAYOUTS = {
    "dubai": "<root>/<tile>/images/<name>.jpg with masks <root>/<tile>/masks/<name>.png",
    "deepglobe": "<root>/<id>_sat.jpg with masks <root>/<id>_mask.png in the same folder",
    "loveda": "<root>/img_dir/[<split>/]<name>.png with masks <root>/ann_dir/[<split>/]<name>.png "
    "(or LoveDA's images_png/ with masks_png/)",
    "isprs": "<root>/img_dir/[<split>/]<name>.png with masks <root>/ann_dir/[<split>/]<name>.png",
    "openearthmap": "<root>/<region>/images/<name>.tif with masks <root>/<region>/labels/<name>.tif",
    "folder": "<root>/images/**/<name>.<ext> with masks <root>/masks/**/<name>.<ext> (same relative path)",
}

Window4 = tuple[int, int, int, int]  # (row, col, height, width), the order of read_window's arguments


@dataclass(frozen=True)
class LabeledPair:
    """One image file and its mask file; ``name`` is the image path relative to the data root (for reports)."""

    image: str
    mask: str
    name: str


# --------------------------------------------------------------------------------------------------------------
# formats and schemas


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise CdkdValueError(f"unknown labeled-data format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def mask_kind(fmt: str) -> str:
    """How ``fmt`` encodes its masks: "rgb" (colour-coded), "index" (raw values) or "auto" (``folder``).

    Informational (reports, checks): ``read_pair`` decides per file from the mask's bands, so a data set
    that mixes RGB and paletted masks (Dubai does) still decodes.
    """
    return _MASK_KINDS[_check_format(fmt)]


def schema_for(fmt: str, classes: str | Path | None = None) -> ClassSchema:
    """The class schema for ``fmt``: the class file ``classes`` if given, else the built-in one.

    Raises:
        CdkdValueError: unknown format, or ``folder`` without a class file.
        CdkdIOError / CdkdValueError: the class file is missing or invalid.
    """
    _check_format(fmt)
    if classes is not None:
        return ClassSchema.load(classes)
    if fmt not in BUILTIN_SCHEMAS:
        raise CdkdValueError(
            f"format {fmt!r} has no built-in classes: give a class file (--classes classes.yaml) listing "
            "'classes: [{id: 0, name: ..., color: \"#RRGGBB\"}, ...]' (see cdkd.data.classes for the format)"
        )
    return BUILTIN_SCHEMAS[fmt]


# --------------------------------------------------------------------------------------------------------------
# finding pairs


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=str)


def _by_stem(files: list[Path], base: Path) -> dict[tuple[Path, str], Path]:
    """``(relative folder, stem) -> file``; where several suffixes share a stem, .png wins, then .tif, ..."""
    preference = {s: k for k, s in enumerate((".png", ".tif", ".tiff", ".jpg", ".jpeg"))}
    out: dict[tuple[Path, str], Path] = {}
    for f in sorted(files, key=lambda p: (preference.get(p.suffix.lower(), 99), str(p))):
        out.setdefault((f.relative_to(base).parent, f.stem), f)
    return out


def _sibling_dirs(root: Path, image_dir: str, mask_dir: str, recursive: bool) -> list[tuple[Path, Path]]:
    """(image folder, mask folder) pairs: folders named ``image_dir`` with a sibling ``mask_dir``."""
    if recursive:
        candidates = sorted((d for d in root.rglob(image_dir) if d.is_dir()), key=str)
    else:
        candidates = [root / image_dir]
    return [(d, d.parent / mask_dir) for d in candidates]


def _pair_folders(folders: list[tuple[Path, Path]]) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """Match images to masks with the same relative folder and stem: (matched, unmatched image -> expected mask)."""
    matched, unmatched = [], []
    for images, masks in folders:
        index = _by_stem(_image_files(masks), masks)
        for img in _image_files(images):
            rel = img.relative_to(images)
            mask = index.get((rel.parent, img.stem))
            if mask is None:
                unmatched.append((img, masks / rel.parent / f"{img.stem}.png"))
            else:
                matched.append((img, mask))
    return matched, unmatched


def _pair_deepglobe(root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """``<id>_sat.<ext>`` with ``<id>_mask.<ext>`` in the same folder."""
    files = _image_files(root)
    index = _by_stem(files, root)
    matched, unmatched = [], []
    for img in (f for f in files if f.stem.endswith("_sat")):
        stem = img.stem[: -len("_sat")] + "_mask"
        mask = index.get((img.relative_to(root).parent, stem))
        if mask is None:
            unmatched.append((img, img.parent / f"{stem}.png"))
        else:
            matched.append((img, mask))
    return matched, unmatched


def _candidate_pairs(root: Path, fmt: str) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """All (image, mask) pairs of ``fmt`` under ``root``, and the images whose mask is missing."""
    if fmt == "deepglobe":
        return _pair_deepglobe(root)
    if fmt == "dubai":
        folders = _sibling_dirs(root, "images", "masks", recursive=True)
    elif fmt in ("loveda", "isprs"):
        folders = _sibling_dirs(root, "img_dir", "ann_dir", recursive=True)
        if fmt == "loveda":
            folders += _sibling_dirs(root, "images_png", "masks_png", recursive=True)
    elif fmt == "openearthmap":
        folders = _sibling_dirs(root, "images", "labels", recursive=True)
    else:  # folder
        folders = _sibling_dirs(root, "images", "masks", recursive=False)
    return _pair_folders(folders)


def _matches_split(rel: Path, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(part, pat) for part in rel.parts for pat in patterns)


def find_pairs(root: str | Path, fmt: str, split: Sequence[str] | None = None) -> list[LabeledPair]:
    """Every image/mask pair of format ``fmt`` under ``root``, sorted by name (the image path relative to root).

    Args:
        root: data folder in the layout of ``fmt`` (module docstring).
        fmt: one of ``FORMATS``.
        split: fnmatch patterns (case-sensitive); a pair is kept if any component of its image path relative to
            ``root`` (folders and file name) matches any pattern, e.g. ``["tile[1-6]"]`` for Dubai tiles 1-6 or
            ``["train"]`` for mmsegmentation split folders. None or empty keeps every pair.

    Images without a mask are skipped with one ``UserWarning`` that counts them and names the first.

    Raises:
        DataError: ``root`` is missing, or no pair is found (the message gives the expected layout), or the
            split patterns match none of the pairs.
        CdkdValueError: unknown ``fmt``.
    """
    _check_format(fmt)
    root = Path(root)
    if not root.is_dir():
        what = "not a folder" if root.exists() else "data folder not found"
        raise DataError(f"{root}: {what} (expected {_LAYOUTS[fmt]})")
    matched, unmatched = _candidate_pairs(root, fmt)
    if not matched:
        detail = (
            f"{len(unmatched)} image(s) without a mask, e.g. {unmatched[0][0].relative_to(root)} "
            f"(looked for {unmatched[0][1].relative_to(root)})"
            if unmatched
            else "no image found"
        )
        raise DataError(f"{root}: no {fmt} image/mask pair found: {detail}; expected {_LAYOUTS[fmt]}")
    if unmatched:
        img, expected = unmatched[0]
        warnings.warn(
            f"{root}: skipped {len(unmatched)} of {len(matched) + len(unmatched)} images that have no mask "
            f"(first: {img.relative_to(root)}, looked for {expected.relative_to(root)})",
            UserWarning,
            stacklevel=2,
        )
    pairs = [LabeledPair(str(img), str(mask), img.relative_to(root).as_posix()) for img, mask in matched]
    patterns = [split] if isinstance(split, str) else list(split or [])
    if patterns:
        kept = [p for p in pairs if _matches_split(Path(p.name), patterns)]
        if not kept:
            raise DataError(
                f"{root}: split {patterns} matches none of the {len(pairs)} {fmt} pairs (e.g. {pairs[0].name}); "
                "patterns are matched against each folder and file name of the image path"
            )
        pairs = kept
    return sorted(pairs, key=lambda p: p.name)


# --------------------------------------------------------------------------------------------------------------
# reading


def _check_sizes(pair: LabeledPair, image_hw: tuple[int, int], mask_hw: tuple[int, int]) -> None:
    if image_hw != mask_hw:
        raise DataError(
            f"{pair.image} is {image_hw[0]}x{image_hw[1]} (rows x columns) but its mask {pair.mask} is "
            f"{mask_hw[0]}x{mask_hw[1]}: image and mask must have the same size"
        )


def _is_gray_ramp(cmap: dict[int, tuple[int, ...]]) -> bool:
    return all(tuple(rgba[:3]) == (i, i, i) for i, rgba in cmap.items())


def _palette(src, schema: ClassSchema) -> dict[int, tuple[int, int, int]] | None:
    """The colour table of a 1-band mask if its pixels should be decoded as colours, else None.

    Some data sets store colour-coded masks as paletted PNGs (18 of Dubai's 72 masks, each with its own entry
    order), where the raw index means nothing. A palette is taken to be the colour coding when the schema has
    no raw value map (an index schema with ``values`` reads raw values) and the palette holds at least one
    class colour; a plain gray ramp is just a grayscale image.
    """
    if schema.value_map is not None or src.colorinterp[0] != ColorInterp.palette:
        return None
    try:
        cmap = src.colormap(1)
    except ValueError:  # palette interpretation without a table
        return None
    if not cmap or _is_gray_ramp(cmap):
        return None
    colors = {i: tuple(int(c) for c in rgba[:3]) for i, rgba in cmap.items()}
    return cast("dict[int, tuple[int, int, int]]", colors) if set(colors.values()) & set(schema.colors) else None


def _decode_palette(
    band: np.ndarray, colors: dict[int, tuple[int, int, int]], schema: ClassSchema, path: str
) -> np.ndarray:
    """(h, w) palette indexes -> class ids through the palette's colours."""
    missing = sorted(set(np.unique(band).tolist()) - set(colors))
    if missing:
        raise DataError(f"{path}: palette mask uses index(es) {missing[:10]} that its colour table lacks")
    lut = np.zeros((max(colors) + 1, 3), dtype=np.uint8)
    for i, c in colors.items():
        lut[i] = c
    return schema.decode_rgb(np.moveaxis(lut[band], -1, 0), path)


def _read_label(path: str, schema: ClassSchema, window: Window | None) -> np.ndarray:
    """Decoded (h, w) int64 label of ``window`` (None: whole mask).

    3+ bands: colour-coded (bands 1-3, alpha ignored); 1-2 bands: band 1 is an index mask, or a colour-coded
    mask stored with a palette (see ``_palette``).
    """
    try:
        with reading(path) as src:
            if window is not None and (
                window.row_off + window.height > src.height or window.col_off + window.width > src.width
            ):
                raise CdkdValueError(f"{path}: window {window} lies outside the {src.height}x{src.width} mask")
            if src.count >= 3:
                return schema.decode_rgb(src.read([1, 2, 3], window=window), path)
            band = src.read(1, window=window)
            colors = _palette(src, schema)
    except CdkdError:
        raise
    except (RasterioError, OSError) as e:
        raise CdkdIOError(f"{path}: cannot read the mask ({gdal_reason(e)})") from e
    if colors is not None:
        return _decode_palette(band, colors, schema, path)
    return schema.decode_index(band, path)


def read_label(pair: LabeledPair, schema: ClassSchema, window: Window4 | None = None) -> np.ndarray:
    """The mask of ``pair`` alone, decoded: (h, w) int64 class ids with ``schema.ignore_index``.

    ``window`` is ``(row, col, height, width)``; None reads the whole mask. Does not look at the image (use
    ``read_pair`` for image validity and the size check).
    """
    return _read_label(pair.mask, schema, _window(window))


def _window(window: Window4 | None) -> Window | None:
    if window is None:
        return None
    row, col, height, width = (int(v) for v in window)
    if height < 1 or width < 1 or row < 0 or col < 0:
        raise CdkdValueError(f"invalid window row={row} col={col} height={height} width={width}")
    return Window(col, row, width, height)


def _read_pair(
    pair: LabeledPair, schema: ClassSchema, bands: tuple[int, ...], window: Window4 | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (C, h, w) raw dtype, valid (h, w) bool, label (h, w) int64) with the size check done."""
    img_h, img_w, _, _ = raster_header(pair.image)
    mask_h, mask_w, _, _ = raster_header(pair.mask)
    _check_sizes(pair, (img_h, img_w), (mask_h, mask_w))
    row, col, h, w = window if window is not None else (0, 0, img_h, img_w)
    label = _read_label(pair.mask, schema, _window((row, col, h, w)))
    image, valid = read_window(pair.image, bands, row, col, h, w)
    return image, valid, label


def read_pair(
    pair: LabeledPair, schema: ClassSchema, bands: Sequence[int], window: Window4 | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one pair, or one window of it.

    Args:
        pair: from ``find_pairs``.
        schema: decodes the mask (``schema_for``).
        bands: 1-based image band indexes.
        window: ``(row, col, height, width)`` in pixels, inside the image; None reads everything.

    Returns:
        ``(image, label)``: image (C, h, w) in the file's dtype; label (h, w) int64 class ids, with
        ``schema.ignore_index`` where the mask says so and where the image pixel is invalid (nodata / alpha /
        internal mask), so that no loss or metric counts a pixel that has no data.

    Masks with 3 or more bands are decoded as colours (bands 1-3), masks with one band as raw values, except
    paletted masks whose palette holds the schema's colours, which are decoded through the palette.

    Raises:
        DataError: image and mask sizes differ (both files and sizes named), unknown colours or values.
        CdkdIOError: a file cannot be read. CdkdValueError: bad band or window.
    """
    image, valid, label = _read_pair(pair, schema, check_bands(bands), window)
    return image, np.where(valid, label, schema.ignore_index)


def class_frequencies(pairs: Sequence[LabeledPair], schema: ClassSchema) -> np.ndarray:
    """(K,) int64 pixel count of each class over the whole masks of ``pairs`` (ignored pixels not counted).

    Reads each mask whole (masks are single-band or small), not the images: image nodata is not subtracted.
    """
    counts = np.zeros(schema.num_classes, dtype=np.int64)
    for pair in pairs:
        label = read_label(pair, schema)
        counts += np.bincount(label[label != schema.ignore_index].ravel(), minlength=schema.num_classes)
    return counts


# --------------------------------------------------------------------------------------------------------------
# training tiles


class LabeledTiles(Dataset):
    """Labeled training tiles of ``tile_size`` x ``tile_size`` pixels, one random window per sample.

    The sampling scheme is ``UnlabeledTiles``'s: ``len(ds)`` is the number of pairs (one epoch) and ``ds[i]``
    accepts any global sample number ``i >= 0``; epoch ``i // len(ds)`` visits the pairs in a permutation seeded
    by ``(seed, epoch)`` and the window, flips and rotation come from a generator seeded by ``(seed, 1, i)``.

    Each item is a dict:

    - ``image``: float32 (C, T, T), normalised with ``stats`` (bands ``stats.bands``), 0 on padding and on
      invalid pixels.
    - ``label``: int64 (T, T) class ids, ``schema.ignore_index`` on padding and on invalid image pixels.
    - ``valid``: bool (T, T), False on padding and on pixels the image file marks invalid. Pixels whose mask
      says 'ignore' stay valid image pixels: ``label`` carries that.

    Image and mask are read through the same window; pairs smaller than the tile are placed top-left and padded.
    Headers are checked when the dataset is built, so a size mismatch or a missing band fails at once.
    """

    def __init__(
        self,
        pairs: Sequence[LabeledPair],
        schema: ClassSchema,
        stats: NormStats,
        tile_size: int,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        self.tile_size = check_tile_size(tile_size)
        if not pairs:
            raise DataError("no labeled image/mask pair to draw training tiles from")
        self.pairs = list(pairs)
        self.schema = schema
        self.stats = stats
        self.augment = bool(augment)
        self.seed = int(seed)
        self.sizes = [self._check_pair(p) for p in self.pairs]

    def _check_pair(self, pair: LabeledPair) -> tuple[int, int]:
        """(height, width) of a pair whose image and mask agree and whose image has the bands of ``stats``."""
        img_h, img_w, count, _ = raster_header(pair.image)
        mask_h, mask_w, _, _ = raster_header(pair.mask)
        _check_sizes(pair, (img_h, img_w), (mask_h, mask_w))
        if count < max(self.stats.bands):
            raise DataError(f"{pair.image}: has {count} bands but the statistics use bands {list(self.stats.bands)}")
        return img_h, img_w

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # as in UnlabeledTiles: legacy __getitem__ iteration would never stop
        return (self[i] for i in range(len(self)))

    def pair_index(self, i: int) -> int:
        """Index into ``pairs`` of global sample ``i`` (``UnlabeledTiles.raster_for``'s permutation scheme)."""
        epoch, k = divmod(i, len(self.pairs))
        return int(np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))[k])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = check_index(i)
        n = self.pair_index(i)
        rng = np.random.default_rng([self.seed, 1, i])
        image, valid, label = self._read_tile(self.pairs[n], self.sizes[n], rng)
        if self.augment:
            # a copy of the generator replays the same draws, so the label gets the image's flips and rotation
            twin = copy.deepcopy(rng)
            image, valid = flip_rotate(image, valid, rng)
            label, _ = flip_rotate(label[None], np.zeros(label.shape, dtype=bool), twin)
            label = label[0]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": torch.from_numpy(np.ascontiguousarray(label)),
            "valid": torch.from_numpy(np.ascontiguousarray(valid)),
        }

    def _read_tile(
        self, pair: LabeledPair, size: tuple[int, int], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalised (C, T, T) image, (T, T) validity and (T, T) label, padded at the bottom/right if needed."""
        t = self.tile_size
        height, width = size
        h, w = min(t, height), min(t, width)
        row = int(rng.integers(0, height - h + 1))
        col = int(rng.integers(0, width - w + 1))
        label = _read_label(pair.mask, self.schema, Window(col, row, w, h))
        pixels, ok = read_window(pair.image, self.stats.bands, row, col, h, w)
        image = np.zeros((len(self.stats.bands), t, t), dtype=np.float32)
        image[:, :h, :w] = self.stats.normalize(pixels, ok)
        valid = np.zeros((t, t), dtype=bool)
        valid[:h, :w] = ok
        out = np.full((t, t), self.schema.ignore_index, dtype=np.int64)
        out[:h, :w] = np.where(ok, label, self.schema.ignore_index)
        return image, valid, out
