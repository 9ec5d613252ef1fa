"""From per-tile detections to whole objects: polygons of the masks, and one object from the pieces of several tiles.

Tiles overlap, so an object near a tile border is seen by two (or four) windows: whole by one and cut by the
other, cut by both, or whole by both. ``ObjectMerger`` joins those pieces into one object by *union by overlap*:
two pieces of the same class from different windows belong to one object when, **inside the part of the image
both windows see**, their masks overlap with an IoU of at least ``iou``. There both windows looked at the same
pixels, so the same object has (nearly) the same mask in both, however much of it either window cut off; two
neighbouring objects do not overlap there. Pieces joined directly or through others form a group, and a group
becomes one object: the union of its polygons, the best score of its pieces. Pieces of one window are never
joined (the detector's own NMS decided about them).

Every piece keeps the detector's box beside its mask. A detection whose mask has no pixel above the threshold
(a weakly trained mask head) still has its box: it counts for box AP, joins other pieces by the overlap of its
box, and an object with no mask at all is written nowhere but counted (``SceneObject.polygon`` is None).

Everything is in the image's pixel coordinates (x = column, y = row), where polygons of pixel masks are exact;
an affine transform maps them into the scene's CRS afterwards, so unions "in map coordinates" and in pixels are
the same. The merger streams: windows come in plan order, and ``pop_final(next_row)`` hands out every group no
later window can reach, so memory holds about one row of windows' objects. Its state (``state``/``restore``) is
plain arrays, for the scene engine's checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import shapely
from rasterio.features import rasterize, shapes
from rasterio.transform import Affine

from cdkd.inference.tiler import TileWindow

MERGE_IOU = 0.5  # pieces whose masks overlap by at least this IoU where both windows see them are one object
MIN_PIXELS = 4  # mask parts smaller than this (px) are specks, not objects


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in image px


@dataclass(frozen=True)
class SceneObject:
    """One object of an image: ``polygon`` of its mask in image pixel coordinates (None when no piece had mask
    pixels), ``box`` the union of its pieces' detector boxes, class id, best score, pieces joined."""

    polygon: shapely.Polygon | None
    class_id: int
    score: float
    pieces: int = 1
    box: Box | None = None


def mask_polygon(mask: np.ndarray, row: int, col: int, min_pixels: int = MIN_PIXELS) -> shapely.Polygon | None:
    """The largest 4-connected part of a (h, w) bool ``mask`` whose top-left pixel is (``row``, ``col``) of the
    image, as a polygon in image pixel coordinates (holes kept), or None when no part has ``min_pixels``.

    A Mask R-CNN mask is one blob up to specks; the object is that blob (specks would make multi-part objects).
    """
    rows = np.flatnonzero(mask.any(1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(0))
    r0, c0 = int(rows[0]), int(cols[0])
    crop = np.ascontiguousarray(mask[r0 : rows[-1] + 1, c0 : cols[-1] + 1], dtype=np.uint8)
    best, best_area = None, 0.0
    for geom, _ in shapes(
        crop, mask=crop.astype(bool), connectivity=4, transform=Affine.translation(col + c0, row + r0)
    ):
        poly = shapely.geometry.shape(geom)
        if poly.area > best_area:
            best, best_area = poly, poly.area
    return best if best_area >= min_pixels else None


@dataclass
class _Piece:
    polygon: shapely.Polygon  # pixel-edged (vertices at pixel corners): the mask, or the rounded box without one
    class_id: int
    score: float
    window: TileWindow
    group: int
    box: Box
    has_mask: bool = True
    bounds: Box = (0.0, 0.0, 0.0, 0.0)  # of the polygon (shapely's, cached)
    _mask: tuple[int, int, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.bounds = tuple(shapely.bounds(self.polygon).tolist())

    def mask(self) -> tuple[int, int, np.ndarray]:
        """(row, col, (h, w) bool) of the piece's pixels over its box: the polygon rasterised back, which gives
        exactly the mask it was traced from (pixel centres inside a pixel-edged polygon)."""
        if self._mask is None:
            x0, y0, x1, y1 = (round(v) for v in self.bounds)
            local = shapely.transform(self.polygon, lambda xy: xy - np.array([x0, y0], dtype=np.float64))
            m = rasterize([(local, 1)], out_shape=(y1 - y0, x1 - x0), fill=0, dtype="uint8").astype(bool)
            self._mask = (y0, x0, m)
        return self._mask

    def pixels(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        """The piece's (bottom - top, right - left) bool mask over that rectangle of the image."""
        r, c, m = self.mask()
        out = np.zeros((bottom - top, right - left), dtype=bool)
        t, lft = max(top, r), max(left, c)
        b, rgt = min(bottom, r + m.shape[0]), min(right, c + m.shape[1])
        if b > t and rgt > lft:
            out[t - top : b - top, lft - left : rgt - left] = m[t - r : b - r, lft - c : rgt - c]
        return out


class ObjectMerger:
    """Joins the pieces of objects cut by (or repeated across) overlapping windows; see the module docstring."""

    def __init__(self, iou: float = MERGE_IOU) -> None:
        if not 0.0 < iou <= 1.0:
            raise ValueError(f"merge IoU must be in (0, 1], got {iou}")
        self.iou = float(iou)
        self.pieces: list[_Piece] = []
        self._parent: dict[int, int] = {}  # union-find over group ids
        self._next_group = 0

    def __len__(self) -> int:
        return len(self.pieces)

    def _find(self, g: int) -> int:
        while self._parent[g] != g:
            self._parent[g] = self._parent[self._parent[g]]
            g = self._parent[g]
        return g

    def _new_group(self) -> int:
        g = self._next_group
        self._next_group += 1
        self._parent[g] = g
        return g

    def add(
        self,
        window: TileWindow,
        polygons: list[shapely.Polygon | None],
        class_ids: list[int],
        scores: list[float],
        boxes: list[Box] | None = None,
    ) -> None:
        """Add the objects one window found: mask polygons in image pixel coordinates (None: no mask pixel) and
        detector boxes (default: the polygons' bounds)."""
        old = self.pieces
        bounds = np.array([p.bounds for p in old]).reshape(-1, 4)
        boxes = boxes if boxes is not None else [tuple(shapely.bounds(p).tolist()) for p in polygons]
        for poly, cid, score, box in zip(polygons, class_ids, scores, boxes):
            box = cast(Box, tuple(float(v) for v in box))
            if poly is None:  # no mask pixel: the box, on pixel edges, stands in for joining
                x0, y0 = np.floor(box[:2])
                x1, y1 = np.maximum(np.ceil(box[2:]), (x0 + 1, y0 + 1))
                piece = _Piece(
                    shapely.box(x0, y0, x1, y1), int(cid), float(score), window, self._new_group(), box, has_mask=False
                )
            else:
                piece = _Piece(poly, int(cid), float(score), window, self._new_group(), box)
            x0, y0, x1, y1 = piece.bounds
            near: np.ndarray | list[int] = (
                np.flatnonzero((bounds[:, 0] < x1) & (bounds[:, 2] > x0) & (bounds[:, 1] < y1) & (bounds[:, 3] > y0))
                if len(old)
                else []
            )
            for k in near:
                other = old[k]
                if other.class_id == piece.class_id and other.window != window and self._same(piece, other):
                    a, b = self._find(piece.group), self._find(other.group)
                    if a != b:
                        self._parent[max(a, b)] = min(a, b)  # the older group's id survives
            self.pieces.append(piece)

    def _same(self, p: _Piece, q: _Piece) -> bool | np.bool_:
        """IoU of the two pieces' pixels inside the part of the image both their windows see (exact, in pixels;
        polygon overlays of pixel-edged shapes that touch along edges trip GEOS)."""
        a, b = p.window, q.window
        top, left = max(a.row, b.row), max(a.col, b.col)
        bottom, right = min(a.row + a.height, b.row + b.height), min(a.col + a.width, b.col + b.width)
        (px0, py0, px1, py1), (qx0, qy0, qx1, qy1) = p.bounds, q.bounds
        top, left = max(top, int(min(py0, qy0))), max(left, int(min(px0, qx0)))
        bottom, right = min(bottom, int(max(py1, qy1))), min(right, int(max(px1, qx1)))
        if bottom <= top or right <= left:
            return False
        ma, mb = p.pixels(top, left, bottom, right), q.pixels(top, left, bottom, right)
        union = int(np.count_nonzero(ma | mb))
        return union > 0 and np.count_nonzero(ma & mb) / union >= self.iou

    def pop_final(self, next_row: float = np.inf) -> list[SceneObject]:
        """The objects no window starting at image row ``next_row`` or below can touch, removed from the merger;
        ``next_row=inf`` (the default) hands out everything. In the order their first piece came."""
        groups: dict[int, list[_Piece]] = {}
        for p in self.pieces:
            groups.setdefault(self._find(p.group), []).append(p)
        final = {g for g, ps in groups.items() if max(p.bounds[3] for p in ps) <= next_row}
        out = [_join(groups[g]) for g in sorted(final)]
        self.pieces = [p for p in self.pieces if self._find(p.group) not in final]
        live = {self._find(p.group) for p in self.pieces}
        self._parent = {p.group: self._find(p.group) for p in self.pieces}
        self._parent.update({g: g for g in live})
        return out

    # ------------------------------------------------------------------------------------------------ state

    def state(self) -> dict[str, np.ndarray]:
        """The pending pieces as plain arrays (``np.savez``-able without pickling)."""
        wkb = [shapely.to_wkb(p.polygon) for p in self.pieces]
        return {
            "wkb": np.frombuffer(b"".join(wkb), dtype=np.uint8),
            "wkb_ends": np.cumsum([len(w) for w in wkb], dtype=np.int64),
            "class_id": np.array([p.class_id for p in self.pieces], dtype=np.int64),
            "score": np.array([p.score for p in self.pieces], dtype=np.float64),
            "window": np.array(
                [[p.window.row, p.window.col, p.window.height, p.window.width] for p in self.pieces], dtype=np.int64
            ).reshape(-1, 4),
            "box": np.array([p.box for p in self.pieces], dtype=np.float64).reshape(-1, 4),
            "has_mask": np.array([p.has_mask for p in self.pieces], dtype=bool),
            "group": np.array([self._find(p.group) for p in self.pieces], dtype=np.int64),
            "next_group": np.array([self._next_group], dtype=np.int64),
        }

    @classmethod
    def restore(cls, state: dict[str, np.ndarray], iou: float = MERGE_IOU) -> ObjectMerger:
        merger = cls(iou)
        buf, ends = state["wkb"].tobytes(), state["wkb_ends"].tolist()
        starts = [0] + ends[:-1]
        for s, e, cid, score, win, g, box, has in zip(
            starts,
            ends,
            state["class_id"].tolist(),
            state["score"].tolist(),
            state["window"].tolist(),
            state["group"].tolist(),
            state["box"].tolist(),
            state["has_mask"].tolist(),
        ):
            merger.pieces.append(_Piece(shapely.from_wkb(buf[s:e]), cid, score, TileWindow(*win), g, tuple(box), has))
            merger._parent[g] = g
        merger._next_group = int(state["next_group"][0])
        return merger


def _join(pieces: list[_Piece]) -> SceneObject:
    masks = [p.polygon for p in pieces if p.has_mask]
    polygon = None if not masks else masks[0] if len(masks) == 1 else shapely.union_all(masks)
    if polygon is not None and polygon.geom_type != "Polygon":  # pieces overlap by construction; a union that
        polygon = max(shapely.get_parts(polygon), key=lambda g: g.area)  # still falls apart keeps its largest part
    boxes = np.array([p.box for p in pieces])
    box = (*boxes[:, :2].min(0).tolist(), *boxes[:, 2:].max(0).tolist())
    return SceneObject(polygon, pieces[0].class_id, max(p.score for p in pieces), len(pieces), box)


__all__ = ["MERGE_IOU", "MIN_PIXELS", "ObjectMerger", "SceneObject", "mask_polygon"]
