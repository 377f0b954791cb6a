"""The volume type and reading/writing with the source geometry carried exactly.

Arrays are kept in the voxel index order of the file as nibabel reads it: images `(C, X, Y, Z)`
(or `(C, X, Y)` for 2D files), labels `(1, X, Y, Z)`. The affine maps voxel indices to world
millimetres (nibabel's RAS+ convention). The source header is kept so a written volume carries the
same sform/qform (codes included), which is what 3D Slicer and ITK-SNAP read.

NIfTI is read here with nibabel; NRRD/MHA files (`medseg3d.io.itk_files`) and DICOM series folders
(`medseg3d.io.dicom`) through SimpleITK, converted to the same `(C, X, Y, Z)` order and RAS+ affine
(`medseg3d.io.convert`); their volumes have no NIfTI header (`header=None`).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from medseg3d.errors import InputError
from medseg3d.io.atomic import atomic_path
from medseg3d.io.formats import file_format

NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: Exceptions nibabel raises on unreadable, truncated or mis-formatted files.
READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, ImageFileError, TypeError)


@dataclass
class Volume:
    """An image or label volume with its geometry.

    Attributes:
        array: voxel data `(C, X, Y, Z)` (or `(C, X, Y)`), channels first, file index order.
        affine: `(4, 4)` voxel index -> world (mm) transform.
        header: the source NIfTI header, kept so writes reproduce sform/qform exactly; may be None
            for volumes made in code.
    """

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape without the channel axis, e.g. `(X, Y, Z)`."""
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.array.ndim - 1

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm per spatial axis (column norms of the affine)."""
        return spacing_from_affine(self.affine, self.ndim)

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume with the same geometry and new voxel data (same spatial shape)."""
        return Volume(array=array, affine=self.affine.copy(), header=self.header)


@dataclass(frozen=True)
class HeaderInfo:
    """What the header says, read without decompressing voxels."""

    path: Path
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    dtype: np.dtype

    @property
    def spatial_ndim(self) -> int:
        """Spatial dimensions: a 4D file is 3D with channels; a (X, Y, 1) file is still 3D."""
        return 3 if len(self.shape) >= 3 else len(self.shape)


def spacing_from_affine(affine: np.ndarray, ndim: int = 3) -> tuple[float, ...]:
    """Voxel spacing (mm) as the norms of the first `ndim` affine columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :ndim], axis=0))


def strip_nifti_suffix(name: str) -> str:
    """`case_0000.nii.gz` -> `case_0000`."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def _load(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    try:
        img = nib.load(str(path))
    except READ_ERRORS as exc:
        raise InputError(f"{path} is not a readable NIfTI file ({exc}); re-export or re-copy it") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path} is a {type(img).__name__}, not NIfTI; convert it to .nii.gz")
    return img


def _source_kind(path: Path) -> str:
    """`dicom` for a folder (a DICOM series), `itk` for NRRD/MHA files, else `nifti` (nibabel's errors)."""
    if path.is_dir():
        return "dicom"
    return "itk" if file_format(path) in ("nrrd", "mha") else "nifti"


def _read_other(path: Path, dtype: type | None, series_uid: str | None) -> Volume:
    """A DICOM series folder or NRRD/MHA file as a `Volume` of `dtype` (None: the file's own)."""
    if _source_kind(path) == "dicom":
        from medseg3d.io.dicom import read_dicom_volume

        vol = read_dicom_volume(path, series_uid, dtype=dtype or np.float64)
    else:
        from medseg3d.io.itk_files import read_itk_volume

        vol = read_itk_volume(path, dtype=dtype)
    return vol


def read_header(path: str | Path, *, series_uid: str | None = None) -> HeaderInfo:
    """Shape, spacing, affine and on-disk dtype of an image file (or DICOM series folder), without reading voxels.

    NIfTI shapes are the file's (`(X, Y, Z, C)` for 4D); NRRD/MHA give vector pixels as that last axis.
    `series_uid` chooses the series of a DICOM folder holding several.
    """
    path = Path(path)
    kind = _source_kind(path)
    if kind == "dicom":
        from medseg3d.io.dicom import read_dicom_header

        return read_dicom_header(path, series_uid)
    if kind == "itk":
        from medseg3d.io.itk_files import read_itk_header

        return read_itk_header(path)
    img = _load(path)
    shape = tuple(int(s) for s in img.shape)
    ndim = 3 if len(shape) >= 3 else len(shape)
    return HeaderInfo(path, shape, spacing_from_affine(img.affine, ndim), np.asarray(img.affine), img.get_data_dtype())


def _voxels(img: nib.Nifti1Image, path: Path, dtype: type) -> np.ndarray:
    try:
        return np.asarray(img.dataobj, dtype=dtype)
    except READ_ERRORS as exc:
        raise InputError(
            f"{path} could not be decompressed/read ({type(exc).__name__}: {exc}); the file is probably "
            "truncated or corrupt: copy it again from the source"
        ) from exc


def read_volume(
    paths: str | Path | Sequence[str | Path], dtype: type = np.float32, *, series_uid: str | None = None
) -> Volume:
    """Read an image as `(C, X, Y, Z)` float32.

    `paths` is one file (3D, or 4D with channels on the last axis as in the MSD layout; NRRD/MHA
    vector pixels are channels too) or one 3D file per channel (nnU-Net's `CASE_0000`, `CASE_0001`,
    ...), or a DICOM series folder (`series_uid` chooses among several series). Channel files must
    share shape and geometry; the first file's header is kept (None unless it is NIfTI).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no image file given")
    volumes: list[Volume] = []
    for path in paths:
        vol = _read_one(path, dtype, series_uid)
        if vol.num_channels > 1 and len(paths) > 1:
            raise InputError(f"{path} is 4D but channels were given as separate files; give one file per channel")
        if volumes and (vol.spatial_shape[:3] != volumes[0].spatial_shape[:3]
                        or not np.allclose(vol.affine, volumes[0].affine, atol=1e-3)):
            raise InputError(f"{path} does not have the shape/geometry of {paths[0]}; every channel must match")
        volumes.append(vol)
    first = volumes[0]
    array = first.array if len(volumes) == 1 else np.concatenate([v.array for v in volumes])
    return Volume(np.ascontiguousarray(array, dtype=dtype), first.affine, first.header)


def _read_one(path: Path, dtype: type, series_uid: str | None) -> Volume:
    """One file (or DICOM folder) as a `Volume` `(C, X, Y[, Z])` of `dtype`."""
    if _source_kind(path) != "nifti":
        vol = _read_other(path, dtype, series_uid)
    else:
        img = _load(path)
        data = _voxels(img, path, dtype)
        if data.ndim == 4:
            data = np.moveaxis(data, -1, 0)
        elif data.ndim in (2, 3):
            data = data[None]
        else:
            raise InputError(f"{path} has {data.ndim} dimensions; expected a 2D, 3D or 4D (channels last) image")
        vol = Volume(data, np.asarray(img.affine, dtype=np.float64), img.header.copy())
    if vol.array.ndim not in (3, 4):
        raise InputError(f"{path} has {vol.array.ndim - 1} dimensions; expected a 2D, 3D or 4D (channels last) image")
    return vol


def read_label(path: str | Path, *, series_uid: str | None = None) -> Volume:
    """Read a label map as `(1, X, Y, Z)` int16; non-integer values raise `InputError`."""
    path = Path(path)
    if _source_kind(path) != "nifti":
        vol = _read_other(path, None, series_uid)
        if vol.num_channels != 1:
            raise InputError(f"{path} is a label with {vol.num_channels} components per voxel; store labels as one "
                             "integer map")
        raw = vol.array[0]
        affine, header = vol.affine, None
    else:
        img = _load(path)
        floating = np.issubdtype(img.get_data_dtype(), np.floating)
        raw = _voxels(img, path, np.float64 if floating else np.int16)
        affine, header = np.asarray(img.affine, dtype=np.float64), img.header.copy()
    if np.issubdtype(raw.dtype, np.floating) and (not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw))):
        raise InputError(f"{path} holds non-integer label values; labels must be integers 0..K-1")
    data = raw.astype(np.int16, copy=False)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise InputError(f"{path} is a label with {data.ndim} dimensions; expected 2D or 3D")
    return Volume(data[None], affine, header)


def write_volume(vol: Volume, path: str | Path, *, overwrite: bool = False, dtype: type | None = None) -> None:
    """Write `vol` as NIfTI (`.nii` or `.nii.gz`) atomically, carrying its geometry exactly.

    A one-channel volume is written 3D; several channels as one 4D file (channels last). With a
    source header, its sform and qform (and their codes) are reused unchanged; otherwise the affine
    is written as both. `OutputExistsError` if `path` exists and not `overwrite`.
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"{path}: output must end in .nii or .nii.gz")
    img = to_nifti(vol, dtype=dtype)
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))


def to_nifti(vol: Volume, *, dtype: type | None = None) -> nib.Nifti1Image:
    """`vol` as an in-memory NIfTI image, exactly as `write_volume` writes it (3D for one channel,
    4D channels last otherwise; the source header's sform/qform and codes reused unchanged)."""
    data = vol.array[0] if vol.num_channels == 1 else np.moveaxis(vol.array, 0, -1)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if vol.header is not None:
        header = vol.header.copy()
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(np.nan, np.nan)
        img = nib.Nifti1Image(data, None, header=header)
        sform, scode = vol.header.get_sform(coded=True)
        qform, qcode = vol.header.get_qform(coded=True)
        if scode:
            img.set_sform(sform, code=int(scode))
        if qcode:
            img.set_qform(qform, code=int(qcode))
        if not scode and not qcode:
            img.set_sform(vol.affine, code=1)
            img.set_qform(vol.affine, code=1)
    else:
        img = nib.Nifti1Image(data, vol.affine)
        img.set_qform(vol.affine, code=1)
        img.set_sform(vol.affine, code=1)
    return img
