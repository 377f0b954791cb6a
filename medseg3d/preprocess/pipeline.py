"""One case from the volume read on disk to the arrays the network sees, and back.

Order (as nnU-Net): crop to the non-zero bounding box over all channels, normalise per channel,
resample to the configuration's spacing. Images are `(C, X, Y, Z)`, labels `(X, Y, Z)`, spacing mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from medseg3d.errors import InputError
from medseg3d.preprocess.crop import crop_to_nonzero, uncrop
from medseg3d.preprocess.normalize import normalize
from medseg3d.preprocess.resample import compute_new_shape, resample_data, resample_seg, separate_axis_for

if TYPE_CHECKING:
    from medseg3d.io.volume import Volume
    from medseg3d.plans.schema import ConfigurationPlan

#: At most this many foreground voxel coordinates are kept per class (nnU-Net's figure).
MAX_CLASS_LOCATIONS = 10000

__all__ = [
    "PreprocessedCase",
    "compute_new_shape",
    "preprocess_arrays",
    "preprocess_case",
    "probs_to_original",
    "resample_data",
    "resample_seg",
    "sample_class_locations",
    "seg_to_original",
]


@dataclass
class PreprocessedCase:
    """The network-ready arrays of one case.

    data: float32 `(C, X', Y', Z')`; seg: int8 `(X', Y', Z')` or None; properties: see
    docs/architecture.md (original_shape, original_spacing, bbox, shape_after_crop,
    shape_after_resample, spacing, class_locations when a label was given).
    """

    data: np.ndarray
    seg: np.ndarray | None
    properties: dict[str, Any]


def sample_class_locations(
    seg: np.ndarray, classes: list[int] | None = None, max_per_class: int = MAX_CLASS_LOCATIONS, seed: int = 1234
) -> dict[str, list[list[int]]]:
    """Up to `max_per_class` voxel coordinates `[x, y, z]` per foreground class of `seg` `(X, Y, Z)`.

    A seeded uniform sample (deterministic); classes with no voxel map to an empty list.
    """
    rng = np.random.default_rng(seed)
    if classes is None:
        classes = [int(c) for c in np.unique(seg) if c > 0]
    out: dict[str, list[list[int]]] = {}
    for c in classes:
        coords = np.argwhere(seg == c)
        if len(coords) > max_per_class:
            coords = coords[np.sort(rng.choice(len(coords), max_per_class, replace=False))]
        out[str(c)] = coords.astype(int).tolist()
    return out


def preprocess_arrays(
    data: np.ndarray | list[np.ndarray],
    spacing: tuple[float, ...],
    config: ConfigurationPlan,
    seg: np.ndarray | None = None,
    classes: list[int] | None = None,
) -> PreprocessedCase:
    """`preprocess_case` on plain arrays: `data` `(C, X, Y, Z)`, `spacing` mm, `seg` `(X, Y, Z)` integer.

    The one preprocessing function: the cache writer, the final validation and `medseg3d predict`
    all call it. `data` may be passed inside a one-element list, which is emptied: when the caller
    keeps no other reference, the input is then freed once it is normalised, before the cubic
    resampling (the memory peak of predicting a large volume).
    """
    if isinstance(data, list):
        if len(data) != 1:
            raise ValueError("pass the image array itself or a list holding exactly that one array")
        data = np.asarray(data.pop())
    if data.ndim != 4:
        raise InputError(f"expected a 3D image (C, X, Y, Z), got shape {data.shape}; 2D files are not supported")
    original_shape = tuple(int(s) for s in data.shape[1:])
    data_c, seg_c, bbox = crop_to_nonzero(data, seg)
    del data
    shape_after_crop = tuple(int(s) for s in data_c.shape[1:])
    mask = None
    if any(n.get("use_mask") for n in config.normalization):
        mask = ndimage.binary_fill_holes(np.any(data_c != 0, axis=0))
    data_n = normalize(data_c, config.normalization, mask)
    del data_c, mask  # the crop is a view: with it the caller's input goes, if it held no other reference
    target = config.target_spacing(spacing)
    new_shape = compute_new_shape(shape_after_crop, spacing, target)
    sep = config.resampling.get("separate_axis")
    if sep is None:
        sep = separate_axis_for(spacing, target)
    data_r = resample_data(data_n, new_shape, order=int(config.resampling.get("image_order", 3)), separate_axis=sep)
    del data_n
    props: dict[str, Any] = {
        "original_shape": list(original_shape),
        "original_spacing": [float(s) for s in spacing],
        "bbox": bbox,
        "shape_after_crop": list(shape_after_crop),
        "shape_after_resample": list(new_shape),
        "spacing": [float(s) for s in target],
    }
    seg_r = None
    if seg_c is not None:
        if seg_c.size and (seg_c.max() > 127 or seg_c.min() < -1):
            raise InputError(f"label values must lie in [-1, 127] to be stored as int8, got {seg_c.min()}..{seg_c.max()}")
        mode = str(config.resampling.get("label_mode", "linear_onehot"))
        seg_r = resample_seg(seg_c.astype(np.int8), new_shape, mode=mode, separate_axis=sep)
        props["class_locations"] = sample_class_locations(seg_r, classes)
    return PreprocessedCase(data=np.ascontiguousarray(data_r, dtype=np.float32), seg=seg_r, properties=props)


def preprocess_case(
    image: Volume, config: ConfigurationPlan, label: Volume | None = None, classes: list[int] | None = None
) -> PreprocessedCase:
    """Crop, normalise and resample one case to `config.target_spacing(image spacing)`.

    image: `Volume` with array `(C, X, Y, Z)`; label: `Volume` with array `(1, X, Y, Z)` integer.
    `classes`: foreground classes whose locations are sampled (default: those present).
    """
    seg = None if label is None else np.asarray(label.array[0])
    return preprocess_arrays(np.asarray(image.array), tuple(image.spacing), config, seg, classes)


def _inverse_separate_axis(properties: dict[str, Any], separate_axis: int | None) -> int | None:
    if separate_axis is not None or "spacing" not in properties:
        return separate_axis
    return separate_axis_for(properties["original_spacing"], properties["spacing"])


def seg_to_original(seg: np.ndarray, properties: dict[str, Any], separate_axis: int | None = None) -> np.ndarray:
    """A label map `(X', Y', Z')` in preprocessed geometry back to the original `(X, Y, Z)` (linear one-hot).

    Voxels outside the crop box are background (0). `separate_axis` defaults to the rule applied
    on the way in (from `original_spacing` and `spacing` in `properties`).
    """
    separate_axis = _inverse_separate_axis(properties, separate_axis)
    crop_shape = tuple(properties["shape_after_crop"])
    res = resample_seg(seg, crop_shape, separate_axis=separate_axis)
    return uncrop(res, properties["bbox"], tuple(properties["original_shape"]), fill=0)


def probs_to_original(
    probs: np.ndarray, properties: dict[str, Any], separate_axis: int | None = None
) -> np.ndarray:
    """Class probabilities `(K, X', Y', Z')` back to `(K, X, Y, Z)` (linear); outside the crop, background.

    Memory: one float32 copy at the original size; callers with large volumes and many classes can
    call this per class (K=1 slices) and keep a running argmax. `separate_axis` as in `seg_to_original`.
    """
    separate_axis = _inverse_separate_axis(properties, separate_axis)
    crop_shape = tuple(properties["shape_after_crop"])
    res = resample_data(probs, crop_shape, order=1, separate_axis=separate_axis)
    out = uncrop(res, properties["bbox"], tuple(properties["original_shape"]), fill=0)
    if out.shape[0] > 1 and res.shape[1:] != out.shape[1:]:
        outside = np.ones(out.shape[1:], dtype=bool)
        outside[tuple(slice(lo, hi) for lo, hi in properties["bbox"])] = False
        out[0][outside] = 1.0
    return out
