"""In-memory images to `Volume`s and label maps back, for the Python API (`medseg3d.Segmenter`).

Three kinds of input besides a file: a nibabel image, a SimpleITK image and a numpy array with its
spacing. Each becomes a `Volume` `(C, X, Y, Z)` float32 in nibabel's voxel order and RAS+ affine, and
a label map `(X, Y, Z)` goes back as the same kind of object with the input's exact geometry.

SimpleITK stores voxels `(Z, Y, X)` and maps indices to LPS world coordinates
(`origin + direction @ diag(spacing) @ index`); nibabel stores `(X, Y, Z)` and maps to RAS, so the
affine here is `diag(-1, -1, 1) @ [direction @ diag(spacing) | origin]`. `affine_from_sitk` and
`sitk_geometry` are that rule and its inverse, the one place it lives: NRRD/MHA/DICOM files
(`medseg3d.io.itk_files`, `medseg3d.io.dicom`) are read and written through them too.
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


def affine_from_sitk(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """The `(4, 4)` RAS+ affine (nibabel's, voxel index `(x, y, z)` -> mm) of ITK geometry in LPS.

    `origin` and `spacing` (mm) have one value per dimension, `direction` is the row-major `n x n`
    matrix of `GetDirection()`; a 2D image (n = 2) gets a 2D grid in the z = 0 plane (spacing 1 on z).
    """
    n = len(spacing)
    lps = np.eye(4)
    lps[:n, :n] = np.asarray(direction, dtype=np.float64).reshape(n, n) @ np.diag(np.asarray(spacing, dtype=np.float64))
    lps[:n, 3] = np.asarray(origin, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :] = _LPS_TO_RAS @ lps[:3, :]
    return affine


def sitk_geometry(affine: np.ndarray, ndim: int = 3) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """`(origin, spacing, direction)` in ITK's LPS convention of a RAS+ affine: `affine_from_sitk`'s inverse.

    Spacing (mm) is the norm of each affine column, direction the columns divided by it (row-major,
    as `SetDirection` takes it), `ndim` values each (2: the upper-left 2 x 2 block of a 2D grid).
    """
    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3, :]
    cols = lps[:ndim, :ndim]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(lps)):
        raise InputError(f"the affine {np.round(affine, 4).tolist()} has a zero or non-finite voxel size; it maps no grid")
    direction = cols / spacing
    return (tuple(float(v) for v in lps[:ndim, 3]), tuple(float(v) for v in spacing),
            tuple(float(v) for v in direction.ravel()))


def volume_from_sitk(image: Any, what: str = "the SimpleITK image") -> Volume:
    """A 3D (or 2D) `SimpleITK.Image` (scalar, or vector pixels as channels) as a `Volume` `(C, X, Y, Z)` float32.

    `what` names the image in errors (a file path when read from disk).
    """
    data = sitk_voxels(image, what)
    affine = affine_from_sitk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Volume(data.astype(np.float32, copy=False), affine, None)


def sitk_voxels(image: Any, what: str = "the SimpleITK image") -> np.ndarray:
    """The voxels of a 2D/3D `SimpleITK.Image` as `(C, X, Y, Z)` (or `(C, X, Y)`), in the image's own dtype.

    ITK index `(i, j, k)` is array index `[c, i, j, k]`; vector pixels are the channels `c`.
    """
    import SimpleITK as sitk

    if image.GetDimension() not in (2, 3):
        raise InputError(f"{what} has {image.GetDimension()} dimensions; medseg3d reads 2D and 3D images "
                         "(channels as vector pixels or as separate files)")
    arr = sitk.GetArrayFromImage(image)  # (Z, Y, X) or (Z, Y, X, C)
    axes = tuple(range(image.GetDimension()))[::-1]
    if image.GetNumberOfComponentsPerPixel() == 1:
        return arr.transpose(*axes)[None]
    return np.moveaxis(arr.transpose(*axes, arr.ndim - 1), -1, 0)


def sitk_from_array(array: np.ndarray, affine: np.ndarray) -> Any:
    """Spatial voxels `(X, Y, Z)` (or `(X, Y)`) as a scalar `SimpleITK.Image` with `affine`'s geometry (LPS)."""
    import SimpleITK as sitk

    out = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(*range(array.ndim)[::-1])))
    origin, spacing, direction = sitk_geometry(affine, array.ndim)
    out.SetOrigin(origin)
    out.SetSpacing(spacing)
    out.SetDirection(direction)
    return out


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
