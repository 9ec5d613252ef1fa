"""COCO instances: reading (images resolved, split, errors), writing (round trip), and COCO AP against pycocotools."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cdkd.data.coco import encode_mask, object_mask, read_coco, write_coco
from cdkd.errors import DataError
from tests.conftest import make_image, synthetic_image


def _coco(tmp_path, missing: bool = False):
    """A COCO folder: annotations/instances_train.json + images/, two 48x64 images, categories 3 and 7 (not
    contiguous, to check the mapping), one polygon, one compressed RLE and one uncompressed RLE annotation."""
    root = tmp_path / "coco"
    make_image(root / "images" / "a.png", synthetic_image((3, 48, 64), seed=1), "PNG")
    if not missing:
        make_image(root / "images" / "b.png", synthetic_image((3, 48, 64), seed=2), "PNG")
    rle_mask = np.zeros((48, 64), bool)
    rle_mask[30:40, 5:25] = True
    rle_mask[33:36, 10:15] = False  # a hole, which polygons cannot hold
    counts = encode_mask(rle_mask)
    raw = np.zeros((48, 64), bool)
    raw[2:6, 50:60] = True
    flat = raw.flatten(order="F")  # uncompressed RLE: run lengths over the column-major pixels, from a 0-run
    changes = np.flatnonzero(np.diff(np.r_[0, flat.astype(np.int8), 0])) if flat.any() else []
    runs = np.diff(np.r_[0, changes, flat.size]).tolist()
    d = {
        "images": [
            {"id": 11, "file_name": "a.png", "height": 48, "width": 64},
            {"id": 12, "file_name": "b.png", "height": 48, "width": 64},
        ],
        "categories": [{"id": 7, "name": "tank"}, {"id": 3, "name": "ship"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 11,
                "category_id": 3,
                "bbox": [10, 10, 20, 10],
                "area": 200,
                "iscrowd": 0,
                "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]],
            },
            {
                "id": 2,
                "image_id": 11,
                "category_id": 7,
                "bbox": [5, 30, 20, 10],
                "area": 185,
                "iscrowd": 0,
                "segmentation": counts,
            },
            {
                "id": 3,
                "image_id": 12,
                "category_id": 7,
                "bbox": [50, 2, 10, 4],
                "area": 40,
                "iscrowd": 0,
                "segmentation": {"size": [48, 64], "counts": runs},
            },
        ],
    }
    path = root / "annotations" / "instances_train.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(d))
    return root, path, rle_mask, raw


def test_read_resolves_images_maps_categories_and_decodes_every_segmentation(tmp_path):
    root, path, rle_mask, raw = _coco(tmp_path)
    data = read_coco(root)  # the folder: its one JSON file
    assert data.schema.names == ("ship", "tank") and data.category_ids == (3, 7)  # category-id order
    a, b = data.images
    assert a.path == str(root / "images" / "a.png") and (a.id, a.height, a.width) == (11, 48, 64)
    poly, rle = a.objects
    assert poly.class_id == 0 and rle.class_id == 1
    m = object_mask(poly, 48, 64)
    assert m[10:20, 10:30].all() and m.sum() == 200  # pixel centres inside the 20 x 10 polygon
    assert np.array_equal(object_mask(rle, 48, 64), rle_mask)
    assert np.array_equal(object_mask(b.objects[0], 48, 64), raw)
    assert np.array_equal(object_mask(rle, 48, 64, (30, 5, 4, 8)), rle_mask[30:34, 5:13])  # a window of it


def test_write_read_round_trip(tmp_path):
    _, path, _, _ = _coco(tmp_path)
    data = read_coco(path)
    copy = write_coco(path.with_name("copy.json"), data)
    again = read_coco(copy)
    assert again.schema == data.schema and again.category_ids == data.category_ids
    for x, y in zip(data.images, again.images):
        assert (x.id, x.file_name, x.path) == (y.id, y.file_name, y.path)
        assert [o.class_id for o in x.objects] == [o.class_id for o in y.objects]
        for o, p in zip(x.objects, y.objects):
            assert np.array_equal(object_mask(o, x.height, x.width), object_mask(p, y.height, y.width))
            assert o.bbox == p.bbox
    areas = [a["area"] for a in json.loads(copy.read_text())["annotations"]]
    assert areas == [200, 185, 40]  # recomputed from the masks (pycocotools), hole subtracted


def test_split_keeps_matching_images(tmp_path):
    _, path, _, _ = _coco(tmp_path)
    assert [im.file_name for im in read_coco(path, split=["b*"]).images] == ["b.png"]
    with pytest.raises(DataError, match="no image matches --split"):
        read_coco(path, split=["z*"])


def test_missing_images_are_named(tmp_path):
    root, path, _, _ = _coco(tmp_path, missing=True)
    with pytest.raises(DataError, match=r"1 of its 2 images are missing .*first: b.png"):
        read_coco(path)


def test_malformed_files_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_coco(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="not a COCO instances file"):
        read_coco(bad)
    _, path, _, _ = _coco(tmp_path)
    d = json.loads(path.read_text())
    d["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match="category 99"):
        read_coco(path)


def _hand_made():
    """Ground truth: 2 images, 2 categories; detections: hits, a near miss, a false positive, a duplicate."""
    gt = {
        "images": [
            {"id": 1, "height": 60, "width": 60, "file_name": "1"},
            {"id": 2, "height": 60, "width": 60, "file_name": "2"},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}],
        "annotations": [],
    }

    def box_mask(x, y, w, h):
        m = np.zeros((60, 60), bool)
        m[y : y + h, x : x + w] = True
        return m

    for k, (img, cat, box) in enumerate(
        [(1, 1, (5, 5, 20, 20)), (1, 5, (30, 30, 15, 25)), (2, 1, (10, 30, 30, 10)), (2, 5, (40, 5, 8, 8))]
    ):
        gt["annotations"].append(
            {
                "id": k + 1,
                "image_id": img,
                "category_id": cat,
                "bbox": list(box),
                "iscrowd": 0,
                "area": box[2] * box[3],
                "segmentation": encode_mask(box_mask(*box)),
            }
        )
    dets = [
        (1, 1, (6, 5, 20, 20), 0.9),
        (1, 1, (6, 6, 19, 19), 0.4),
        (1, 5, (30, 32, 15, 22), 0.8),
        (2, 1, (12, 30, 30, 10), 0.7),
        (2, 1, (0, 0, 10, 10), 0.95),
        (2, 5, (43, 8, 8, 8), 0.6),
        (1, 5, (0, 40, 10, 10), 0.3),
    ]
    results = [
        {"image_id": i, "category_id": c, "bbox": list(b), "score": s, "segmentation": encode_mask(box_mask(*b))}
        for i, c, b, s in dets
    ]
    return gt, results


def test_coco_metrics_equal_pycocotools_on_a_hand_made_case():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from cdkd.evaluation.instance import coco_metrics

    gt, results = _hand_made()
    ours = coco_metrics(gt, results)
    coco_gt = COCO()
    coco_gt.dataset = json.loads(json.dumps(gt))
    coco_gt.createIndex()
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(coco_gt, coco_gt.loadRes(json.loads(json.dumps(results))), iou_type)
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert [ours[iou_type][k] for k in ("AP", "AP50", "AP75")] == pytest.approx(list(ev.stats[:3]))
        for cat in (1, 5):  # per class: COCOeval run on that category alone
            one = COCOeval(coco_gt, coco_gt.loadRes(json.loads(json.dumps(results))), iou_type)
            one.params.catIds = [cat]
            one.evaluate(), one.accumulate(), one.summarize()
            assert ours[iou_type]["per_class"][cat]["AP"] == pytest.approx(one.stats[0])
            assert ours[iou_type]["per_class"][cat]["AP50"] == pytest.approx(one.stats[1])
    assert 0 < ours["segm"]["AP"] < 1  # the case is not degenerate
    assert coco_metrics(gt, [])["bbox"]["AP"] == 0.0


def test_match_footprints_greedy_one_to_one():
    import shapely

    from cdkd.evaluation.instance import match_footprints

    truth = [shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10)]
    pred = [shapely.box(1, 0, 11, 10), shapely.box(0, 0, 10, 10), shapely.box(20, 0, 24, 10)]
    m = match_footprints(pred, [0.5, 0.9, 0.8], truth)
    # the best-scored exact box takes the first label; the shifted duplicate is left over; 40 % IoU is no match
    assert m["matched"] == 1 and m["precision"] == pytest.approx(1 / 3) and m["recall"] == 0.5
    assert m["mean_iou"] == 1.0 and math.isclose(m["f1"], 0.4)


def test_object_results_use_the_detector_box_and_keep_maskless_detections():
    import shapely

    from cdkd.data.coco import InstanceObject
    from cdkd.evaluation.instance import object_results
    from cdkd.scene.objects import SceneObject

    objects = [
        SceneObject(shapely.box(2, 3, 6, 5), 0, 0.8, 1, (1.5, 2.5, 6.5, 5.5)),
        SceneObject(None, 1, 0.4, 1, (10.0, 10.0, 20.0, 12.0)),
    ]
    with_mask, maskless = object_results(objects, 7, 16, 24, category_ids=(3, 9))
    assert with_mask["bbox"] == [1.5, 2.5, 5.0, 3.0] and with_mask["category_id"] == 3
    mask = object_mask(InstanceObject(0, (0, 0, 0, 0), with_mask["segmentation"]), 16, 24)
    assert mask.sum() == 8 and mask[3:5, 2:6].all()
    assert maskless["bbox"] == [10.0, 10.0, 10.0, 2.0] and maskless["category_id"] == 9
    assert not object_mask(InstanceObject(0, (0, 0, 0, 0), maskless["segmentation"]), 16, 24).any()
    many = [SceneObject(None, 0, s / 200, 1, (0.0, 0.0, 2.0, 2.0)) for s in range(150)]
    assert len(object_results(many, 1, 4, 4, category_ids=(1,))) == 100  # COCOeval's maxDets per class
