"""Writing predictions: labels in the input's format with its exact geometry, optional probabilities, atomically.

Output formats (`predict --output-format`, `medseg3d.io.formats`): NIfTI with the input's header,
NRRD/MHA with its origin, spacing and direction, or a DICOM SEG referencing the source series.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg3d.errors import InputError
from medseg3d.io import write_volume
from medseg3d.io.atomic import atomic_path
from medseg3d.io.dataset import Case
from medseg3d.io.formats import OUTPUT_FORMATS, OUTPUT_SUFFIX, file_format
from medseg3d.io.volume import Volume

log = logging.getLogger(__name__)


def output_path(output_dir: Path, case: str, file_ending: str = ".nii.gz") -> Path:
    """`OUTPUT_DIR/CASE.nii.gz` (or `.nii`, `.nrrd`, `.mha`, `.dcm`: the ending of the output format)."""
    return Path(output_dir) / f"{case}{file_ending}"


def output_endings(cases: Sequence[Case], output_format: str = "auto") -> dict[str, str]:
    """The file ending of each case's output (`--output-format`), checked before any work.

    `auto`: the input's format (`.nii` for a `.nii` input, `.mha` for `.mha`/`.mhd`, `.nrrd` for
    `.nrrd`/`.nhdr`; a DICOM series gives a DICOM SEG `.dcm`, or `.nii.gz` with a warning when highdicom
    is not installed). `nifti` keeps `.nii` for a `.nii` input. `dicom-seg` needs DICOM inputs and
    highdicom: `InputError` naming the cases otherwise, as for an unknown format.
    """
    from medseg3d.io.dicom_seg import INSTALL_HINT, highdicom_available

    if output_format not in OUTPUT_FORMATS:
        close = difflib.get_close_matches(output_format, OUTPUT_FORMATS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise InputError(f"--output-format {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}{hint}")
    dicom = [c.name for c in cases if c.images[0].is_dir()]
    if output_format == "dicom-seg":
        others = [c.name for c in cases if not c.images[0].is_dir()]
        if others:
            raise InputError(f"--output-format dicom-seg needs DICOM series inputs (a SEG references its source "
                             f"slices); case(s) {', '.join(others)} are files: use --output-format auto")
        if dicom and not highdicom_available():
            raise InputError(f"--output-format dicom-seg needs highdicom: {INSTALL_HINT}")
    seg_ok = output_format == "dicom-seg" or (output_format == "auto" and bool(dicom) and highdicom_available())
    if output_format == "auto" and dicom and not seg_ok:
        log.warning("highdicom is not installed: the DICOM series' labels are written as NIfTI (.nii.gz), not as "
                    "DICOM SEG; %s for DICOM SEG", INSTALL_HINT)
    endings = {}
    for case in cases:
        first = case.images[0]
        fmt = "dicom-seg" if first.is_dir() else file_format(first) or "nifti"
        chosen = fmt if output_format == "auto" else output_format
        if chosen == "dicom-seg" and not seg_ok:
            chosen = "nifti"
        ending = OUTPUT_SUFFIX[chosen]
        if chosen == "nifti" and first.name.lower().endswith(".nii"):
            ending = ".nii"
        endings[case.name] = ending
    return endings


def write_segmentation(
    seg: np.ndarray, reference: Volume, path: Path, *, overwrite: bool, source: Case | None = None,
    labels: dict[int, str] | None = None,
) -> None:
    """Write labels `(X, Y, Z)` to `path` in the format of its ending, with `reference`'s geometry.

    NIfTI: `reference`'s header and affine (sform/qform and codes) unchanged. `.nrrd`/`.mha`: its
    affine as ITK origin, spacing and direction. `.dcm`: a DICOM SEG of `source`'s DICOM series
    (`source.images[0]` its folder) with one segment per label of `labels` (id -> name).
    Integer type: uint8 (uint16 above 255 classes). Atomic: no half-written file is ever left.
    """
    dtype = np.uint8 if seg.max(initial=0) <= 255 else np.uint16
    name = path.name.lower()
    if name.endswith(".dcm"):
        from medseg3d.io.dicom import check_series
        from medseg3d.io.dicom_seg import write_dicom_seg

        if source is None or not source.images[0].is_dir() or labels is None:
            raise InputError(f"{path}: a DICOM SEG needs the source DICOM series and the label names")
        series = check_series(source.images[0], source.series_uid)
        write_dicom_seg(seg, series, labels, path, overwrite=overwrite)
    elif file_format(path) in ("nrrd", "mha"):
        from medseg3d.io.itk_files import write_itk_labels

        write_itk_labels(seg.astype(dtype, copy=False), reference.affine, path, overwrite=overwrite)
    else:
        write_volume(Volume(seg[None].astype(dtype, copy=False), reference.affine, reference.header), path,
                     overwrite=overwrite, dtype=dtype)


def write_probabilities(probs: np.ndarray, path: Path, *, overwrite: bool) -> None:
    """Class probabilities `(K, X, Y, Z)` float32 in the original grid to `path` (.npz, key `probabilities`)."""
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, probabilities=probs.astype(np.float32, copy=False))
