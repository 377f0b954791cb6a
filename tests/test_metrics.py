"""Hand-computed metric tables on tiny volumes, empty-case conventions, HD95 against MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg3d.evaluation.evaluate import summarize, to_jsonable
from medseg3d.evaluation.metrics import (
    case_metrics,
    confusion_matrix,
    hd95,
    overlap_metrics,
    region_metrics,
    surface,
)

# ref / pred of 8 voxels (2x2x2): hand-computed confusion matrix
# rows ref 0,1,2; columns pred 0,1,2 -> [[3,1,0],[0,2,0],[1,0,1]]
REF = np.array([0, 0, 1, 1, 2, 2, 0, 0], np.int16).reshape(2, 2, 2)
PRED = np.array([0, 1, 1, 1, 2, 0, 0, 0], np.int16).reshape(2, 2, 2)


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(REF, PRED)
    assert cm.tolist() == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert confusion_matrix(REF, PRED, 5).shape == (5, 5)


def test_region_metrics_by_hand():
    # t = [4, 2, 2], p = [4, 3, 1], diag = [3, 2, 1]; IoU = [3/5, 2/3, 1/2]
    m = region_metrics(confusion_matrix(REF, PRED))
    assert m["pa"] == pytest.approx(6 / 8)
    assert m["mpa"] == pytest.approx((3 / 4 + 2 / 2 + 1 / 2) / 3)
    assert m["miou"] == pytest.approx((3 / 5 + 2 / 3 + 1 / 2) / 3)
    assert m["fwiou"] == pytest.approx((4 * 3 / 5 + 2 * 2 / 3 + 2 * 1 / 2) / 8)


def test_region_metrics_class_only_in_prediction():
    # class 2 predicted but absent from the reference: it counts in mIoU (IoU 0), not in MPA
    ref = np.array([0, 0, 1, 1]).reshape(4, 1, 1)
    pred = np.array([0, 2, 1, 1]).reshape(4, 1, 1)
    m = region_metrics(confusion_matrix(ref, pred))
    assert m["pa"] == pytest.approx(3 / 4)
    assert m["mpa"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["fwiou"] == pytest.approx((2 * 0.5 + 2 * 1) / 4)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        (1, {"tp": 2, "fp": 1, "fn": 0, "dice": 4 / 5, "iou": 2 / 3, "precision": 2 / 3, "recall": 1.0,
         "ref_voxels": 2, "pred_voxels": 3, "ref_volume_mm3": 12.0, "pred_volume_mm3": 18.0}),
        (2, {"tp": 1, "fp": 0, "fn": 1, "dice": 2 / 3, "iou": 1 / 2, "precision": 1.0, "recall": 1 / 2,
         "ref_voxels": 2, "pred_voxels": 1, "ref_volume_mm3": 12.0, "pred_volume_mm3": 6.0}),
    ],
)
def test_per_class_metrics_by_hand(label, expected):
    result = case_metrics(REF, PRED, spacing=(1.0, 2.0, 3.0))  # 6 mm^3 per voxel
    assert sorted(result["per_class"]) == [1, 2]
    row = result["per_class"][label]
    for key, value in expected.items():
        assert row[key] == pytest.approx(value), key


def test_hd95_two_voxels_anisotropic():
    ref = np.zeros((4, 4, 4), bool)
    pred = np.zeros((4, 4, 4), bool)
    ref[0, 0, 0] = True
    pred[2, 1, 0] = True
    # 2 voxels x 0.5 mm and 1 voxel x 2 mm apart: sqrt(1 + 4)
    assert hd95(ref, pred, (0.5, 2.0, 3.0)) == pytest.approx(math.sqrt(5))


def test_hd95_percentile_interpolation_anisotropic():
    # ref: a line along x at y=0; pred: the same line at y=1 (2 mm away) plus one voxel at (9, 1, 2)
    ref = np.zeros((10, 3, 3), bool)
    pred = np.zeros((10, 3, 3), bool)
    ref[:, 0, 0] = True
    pred[:, 1, 0] = True
    pred[9, 1, 2] = True
    # pred->ref distances: ten of 2 mm and one of sqrt(2^2 + 2^2); 95th percentile at rank 9.5 of 0..10
    expected = 2.0 + 0.5 * (math.sqrt(8) - 2.0)
    assert hd95(ref, pred, (1.0, 2.0, 1.0)) == pytest.approx(expected)
    assert hd95(pred, ref, (1.0, 2.0, 1.0)) == pytest.approx(expected)  # symmetric
    assert hd95(ref, ref, (1.0, 2.0, 1.0)) == 0.0


def test_surface_of_cube_is_its_shell_and_border_counts():
    mask = np.zeros((5, 5, 5), bool)
    mask[1:4, 1:4, 1:4] = True
    assert surface(mask).sum() == 27 - 1
    full = np.ones((3, 3, 3), bool)  # touches the array border everywhere
    assert surface(full).sum() == 26


@pytest.mark.parametrize(
    ("ref_on", "pred_on", "dice", "iou", "precision", "recall", "hd"),
    [
        (False, False, 1.0, 1.0, 1.0, 1.0, 0.0),  # both empty
        (True, False, 0.0, 0.0, 0.0, 0.0, math.nan),  # empty prediction
        (False, True, 0.0, 0.0, 0.0, 0.0, math.nan),  # empty reference
    ],
)
def test_empty_conventions(ref_on, pred_on, dice, iou, precision, recall, hd):
    ref = np.zeros((6, 6, 6), np.int16)
    pred = np.zeros((6, 6, 6), np.int16)
    if ref_on:
        ref[1:3, 1:3, 1:3] = 1
    if pred_on:
        pred[3:5, 3:5, 3:5] = 1
    row = case_metrics(ref, pred, (1.0, 1.0, 1.0), labels=[1])["per_class"][1]
    assert (row["dice"], row["iou"], row["precision"], row["recall"]) == (dice, iou, precision, recall)
    assert (math.isnan(row["hd95"]) and math.isnan(hd)) or row["hd95"] == hd


def test_all_background_case_region_metrics():
    z = np.zeros((3, 3, 3), np.int16)
    m = case_metrics(z, z, (1.0, 1.0, 1.0))
    assert m["per_class"] == {}
    assert (m["pa"], m["mpa"], m["miou"], m["fwiou"]) == (1.0, 1.0, 1.0, 1.0)


def test_label_absent_from_both_and_nan_never_in_means():
    ref = np.zeros((6, 6, 6), np.int16)
    ref[1:3, 1:3, 1:3] = 1
    pred = ref.copy()
    case_a = {"case": "a", **case_metrics(ref, pred, (1, 1, 1), labels=[1, 2, 3])}
    pred_b = np.zeros_like(ref)  # class 1 missed: HD95 NaN
    case_b = {"case": "b", **case_metrics(ref, pred_b, (1, 1, 1))}
    assert case_a["per_class"][3]["dice"] == 1.0 and case_a["per_class"][3]["hd95"] == 0.0
    summary = summarize([case_a, case_b], labels=[1, 2, 3])
    c1 = summary["per_class_mean"][1]
    assert c1["dice"] == pytest.approx(0.5)
    assert c1["hd95"] == 0.0 and c1["hd95_excluded"] == 1  # NaN left out and counted
    assert summary["per_class_mean"][2]["dice"] == 1.0  # filled in for case b
    assert summary["mean"]["hd95_excluded"] == 1
    assert not any(isinstance(v, float) and math.isnan(v) for v in summary["mean"].values())
    assert to_jsonable(summary)["cases"][1]["per_class"]["1"]["hd95"] is None


def test_overlap_metrics_match_direct_numpy():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = rng.random((9, 8, 7)) > 0.6
        b = rng.random((9, 8, 7)) > 0.5
        tp, fp, fn = int((a & b).sum()), int((~a & b).sum()), int((a & ~b).sum())
        m = overlap_metrics(tp, fp, fn)
        assert m["dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
        assert m["iou"] == pytest.approx((a & b).sum() / (a | b).sum())


def _monai_hd95(ref: np.ndarray, pred: np.ndarray, spacing) -> float:
    from monai.metrics import compute_hausdorff_distance

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(torch.from_numpy(pred[None, None]), torch.from_numpy(ref[None, None]),
                                           percentile=95, spacing=list(spacing))
    return float(value.item())


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_monai_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(12, 30, 3))
    spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, 3))
    ref = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.52
    pred = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.52
    if seed % 2:  # a small object inside a larger image, away from the border
        ref = np.pad(ref[:8, :8, :8], 6)
        pred = np.pad(pred[:8, :8, :8], 6)
    assert ref.any() and pred.any()
    assert hd95(ref, pred, spacing) == pytest.approx(_monai_hd95(ref, pred, spacing), abs=1e-3)
