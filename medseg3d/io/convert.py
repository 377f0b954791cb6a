"""In-memory images to `Volume`s and label maps back, for the Python API (`medseg3d.Segmenter`).

Three kinds of input besides a file: a nibabel image, a SimpleITK image and a numpy array with its
spacing. Each becomes a `Volume` `(C, X, Y, Z)` float32 in nibabel's voxel order and RAS+ affine, and
a label map `(X, Y, Z)` goes back as the same kind of object with the input's exact geometry.

SimpleITK stores voxels `(Z, Y, X)` and maps indices to LPS world coordinates
(`origin + direction @ diag(spacing) @ index`); nibabel stores `(X, Y, Z)` and maps to RAS, so the
affine here is `diag(-1, -1, 1) @ [direction @ diag(spacing) | origin]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np

from medseg3d.errors import InputError
from medseg3d.io.volume import Volume, to_nifti

#: LPS (ITK) <-> RAS (NIfTI/nibabel) world coordinates: flip the first two axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _channels_first(data: np.ndarray, what: str) -> np.ndarray:
    """`(X, Y, Z)` -> `(1, X, Y, Z)`; `(X, Y, Z, C)` (channels last, as in MSD files) -> `(C, X, Y, Z)`."""
    if data.ndim == 3:
        return data[None]
    if data.ndim == 4:
        return np.moveaxis(data, -1, 0)
    raise InputError(f"{what} has {data.ndim} dimensions {data.shape}; expected a 3D image (4D: channels last)")


def is_nifti_image(image: object) -> bool:
    """True for a nibabel image that has an affine (Nifti1/2, MGH, ...)."""
    return isinstance(image, nib.spatialimages.SpatialImage)


def is_sitk_image(image: object) -> bool:
    """True for a `SimpleITK.Image` (checked without importing SimpleITK)."""
    return type(image).__module__.startswith("SimpleITK") and type(image).__name__ == "Image"


def volume_from_nifti(image: nib.spatialimages.SpatialImage) -> Volume:
    """A nibabel image as a `Volume` `(C, X, Y, Z)` float32, header kept (as `read_volume` reads a file)."""
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, TypeError) as exc:
        raise InputError(f"the nibabel image's voxels cannot be read ({type(exc).__name__}: {exc})") from exc
    header = image.header.copy() if isinstance(image.header, nib.Nifti1Header) else None
    return Volume(_channels_first(data, "the nibabel image"), np.asarray(image.affine, dtype=np.float64), header)


def labels_like_nifti(seg: np.ndarray, reference: Volume) -> nib.Nifti1Image:
    """Labels `(X, Y, Z)` as a NIfTI image with `reference`'s header and affine: what `predict` writes."""
    return to_nifti(Volume(seg[None], reference.affine, reference.header), dtype=seg.dtype)


def volume_from_sitk(image: Any) -> Volume:
    """A 3D `SimpleITK.Image` (scalar, or vector pixels as channels) as a `Volume` `(C, X, Y, Z)` float32."""
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise InputError(f"the SimpleITK image has {image.GetDimension()} dimensions; the model needs 3D volumes")
    arr = sitk.GetArrayFromImage(image)  # (Z, Y, X) or (Z, Y, X, C)
    data = arr.transpose(2, 1, 0) if image.GetNumberOfComponentsPerPixel() == 1 else arr.transpose(2, 1, 0, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return Volume(_channels_first(data.astype(np.float32, copy=False), "the SimpleITK image"), affine, None)


def labels_like_sitk(seg: np.ndarray, reference: Any) -> Any:
    """Labels `(X, Y, Z)` as a `SimpleITK.Image` with `reference`'s origin, spacing and direction."""
    import SimpleITK as sitk

    out = sitk.GetImageFromArray(np.ascontiguousarray(seg.transpose(2, 1, 0)))
    out.SetOrigin(reference.GetOrigin())
    out.SetSpacing(reference.GetSpacing())
    out.SetDirection(reference.GetDirection())
    return out


def volume_from_array(array: np.ndarray, spacing: Sequence[float] | None) -> Volume:
    """An array `(X, Y, Z)` or `(C, X, Y, Z)` with `spacing` (mm, one value per spatial axis, same order) as a `Volume`.

    The affine is `diag(spacing)`: orientation and origin do not change a prediction, only spacing does.
    """
    if spacing is None:
        raise InputError("a numpy array needs spacing=(sx, sy, sz) in mm, one value per array axis "
                         "(the array's own axis order), e.g. seg(array, spacing=(1.0, 1.0, 2.5))")
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    arr = np.asarray(array)
    if arr.ndim not in (3, 4):
        raise InputError(f"the array has shape {arr.shape}; give (X, Y, Z) or (C, X, Y, Z)")
    if sp.size != 3 or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"spacing={tuple(spacing)} must be 3 positive, finite values in mm (one per spatial axis)")
    data = arr[None] if arr.ndim == 3 else arr
    return Volume(data.astype(np.float32, copy=False), np.diag([*sp, 1.0]), None)
