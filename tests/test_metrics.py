"""Segmentation metrics against confusion matrices and scores worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cdkd.errors import CdkdValueError
from cdkd.evaluation.metrics import MetricAccumulator, SegMetrics, confusion_matrix

IGN = 255
# 2 x 3 label map with one ignored pixel; its prediction (2) must not be counted anywhere.
TARGET = np.array([[0, 0, 0], [1, IGN, 2]])
PRED = np.array([[0, 0, 1], [1, 2, 1]])
# rows = ground truth, columns = prediction:
#   class 0: pixels (0,0) (0,1) right, (0,2) taken for 1
#   class 1: pixel (1,0) right
#   class 2: pixel (1,2) taken for 1
EXPECTED_CM = np.array([[2, 1, 0], [0, 1, 0], [0, 1, 0]])
NAMES = ["water", "forest", "urban"]


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TARGET, num_classes=3, ignore_index=IGN)
    assert cm.dtype == np.int64 and cm.shape == (3, 3)
    np.testing.assert_array_equal(cm, EXPECTED_CM)


def test_confusion_matrix_without_ignore_counts_every_pixel():
    t = np.array([0, 1, 1, 2])
    p = np.array([0, 1, 2, 2])
    np.testing.assert_array_equal(confusion_matrix(p, t, 3, ignore_index=None), [[1, 0, 0], [0, 1, 1], [0, 0, 1]])


def test_confusion_matrix_torch_uint8_any_shape():
    """uint8 labels: K * t must not overflow (20 * 19 = 380 > 255); tensors of any shape are accepted."""
    t = torch.tensor([[[19, 0], [IGN, 19]]], dtype=torch.uint8)
    p = torch.tensor([[[19, 19], [3, 0]]], dtype=torch.uint8)
    cm = confusion_matrix(p, t, 20)
    expected = np.zeros((20, 20), dtype=np.int64)
    expected[19, 19] = 1
    expected[0, 19] = 1
    expected[19, 0] = 1
    np.testing.assert_array_equal(cm, expected)


def test_confusion_matrix_matches_naive_loop():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, size=(3, 17, 11))
    t[rng.random(t.shape) < 0.1] = IGN
    p = rng.integers(0, 4, size=t.shape)
    naive = np.zeros((4, 4), dtype=np.int64)
    for ti, pi in zip(t.ravel(), p.ravel()):
        if ti != IGN:
            naive[ti, pi] += 1
    np.testing.assert_array_equal(confusion_matrix(p, t, 4), naive)


def test_confusion_matrix_all_ignored_is_zero():
    np.testing.assert_array_equal(confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), IGN), 3), 0)


@pytest.mark.parametrize(
    "pred, target, match",
    [
        (np.array([0, 1]), np.array([0, 3]), r"target holds class 3, outside \[0, 3\)"),
        (np.array([0, 1]), np.array([0, -1]), "target holds class -1"),
        (np.array([0, 5]), np.array([0, 1]), "pred holds class 5"),
        (np.array([0.0, 1.0]), np.array([0, 1]), "integer class indices"),
        (np.array([0, 1, 2]), np.array([0, 1]), "shape"),
    ],
)
def test_confusion_matrix_rejects_bad_input(pred, target, match):
    with pytest.raises(CdkdValueError, match=match):
        confusion_matrix(pred, target, 3)


def test_scores_by_hand():
    m = SegMetrics.from_confusion(EXPECTED_CM, NAMES)
    # TP = (2, 1, 0); ground-truth totals (3, 1, 1); prediction totals (2, 3, 0)
    # IoU = TP / (gt + pred - TP)
    np.testing.assert_allclose(m.iou, [2 / 3, 1 / 3, 0 / 1])
    # F1 = 2 TP / (gt + pred)
    np.testing.assert_allclose(m.f1, [4 / 5, 2 / 4, 0 / 1])
    np.testing.assert_allclose(m.precision, [2 / 2, 1 / 3, np.nan])  # class 2 never predicted: undefined
    np.testing.assert_allclose(m.recall, [2 / 3, 1 / 1, 0 / 1])
    np.testing.assert_array_equal(m.support, [3, 1, 1])
    assert m.oa == pytest.approx(3 / 5)
    assert m.miou == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert m.mf1 == pytest.approx((4 / 5 + 1 / 2 + 0) / 3)
    assert m.macc == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_absent_class_is_nan_and_left_out_of_means():
    cm = np.zeros((4, 4), dtype=np.int64)
    cm[:3, :3] = EXPECTED_CM  # class 3: neither in the ground truth nor predicted
    m = SegMetrics.from_confusion(cm)
    assert math.isnan(m.iou[3]) and math.isnan(m.f1[3])
    assert m.miou == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)  # mean over the 3 defined classes, not 4
    assert m.mf1 == pytest.approx((4 / 5 + 1 / 2 + 0) / 3)
    assert m.oa == pytest.approx(3 / 5)
    assert m.class_names == ["0", "1", "2", "3"]


def test_class_only_predicted_has_iou_zero():
    # target [0, 0], prediction [0, 1]: class 1 is predicted once and never true
    cm = confusion_matrix(np.array([0, 1]), np.array([0, 0]), 2)
    np.testing.assert_array_equal(cm, [[1, 1], [0, 0]])
    m = SegMetrics.from_confusion(cm)
    assert m.iou[1] == 0.0 and m.f1[1] == 0.0  # 0 / (0 + 1 - 0), not NaN
    assert m.iou[0] == pytest.approx(1 / 2)
    assert m.miou == pytest.approx((1 / 2 + 0) / 2)
    assert math.isnan(m.recall[1]) and m.precision[1] == 0.0


def test_empty_matrix_gives_nan_everywhere():
    m = SegMetrics.from_confusion(np.zeros((2, 2), dtype=np.int64))
    assert math.isnan(m.oa) and math.isnan(m.miou) and np.isnan(m.iou).all()


def test_bad_matrix_and_names():
    with pytest.raises(CdkdValueError, match="square"):
        SegMetrics.from_confusion(np.zeros((2, 3)))
    with pytest.raises(CdkdValueError, match="negative"):
        SegMetrics.from_confusion(np.array([[1, -1], [0, 1]]))
    with pytest.raises(CdkdValueError, match="2 class names"):
        SegMetrics.from_confusion(EXPECTED_CM, ["a", "b"])


def test_accumulator_two_batches_equal_one_big_batch():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 5, size=(6, 16, 16))
    t[rng.random(t.shape) < 0.05] = IGN
    p = rng.integers(0, 5, size=t.shape)
    acc = MetricAccumulator(5)
    acc.update(torch.from_numpy(p[:2]), torch.from_numpy(t[:2]))
    acc.update(p[2:], t[2:])
    whole = confusion_matrix(p, t, 5)
    np.testing.assert_array_equal(acc.compute().confusion, whole)
    assert acc.compute().miou == pytest.approx(SegMetrics.from_confusion(whole).miou)
    acc.reset()
    assert acc.compute().confusion.sum() == 0


def test_to_dict_is_json_safe_and_round_trips():
    cm = np.zeros((4, 4), dtype=np.int64)
    cm[:3, :3] = EXPECTED_CM
    m = SegMetrics.from_confusion(cm, NAMES + ["snow"])
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))  # raises on any NaN left
    assert d["iou"][3] is None and d["precision"][2] is None
    assert d["miou"] == pytest.approx(1 / 3)
    assert d["class_names"] == NAMES + ["snow"]
    back = SegMetrics.from_dict(d)
    np.testing.assert_array_equal(back.confusion, cm)
    assert back.miou == pytest.approx(m.miou)


def test_markdown_table():
    table = SegMetrics.from_confusion(EXPECTED_CM, NAMES).markdown_table()
    for name in NAMES:
        assert f"| {name} |" in table
    assert "| water | 66.67 | 80.00 | 3 |" in table
    assert "| urban | 0.00 | 0.00 | 1 |" in table
    assert "33.33" in table  # mIoU = 1/3
    assert "OA 60.00 %" in table
    assert "43.33" in table  # mF1 = 1.3 / 3


def test_markdown_table_marks_undefined():
    cm = np.zeros((3, 3), dtype=np.int64)
    cm[:2, :2] = [[1, 0], [0, 1]]
    assert "| 2 | n/a | n/a | 0 |" in SegMetrics.from_confusion(cm).markdown_table()


@pytest.mark.parametrize("normalize", ["true", None])
def test_plot_confusion_writes_png(tmp_path, normalize):
    path = SegMetrics.from_confusion(EXPECTED_CM, NAMES).plot_confusion(tmp_path / "out" / "cm.png", normalize)
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_confusion_many_classes_and_bad_normalize(tmp_path):
    cm = np.random.default_rng(2).integers(0, 50, size=(15, 15))
    m = SegMetrics.from_confusion(cm)
    assert m.plot_confusion(tmp_path / "big.png").stat().st_size > 1000  # K > 12: no cell labels
    with pytest.raises(CdkdValueError, match="normalize"):
        m.plot_confusion(tmp_path / "x.png", normalize="rows")
