"""Pure planning rules (nnU-Net v2's ExperimentPlanner, reproduced): spacing, topology, patch, batch.

Every function takes and returns plain numbers/lists in array axis order `(X, Y, Z)` (or the two
in-plane axes of a 2d configuration); spacings in mm. No I/O, no torch: fast to test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medseg3d.geometry import ANISO_THRESHOLD

MIN_FEATURE_MAP = 4             # pool an axis only while its map is >= 2 * 4 voxels
BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}
INITIAL_PATCH_EDGE = {2: 2048, 3: 256}  # start from a patch of 2048^2 / 256^3 voxels
MIN_BATCH = 2
MAX_DATASET_COVERED = 0.05      # a batch covers at most 5% of the dataset's voxels
LOWRES_THRESHOLD = 0.25         # 3d_lowres when the fullres patch covers < 25% of the median image
LOWRES_SPACING_STEP = 1.03


def target_spacing(spacings: Sequence[Sequence[float]], shapes_after_crop: Sequence[Sequence[int]]) -> list[float]:
    """Target spacing (mm): the per-axis median; for a coarse axis (> 3x the others in spacing and
    3x fewer voxels) the 10th percentile of that axis' spacings, but never finer than the other axes."""
    sp = np.asarray(spacings, dtype=float)
    target = np.percentile(sp, 50, axis=0)
    size = np.percentile(np.asarray(shapes_after_crop, dtype=float), 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    aniso_spacing = target[worst] > ANISO_THRESHOLD * max(target[i] for i in others)
    aniso_voxels = size[worst] * ANISO_THRESHOLD < min(size[i] for i in others)
    if aniso_spacing and aniso_voxels:
        t = float(np.percentile(sp[:, worst], 10))
        if t < max(target[i] for i in others):
            t = max(max(target[i] for i in others), t) + 1e-5
        target[worst] = t
    return [float(t) for t in target]


def slice_axis_2d(spacing: Sequence[float], median_shape: Sequence[int]) -> int:
    """Array axis a 2d configuration slices: the unique coarsest-spacing axis; else an axis of median
    size 1 (thin, 2D-like data); else the last axis."""
    sp = np.asarray(spacing, dtype=float)
    worst = int(np.argmax(sp))
    if sp[worst] > 1.001 * min(sp[i] for i in range(len(sp)) if i != worst):
        return worst
    thin = [i for i, s in enumerate(median_shape) if s == 1]
    return thin[0] if thin else len(spacing) - 1


#: z-score inside the non-zero region only when cropping keeps less than this fraction of the image.
MASK_NORM_BELOW = 0.75


def scheme_for_modality(modality: str) -> str:
    """Normalisation scheme for a channel name from dataset.json (`CT` -> ct, `noNorm` -> none, ...)."""
    m = modality.strip().lower().replace("-", "_")
    if m == "ct":
        return "ct"
    if m in ("nonorm", "none", "no_norm"):
        return "none"
    if m in ("rescale", "rescale_to_0_1", "rgb_to_0_1"):
        return "rescale"
    return "zscore"


def normalization_for(
    channel_names: Sequence[str], intensity_props: dict[str, dict[str, float]], relative_size_after_crop: float = 1.0
) -> list[dict[str, Any]]:
    """Per-channel normalisation entries from the modality names and the fingerprint's foreground stats.

    CT -> clip to the foreground 0.5/99.5 percentiles, z-score with the dataset foreground mean/std;
    `noNorm` -> none; `rescale_to_0_1` -> rescale between the percentiles; anything else -> z-score
    per image, inside the non-zero region only (`use_mask`) when the median crop keeps < 75% of the
    image (e.g. skull-stripped brains). Dataset statistics are recorded for every scheme.
    """
    out = []
    for ch, name in enumerate(channel_names):
        st = intensity_props.get(str(ch), {})
        scheme = scheme_for_modality(name)
        out.append({
            "scheme": scheme,
            "use_mask": bool(scheme == "zscore" and relative_size_after_crop < MASK_NORM_BELOW),
            "mean": float(st.get("mean", 0.0)), "std": float(st.get("std", 1.0)),
            "lower": float(st.get("percentile_00_5", 0.0)), "upper": float(st.get("percentile_99_5", 0.0)),
        })
    return out


def pad_shape(shape: Sequence[int], divisor: Sequence[int]) -> list[int]:
    """Round every axis up to a multiple of its divisor."""
    return [int(math.ceil(s / d) * d) for s, d in zip(shape, divisor, strict=True)]


def pool_and_conv_props(
    spacing: Sequence[float], patch_size: Sequence[int], min_feature_map: int = MIN_FEATURE_MAP
) -> tuple[list[int], list[list[int]], list[list[int]], list[int], list[int]]:
    """Topology for a patch: `(pools_per_axis, strides, kernel_sizes, padded_patch, divisor)`.

    Per stage, an axis is pooled while its map is >= 2*min_feature_map voxels and its current
    spacing is within 2x of the finest pooled-candidate axis (a lone axis needs 3*min_feature_map);
    kernels are 3 on axes within 2x of the finest spacing, else 1 (they stay 3 once 3); the
    bottleneck kernel is 3 everywhere; the patch is padded to a multiple of 2**pools per axis.
    """
    dim = len(spacing)
    cur_sp, cur_size = list(map(float, spacing)), list(map(float, patch_size))
    strides: list[list[int]] = [[1] * dim]
    kernels: list[list[int]] = []
    pools, kernel = [0] * dim, [1] * dim
    while True:
        valid = [i for i in range(dim) if cur_size[i] >= 2 * min_feature_map]
        if not valid:
            break
        min_sp = min(cur_sp[i] for i in valid)
        valid = [i for i in valid if cur_sp[i] / min_sp < 2]
        if len(valid) == 1 and cur_size[valid[0]] < 3 * min_feature_map:
            break
        if not valid:
            break
        for d in range(dim):
            if kernel[d] != 3 and cur_sp[d] / min(cur_sp) < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            pools[v] += 1
            cur_sp[v] *= 2
            cur_size[v] = math.ceil(cur_size[v] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    divisor = [2**p for p in pools]
    return pools, strides, kernels, pad_shape(patch_size, divisor), divisor


def features_per_stage(num_stages: int, dims: int) -> list[int]:
    """32 at the top, doubling per stage, capped at 320 (3D) / 512 (2D)."""
    return [min(MAX_FEATURES[dims], BASE_FEATURES * 2**i) for i in range(num_stages)]


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[int]) -> list[int]:
    """Patch following 1/spacing with the volume of 256^3 (3D) / 2048^2 (2D), clipped to the median shape."""
    dims = len(spacing)
    inv = 1.0 / np.asarray(spacing, dtype=float)
    scale = (INITIAL_PATCH_EDGE[dims] ** dims / np.prod(inv)) ** (1.0 / dims)
    patch = [int(round(v)) for v in inv * scale]
    return [min(p, int(m)) for p, m in zip(patch, median_shape, strict=True)]


#: `memory_fn(patch, strides, kernel_sizes, features, batch) -> bytes` (see plans/memory.py).
MemoryFn = Callable[[Sequence[int], list[list[int]], list[list[int]], list[int], int], float]


def plan_topology_and_patch(
    spacing: Sequence[float],
    median_shape: Sequence[int],
    memory_fn: MemoryFn,
    budget_bytes: float,
    n_voxels_dataset: float,
) -> dict[str, Any]:
    """Patch, topology and batch for one configuration within a memory budget.

    Start from `initial_patch_size`; while a batch of 2 does not fit, shrink the axis largest
    relative to the median shape by one divisor step; then grow the batch with the spare memory
    (rounded, as nnU-Net), capped at 5% of the dataset's voxels and at least 2.
    Returns `{patch_size, strides, kernel_sizes, features, batch_size, estimated_bytes}`.
    """
    dims = len(spacing)
    patch = initial_patch_size(spacing, median_shape)
    _, strides, kernels, patch, divisor = pool_and_conv_props(spacing, patch)
    feats = features_per_stage(len(strides), dims)
    while memory_fn(patch, strides, kernels, feats, MIN_BATCH) > budget_bytes:
        axis = int(np.argsort([p / m for p, m in zip(patch, median_shape)])[-1])
        tmp = list(patch)
        tmp[axis] -= divisor[axis]
        *_, div2 = pool_and_conv_props(spacing, tmp)
        patch = list(patch)
        patch[axis] -= div2[axis]
        if patch[axis] < 1:
            break  # cannot shrink further: even the smallest patch does not fit
        _, strides, kernels, patch, divisor = pool_and_conv_props(spacing, patch)
        feats = features_per_stage(len(strides), dims)
    per_sample = memory_fn(patch, strides, kernels, feats, 1)
    batch = int(round(budget_bytes / per_sample)) if per_sample > 0 else MIN_BATCH
    cap = int(round(n_voxels_dataset * MAX_DATASET_COVERED / float(np.prod(patch, dtype=np.float64))))
    batch = max(min(batch, cap), MIN_BATCH)
    return {
        "patch_size": [int(p) for p in patch],
        "strides": strides,
        "kernel_sizes": kernels,
        "features": feats,
        "batch_size": batch,
        "estimated_bytes": float(memory_fn(patch, strides, kernels, feats, batch)),
    }


def needs_lowres(patch_size: Sequence[int], median_shape: Sequence[int]) -> bool:
    """3d_lowres (+ cascade) is planned when the fullres patch covers < 25% of the median image."""
    return float(np.prod(patch_size, dtype=np.float64)) / float(np.prod(median_shape, dtype=np.float64)) < LOWRES_THRESHOLD


def next_lowres_spacing(spacing: Sequence[float]) -> list[float]:
    """One step coarser: axes finer than half the coarsest grow first, then all axes together (x1.03)."""
    sp = np.asarray(spacing, dtype=float)
    fine = (sp.max() / sp) > 2
    if fine.any():
        sp[fine] *= LOWRES_SPACING_STEP
    else:
        sp *= LOWRES_SPACING_STEP
    return [float(s) for s in sp]
