"""Georeferenced instance labels: a scene (GeoTIFF) and its footprints (GeoJSON, GeoPackage, any OGR vector).

``read_vector_labels`` turns each footprint into an object of the scene's pixel grid: reprojected into the scene's
CRS when the two differ, moved into pixel coordinates through the inverse of the scene's affine transform
(x = column, y = row), clipped to the scene and kept as a geometry, which ``cdkd.data.coco.object_mask``
rasterises for any window (pixel centres inside the polygon, holes honoured). The result is an ``InstanceData``
like a COCO file's, so training tiles and evaluation do not care where labels came from.

Coordinates only mean something in a CRS: a scene without one whose labels have one is refused (and the other
way round), never guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cdkd.data.classes import ClassSchema
from cdkd.data.coco import InstanceData, InstanceImage, InstanceObject, object_schema
from cdkd.data.files import open_raster
from cdkd.errors import DataError

VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp", ".fgb", ".parquet")
DEFAULT_CLASS = "building"


def _read_vectors(labels: Path, layer: str | None):
    import pyogrio
    from pyogrio.errors import DataLayerError, DataSourceError

    if not labels.is_file():
        raise DataError(f"{labels}: no such vector label file")
    try:
        return pyogrio.read_dataframe(labels, layer=layer)
    except (DataSourceError, DataLayerError) as e:
        raise DataError(f"{labels}: not a readable vector file ({str(e).splitlines()[0]})") from None


def _classes(
    frame, labels: Path, class_field: str | None, schema: ClassSchema | None
) -> tuple[ClassSchema, np.ndarray]:
    """(schema, (n,) class id per feature)."""
    n = len(frame)
    if class_field is None:
        if schema is not None and schema.num_classes != 1:
            raise DataError(
                f"{labels}: the class file lists {schema.num_classes} classes; name the attribute that "
                "holds each footprint's class with --class-field"
            )
        return schema or object_schema([DEFAULT_CLASS]), np.zeros(n, dtype=np.int64)
    if class_field not in frame.columns:
        raise DataError(
            f"{labels}: has no attribute {class_field!r} (attributes: "
            f"{', '.join(c for c in frame.columns if c != 'geometry')})"
        )
    values = frame[class_field].astype(str).to_numpy()
    if schema is None:
        schema = object_schema(sorted(set(values.tolist())))
    index = {name: i for i, name in enumerate(schema.names)}
    unknown = sorted(set(values.tolist()) - set(index))
    if unknown:
        raise DataError(
            f"{labels}: attribute {class_field!r} holds value(s) {unknown[:10]} that are no class of "
            f"{list(schema.names)}"
        )
    return schema, np.array([index[v] for v in values], dtype=np.int64)


def read_vector_labels(
    scene: str | Path,
    labels: str | Path,
    *,
    class_field: str | None = None,
    schema: ClassSchema | None = None,
    layer: str | None = None,
    log: Callable[[str], None] | None = None,
) -> InstanceData:
    """The footprints in ``labels`` as objects of ``scene`` (one image).

    ``class_field``: the attribute naming each footprint's class (None: one class, ``schema``'s only class or
    "building"). ``schema``: the classes (a class file); None derives them from the attribute's values.

    Raises DataError for a scene without CRS whose labels have one (or the reverse), non-polygon geometries, an
    unknown class value, or no footprint inside the scene.
    """
    import shapely

    labels = Path(labels)
    with open_raster(scene) as src:
        crs, transform, height, width = src.crs, src.transform, src.height, src.width
    frame = _read_vectors(labels, layer)
    if frame.crs is not None and crs is None:
        raise DataError(
            f"{scene}: has no CRS but its labels {labels.name} are in {frame.crs.to_string()}; assign "
            "the scene its CRS (gdal_edit.py -a_srs EPSG:XXXX) so the footprints can be placed on it"
        )
    if frame.crs is None and crs is not None:
        raise DataError(
            f"{labels}: has no CRS, so its footprints cannot be placed on {scene} "
            f"({crs.to_string()}); write the labels with their CRS"
        )
    if frame.crs is not None and not frame.crs.equals(crs.to_wkt()):
        (log or (lambda m: None))(
            f"{labels.name}: reprojecting footprints from {frame.crs.to_string()} to the scene's {crs.to_string()}"
        )
        frame = frame.to_crs(crs.to_wkt())
    geoms = frame.geometry.to_numpy()
    kinds = set(shapely.get_type_id(geoms[~shapely.is_missing(geoms)]).tolist()) - {3, 6}  # Polygon, MultiPolygon
    if kinds:
        names = sorted({shapely.GeometryType(k).name for k in kinds})
        raise DataError(f"{labels}: footprints must be polygons, found {', '.join(names)}")
    schema, class_ids = _classes(frame, labels, class_field, schema)
    inverse = ~transform

    def to_pixels(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack((inverse.a * x + inverse.b * y + inverse.c, inverse.d * x + inverse.e * y + inverse.f))

    frame_box = shapely.box(0, 0, width, height)
    objects = []
    for k, (geom, cid) in enumerate(zip(geoms, class_ids)):
        if geom is None or shapely.is_empty(geom):
            continue
        px = shapely.intersection(shapely.make_valid(shapely.transform(geom, to_pixels)), frame_box)
        px = _polygonal(px)
        if px is None or shapely.area(px) <= 0:
            continue
        x0, y0, x1, y1 = (float(v) for v in shapely.bounds(px))
        objects.append(InstanceObject(int(cid), (x0, y0, x1 - x0, y1 - y0), px, False, k + 1))
    if not objects:
        raise DataError(f"{labels}: none of its {len(frame)} footprint(s) lies inside {scene}")
    name = Path(str(scene)).name
    return InstanceData(str(labels), (InstanceImage(str(scene), 1, name, height, width, tuple(objects)),), schema)


def _polygonal(geom):
    """The polygonal part of ``geom`` (clipping or make_valid can leave lines and points), or None."""
    import shapely

    if shapely.get_type_id(geom) in (3, 6):
        return geom
    parts = [g for g in shapely.get_parts(geom) if shapely.get_type_id(g) in (3, 6)]
    return shapely.union_all(parts) if parts else None


def scene_label_pairs(root: str | Path, split: Sequence[str] | None = None) -> list[tuple[Path, Path]]:
    """``(scene, labels)`` pairs in a folder: ``<stem>.tif`` with ``<stem>.<vector suffix>`` beside it."""
    import fnmatch

    root = Path(root)
    pairs = []
    for tif in sorted(list(root.rglob("*.tif")) + list(root.rglob("*.tiff"))):
        if split and not any(fnmatch.fnmatch(p, pat) for pat in split for p in tif.relative_to(root).parts):
            continue
        for suffix in VECTOR_SUFFIXES:
            vec = tif.with_suffix(suffix)
            if vec.is_file():
                pairs.append((tif, vec))
                break
    if not pairs:
        raise DataError(
            f"{root}: holds no <name>.tif with its labels <name>.geojson|.gpkg|... beside it; or pass "
            "the scene as --data and its footprints as --labels"
        )
    return pairs


def read_geo(
    data: str | Path,
    labels: str | Path | None = None,
    *,
    class_field: str | None = None,
    schema: ClassSchema | None = None,
    split: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> InstanceData:
    """``--format geo``: one scene (``data``) with its ``labels``, or a folder of scene/label pairs, as one
    ``InstanceData`` (image ids 1..n)."""
    data = Path(data)
    if data.is_dir():
        if labels is not None:
            raise DataError(f"{data}: --labels goes with one scene file as --data, not a folder of scenes")
        pairs = scene_label_pairs(data, split)
    else:
        if labels is None:
            raise DataError(f"{data}: --format geo needs the footprints: --labels FILE.geojson|.gpkg")
        pairs = [(data, Path(labels))]
    parts = []
    for scene, vec in pairs:
        parts.append(read_vector_labels(scene, vec, class_field=class_field, schema=schema, log=log))
    names = parts[0].schema.names
    for (scene, _), part in zip(pairs, parts):
        if part.schema.names != names:
            raise DataError(
                f"{scene}: its labels' classes {list(part.schema.names)} differ from {list(names)}; give "
                "the classes once with --classes"
            )
    images = tuple(
        InstanceImage(im.path, i + 1, im.file_name, im.height, im.width, im.objects)
        for i, im in enumerate(p.images[0] for p in parts)
    )
    return InstanceData(str(data), images, parts[0].schema)


__all__ = ["DEFAULT_CLASS", "VECTOR_SUFFIXES", "read_geo", "read_vector_labels", "scene_label_pairs"]
