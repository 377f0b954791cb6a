"""`verify`: check a dataset before anything is computed, and report every problem at once.

Headers are read before voxels; cases are checked in parallel threads (nibabel's gzip inflation and
numpy's reductions release the GIL, and threads avoid re-importing the package in workers).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg3d.errors import DatasetError, InputError, Problem
from medseg3d.io.dataset import Case, DatasetSpec, discover
from medseg3d.io.volume import HeaderInfo, read_header, read_label, read_volume
from medseg3d.workers import resolve_workers

log = logging.getLogger(__name__)

#: Geometry tolerances between an image's channels and its label.
SPACING_RTOL = 1e-3
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-3


@dataclass
class CaseStats:
    name: str
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    labels_present: tuple[int, ...] = ()


@dataclass
class DatasetSummary:
    """What `verify` found in a valid dataset."""

    spec: DatasetSpec
    cases: list[CaseStats] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_cases(self) -> int:
        return len(self.cases)

    def spacing_range(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        s = np.array([c.spacing for c in self.cases])
        return tuple(s.min(0).round(4).tolist()), tuple(s.max(0).round(4).tolist())

    def shape_range(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        s = np.array([c.shape for c in self.cases])
        return tuple(s.min(0).tolist()), tuple(s.max(0).tolist())


def _geometry_problems(case: str, ref: HeaderInfo, other: HeaderInfo, what: str) -> list[Problem]:
    problems = []
    ndim = min(3, len(ref.shape), len(other.shape))
    if tuple(ref.shape[:ndim]) != tuple(other.shape[:ndim]):
        problems.append(Problem(case, str(other.path), f"{what} shape {other.shape[:ndim]} differs from the image's {ref.shape[:ndim]}", "resample or re-export so image and label share one grid"))
        return problems
    if not np.allclose(ref.spacing, other.spacing, rtol=SPACING_RTOL):
        problems.append(Problem(case, str(other.path), f"{what} spacing {tuple(round(s, 4) for s in other.spacing)} differs from the image's {tuple(round(s, 4) for s in ref.spacing)} mm", "write the label with the image's header (same affine)"))
    if not np.allclose(ref.affine[:3, 3], other.affine[:3, 3], atol=ORIGIN_ATOL_MM):
        problems.append(Problem(case, str(other.path), f"{what} origin {other.affine[:3, 3].round(3).tolist()} differs from the image's {ref.affine[:3, 3].round(3).tolist()} mm", "write the label with the image's header (same affine)"))
    rd = ref.affine[:3, :3] / np.maximum(np.linalg.norm(ref.affine[:3, :3], axis=0), 1e-12)
    od = other.affine[:3, :3] / np.maximum(np.linalg.norm(other.affine[:3, :3], axis=0), 1e-12)
    if not np.allclose(rd, od, atol=DIRECTION_ATOL):
        problems.append(Problem(case, str(other.path), f"{what} orientation (direction cosines) differs from the image's", "reorient the label to the image (e.g. with the image as reference in 3D Slicer)"))
    return problems


def check_case(case: Case, spec: DatasetSpec) -> tuple[list[Problem], CaseStats | None]:
    """Every check of one case: readable files, channels, shapes, geometry, label values, NaN/Inf."""
    problems: list[Problem] = []
    headers: list[HeaderInfo] = []
    for path in (*case.images, case.label):
        if path is None:
            continue
        try:
            headers.append(read_header(path))
        except InputError as exc:
            problems.append(Problem(case.name, str(path), f"unreadable: {exc}", "copy the file again from its source or re-export it as NIfTI"))
    if problems:
        return problems, None
    image_headers, label_header = headers[:-1], headers[-1]
    first = image_headers[0]
    n_channels = sum(h.shape[3] if len(h.shape) == 4 else 1 for h in image_headers)
    if n_channels != spec.num_channels:
        problems.append(Problem(case.name, str(first.path), f"has {n_channels} channel(s), dataset.json declares {spec.num_channels} ({', '.join(spec.channel_names)})", "fix 'modality'/'channel_names' or the image files"))
    for h in image_headers[1:]:
        problems += _geometry_problems(case.name, first, h, "channel")
    if len(label_header.shape) == 4 and label_header.shape[3] != 1:
        problems.append(Problem(case.name, str(label_header.path), f"the label is 4D {label_header.shape}", "store labels as one 3D integer map"))
    else:
        problems += _geometry_problems(case.name, first, label_header, "label")
    if problems:
        return problems, None
    try:
        image = read_volume(case.images)
    except InputError as exc:
        return [Problem(case.name, str(case.images[0]), f"voxels unreadable: {exc}", "copy the file again; it is probably truncated")], None
    bad = ~np.isfinite(image.array)
    if bad.any():
        problems.append(Problem(case.name, str(case.images[0]), f"{int(bad.sum())} voxel(s) are NaN or Inf", "replace them (e.g. with the minimum intensity) before training"))
    try:
        label = read_label(case.label)  # type: ignore[arg-type]
    except InputError as exc:
        problems.append(Problem(case.name, str(case.label), str(exc).split(": ", 1)[-1] if "non-integer" in str(exc) else f"voxels unreadable: {exc}", "store labels as integers 0..K-1 (uint8/int16)"))
        return problems, None
    present = tuple(int(v) for v in np.unique(label.array))
    undeclared = sorted(set(present) - set(spec.labels))
    if undeclared:
        problems.append(Problem(case.name, str(case.label), f"label values {undeclared} are not declared in dataset.json (declared: {sorted(spec.labels)})", "declare them in 'labels' or fix the label map"))
    return problems, CaseStats(case.name, first.shape[:3] if len(first.shape) >= 3 else first.shape, first.spacing, present)


def verify_dataset(root: str | Path, workers: int | None = None, progress: bool = True) -> DatasetSummary:
    """Check the dataset at `root`; raise `DatasetError` naming every problem, else a summary."""
    start = time.perf_counter()
    spec, problems = discover(root)
    if spec is None:
        raise DatasetError(f"dataset {root} cannot be read", problems)
    workers = resolve_workers(workers, min(8, (os.cpu_count() or 1) * 2))
    results: list[tuple[list[Problem], CaseStats | None]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(check_case, c, spec) for c in spec.cases if c.label is not None]
        if progress:
            from rich.progress import track

            from medseg3d.logging_utils import console

            results = [f.result() for f in track(futures, description="verify", console=console, transient=True)]
        else:
            results = [f.result() for f in futures]
    stats = []
    for case_problems, case_stats in results:
        problems += case_problems
        if case_stats is not None:
            stats.append(case_stats)
    dims = {len(s.shape) for s in stats}
    if len(dims) > 1:
        problems.append(Problem(None, None, f"cases mix dimensionalities {sorted(dims)}", "use only 3D (or only 2D) images in one dataset"))
    if not spec.cases and not problems:
        problems.append(Problem(None, str(spec.root), "no training cases found", "put images in imagesTr and labels in labelsTr"))
    if problems:
        raise DatasetError(f"dataset {root} failed verification", problems)
    summary = DatasetSummary(spec, stats, time.perf_counter() - start)
    log.debug("verified %d cases in %.2f s", summary.num_cases, summary.seconds)
    return summary
