"""Writing predictions: NIfTI labels with the input's exact geometry, optional probabilities, atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg3d.io import write_volume
from medseg3d.io.atomic import atomic_path
from medseg3d.io.volume import Volume


def output_path(output_dir: Path, case: str, file_ending: str = ".nii.gz") -> Path:
    """`OUTPUT_DIR/CASE.nii.gz` (or `.nii` when the input was uncompressed)."""
    return Path(output_dir) / f"{case}{file_ending}"


def write_segmentation(seg: np.ndarray, reference: Volume, path: Path, *, overwrite: bool) -> None:
    """Write labels `(X, Y, Z)` with `reference`'s header and affine (sform/qform and codes) unchanged.

    Integer type: uint8 (uint16 above 255 classes). Atomic: no half-written file is ever left.
    """
    dtype = np.uint8 if seg.max(initial=0) <= 255 else np.uint16
    write_volume(Volume(seg[None].astype(dtype, copy=False), reference.affine, reference.header), path,
                 overwrite=overwrite, dtype=dtype)


def write_probabilities(probs: np.ndarray, path: Path, *, overwrite: bool) -> None:
    """Class probabilities `(K, X, Y, Z)` float32 in the original grid to `path` (.npz, key `probabilities`)."""
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, probabilities=probs.astype(np.float32, copy=False))
