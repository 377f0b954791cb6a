"""DICOM series as input volumes: find the series in a folder, refuse what would need a guess, read it.

A case is a folder holding the files of one series (SimpleITK/GDCM find them by SeriesInstanceUID,
any file names, other files ignored). Before any voxel is read, every slice's header is checked:

- several series in the folder -> `InputError` naming the folder and every SeriesInstanceUID
  (choose one with `--series-uid`); a `--series-uid` the folder does not hold -> the ones it does;
- every slice has ImagePositionPatient, the same ImageOrientationPatient, PixelSpacing, Rows and
  Columns; no enhanced multi-frame file; at least 2 slices;
- slice positions, projected on the slice normal, are strictly increasing in GDCM's order, evenly
  spaced (every gap within 1 % of the median gap: a missing slice or an irregular series is
  reported with the files around the gap) and stacked along the normal (no gantry tilt / shear).

Nothing is interpolated or reordered beyond GDCM's sort along the normal. Geometry: ITK's (origin =
first slice's ImagePositionPatient, direction = the orientation's row and column cosines and their
cross product, LPS), converted to medseg3d's RAS+ affine by `medseg3d.io.convert.affine_from_sitk`;
voxels `(X, Y, Z)` = (column, row, slice in the order of `DicomSeries.files`), rescale slope and
intercept applied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg3d.errors import InputError
from medseg3d.io.convert import affine_from_sitk, sitk_voxels
from medseg3d.io.volume import HeaderInfo, Volume, spacing_from_affine

log = logging.getLogger(__name__)

#: Relative tolerance of a slice gap around the median gap, and of PixelSpacing between slices.
GAP_RTOL = 1e-2
#: Tolerance of ImageOrientationPatient cosines between slices.
ORIENTATION_ATOL = 1e-4
#: In-plane offset (mm) between a slice and the first, beyond which slices are not stacked on the normal.
SHEAR_ATOL_MM = 1e-2

_TAGS = {"position": "0020|0032", "orientation": "0020|0037", "pixel_spacing": "0028|0030",
         "rows": "0028|0010", "columns": "0028|0011", "frames": "0028|0008", "samples": "0028|0002"}


@dataclass(frozen=True)
class DicomSeries:
    """One checked series: its folder, SeriesInstanceUID and files in slice order (z index 0, 1, ...)."""

    folder: Path
    series_uid: str
    files: tuple[Path, ...]
    shape: tuple[int, int, int]  # (X, Y, Z) = (Columns, Rows, slices)
    slice_gap_mm: float


def series_ids(folder: str | Path) -> tuple[str, ...]:
    """SeriesInstanceUIDs of the DICOM files directly in `folder` (empty when there is none)."""
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        return ()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns on stderr for every folder without a series
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def choose_series(folder: str | Path, series_uid: str | None = None) -> str:
    """The one series of `folder` (or `series_uid`, checked to be there); `InputError` otherwise, never a guess."""
    folder = Path(folder)
    ids = series_ids(folder)
    if not ids:
        raise InputError(f"{folder} holds no DICOM series; give a folder of one series' DICOM files")
    if series_uid is not None:
        if series_uid not in ids:
            raise InputError(f"{folder} holds no series with SeriesInstanceUID {series_uid} (--series-uid); it holds: "
                             + ", ".join(ids))
        return series_uid
    if len(ids) > 1:
        raise InputError(f"{folder} holds {len(ids)} DICOM series: {', '.join(ids)}; medseg3d does not pick one: "
                         "pass --series-uid UID, or move each series into its own folder")
    return ids[0]


def check_series(folder: str | Path, series_uid: str | None = None) -> DicomSeries:
    """The series of `folder` (see `choose_series`), its slice headers checked as the module says."""
    import SimpleITK as sitk

    folder = Path(folder)
    uid = choose_series(folder, series_uid)
    files = tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    if len(files) < 2:
        raise InputError(f"the DICOM series {uid} in {folder} has {len(files)} slice file; a volume needs at "
                         "least 2 (the slice spacing is not guessed from one slice)")
    headers = [_slice_header(f) for f in files]
    first = headers[0]
    for f, h in zip(files[1:], headers[1:]):
        if (h["rows"], h["columns"]) != (first["rows"], first["columns"]):
            raise InputError(f"the DICOM series in {folder} mixes slice sizes: {f.name} is {h['columns']} x "
                             f"{h['rows']}, {files[0].name} {first['columns']} x {first['rows']} (columns x rows)")
        if not np.allclose(h["orientation"], first["orientation"], atol=ORIENTATION_ATOL):
            raise InputError(f"the DICOM series in {folder} mixes slice orientations (ImageOrientationPatient of "
                             f"{f.name} differs from {files[0].name}); export it again as one stack")
        if not np.allclose(h["pixel_spacing"], first["pixel_spacing"], rtol=GAP_RTOL):
            raise InputError(f"the DICOM series in {folder} has inconsistent pixel spacing: {f.name} "
                             f"{h['pixel_spacing'].tolist()} mm, {files[0].name} {first['pixel_spacing'].tolist()} mm")
    row, col = first["orientation"][:3], first["orientation"][3:]
    normal = np.cross(row, col)
    positions = np.stack([h["position"] for h in headers])
    offsets = positions - positions[0]
    along = offsets @ normal
    sheared = np.linalg.norm(offsets - np.outer(along, normal), axis=1)
    if sheared.max() > SHEAR_ATOL_MM:
        k = int(np.argmax(sheared))
        raise InputError(f"the slices of the DICOM series in {folder} are not stacked along their normal "
                         f"({files[k].name} is {sheared[k]:.3g} mm off it: gantry tilt or a sheared stack); "
                         "medseg3d does not resample it: reconstruct the series without tilt, or convert it to "
                         "NIfTI with a tool that corrects the tilt (e.g. dcm2niix)")
    gaps = np.diff(along)
    if np.any(gaps <= 0):
        k = int(np.argmax(gaps <= 0))
        raise InputError(f"the DICOM series in {folder} has two slices at the same position or out of order "
                         f"({files[k].name} and {files[k + 1].name}, {gaps[k]:.4g} mm apart along the normal); "
                         "remove the duplicate files")
    median = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - median) > GAP_RTOL * median)
    if bad.size:
        k = int(bad[0])
        ratio = gaps[k] / median
        what = (f"about {round(ratio) - 1} slice(s) missing" if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1
                else "inconsistent spacing")
        raise InputError(f"the DICOM series in {folder} has missing slices or inconsistent spacing: {bad.size} of "
                         f"{gaps.size} gap(s) differ from the median {median:.4g} mm, first {gaps[k]:.4g} mm between "
                         f"{files[k].name} and {files[k + 1].name} ({what}); medseg3d does not interpolate: "
                         "export the complete series again")
    shape = (first["columns"], first["rows"], len(files))
    return DicomSeries(folder, uid, files, shape, median)


def _slice_header(path: Path) -> dict[str, Any]:
    """The geometry tags of one slice file (SimpleITK reads the header only)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path} is not a readable DICOM file ({str(exc).strip().splitlines()[-1]}); copy it again "
                         "or remove it from the series folder") from exc

    def tag(name: str, required: bool = True) -> str | None:
        key = _TAGS[name]
        if not reader.HasMetaDataKey(key) or not reader.GetMetaData(key).strip():
            if required:
                raise InputError(f"{path} has no {name.replace('_', ' ')} ({key.replace('|', ',')}); the series "
                                 "geometry is not guessed: export it again from the scanner or PACS")
            return None
        return reader.GetMetaData(key).strip()

    frames = tag("frames", required=False)
    if frames is not None and int(float(frames)) > 1:
        raise InputError(f"{path} is an enhanced multi-frame DICOM ({frames} frames in one file), which medseg3d "
                         "does not read; convert it to NIfTI (e.g. dcm2niix) or export classic single-frame slices")
    samples = tag("samples", required=False)
    if samples is not None and int(samples) != 1:
        raise InputError(f"{path} has {samples} samples per pixel (colour); medseg3d reads grey-level DICOM series")
    try:
        return {"position": _numbers(tag("position"), 3), "orientation": _numbers(tag("orientation"), 6),
                "pixel_spacing": _numbers(tag("pixel_spacing"), 2),
                "rows": int(tag("rows")), "columns": int(tag("columns"))}  # type: ignore[arg-type]
    except ValueError as exc:
        raise InputError(f"{path} has a malformed geometry tag ({exc}); export the series again") from exc


def _numbers(text: str | None, n: int) -> np.ndarray:
    values = np.array([float(v) for v in str(text).split("\\")], dtype=np.float64)
    if values.size != n or not np.all(np.isfinite(values)):
        raise ValueError(f"{text!r} is not {n} numbers")
    return values


def _read_image(series: DicomSeries) -> Any:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series.files])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"the DICOM series {series.series_uid} in {series.folder} could not be read "
                         f"({str(exc).strip().splitlines()[-1]}); a file is probably truncated or compressed "
                         "with a codec GDCM lacks: copy it again or convert it") from exc


def read_dicom_volume(folder: str | Path, series_uid: str | None = None, dtype: type = np.float32) -> Volume:
    """The checked series of `folder` as a `Volume` `(1, X, Y, Z)` of `dtype` (rescale slope/intercept applied)."""
    series = check_series(folder, series_uid)
    image = _read_image(series)
    affine = affine_from_sitk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    data = sitk_voxels(image, str(series.folder))
    if tuple(data.shape[1:]) != series.shape:
        raise InputError(f"the DICOM series in {series.folder} read as {data.shape[1:]} voxels, its headers say "
                         f"{series.shape}; export the series again")
    return Volume(data.astype(dtype, copy=False), affine, None)


def read_dicom_header(folder: str | Path, series_uid: str | None = None) -> HeaderInfo:
    """Shape `(X, Y, Z)`, spacing and affine of the checked series of `folder`, from its slice headers."""
    import SimpleITK as sitk

    series = check_series(folder, series_uid)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(series.files[0]))
    reader.ReadImageInformation()
    spacing = (*reader.GetSpacing()[:2], series.slice_gap_mm)
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = affine_from_sitk(reader.GetOrigin(), spacing, direction.ravel())
    return HeaderInfo(Path(folder), series.shape, spacing_from_affine(affine), affine, np.dtype(np.float32))
