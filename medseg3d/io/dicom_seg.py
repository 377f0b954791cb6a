"""Label maps as DICOM Segmentation objects (highdicom) that reference their source series.

The SEG is BINARY, one segment per foreground label (segment number = label id, label = the
dataset's name for it, category and type SNOMED "Tissue", algorithm type AUTOMATIC, algorithm
"medseg3d"), in the source's frame of reference, patient and study; each frame references the
source slice (SOPInstanceUID) it lies on, with that slice's ImagePositionPatient, so PACS, OHIF and
3D Slicer show it on the series. Frames without any voxel of a segment are left out (highdicom's
default). Needs the optional `highdicom` (`pip install "medseg3d[dicom]"`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg3d.errors import InputError
from medseg3d.io.atomic import atomic_path
from medseg3d.io.dicom import DicomSeries

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "medseg3d[dicom]" (or pip install highdicom)'


def highdicom_available() -> bool:
    """True when highdicom (and so pydicom) can be imported."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return False
    return True


def write_dicom_seg(
    seg: np.ndarray, series: DicomSeries, labels: dict[int, str], path: str | Path, *, overwrite: bool,
    series_description: str = "medseg3d segmentation",
) -> None:
    """Write labels `(X, Y, Z)` on `series`' grid (z index k = `series.files[k]`) as a DICOM SEG to `path`.

    `labels`: id -> name, background 0 included (not a segment). Atomic. `InputError` naming the
    series folder when the labels do not fit the series or the source files lack what a SEG needs.
    """
    try:
        import highdicom as hd
        import pydicom
        from highdicom.seg import (
            SegmentAlgorithmTypeValues,
            Segmentation,
            SegmentationTypeValues,
            SegmentDescription,
        )
        from pydicom.sr.codedict import codes
    except ImportError as exc:
        raise InputError(f"writing a DICOM SEG needs highdicom: {INSTALL_HINT}, or use --output-format nifti") from exc
    from medseg3d import __version__

    if tuple(seg.shape) != series.shape:
        raise InputError(f"the labels {tuple(seg.shape)} do not have the shape {series.shape} of the DICOM series "
                         f"in {series.folder} (columns x rows x slices)")
    foreground = sorted(k for k in labels if k > 0)
    if foreground != list(range(1, len(foreground) + 1)):
        raise InputError(f"label ids {sorted(labels)} are not 0..K-1; a DICOM SEG numbers its segments 1, 2, ...")
    if seg.max(initial=0) > len(foreground):
        raise InputError(f"the labels hold value {int(seg.max())}, beyond the {len(foreground)} named label(s)")
    try:
        sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in series.files]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"a file of the DICOM series in {series.folder} could not be read by pydicom ({exc})") from exc
    for ds in sources:
        if "SliceThickness" not in ds or ds.SliceThickness in (None, ""):
            # type 2 in the image modules (may be empty) but needed in the SEG's pixel measures: the slice gap
            ds.SliceThickness = round(series.slice_gap_mm, 6)
    algorithm = hd.AlgorithmIdentificationSequence(name="medseg3d", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        SegmentDescription(segment_number=k, segment_label=str(labels[k])[:64],
                           segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
                           algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for k in foreground
    ]
    frames = np.ascontiguousarray(seg.transpose(2, 1, 0).astype(np.uint8 if len(foreground) < 256 else np.uint16))
    source_number = sources[0].get("SeriesNumber")
    try:
        dcm = Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(),
            series_number=int(source_number) + 1000 if source_number not in (None, "") else 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medseg3d",
            manufacturer_model_name="medseg3d", software_versions=__version__, device_serial_number="none",
            series_description=series_description,
        )
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise InputError(f"no DICOM SEG can reference the series in {series.folder}: {exc}; use --output-format "
                         "nifti (or nrrd/mha) for this case") from exc
    with atomic_path(path, overwrite=overwrite) as tmp:
        dcm.save_as(str(tmp))
    log.debug("wrote DICOM SEG %s: %d segment(s), %d frame(s)", path, len(foreground), int(dcm.NumberOfFrames))
