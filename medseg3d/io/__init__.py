"""Reading and writing volumes, dataset discovery and verification (the only place nibabel is used)."""

from medseg3d.io.atomic import atomic_path, write_bytes_atomic, write_json_atomic
from medseg3d.io.dataset import Case, DatasetSpec, discover, find_input_cases, load_dataset
from medseg3d.io.verify import DatasetSummary, verify_dataset
from medseg3d.io.volume import (
    HeaderInfo,
    Volume,
    read_header,
    read_label,
    read_volume,
    spacing_from_affine,
    strip_nifti_suffix,
    write_volume,
)

__all__ = [
    "Case", "DatasetSpec", "DatasetSummary", "HeaderInfo", "Volume", "atomic_path", "discover",
    "find_input_cases", "load_dataset", "read_header", "read_label", "read_volume", "spacing_from_affine",
    "strip_nifti_suffix", "verify_dataset", "write_bytes_atomic", "write_json_atomic", "write_volume",
]
