"""Resampling of images and labels between spacings, the anisotropic axis handled separately.

scipy.ndimage is used rather than monai/skimage: `zoom` with `grid_mode=True` aligns voxel
centres exactly the way the affine does and works on any dtype; for cubic splines we prefilter in
float32 in place ourselves (scipy's `zoom` prefilters into a float64 copy). Arrays are `(C, X, Y, Z)` (images, float) and `(X, Y, Z)` (labels, integer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medseg3d.geometry import ANISO_THRESHOLD, compute_new_shape, separate_axis_for

__all__ = [
    "ANISO_THRESHOLD", "compute_new_shape", "linear_rows", "resample_data", "resample_seg", "separate_axis_for",
]

#: Edge padding before the spline prefilter, as scipy's `zoom` pads for mode "nearest".
_SPLINE_PAD = 12


def _zoom(arr: np.ndarray, new_shape: Sequence[int], order: int, out: np.ndarray | None = None) -> np.ndarray:
    """Resample one spatial array `(X, Y, Z)` to `new_shape` with spline `order`, voxel centres aligned.

    Written into `out` when given (shape `new_shape`). Cubic (order > 1) does what
    `ndimage.zoom(prefilter=True, mode="nearest", grid_mode=True)` does (same result to ~1e-7) but
    prefilters in the array's own float type, in place on one padded copy: scipy's `zoom` makes a
    float64 prefiltered copy, twice the input's size in float32, which was the largest allocation
    of preprocessing a CT-sized volume.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(arr.shape) == new_shape:
        if out is None:
            return arr
        out[...] = arr
        return out
    if order > 1:
        ftype = np.float64 if arr.dtype == np.float64 else np.float32
        padded = np.pad(arr.astype(ftype, copy=False), _SPLINE_PAD, mode="edge")
        ndimage.spline_filter(padded, order, output=padded, mode="nearest")
        scale = np.asarray(arr.shape, dtype=float) / np.asarray(new_shape, dtype=float)
        offset = 0.5 * scale - 0.5 + _SPLINE_PAD  # output voxel centre -> input voxel centre (grid mode)
        if out is None:
            out = np.empty(new_shape, dtype=ftype)
        ndimage.affine_transform(padded, scale, offset=offset, output=out, order=order, mode="nearest",
                                 prefilter=False)
        return out
    factors = [n / o for n, o in zip(new_shape, arr.shape, strict=True)]
    res = ndimage.zoom(arr, factors, order=order, mode="nearest", grid_mode=True, prefilter=False)
    if res.shape != new_shape:  # zoom rounds per axis; pad/crop the odd voxel
        res = _fit(res, new_shape)
    if out is None:
        return res
    out[...] = res
    return out


def linear_rows(arr: np.ndarray, new_shape: Sequence[int], start: int, stop: int) -> np.ndarray:
    """Rows `start:stop` (first axis) of `arr` resampled linearly to `new_shape`, voxel centres aligned.

    `arr` is one spatial array `(X, Y, Z)` (or `(X, Y)`) of any float dtype; returns float32
    `(stop - start, *new_shape[1:])`, reading only the input rows those output rows need (a copy of
    at most `stop - start` scaled rows + 2). Linear interpolation is separable, so this equals
    `_resample_one(arr, new_shape, 1, separate_axis, 1)` for any `separate_axis` (same values to
    float32 rounding): the export uses it to resample a large volume one slab at a time.
    """
    new_shape = tuple(int(s) for s in new_shape)
    scale = np.asarray(arr.shape, dtype=float) / np.asarray(new_shape, dtype=float)
    offset = 0.5 * scale - 0.5  # output voxel centre -> input voxel centre (grid mode)
    first = start * scale[0] + offset[0]  # input coordinate of output row `start`
    last = (stop - 1) * scale[0] + offset[0]
    i0 = min(max(0, int(np.floor(first))), arr.shape[0] - 1)
    i1 = min(arr.shape[0], max(i0 + 1, int(np.floor(last)) + 2))
    sub = np.asarray(arr[i0:i1], dtype=np.float32)
    offset[0] = first - i0
    out = np.empty((stop - start, *new_shape[1:]), dtype=np.float32)
    ndimage.affine_transform(sub, scale, offset=offset, output=out, order=1, mode="nearest", prefilter=False)
    return out


def _fit(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    sl = tuple(slice(0, min(a, s)) for a, s in zip(arr.shape, shape))
    out = np.empty(shape, dtype=arr.dtype)
    pad = [(0, max(0, s - a)) for a, s in zip(arr.shape, shape)]
    out[...] = np.pad(arr[sl], pad, mode="edge")
    return out


def _resample_one(
    arr: np.ndarray, new_shape: Sequence[int], order: int, separate_axis: int | None, order_axis: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    if separate_axis is None:
        return _zoom(arr, new_shape, order, out)
    # in-plane first (factor 1 along the coarse axis: a spline interpolates its grid points exactly)
    mid = list(new_shape)
    mid[separate_axis] = arr.shape[separate_axis]
    arr = _zoom(arr, mid, order)
    return _zoom(arr, new_shape, order_axis, out)


def resample_data(
    data: np.ndarray,
    new_shape: Sequence[int],
    *,
    order: int = 3,
    separate_axis: int | None = None,
    order_axis: int = 1,
) -> np.ndarray:
    """Resample every channel of `data` `(C, *spatial)` to `new_shape` (spatial only).

    `order` is the spline order in-plane (3 for images, 1 for probabilities); when `separate_axis`
    is given that axis is resampled afterwards on its own with `order_axis` (1 = linear). Returns
    float32 unless `data` is float64.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if len(new_shape) != data.ndim - 1:
        raise ValueError(f"new_shape {new_shape} must have {data.ndim - 1} entries for data {data.shape}")
    if tuple(data.shape[1:]) == new_shape:
        return data.astype(np.float32, copy=False) if data.dtype != np.float64 else data
    dtype = np.float64 if data.dtype == np.float64 else np.float32
    out = np.empty((data.shape[0], *new_shape), dtype=dtype)
    for c in range(data.shape[0]):  # each channel written straight into `out` (no per-channel temporary)
        _resample_one(data[c].astype(dtype, copy=False), new_shape, order, separate_axis, order_axis, out=out[c])
    return out


def resample_seg(
    seg: np.ndarray,
    new_shape: Sequence[int],
    num_classes: int | None = None,
    *,
    mode: str = "linear_onehot",
    separate_axis: int | None = None,
) -> np.ndarray:
    """Resample a label map `(X, Y, Z)` to `new_shape`.

    `mode="linear_onehot"`: each class' mask is resampled linearly and the voxel takes the class of
    the highest value (smooth boundaries, no class vanishes where it is thick enough);
    `mode="nearest"`: nearest neighbour. With `separate_axis`, that axis goes nearest after the
    in-plane pass. `num_classes` is accepted for symmetry with the predictor; only classes present
    are resampled, and negative values (ignore) are kept as a class of their own. Returns the
    input dtype.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(seg.shape) == new_shape:
        return seg
    if mode == "nearest":
        return _resample_one(seg, new_shape, 0, separate_axis, 0)
    if mode != "linear_onehot":
        raise ValueError(f"unknown label resampling mode {mode!r}; use 'linear_onehot' or 'nearest'")
    classes = np.unique(seg)  # classes absent from `seg` cannot win, so `num_classes` needs no pass
    best = np.full(new_shape, -np.inf, dtype=np.float32)
    out = np.zeros(new_shape, dtype=seg.dtype)
    for c in classes:
        mask = (seg == c).astype(np.float32)
        res = _resample_one(mask, new_shape, 1, separate_axis, 0)
        win = res > best
        out[win] = c
        best[win] = res[win]
    return out
