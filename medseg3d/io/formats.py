"""Which image formats are read and written, told apart by file name (no library imported here).

| format | read from | written as |
|---|---|---|
| `nifti` | `.nii.gz`, `.nii` (nibabel) | `.nii.gz` (`.nii` when the input was `.nii`) |
| `nrrd` | `.nrrd`, `.nhdr` (SimpleITK) | `.nrrd` (one gzip-compressed file) |
| `mha` | `.mha`, `.mhd` (SimpleITK) | `.mha` (one compressed file; an `.mhd` + `.raw` pair cannot be renamed atomically) |
| `dicom` | a folder holding one DICOM series (SimpleITK/GDCM) | `dicom-seg`: `CASE.dcm`, a DICOM Segmentation (highdicom) |
"""

from __future__ import annotations

from pathlib import Path

#: File suffixes per format, longest first within a format so `.nii.gz` wins over `.nii`.
FILE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "nifti": (".nii.gz", ".nii"),
    "nrrd": (".nrrd", ".nhdr"),
    "mha": (".mha", ".mhd"),
}
#: Every image file suffix medseg3d reads, longest first.
IMAGE_SUFFIXES: tuple[str, ...] = tuple(sorted((s for v in FILE_SUFFIXES.values() for s in v), key=len, reverse=True))
#: The suffixes as listed in messages, format by format.
LISTED_SUFFIXES = ", ".join(s for v in FILE_SUFFIXES.values() for s in v)
#: `predict --output-format` values; `auto` is the input's own format (a DICOM series gives `dicom-seg`).
OUTPUT_FORMATS = ("auto", "nifti", "nrrd", "mha", "dicom-seg")
#: The file ending each output format writes.
OUTPUT_SUFFIX = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-seg": ".dcm"}


def file_format(path: str | Path) -> str | None:
    """`nifti`, `nrrd` or `mha` from `path`'s suffix (case-insensitive), None for anything else."""
    name = Path(path).name.lower()
    for fmt, suffixes in FILE_SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    return None


def is_image_file(path: Path) -> bool:
    """A visible file of a format medseg3d reads (by name; the contents are checked when read)."""
    return not path.name.startswith(".") and file_format(path) is not None


def strip_image_suffix(name: str) -> str:
    """`case_0000.nii.gz` -> `case_0000`, `case.nrrd` -> `case`; other names unchanged."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_suffix(name: str) -> str:
    """The image suffix of `name` as written (`.nii.gz`, `.NRRD`, ...), or `""`."""
    return name[len(strip_image_suffix(name)):]
