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
    "PreprocessedCase",
    "case_paths",
    "compute_new_shape",
    "is_cached",
    "list_cached_cases",
    "load_case",
    "preprocess_case",
    "probs_to_original",
    "resample_data",
    "resample_seg",
    "save_case",
    "seg_to_original",
]
