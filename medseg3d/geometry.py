"""Voxel-grid rules shared by planning, preprocessing and augmentation (the one home of each).

Per-axis sequences are in array axis order `(X, Y, Z)`; spacings in mm. `medseg3d.fingerprint`,
`medseg3d.plans`, `medseg3d.preprocess` and `medseg3d.evaluation` all import it, so it imports none of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: A spacing (or patch edge) ratio above this marks an axis as anisotropic (nnU-Net's ANISO_THRESHOLD).
ANISO_THRESHOLD = 3.0


def compute_new_shape(
    shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[int, ...]:
    """Shape (voxels) after resampling from `spacing` to `new_spacing` (mm), rounded, at least 1."""
    return tuple(
        max(1, int(round(s * sp / nsp))) for s, sp, nsp in zip(shape, spacing, new_spacing, strict=True)  # noqa: RUF046
    )


def anisotropic_axis(spacing: Sequence[float]) -> int | None:
    """The coarse axis of `spacing` when it is more than `ANISO_THRESHOLD` x the finest, else None."""
    sp = np.asarray(spacing, dtype=float)
    return int(np.argmax(sp)) if sp.max() / sp.min() > ANISO_THRESHOLD else None


def separate_axis_for(spacing: Sequence[float], new_spacing: Sequence[float]) -> int | None:
    """The axis to resample on its own (the coarse one), or None when both spacings are near isotropic.

    The source spacing decides first, then the target (as nnU-Net does).
    """
    for sp in (spacing, new_spacing):
        axis = anisotropic_axis(sp)
        if axis is not None:
            return axis
    return None


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box (one `slice` per axis, `[lo, hi)` voxels) holding every True voxel of `mask`; None when empty.

    The one bounding box of medseg3d: the non-zero crop (fingerprint, preprocessing), HD95's surface
    box and the postprocessing's component search all use it.
    """
    box = []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def dummy_2d_axis(patch_size: Sequence[int]) -> int | None:
    """nnU-Net's dummy-2D rule for a 3D patch: the short axis when the longest edge is more than
    `ANISO_THRESHOLD` x it (rotation and scaling then act in the other two axes only), else None."""
    if len(patch_size) != 3:
        return None
    short = int(np.argmin(patch_size))
    return short if max(patch_size) / patch_size[short] > ANISO_THRESHOLD else None
