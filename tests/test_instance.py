"""Instance segmentation: the detector on every student, detector.pt, vector labels through a transform, the
scene engine's cross-border merge (constructed scene), resume, and the errors a user can run into."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from rasterio.transform import Affine

from cdkd.artifacts import InferenceMeta
from cdkd.data.coco import object_mask, object_schema
from cdkd.data.stats import NormStats
from cdkd.errors import CdkdValueError, CheckpointError, DataError, OutputExistsError
from cdkd.inference.tiler import TileWindow
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.core.runstate import output_paths
from cdkd.scene.instances import segment_instances
from cdkd.scene.objects import ObjectMerger, mask_polygon
from tests.conftest import TINY_STUDENT, make_geotiff

QUIET = dict(progress=False, read_threads=0)
TRANSFORM = Affine(10, 0, 500_000, 0, -10, 5_000_000)  # 10 m UTM pixels, as make_geotiff writes
TINY_STUDENTS = {
    "vit_s": TINY_STUDENT,
    "vit_s_win": dict(TINY_STUDENT, global_blocks=(1, 3)),
    "rsmamba_s": {"embed_dim": 32, "depth": 2, "d_inner": 64},
}


# --------------------------------------------------------------------------------------------------------------
# the model


@pytest.mark.parametrize("arch", sorted(TINY_STUDENTS))
def test_detector_trains_and_detects_on_every_student(arch):
    import torch

    from cdkd.models.instance import Detector
    from cdkd.models.student import build_student

    torch.manual_seed(0)
    det = Detector(
        build_student(arch, img_size=64, **TINY_STUDENTS[arch]),
        num_classes=3,
        channels=32,
        box_batch_size_per_image=32,
        detections_per_image=10,
    ).train()
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    target = {"boxes": torch.tensor([[12.0, 10, 40, 30]]), "labels": torch.tensor([2]), "masks": masks}
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 64, 64, dtype=torch.uint8),
    }
    losses = det(torch.randn(2, 3, 64, 64), [target, empty])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in det.encoder.parameters())  # frozen student
    assert det.mask_rcnn.backbone.fpn.outputs[0][0][0].weight.grad is not None
    det.eval()
    with torch.no_grad():
        out = det(torch.randn(1, 3, 64, 64))[0]
    assert out["masks"].shape[1:] == (1, 64, 64) and (out["labels"] >= 1).all() and (out["labels"] <= 3).all()
    with pytest.raises(CdkdValueError, match="multiple of the patch size"):
        det(torch.randn(1, 3, 60, 64))


def test_unfrozen_student_trains_too():
    import torch

    from cdkd.models.instance import Detector
    from cdkd.models.student import build_student

    det = Detector(
        build_student("vit_s", img_size=64, **TINY_STUDENT),
        num_classes=1,
        channels=32,
        freeze_encoder=False,
        box_batch_size_per_image=16,
    ).train()
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 64, 64, dtype=torch.uint8),
    }
    sum(det(torch.randn(1, 3, 64, 64), [empty]).values()).backward()
    assert det.encoder.blocks[-1].mlp.fc2.weight.grad is not None and det.config()["freeze_encoder"] is False


def _tiny_detector(tmp_path, classes=("building", "tank"), tile=64, overlap=16):
    import torch

    from cdkd.artifacts import DetectorInfo, StudentInfo, save_detector
    from cdkd.models.instance import Detector
    from cdkd.models.student import build_student

    torch.manual_seed(0)
    args = dict(TINY_STUDENT, img_size=tile, in_chans=3)
    det = Detector(build_student("vit_s", **args), num_classes=len(classes), channels=32, detections_per_image=10)
    norm = NormStats((100.0,) * 3, (50.0,) * 3, (1, 2, 3), "uint8")
    info = DetectorInfo(StudentInfo("vit_s", args, norm, {}), det.config(), object_schema(list(classes)), tile, overlap)
    save_detector(tmp_path / "detector.pt", det.eval(), info)
    return tmp_path / "detector.pt", det


def test_detector_pt_round_trip_and_runtime(tmp_path):
    import torch

    from cdkd.artifacts import artifact_format, load_detector
    from cdkd.inference.runtimes import RuntimeSpec, open_runtime
    from cdkd.tasks import task_of_model

    path, det = _tiny_detector(tmp_path)
    model, info = load_detector(path)
    assert artifact_format(path) == "cdkd.detector" and info.classes.names == ("building", "tank")
    for a, b in zip(det.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    task = task_of_model(path)
    rt = task.open_runtime(RuntimeSpec(str(path), device="cpu"))
    assert (
        task.name == "instance"
        and rt.meta.task == "instance"
        and rt.meta.tile_size == 64
        and RuntimeSpec(str(path)).meta() == rt.meta
    )
    (found,) = rt.detect(np.zeros((1, 3, 64, 64), np.float32))
    assert found.masks.dtype == bool and found.masks.shape[1:] == (64, 64) and len(found.labels) == len(found.scores)
    assert found.labels.min(initial=0) >= 0 and found.labels.max(initial=0) < 2  # 0-based class ids
    with pytest.raises(CheckpointError):  # the segmenter runtime does not misread a detector
        open_runtime(path, device="cpu")


def test_inference_meta_task_is_backward_compatible():
    meta = InferenceMeta(object_schema(["building"]), NormStats((1.0,), (2.0,), (1,), "uint8"), 64, 16, 1)
    assert "task" not in meta.to_dict() and InferenceMeta.from_json(meta.to_json()).task == "semantic"
    inst = InferenceMeta(meta.classes, meta.norm, 64, 16, 1, task="instance")
    assert InferenceMeta.from_json(inst.to_json()).task == "instance"


# --------------------------------------------------------------------------------------------------------------
# vector labels


def _scene(tmp_path, crs="EPSG:32633", shape=(3, 40, 50)):
    return make_geotiff(tmp_path / "scene.tif", np.full(shape, 120, np.uint8), crs=crs, transform=TRANSFORM)


def _labels(tmp_path, geoms, crs="EPSG:32633", name="labels.gpkg", **fields):
    import geopandas as gpd

    frame = gpd.GeoDataFrame(fields, geometry=list(geoms), crs=crs)
    frame.to_file(tmp_path / name)
    return tmp_path / name


def _map_box(col0, row0, col1, row1):
    """The map-coordinate box of pixels [row0, row1) x [col0, col1) of TRANSFORM."""
    (x0, y0), (x1, y1) = TRANSFORM @ (col0, row0), TRANSFORM @ (col1, row1)
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def test_vector_labels_are_rasterised_through_the_scene_transform(tmp_path):
    from cdkd.data.vector_labels import read_vector_labels

    scene = _scene(tmp_path)
    ring = _map_box(5, 3, 15, 10).difference(_map_box(8, 5, 10, 7))  # a courtyard: holes are kept
    outside = _map_box(100, 100, 110, 110)
    labels = _labels(tmp_path, [ring, _map_box(45, 30, 60, 45), outside], kind=["house", "shed", "house"])
    data = read_vector_labels(scene, labels, class_field="kind")
    im = data.images[0]
    assert (im.height, im.width) == (40, 50) and data.schema.names == ("house", "shed")
    assert len(im.objects) == 2  # the footprint outside the scene is dropped, the one across its edge clipped
    expected = np.zeros((40, 50), bool)
    expected[3:10, 5:15] = True
    expected[5:7, 8:10] = False
    assert np.array_equal(object_mask(im.objects[0], 40, 50), expected)
    assert im.objects[0].bbox == (5.0, 3.0, 10.0, 7.0) and im.objects[1].class_id == 1
    assert object_mask(im.objects[1], 40, 50).sum() == 10 * 5  # clipped to cols 45..49, rows 30..39

    # the same footprint in WGS84 lands on the same pixels (reprojected into the scene's CRS first)
    import geopandas as gpd

    wgs = gpd.GeoSeries([ring], crs="EPSG:32633").to_crs("EPSG:4326")
    again = read_vector_labels(scene, _labels(tmp_path, wgs, crs="EPSG:4326", name="wgs.geojson"))
    assert np.array_equal(object_mask(again.images[0].objects[0], 40, 50), expected)
    assert again.schema.names == ("building",)


def test_vector_label_errors(tmp_path):
    from cdkd.data.vector_labels import read_vector_labels

    labels = _labels(tmp_path, [_map_box(5, 3, 15, 10)])
    with pytest.raises(DataError, match="has no CRS but its labels"):
        read_vector_labels(_scene(tmp_path / "nocrs", crs=None), labels)
    lines = _labels(tmp_path, [shapely.LineString([(500_000, 4_999_900), (500_100, 4_999_800)])], name="l.gpkg")
    with pytest.raises(DataError, match="must be polygons"):
        read_vector_labels(_scene(tmp_path), lines)
    with pytest.raises(DataError, match="no attribute 'kind'"):
        read_vector_labels(_scene(tmp_path), labels, class_field="kind")
    far = _labels(tmp_path, [_map_box(500, 500, 510, 510)], name="far.gpkg")
    with pytest.raises(DataError, match="none of its 1 footprint"):
        read_vector_labels(_scene(tmp_path), far)


def test_instance_tiles_hold_the_visible_objects(tmp_path):
    from cdkd.data.instance_tiles import InstanceTiles, collate_instances
    from cdkd.data.vector_labels import read_vector_labels

    scene = _scene(tmp_path, shape=(3, 40, 50))
    data = read_vector_labels(scene, _labels(tmp_path, [_map_box(5, 3, 15, 10), _map_box(30, 20, 40, 36)]))
    tiles = InstanceTiles(data, NormStats((100.0,) * 3, (50.0,) * 3, (1, 2, 3), "uint8"), 32, augment=True, seed=3)
    for i in range(6):
        item = tiles[i]
        assert item["image"].shape == (3, 32, 32) and item["masks"].shape[1:] == (32, 32)
        for box, mask in zip(item["boxes"], item["masks"]):  # boxes are the masks' tight boxes, after augmentation
            rows, cols = np.flatnonzero(mask.numpy().any(1)), np.flatnonzero(mask.numpy().any(0))
            assert box.tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
        assert (item["labels"] == 1).all()
    assert tiles[4]["masks"].equal(tiles[4]["masks"])  # a pure function of the sample number
    batch = collate_instances([tiles[0], tiles[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and len(batch["targets"]) == 2


# --------------------------------------------------------------------------------------------------------------
# merging across tile borders


class BlobDetector:
    """An instance runtime for constructed scenes: every 4-connected blob of bright pixels (> 0 normalised) in a
    tile is one object, class 0 (1 when its pixels are brighter than 2), score 0.9. It sees only its tile, so an
    object cut by the tile's border comes out cut, as a real detector's would."""

    name, device, max_batch, fixed_tile = "blobs", "cpu", None, False

    def __init__(self, path, tile=64, overlap=16, interrupt_after: int = -1) -> None:
        path.write_bytes(b"a model file")
        self.path, self.options, self.calls, self.interrupt_after = str(path), {}, 0, interrupt_after
        self.meta = InferenceMeta(
            object_schema(["building", "tank"]),
            NormStats((100.0,) * 3, (50.0,) * 3, (1, 2, 3), "uint8"),
            tile,
            overlap,
            3,
            arch="blobs",
            head="blobs",
            task="instance",
        )

    def detect(self, batch):
        from rasterio.features import rasterize, shapes

        from cdkd.data.coco import mask_bbox
        from cdkd.inference.detector_runtimes import Detections

        self.calls += 1
        if self.calls == self.interrupt_after:
            raise KeyboardInterrupt
        out = []
        for tile in batch:
            bright = (tile[0] > 0).astype(np.uint8)
            masks, labels = [], []
            for geom, _ in shapes(bright, mask=bright.astype(bool), connectivity=4):
                m = rasterize([(geom, 1)], out_shape=bright.shape, dtype="uint8").astype(bool)
                masks.append(m)
                labels.append(2 if tile[0][m].mean() > 2 else 1)
            n = len(masks)
            boxes = [mask_bbox(m) for m in masks]
            out.append(
                Detections.from_outputs(
                    np.array(boxes).reshape(n, 4),
                    np.array(labels),
                    np.full(n, 0.9),
                    np.array(masks, dtype=np.float32).reshape(n, 1, *bright.shape),
                )
            )
        return out


BUILDINGS = {  # (row0, row1, col0, col1): what each exercises with 64 px windows overlapping by 16 (stride 48)
    "cut by one border": (40, 60, 40, 90),
    "at a corner of four windows": (90, 120, 85, 110),
    "wider than any window": (150, 175, 10, 140),
    "left of a neighbour": (10, 25, 150, 170),
    "right of it, 1 px apart": (10, 25, 171, 190),
}


@pytest.fixture
def constructed(tmp_path):
    image = np.full((3, 200, 200), 10, np.uint8)
    for r0, r1, c0, c1 in BUILDINGS.values():
        image[:, r0:r1, c0:c1] = 200
    image[:, 185:195, 180:195] = 250  # a brighter object: class "tank"
    return make_geotiff(tmp_path / "constructed.tif", image, transform=TRANSFORM)


def _read(path):
    import pyogrio

    return pyogrio.read_dataframe(path, layer=path.stem)


def test_objects_cut_by_tile_borders_come_out_whole(constructed, tmp_path):
    runtime = BlobDetector(tmp_path / "blobs.model")
    out = tmp_path / "buildings.gpkg"
    report = segment_instances(constructed, runtime, out, SegmentOptions(batch_size=3, **QUIET))
    found = _read(out)
    assert len(found) == len(BUILDINGS) + 1 == report.objects and report.pieces > report.objects
    assert found.crs.to_epsg() == 32633 and list(found.columns[:4]) == ["class_id", "class_name", "score", "area_m2"]
    for r0, r1, c0, c1 in BUILDINGS.values():
        expected = _map_box(c0, r0, c1, r1)
        hits = [g for g in found.geometry if g.intersects(expected)]
        assert len(hits) == 1 and hits[0].equals(expected)  # one polygon, exactly the building
    tank = found[found.class_name == "tank"]
    assert len(tank) == 1 and tank.geometry.iloc[0].equals(_map_box(180, 185, 195, 195))
    assert found.area_m2.to_numpy() == pytest.approx(found.geometry.area.to_numpy(), rel=2e-3)  # UTM: ~ground
    assert (found.score == 0.9).all()
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["objects"] == 6 and saved["classes"]["building"]["objects"] == 5


def test_min_score_and_overlap_rules(constructed, tmp_path):
    runtime = BlobDetector(tmp_path / "blobs.model")
    report = segment_instances(constructed, runtime, tmp_path / "none.gpkg", SegmentOptions(min_score=0.95, **QUIET))
    assert report.objects == 0 and len(_read(tmp_path / "none.gpkg")) == 0
    with pytest.raises(CdkdValueError, match="overlapping windows"):
        segment_instances(constructed, runtime, tmp_path / "a.gpkg", SegmentOptions(overlap=0, **QUIET))
    with pytest.raises(CdkdValueError, match="vector polygons"):
        segment_instances(constructed, runtime, tmp_path / "a.tif", SegmentOptions(**QUIET))
    with pytest.raises(CdkdValueError, match="--edge-context applies to class rasters"):  # not ignored silently
        segment_instances(constructed, runtime, tmp_path / "a.gpkg", SegmentOptions(edge_context=8, **QUIET))
    assert not (tmp_path / "a.gpkg").exists()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        segment_instances(constructed, runtime, tmp_path / "none.gpkg", SegmentOptions(**QUIET))


def test_flatgeobuf_output(constructed, tmp_path):
    import pyogrio

    if "w" not in pyogrio.list_drivers().get("FlatGeobuf", ""):
        pytest.skip("this GDAL cannot write FlatGeobuf")
    segment_instances(constructed, BlobDetector(tmp_path / "m"), tmp_path / "b.fgb", SegmentOptions(**QUIET))
    assert len(pyogrio.read_dataframe(tmp_path / "b.fgb")) == len(BUILDINGS) + 1


def test_resume_writes_what_an_uninterrupted_run_writes(constructed, tmp_path):
    whole = tmp_path / "whole.gpkg"
    segment_instances(constructed, BlobDetector(tmp_path / "m"), whole, SegmentOptions(batch_size=2, **QUIET))
    out = tmp_path / "out.gpkg"
    with pytest.raises(KeyboardInterrupt):  # 4 windows per row, 2 per call: dies in the third window row
        segment_instances(
            constructed,
            BlobDetector(tmp_path / "m", interrupt_after=5),
            out,
            SegmentOptions(batch_size=2, checkpoint_seconds=0, **QUIET),
        )
    assert not out.exists() and (output_paths(out)[3] / "state.json").exists()
    counting = BlobDetector(tmp_path / "m")
    report = segment_instances(constructed, counting, out, SegmentOptions(batch_size=2, resume=True, **QUIET))
    assert report.resumed_from_row == 2 and counting.calls == 4  # rows 3 and 4 only
    a, b = _read(whole), _read(out)
    assert len(a) == len(b) and all(x.equals(y) for x, y in zip(a.geometry, b.geometry))
    assert not output_paths(out)[3].exists()


def test_merger_joins_pieces_but_not_neighbours():
    merger = ObjectMerger()
    left, right = TileWindow(0, 0, 64, 64), TileWindow(0, 48, 64, 64)
    whole = np.zeros((64, 120), bool)
    whole[10:20, 40:90] = True  # cut by the left window's border at 64
    mask_l = whole[:, 0:64]
    mask_r = whole[:, 48:112]
    merger.add(left, [mask_polygon(mask_l, 0, 0)], [0], [0.7])
    merger.add(right, [mask_polygon(mask_r, 0, 48)], [0], [0.8])
    (obj,) = merger.pop_final()
    assert obj.polygon.equals(shapely.box(40, 10, 90, 20)) and obj.score == 0.8 and obj.pieces == 2
    # two neighbours touching inside the shared part of two windows stay two objects
    merger.add(left, [shapely.box(50, 30, 56, 40)], [0], [0.9])
    merger.add(right, [shapely.box(56, 30, 62, 40)], [0], [0.9])
    assert len(merger.pop_final()) == 2
    # a class of its own is never joined
    merger.add(left, [shapely.box(50, 30, 60, 40)], [0], [0.9])
    merger.add(right, [shapely.box(50, 30, 60, 40)], [1], [0.9])
    assert len(merger.pop_final()) == 2
    # a detection without mask pixels joins by its box, and keeps the object's box
    merger.add(left, [None], [0], [0.6], [(40.0, 30.0, 63.5, 40.0)])
    merger.add(right, [shapely.box(48, 30, 70, 40)], [0], [0.9], [(48.0, 30.0, 70.0, 40.0)])
    (obj,) = merger.pop_final()
    assert obj.polygon.equals(shapely.box(48, 30, 70, 40)) and obj.box == (40.0, 30.0, 70.0, 40.0)
    merger.add(left, [None], [0], [0.6], [(1.0, 1.0, 5.0, 5.0)])
    (alone,) = merger.pop_final()
    assert alone.polygon is None and alone.box == (1.0, 1.0, 5.0, 5.0)
    # streaming: a group still reachable by the next window row stays
    merger.add(left, [shapely.box(0, 50, 10, 60)], [0], [0.9])
    assert merger.pop_final(next_row=48) == [] and len(merger.pop_final(next_row=60)) == 1


# --------------------------------------------------------------------------------------------------------------
# errors


def test_evaluate_refuses_categories_that_do_not_match_the_model(tmp_path):
    from cdkd.evaluation.instance import evaluate_instances
    from tests.test_coco import _coco

    path, _ = _tiny_detector(tmp_path)  # classes building, tank; the data's: ship, tank
    _, json_path, _, _ = _coco(tmp_path)
    with pytest.raises(DataError, match="do not match the model's classes"):
        evaluate_instances(path, json_path, tmp_path / "eval", progress=False)


def test_evaluate_writes_metrics_and_a_picture(tmp_path):
    from cdkd.evaluation.instance import evaluate_instances
    from tests.test_coco import _coco

    _, json_path, _, _ = _coco(tmp_path)
    path, _ = _tiny_detector(tmp_path, classes=("ship", "tank"))
    res = evaluate_instances(path, json_path, tmp_path / "eval", progress=False)
    saved = json.loads(res.json_path.read_text())
    assert set(saved["bbox"]["per_class"]) == {"ship", "tank"} and saved["images"] == 2
    assert res.preview_path.read_bytes()[:4] == b"\x89PNG" and "| **all** |" in res.markdown_path.read_text()
    with pytest.raises(OutputExistsError):
        evaluate_instances(path, json_path, tmp_path / "eval", progress=False)


def test_onnx_export_of_a_detector_matches_pytorch(tmp_path):
    from cdkd.export import export_onnx
    from cdkd.inference.runtimes import RuntimeSpec, open_runtime
    from cdkd.scene.core.options import SegmentOptions
    from cdkd.scene.engine import segment_scene
    from cdkd.tasks import task_of_model

    path, _ = _tiny_detector(tmp_path, classes=("ship", "tank"))
    task = task_of_model(path)
    with pytest.raises(CdkdValueError, match="batch 1 only"):
        task.export_onnx(path, tmp_path / "det.onnx", dynamic_batch=True)
    with pytest.raises(CdkdValueError, match="an instance model"):  # the segmenter exporter refuses, in one line
        export_onnx(path, tmp_path / "det.onnx")
    res = task.export_onnx(path, tmp_path / "det.onnx", check_tiles=2)
    assert res.parity.passed and res.parity.agreement == 1.0 and res.batch == 1
    assert task_of_model(tmp_path / "det.onnx").name == "instance"
    rt = task.open_runtime(RuntimeSpec(str(tmp_path / "det.onnx")))
    assert rt.name == "onnx" and rt.meta.task == "instance" and rt.meta.classes.names == ("ship", "tank")
    with pytest.raises(CdkdValueError, match="instance task"):  # not misread as a segmenter's logits
        open_runtime(tmp_path / "det.onnx")
    with pytest.raises(CdkdValueError, match="makes no class raster"):
        segment_scene(tmp_path / "none.tif", rt, tmp_path / "none_lc.tif", SegmentOptions(progress=False))
    assert res.parity.detections[0] > 0  # the comparison compared something
