"""Crop a case to the bounding box of its non-zero region (over all channels).

Arrays are `(C, X, Y, Z)` images and `(X, Y, Z)` labels; the bounding box is per spatial axis
`[lo, hi)` in voxels of the original array.
"""

from __future__ import annotations

import numpy as np

from medseg3d.geometry import bounding_box


def bbox_of_mask(mask: np.ndarray) -> list[list[int]]:
    """Per-axis `[lo, hi)` of the True voxels (`geometry.bounding_box` as JSON-able lists); the whole
    array when the mask is empty."""
    box = bounding_box(mask)
    if box is None:
        return [[0, int(s)] for s in mask.shape]
    return [[s.start, s.stop] for s in box]


def crop_to_bbox(array: np.ndarray, bbox: list[list[int]]) -> np.ndarray:
    """Crop the trailing `len(bbox)` axes of `array` to `bbox` (leading axes, e.g. channels, kept)."""
    lead = (slice(None),) * (array.ndim - len(bbox))
    return array[lead + tuple(slice(lo, hi) for lo, hi in bbox)]


def crop_to_nonzero(
    data: np.ndarray, seg: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, list[list[int]]]:
    """Crop image `(C, X, Y, Z)` (and label `(X, Y, Z)`) to the non-zero bounding box of the image.

    Returns `(data_cropped, seg_cropped_or_None, bbox)`; the crop is a view when possible.
    """
    mask = np.any(data != 0, axis=0)  # holes do not change a bounding box, so no fill here
    bbox = bbox_of_mask(mask)
    return crop_to_bbox(data, bbox), (None if seg is None else crop_to_bbox(seg, bbox)), bbox


def uncrop(array: np.ndarray, bbox: list[list[int]], full_shape: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Inverse of `crop_to_bbox`: place `array` (`(..., x, y, z)`) into a `fill`ed array of spatial `full_shape`."""
    lead = array.shape[: array.ndim - len(bbox)]
    out = np.full(lead + tuple(full_shape), fill, dtype=array.dtype)
    out[(slice(None),) * len(lead) + tuple(slice(lo, hi) for lo, hi in bbox)] = array
    return out
