"""The dataset fingerprint: per case geometry and shape after cropping, per channel foreground intensities.

Written to `WORK_DIR/dataset_fingerprint.json`. Shapes and spacings are in array axis order
`(X, Y, Z)`, spacing in mm. Intensity statistics come from a bounded, seeded sample of foreground
(label > 0) voxels per case, so the cost does not grow with image size.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medseg3d.geometry import bounding_box
from medseg3d.io import Case, DatasetSpec, read_label, read_volume
from medseg3d.io.atomic import write_json_atomic
from medseg3d.workers import resolve_workers

log = logging.getLogger(__name__)

#: Foreground voxels sampled per case over the whole dataset (spread over the cases), and per case bounds.
TOTAL_INTENSITY_SAMPLES = 10_000_000
MIN_SAMPLES_PER_CASE, MAX_SAMPLES_PER_CASE = 1_000, 100_000

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: list[T], workers: int, description: str) -> list[R]:
    """`[fn(i) for i in items]` over `workers` processes (fork where available), with a progress bar.

    `workers` 0 or 1 runs in this process; a negative count raises `InputError`.
    """
    from rich.progress import track

    from medseg3d.logging_utils import console

    workers = resolve_workers(workers, 1)
    if workers <= 1 or len(items) <= 1:
        return [fn(i) for i in track(items, description=description, console=console, transient=True)]
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        results: Iterable[R] = pool.map(fn, items, chunksize=max(1, len(items) // (workers * 8)))
        return list(track(results, total=len(items), description=description, console=console, transient=True))


def _crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop `(C, X, Y, Z)` (and `(X, Y, Z)`) to the bounding box of voxels non-zero in any channel.

    The box of `medseg3d.geometry.bounding_box`, as `medseg3d.preprocess.crop` crops (fingerprinting
    comes before preprocessing in the data flow, so it does not import it).
    """
    box = bounding_box(np.any(data != 0, axis=0))
    if box is None:
        return data, seg
    return data[(slice(None), *box)], (None if seg is None else seg[box])


def case_fingerprint(case: Case, num_samples: int = 10_000, seed: int = 1234) -> dict[str, Any]:
    """Fingerprint of one case: spacing, shape, shape after crop, voxels per class, foreground samples.

    Returns a dict; `samples` is a list (per channel) of float32 arrays that `summarise` pools.
    """
    image = read_volume(case.images)
    label = read_label(case.label) if case.label is not None else None
    seg = None if label is None else np.asarray(label.array[0])
    data_c, seg_c = _crop_to_nonzero(np.asarray(image.array), seg)
    rng = np.random.default_rng(seed)
    samples: list[np.ndarray] = []
    class_voxels: dict[str, int] = {}
    if seg is not None:
        values, counts = np.unique(seg, return_counts=True)
        class_voxels = {str(int(v)): int(n) for v, n in zip(values, counts)}
        fg = seg_c > 0
        for c in range(data_c.shape[0]):
            vox = data_c[c][fg]
            if len(vox) > num_samples:
                vox = rng.choice(vox, num_samples, replace=False)
            samples.append(np.asarray(vox, dtype=np.float32))
    return {
        "name": case.name,
        "spacing": [float(s) for s in image.spacing],
        "shape": [int(s) for s in image.spatial_shape],
        "shape_after_crop": [int(s) for s in data_c.shape[1:]],
        "class_voxels": class_voxels,
        "samples": samples,
    }


def intensity_stats(values: np.ndarray) -> dict[str, float]:
    """Mean, std, median, min, max, 0.5 and 99.5 percentiles of a 1D sample (zeros when empty)."""
    if values.size == 0:
        return dict.fromkeys(("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5"), 0.0)
    p = np.percentile(values, [0.5, 50.0, 99.5])
    return {
        "mean": float(values.mean()), "std": float(values.std()), "median": float(p[1]),
        "min": float(values.min()), "max": float(values.max()),
        "percentile_00_5": float(p[0]), "percentile_99_5": float(p[2]),
    }


def summarise(spec: DatasetSpec, per_case: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool per-case fingerprints into the dataset fingerprint (the JSON written to disk)."""
    n_ch = spec.num_channels
    pooled = [
        np.concatenate([np.asarray(c["samples"][ch], dtype=np.float64) for c in per_case if c["samples"]] or [np.zeros(0)])
        for ch in range(n_ch)
    ]
    cases = [{k: v for k, v in c.items() if k != "samples"} for c in per_case]
    rel = [np.prod(c["shape_after_crop"]) / max(1, np.prod(c["shape"])) for c in cases]
    return {
        "dataset_name": spec.name,
        "num_cases": len(cases),
        "channel_names": list(spec.channel_names),
        "labels": {str(k): v for k, v in sorted(spec.labels.items())},
        "cases": cases,
        "spacings": [c["spacing"] for c in cases],
        "shapes_after_crop": [c["shape_after_crop"] for c in cases],
        "foreground_intensity_properties_per_channel": {str(ch): intensity_stats(pooled[ch]) for ch in range(n_ch)},
        "median_relative_size_after_cropping": float(np.median(rel)) if rel else 1.0,
    }


class _CaseJob:
    """Picklable closure for the process pool."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def __call__(self, case: Case) -> dict[str, Any]:
        return case_fingerprint(case, self.num_samples)


def compute_fingerprint(spec: DatasetSpec, workers: int = 1) -> dict[str, Any]:
    """Fingerprint every labelled case of `spec` over `workers` processes."""
    cases = [c for c in spec.cases if c.label is not None]
    per_case_n = int(np.clip(TOTAL_INTENSITY_SAMPLES // max(1, len(cases)), MIN_SAMPLES_PER_CASE, MAX_SAMPLES_PER_CASE))
    per_case = parallel_map(_CaseJob(per_case_n), cases, workers, "fingerprint")
    return summarise(spec, per_case)


def save_fingerprint(fingerprint: dict[str, Any], path: str | Path) -> None:
    """Write the fingerprint atomically."""
    write_json_atomic(Path(path), fingerprint)
