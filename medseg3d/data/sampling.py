"""Patch sampling from the preprocessed cache, with nnU-Net's foreground oversampling.

A batch of B patches: the last `round(B * oversample_fg)` (at least one when oversampling is on)
are centred on a foreground voxel of a class drawn uniformly among the classes present in the case
(from `class_locations` in `CASE.json`); the others are uniformly random. A patch that exceeds the
image is zero-padded (image 0, label background 0). For a 2d configuration the patch is a slice
along `slice_axis` of the same 3D cache: the slice axis gets extent 1 and is squeezed out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def full_patch_size(patch_size: Sequence[int], slice_axis: int | None) -> tuple[int, int, int]:
    """The 3D box read from a `(X, Y, Z)` array: `patch_size` itself, or with 1 inserted at `slice_axis`."""
    p = [int(v) for v in patch_size]
    if slice_axis is not None:
        p.insert(int(slice_axis), 1)
    if len(p) != 3:
        raise ValueError(f"patch_size {tuple(patch_size)} with slice_axis {slice_axis} is not a 3D box")
    return tuple(p)  # type: ignore[return-value]


def patch_bounds(shape: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest allowed lower corner per axis (nnU-Net's rule).

    Where the image is smaller than the patch, the patch may stick out by half the difference on
    each side; otherwise it stays inside the image.
    """
    shape_a, patch_a = np.asarray(shape, int), np.asarray(patch, int)
    need = np.maximum(patch_a - shape_a, 0)
    lo = -(need // 2)
    hi = shape_a + need // 2 + need % 2 - patch_a
    return lo, hi


def choose_corner(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator,
                  class_locations: Mapping[str, Sequence[Sequence[int]]] | None = None,
                  force_fg: bool = False) -> np.ndarray:
    """Lower corner `(3,)` of a patch in an array of spatial `shape`.

    With `force_fg` and a non-empty `class_locations`, a class is drawn uniformly among those with
    locations, then one of its voxels, and the patch is centred on it (clipped to the bounds).
    Falls back to a random corner when the case has no foreground.
    """
    lo, hi = patch_bounds(shape, patch)
    if force_fg and class_locations:
        present = [k for k, v in class_locations.items() if len(v) > 0]
        if present:
            cls = present[int(rng.integers(len(present)))]
            locs = class_locations[cls]
            voxel = np.asarray(locs[int(rng.integers(len(locs)))], int)
            corner = voxel - np.asarray(patch, int) // 2
            return np.clip(corner, lo, hi)
    return np.array([int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)])


def crop_padded(array: np.ndarray, corner: Sequence[int], patch: Sequence[int], pad_value: float = 0) -> np.ndarray:
    """The box `[corner, corner + patch)` of the last 3 axes of `array`, padded with `pad_value` outside.

    `array` is `(..., X, Y, Z)` (memory-mapped is fine: only the box is read).
    """
    spatial = array.shape[-3:]
    lead = array.shape[:-3]
    out = np.full(lead + tuple(int(p) for p in patch), pad_value, dtype=array.dtype)
    src, dst = [], []
    for c, p, s in zip(corner, patch, spatial):
        a, b = max(int(c), 0), min(int(c) + int(p), int(s))
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - int(c), b - int(c)))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


def sample_patch(data: np.ndarray, seg: np.ndarray, properties: Mapping[str, Any], patch_size: Sequence[int],
                 rng: np.random.Generator, force_fg: bool = False,
                 slice_axis: int | None = None, extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One patch `(image (C, *patch) float32, label (*patch) int8)` from a cached case.

    data `(C, X, Y, Z)`, seg `(X, Y, Z)`; `patch_size` has 3 values, or 2 for a 2d configuration
    with `slice_axis` (the axis whose extent becomes 1 and is removed). `extra`: another label map
    `(X, Y, Z)` of the same grid (the cascade's previous stage) cropped at the same box: the label
    is then `(2, *patch)`, the target first.
    """
    box = full_patch_size(patch_size, slice_axis)
    corner = choose_corner(seg.shape, box, rng, properties.get("class_locations"), force_fg)
    img = crop_padded(data, corner, box, 0.0).astype(np.float32, copy=False)
    lab = crop_padded(seg, corner, box, 0).astype(np.int8, copy=False)
    if extra is not None:
        lab = np.stack([lab, crop_padded(extra, corner, box, 0).astype(np.int8, copy=False)])
    if slice_axis is not None:
        img = np.take(img, 0, axis=1 + int(slice_axis))
        lab = np.take(lab, 0, axis=int(slice_axis) + (lab.ndim - 3))
    return img, lab


def num_forced_fg(batch_size: int, oversample_fg: float) -> int:
    """How many patches of a batch are centred on foreground: `round(B * p)`, at least 1 when `p > 0`."""
    if oversample_fg <= 0:
        return 0
    return min(batch_size, max(1, int(round(batch_size * oversample_fg))))
