"""NRRD (`.nrrd`, `.nhdr`) and MetaImage (`.mha`, `.mhd`) files through SimpleITK, in medseg3d's convention.

Voxels come back in nibabel's order `(X, Y, Z)` (channels from vector pixels) and the geometry as the
RAS+ affine of `medseg3d.io.convert.affine_from_sitk`; writing converts back with `sitk_geometry`,
so origin, spacing and direction (LPS, float64 in the file's text header) round-trip exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg3d.errors import InputError
from medseg3d.io.atomic import atomic_path
from medseg3d.io.convert import affine_from_sitk, sitk_from_array, sitk_voxels
from medseg3d.io.volume import HeaderInfo, Volume, spacing_from_affine


def _reader(path: Path) -> Any:
    import SimpleITK as sitk

    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    return reader


def read_itk_header(path: str | Path) -> HeaderInfo:
    """Shape `(X, Y, Z[, C])`, spacing, affine and voxel dtype of an NRRD/MHA file, without reading voxels."""
    import SimpleITK as sitk

    path = Path(path)
    reader = _reader(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path} is not a readable image ({_first_line(exc)}); re-export or re-copy it") from exc
    size = tuple(int(s) for s in reader.GetSize())
    if len(size) not in (2, 3):
        raise InputError(f"{path} has {len(size)} dimensions; medseg3d reads 2D and 3D images "
                         "(channels as vector pixels or as separate files)")
    components = int(reader.GetNumberOfComponents())
    shape = size + ((components,) if components > 1 else ())
    affine = affine_from_sitk(reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection())
    dtype = sitk.GetArrayViewFromImage(sitk.Image([1] * len(size), reader.GetPixelID(), components)).dtype
    return HeaderInfo(path, shape, spacing_from_affine(affine, min(3, len(size))), affine, dtype)


def read_itk_image(path: str | Path) -> Any:
    """The `SimpleITK.Image` of an NRRD/MHA file; `InputError` naming the file when it cannot be read."""
    path = Path(path)
    reader = _reader(path)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{path} could not be read ({_first_line(exc)}); the file is probably truncated or "
                         "corrupt: copy it again from the source") from exc


def read_itk_volume(path: str | Path, dtype: type | None = np.float32) -> Volume:
    """An NRRD/MHA image as a `Volume` `(C, X, Y, Z)` of `dtype` (None: the file's own; no NIfTI header)."""
    path = Path(path)
    image = read_itk_image(path)
    data = sitk_voxels(image, str(path))
    affine = affine_from_sitk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Volume(data if dtype is None else data.astype(dtype, copy=False), affine, None)


def write_itk_labels(seg: np.ndarray, affine: np.ndarray, path: str | Path, *, overwrite: bool) -> None:
    """Labels `(X, Y, Z)` to an `.nrrd` or `.mha` file with `affine`'s geometry, compressed, atomically."""
    import SimpleITK as sitk

    if not str(path).lower().endswith((".nrrd", ".mha")):
        raise InputError(f"{path}: labels are written as one .nrrd or .mha file (a detached header pair cannot be "
                         "renamed atomically)")
    image = sitk_from_array(seg, affine)
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as exc:  # ITK hides errno: a full disk or lost folder shows here
            raise OSError(f"SimpleITK could not write {path}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    """ITK's exception text without its multi-line source location."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("/", "sitk::ERROR:")) or "ERROR" in line]
    return (useful or lines or [type(exc).__name__])[-1]
