"""Segmentation metrics on label maps (pure numpy/scipy; no file access).

All arrays are integer label maps of one case in file voxel order, `(X, Y, Z)` (2D `(X, Y)` works
too); `spacing` is the voxel size in mm per axis in the same order.

Definitions (n_ij = voxels of reference class i predicted as j, t_i = sum_j n_ij, p_j = sum_i n_ij):

* per class c: TP = n_cc, FN = t_c - n_cc, FP = p_c - n_cc;
  Dice = 2TP / (2TP + FP + FN); IoU = TP / (TP + FP + FN); precision = TP / (TP + FP);
  recall = TP / (TP + FN). **Zero denominator**: the value is 1 when reference and prediction are
  both empty for that class, else 0 (e.g. empty prediction, non-empty reference: precision 0).
* HD95 (mm): surfaces are the voxels of a mask that touch the outside of the mask through a face
  (mask minus its binary erosion with the 6-neighbourhood, outside the image counts as outside);
  distances are Euclidean in mm from each surface voxel of one mask to the nearest surface voxel of
  the other; HD95 = max(95th percentile of pred->ref, 95th percentile of ref->pred), linear
  interpolation (MONAI's `compute_hausdorff_distance(percentile=95)`). Both empty: 0. Exactly one
  empty: NaN, written as `null` and excluded from means (the number excluded is reported).
* per case, over the classes 0..K-1 (background included) present in reference or prediction:
  PA = sum_i n_ii / sum_i t_i; MPA = mean over i with t_i > 0 of n_ii / t_i;
  IoU_i = n_ii / (t_i + p_i - n_ii); mIoU = mean_i IoU_i; FWIoU = sum_i t_i IoU_i / sum_i t_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from medseg3d.geometry import bounding_box

#: Per-class keys of a case result, in table/CSV order.
CLASS_KEYS = (
    "dice", "iou", "hd95", "precision", "recall", "tp", "fp", "fn",
    "ref_voxels", "pred_voxels", "ref_volume_mm3", "pred_volume_mm3",
)
#: Voxels per bincount chunk in `confusion_matrix`.
_CHUNK = 1 << 23
#: Per-case keys computed from the confusion matrix.
CASE_KEYS = ("pa", "mpa", "miou", "fwiou")


def confusion_matrix(ref: np.ndarray, pred: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """`(K, K)` int64 matrix, rows = reference class, columns = predicted class, in one bincount pass.

    `K` = `num_classes` or `max(ref.max(), pred.max()) + 1`. Labels must be non-negative integers.
    """
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} != prediction shape {pred.shape}")
    top = max(int(ref.max(initial=0)), int(pred.max(initial=0))) + 1
    k = top if num_classes is None else max(int(num_classes), top)
    ref_flat, pred_flat = ref.ravel(), pred.ravel()
    counts = np.zeros(k * k, dtype=np.int64)
    # chunks bound the int64 index array to 64 MB on large CT volumes
    for start in range(0, ref_flat.size, _CHUNK):
        index = ref_flat[start:start + _CHUNK].astype(np.int64) * k
        index += pred_flat[start:start + _CHUNK]
        counts += np.bincount(index, minlength=k * k)
    return counts.reshape(k, k)


def region_metrics(cm: np.ndarray) -> dict[str, float]:
    """PA, MPA, mIoU and FWIoU of one case from its `(K, K)` confusion matrix (see module docstring)."""
    cm = np.asarray(cm, dtype=np.float64)
    t = cm.sum(axis=1)
    p = cm.sum(axis=0)
    diag = np.diag(cm)
    total = t.sum()
    if total == 0:
        return {"pa": 1.0, "mpa": 1.0, "miou": 1.0, "fwiou": 1.0}
    present = (t + p) > 0
    iou = diag[present] / (t[present] + p[present] - diag[present])
    in_ref = t > 0
    return {
        "pa": float(diag.sum() / total),
        "mpa": float(np.mean(diag[in_ref] / t[in_ref])),
        "miou": float(np.mean(iou)),
        "fwiou": float(np.sum(t[present] * iou) / total),
    }


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den > 0:
        return float(num / den)
    return 1.0 if both_empty else 0.0


def overlap_metrics(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Dice, IoU, precision and recall from voxel counts, with the zero-denominator rule above."""
    empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "iou": _ratio(tp, tp + fp + fn, empty),
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
    }


def dice_per_class(ref: np.ndarray, pred: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each class in `labels` between integer label maps `(X, Y, Z)` of equal shape.

    One confusion-matrix pass; Dice = 2TP / (2TP + FP + FN) with the zero-denominator rule above
    (1.0 when the class is absent from both maps, 0.0 when from one). The one Dice of medseg3d:
    `evaluate`, the postprocessing choice and training's final validation all report this value.
    """
    labels = [int(c) for c in labels]
    cm = confusion_matrix(ref, pred, max(labels, default=0) + 1)
    t, p = cm.sum(axis=1), cm.sum(axis=0)
    out = {}
    for c in labels:
        tp = int(cm[c, c])
        out[c] = overlap_metrics(tp, int(p[c]) - tp, int(t[c]) - tp)["dice"]
    return out


def _grow(box: tuple[slice, ...], shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask: mask minus its erosion by the face-neighbourhood cross.

    Voxels on the array border count as surface (outside the array is background).
    """
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(ref_mask: np.ndarray, pred_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two boolean masks `(X, Y, Z)`.

    0 when both are empty, NaN when exactly one is. Surfaces are extracted inside the bounding box
    of the two masks plus one voxel (which holds every surface voxel, so nothing changes), and the
    nearest-surface distances come from a KD-tree on the surface points scaled to mm: exactly the
    Euclidean distances a distance transform gives (tested against MONAI), but the cost scales with
    the number of surface voxels rather than the box volume: 4x faster than scipy's EDT on the
    hippocampus boxes (benchmarks/bench_evaluate.py), more on large organs.
    """
    ref_mask = np.asarray(ref_mask, dtype=bool)
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_box = bounding_box(ref_mask)
    pred_box = bounding_box(pred_mask)
    if ref_box is None and pred_box is None:
        return 0.0
    if ref_box is None or pred_box is None:
        return math.nan
    box = _union_box(ref_box, pred_box, ref_mask.shape)
    return _hd95_in_box(ref_mask[box], pred_mask[box], spacing)


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    box = tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))
    return _grow(box, shape, 1)


def _hd95_in_box(ref_mask: np.ndarray, pred_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 of two non-empty masks cropped with a one-voxel margin (or up to the image border)."""
    ref_surf = surface(ref_mask)
    pred_surf = surface(pred_mask)
    both = (ref_surf & pred_surf).ravel()  # on both surfaces: distance 0, no query needed
    scale = np.asarray([float(s) for s in spacing], dtype=np.float64)
    ref_flat = np.flatnonzero(ref_surf)
    pred_flat = np.flatnonzero(pred_surf)
    ref_pts = np.column_stack(np.unravel_index(ref_flat, ref_surf.shape)) * scale
    pred_pts = np.column_stack(np.unravel_index(pred_flat, pred_surf.shape)) * scale
    ref_only = ~both[ref_flat]
    pred_only = ~both[pred_flat]
    n_both = len(ref_flat) - int(np.count_nonzero(ref_only))
    # unbalanced, non-compact trees build 3x faster and query as fast on surface point clouds
    to_ref = cKDTree(ref_pts, balanced_tree=False, compact_nodes=False).query(pred_pts[pred_only], k=1)[0]
    to_pred = cKDTree(pred_pts, balanced_tree=False, compact_nodes=False).query(ref_pts[ref_only], k=1)[0]
    zeros = np.zeros(n_both)
    return float(max(np.percentile(np.concatenate([zeros, to_ref]), 95),
                     np.percentile(np.concatenate([zeros, to_pred]), 95)))


def empty_class_result() -> dict[str, float | int]:
    """Values of a class absent from both reference and prediction (Dice = IoU = 1, HD95 = 0)."""
    return {
        "dice": 1.0, "iou": 1.0, "hd95": 0.0, "precision": 1.0, "recall": 1.0, "tp": 0, "fp": 0, "fn": 0,
        "ref_voxels": 0, "pred_voxels": 0, "ref_volume_mm3": 0.0, "pred_volume_mm3": 0.0,
    }


def case_metrics(
    ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], labels: Sequence[int] | None = None
) -> dict:
    """Every metric of one case.

    Args:
        ref, pred: integer label maps `(X, Y, Z)` of equal shape, values >= 0.
        spacing: voxel size in mm per axis.
        labels: classes to report; default every non-zero class present in `ref` or `pred`.

    Returns:
        `{"per_class": {c: {dice, iou, hd95 (mm, NaN if one side empty), precision, recall, tp, fp,
        fn, ref_voxels, pred_voxels, ref_volume_mm3, pred_volume_mm3}}, "pa", "mpa", "miou", "fwiou"}`.
    """
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} != prediction shape {pred.shape}")
    if ref.size and (ref.min() < 0 or pred.min() < 0):
        raise ValueError("label maps must hold non-negative integers")
    cm = confusion_matrix(ref, pred)
    k = cm.shape[0]
    t = cm.sum(axis=1)
    p = cm.sum(axis=0)
    if labels is None:
        labels = [c for c in range(1, k) if t[c] + p[c] > 0]
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    # every class' bounding box in one pass over each map (None where the class is absent)
    ref_boxes = ndimage.find_objects(ref, max_label=k - 1)
    pred_boxes = ndimage.find_objects(pred, max_label=k - 1)
    per_class: dict[int, dict] = {}
    for c in labels:
        c = int(c)
        if c >= k or t[c] + p[c] == 0:
            per_class[c] = empty_class_result()
            continue
        tp = int(cm[c, c])
        fn = int(t[c]) - tp
        fp = int(p[c]) - tp
        result: dict = overlap_metrics(tp, fp, fn)
        if t[c] and p[c]:
            box = _union_box(ref_boxes[c - 1], pred_boxes[c - 1], ref.shape)
            result["hd95"] = _hd95_in_box(ref[box] == c, pred[box] == c, spacing)
        else:
            result["hd95"] = math.nan  # exactly one side empty (both empty was handled above)
        result.update(
            tp=tp, fp=fp, fn=fn, ref_voxels=int(t[c]), pred_voxels=int(p[c]),
            ref_volume_mm3=float(t[c]) * voxel_mm3, pred_volume_mm3=float(p[c]) * voxel_mm3,
        )
        per_class[c] = {key: result[key] for key in CLASS_KEYS}
    out: dict = {"per_class": per_class}
    out.update(region_metrics(cm))
    return out
