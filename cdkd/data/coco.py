"""Object instances: COCO files read and written, and one in-memory form shared with georeferenced vector labels.

An ``InstanceData`` is a set of images, each with its objects (class, box, mask), and the class schema of those
objects. It comes from a COCO instances file (``read_coco``) or from a scene and its vector footprints
(``cdkd.data.vector_labels.read_vector_labels``), and everything downstream (training tiles, evaluation) takes it
as it is. COCO category ids (any integers, not necessarily contiguous) become class ids 0..K-1 in category-id
order; ``category_ids`` keeps the way back, so predictions are written with the file's own ids.

Masks: an object's segmentation is what the source holds (COCO polygons, RLE either compressed or not, or a
shapely geometry in pixel coordinates for vector labels) and is rasterised only for the window asked
(``object_mask``): a scene with thousands of footprints never holds them as full-size rasters. Pixel coordinates
follow COCO and rasterio alike: x = column, y = row, pixel (r, c) covers [c, c + 1) x [r, r + 1).

Finding the images of a COCO file: its ``file_name`` entries are looked up relative to, in order, the folder
given, ``<root>/images``, ``<root>/<split>/images``, ``<root>/<split>/image``, ``<root>/<split>``, ``<root>`` and
the JSON file's own folder, where ``<root>`` is the folder above ``annotations/`` and ``<split>`` a word of the
JSON's name (``train_instances.json`` -> ``train``, ``instances_val2017.json`` -> ``val2017``). The first folder
that holds every image wins; if none does, the error names the missing images and the folders tried.
"""

from __future__ import annotations

import colorsys
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np

from cdkd.data.classes import ClassSchema, LandCoverClass
from cdkd.errors import CdkdValueError, DataError

INSTANCE_FORMATS = ("coco", "geo")  # COCO JSON + images | GeoTIFF scene(s) + vector footprints


@dataclass(frozen=True)
class InstanceObject:
    """One object: ``class_id`` (0-based), ``bbox`` (x, y, w, h) in px and its segmentation (see module docs)."""

    class_id: int
    bbox: tuple[float, float, float, float]
    segmentation: Any
    iscrowd: bool = False
    id: int = 0


@dataclass(frozen=True)
class InstanceImage:
    """One image file (or scene) and its objects; ``id`` and ``file_name`` are the COCO ones."""

    path: str
    id: int
    file_name: str
    height: int
    width: int
    objects: tuple[InstanceObject, ...] = ()


@dataclass(frozen=True)
class InstanceData:
    """Images with their objects, the class schema and each class's COCO category id (index = class id)."""

    source: str
    images: tuple[InstanceImage, ...]
    schema: ClassSchema
    category_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.category_ids:
            object.__setattr__(self, "category_ids", tuple(range(1, self.schema.num_classes + 1)))

    @property
    def num_objects(self) -> int:
        return sum(len(im.objects) for im in self.images)

    def to_coco(self) -> dict[str, Any]:
        """A COCO instances dict (ground truth for ``pycocotools``, or to write with ``write_coco``).

        Geometries (vector labels) become compressed RLE over the whole image; COCO segmentations pass as they are.
        """
        categories = [{"id": cid, "name": c.name} for cid, c in zip(self.category_ids, self.schema.classes)]
        images, annotations, next_id = [], [], 1
        for im in self.images:
            images.append({"id": im.id, "file_name": im.file_name, "height": im.height, "width": im.width})
            for obj in im.objects:
                seg = obj.segmentation
                if not isinstance(seg, (list, dict)):
                    seg = encode_mask(object_mask(obj, im.height, im.width))
                ann_id = obj.id or next_id
                next_id = max(next_id, ann_id) + 1
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": im.id,
                        "category_id": self.category_ids[obj.class_id],
                        "bbox": [float(v) for v in obj.bbox],
                        "area": float(_area(seg, im)),
                        "segmentation": seg,
                        "iscrowd": int(obj.iscrowd),
                    }
                )
        return {"images": images, "annotations": annotations, "categories": categories}


# --------------------------------------------------------------------------------------------------------------
# masks


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> COCO compressed RLE with ``counts`` as text (JSON-safe)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as one compressed RLE (pycocotools)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def _area(segmentation: Any, image: InstanceImage) -> float:
    from pycocotools import mask as mask_utils

    return float(mask_utils.area(_rle(segmentation, image.height, image.width)))


def object_mask(
    obj: InstanceObject, height: int, width: int, window: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """The object's (h, w) bool mask over ``window`` = (row, col, h, w) of its (``height``, ``width``) image
    (None: the whole image)."""
    row, col, h, w = window if window is not None else (0, 0, height, width)
    seg = obj.segmentation
    if isinstance(seg, (list, dict)):
        from pycocotools import mask as mask_utils

        full = mask_utils.decode(_rle(seg, height, width)).astype(bool)
        return full[row : row + h, col : col + w]
    import shapely
    from rasterio.features import rasterize

    if shapely.is_empty(seg):
        return np.zeros((h, w), dtype=bool)
    # pixel centres inside the geometry, the rule GDAL and pycocotools share (all_touched=False)
    local = shapely.transform(seg, lambda xy: xy - np.array([col, row], dtype=np.float64))
    return rasterize([(local, 1)], out_shape=(h, w), fill=0, dtype="uint8").astype(bool)


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight (x0, y0, x1, y1) px box of a (H, W) bool mask (x1, y1 exclusive), None when it is empty."""
    rows = np.flatnonzero(mask.any(1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


# --------------------------------------------------------------------------------------------------------------
# class schemas


def _palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct display colours: hues a golden angle apart (no two alike, however many classes)."""
    out: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    k = 0
    while len(out) < n:
        h = (0.61803398875 * k) % 1.0
        v = 0.95 - 0.25 * ((k // 7) % 3)
        rgb = cast("tuple[int, int, int]", tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, v)))
        if rgb not in seen:
            seen.add(rgb)
            out.append(rgb)
        k += 1
    return out


def object_schema(names: Sequence[str], colors: Sequence[Any] | None = None) -> ClassSchema:
    """A schema of object classes ``names`` (ids 0..K-1 in that order), coloured by ``_palette`` unless given."""
    colors = list(colors) if colors is not None else _palette(len(names))
    return ClassSchema(tuple(LandCoverClass(i, n, c) for i, (n, c) in enumerate(zip(names, colors))))


# --------------------------------------------------------------------------------------------------------------
# reading


def find_coco_json(data: str | Path) -> Path:
    """``data`` itself when it is a JSON file, else the one COCO JSON file below the folder ``data``."""
    data = Path(data)
    if data.is_file():
        return data
    if not data.is_dir():
        raise DataError(f"{data}: no such COCO file or folder")
    found = sorted(data.rglob("*.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"{data}: holds no COCO JSON file (expected e.g. annotations/instances_train.json)")
    names = ", ".join(str(p.relative_to(data)) for p in found[:6])
    raise DataError(f"{data}: holds {len(found)} JSON files ({names}); pass the COCO file itself as --data")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise DataError(f"{path}: cannot read the COCO file ({e.strerror or e})") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a COCO instances file (the top level is not an object)")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(d.get(k), list)]
    if missing:
        raise DataError(f"{path}: not a COCO instances file (no {', '.join(missing)} list)")
    return d


def _split_words(json_path: Path) -> list[str]:
    words = [w for w in json_path.stem.replace("-", "_").split("_") if w and w.lower() not in ("instances", "coco")]
    return words


def image_folders(json_path: Path, images: str | Path | None = None) -> list[Path]:
    """The folders a COCO file's ``file_name`` entries are looked up in, in order (module docstring)."""
    here = json_path.parent
    root = here.parent if here.name == "annotations" else here
    out = [Path(images)] if images is not None else []
    out.append(root / "images")
    for w in _split_words(json_path):
        out += [root / w / "images", root / w / "image", root / w]
    out += [root, here]
    return list(dict.fromkeys(out))


def _resolve_images(json_path: Path, file_names: list[str], images: str | Path | None) -> Path:
    folders = image_folders(json_path, images)
    best, best_missing = None, None
    for folder in folders:
        missing = [f for f in file_names if not (folder / f).is_file()]
        if not missing:
            return folder
        if folder.is_dir() and (best_missing is None or len(missing) < len(best_missing)):
            best, best_missing = folder, missing
    if best is None or best_missing is None:
        tried = ", ".join(str(f) for f in folders)
        raise DataError(f"{json_path}: none of its {len(file_names)} images was found; looked in {tried}")
    raise DataError(
        f"{json_path}: {len(best_missing)} of its {len(file_names)} images are missing from {best} "
        f"(first: {best_missing[0]}); looked in {', '.join(str(f) for f in folders)}"
    )


def _matches(file_name: str, patterns: Sequence[str]) -> bool:
    parts = Path(file_name).parts
    return any(fnmatch.fnmatch(p, pat) for pat in patterns for p in parts + (Path(file_name).stem,))


def _categories(path: Path, cats: list[Any]) -> tuple[ClassSchema, tuple[int, ...]]:
    try:
        pairs = sorted((int(c["id"]), str(c["name"])) for c in cats)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: every category needs an integer id and a name") from None
    if not pairs:
        raise DataError(f"{path}: lists no category")
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: category ids repeat ({ids})")
    try:
        schema = object_schema([n for _, n in pairs])
    except CdkdValueError as e:
        raise DataError(f"{path}: categories cannot form a class schema ({e})") from None
    return schema, tuple(ids)


def read_coco(path: str | Path, split: Sequence[str] | None = None, images: str | Path | None = None) -> InstanceData:
    """Read a COCO instances file (or the one below a folder) with every image resolved to a file.

    ``split``: fnmatch patterns; only images whose file name (a folder of it, its name or stem) matches one are
    kept (e.g. ``["[0-4]*"]``). ``images``: the image folder, when it is none of the usual places.

    Raises DataError for an unreadable or malformed file, missing images, annotations of unknown images or
    categories, and a split that keeps no image.
    """
    json_path = find_coco_json(path)
    d = _load_json(json_path)
    schema, category_ids = _categories(json_path, d["categories"])
    class_of = {cid: k for k, cid in enumerate(category_ids)}
    try:
        entries = [(int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"])) for im in d["images"]]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{json_path}: every image needs id, file_name, height and width") from None
    if split:
        entries = [e for e in entries if _matches(e[1], split)]
        if not entries:
            raise DataError(f"{json_path}: no image matches --split {','.join(split)}")
    if not entries:
        raise DataError(f"{json_path}: lists no image")
    folder = _resolve_images(json_path, [e[1] for e in entries], images)
    objects: dict[int, list[InstanceObject]] = {e[0]: [] for e in entries}
    known_images = {int(im["id"]) for im in d["images"]}
    for ann in d["annotations"]:
        try:
            image_id, cat = int(ann["image_id"]), int(ann["category_id"])
            bbox = tuple(float(v) for v in ann["bbox"])
            seg = ann["segmentation"]
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{json_path}: annotation {ann.get('id', '?')} lacks image_id, category_id, bbox or segmentation"
            ) from None
        if image_id not in known_images:
            raise DataError(
                f"{json_path}: annotation {ann.get('id', '?')} refers to image {image_id}, which the file does not list"
            )
        if cat not in class_of:
            raise DataError(
                f"{json_path}: annotation {ann.get('id', '?')} has category {cat}, which the file does not list"
            )
        if image_id in objects and len(bbox) == 4:
            objects[image_id].append(
                InstanceObject(class_of[cat], bbox, seg, bool(ann.get("iscrowd", 0)), int(ann.get("id", 0)))
            )
    imgs = tuple(InstanceImage(str(folder / name), i, name, h, w, tuple(objects[i])) for i, name, h, w in entries)
    for im in imgs:
        _check_declared_size(json_path, im)
    return InstanceData(str(json_path), imgs, schema, category_ids)


def _check_declared_size(json_path: Path, image: InstanceImage) -> None:
    """The size the file declares for an image must be the image's: polygons and RLE masks are decoded at the
    declared size, so a wrong one misplaces or crops every object of the image without a word."""
    from cdkd.data.files import raster_header

    height, width = raster_header(image.path)[:2]
    if (height, width) != (image.height, image.width):
        raise DataError(
            f"{json_path}: image {image.id} ({image.file_name}) is declared {image.height}x{image.width} "
            f"(rows x columns) but {image.path} is {height}x{width}; fix the file's height and width"
        )


def write_coco(path: str | Path, coco: dict[str, Any] | InstanceData) -> Path:
    """Write a COCO dict (or ``InstanceData.to_coco()``) as JSON, atomically; returns the path."""
    from cdkd.utils.atomic import atomic_write_text

    d = coco.to_coco() if isinstance(coco, InstanceData) else coco
    atomic_write_text(Path(path), json.dumps(d))
    return Path(path)


__all__ = [
    "INSTANCE_FORMATS",
    "InstanceData",
    "InstanceImage",
    "InstanceObject",
    "encode_mask",
    "find_coco_json",
    "image_folders",
    "mask_bbox",
    "object_mask",
    "object_schema",
    "read_coco",
    "write_coco",
]
