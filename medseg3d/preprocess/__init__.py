"""Preprocessing: crop to non-zero, normalise, resample; the memory-mapped cache."""

from medseg3d.preprocess.cache import case_paths, is_cached, list_cached_cases, load_case, save_case
from medseg3d.preprocess.pipeline import (
    PreprocessedCase,
    compute_new_shape,
    preprocess_case,
    probs_to_original,
    resample_data,
    resample_seg,
    seg_to_original,
)

__all__ = [
    "PreprocessedCase", "preprocess_case", "resample_data", "resample_seg", "compute_new_shape",
    "seg_to_original", "probs_to_original", "case_paths", "is_cached", "list_cached_cases", "load_case",
    "save_case",
]
