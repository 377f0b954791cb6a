"""The preprocessed cache: `WORK_DIR/preprocessed/<data_identifier>/CASE.npy`, `CASE_seg.npy`, `CASE.json`.

Images float16 `(C, X, Y, Z)` (float32 when a value does not fit float16, e.g. unnormalised raw
intensities above 65504), labels int8 `(X, Y, Z)`, read memory-mapped for fast random patch reads;
the patch sampler casts patches to float32. float16 halves the footprint of the image arrays: after
normalisation values are O(1-10), where float16's relative step (2^-11) is far below the noise the
augmentation adds. Every file is written atomically; a case counts as cached only when all its files exist and
their headers agree with its properties (so an interrupted run resumes where it stopped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg3d.errors import PlanError
from medseg3d.io.atomic import atomic_path, write_bytes_atomic


@dataclass(frozen=True)
class CasePaths:
    data: Path
    seg: Path
    properties: Path


def cache_dir(work_dir: str | Path, data_identifier: str) -> Path:
    return Path(work_dir) / "preprocessed" / data_identifier


def case_paths(work_dir: str | Path, data_identifier: str, case: str) -> CasePaths:
    """Paths of one cached case (they may not exist)."""
    d = cache_dir(work_dir, data_identifier)
    return CasePaths(d / f"{case}.npy", d / f"{case}_seg.npy", d / f"{case}.json")


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(fh)
        return tuple(shape), dtype
    except (OSError, ValueError):
        return None


def is_cached(work_dir: str | Path, data_identifier: str, case: str, with_seg: bool = True) -> bool:
    """True when the case's files exist, are complete and agree with its properties."""
    p = case_paths(work_dir, data_identifier, case)
    try:
        props = json.loads(p.properties.read_text(encoding="utf-8"))
        expected = tuple(props["shape_after_resample"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    head = _npy_shape(p.data)
    if head is None or head[0][1:] != expected or head[1] not in (np.float16, np.float32):
        return False
    size = p.data.stat().st_size
    if size < int(np.prod(head[0])) * np.dtype(head[1]).itemsize:
        return False
    if with_seg:
        sh = _npy_shape(p.seg)
        if sh is None or sh[0] != expected or sh[1] != np.int8:
            return False
    return True


FLOAT16_SAFE = 60000.0  # below float16's largest finite value (65504), with margin for rounding


def cache_dtype(data: np.ndarray) -> np.dtype:
    """float16 when every value of `data` fits it, else float32."""
    if data.size == 0 or data.dtype == np.float16:
        return np.dtype(np.float16)
    return np.dtype(np.float16) if float(np.max(np.abs(data))) < FLOAT16_SAFE else np.dtype(np.float32)


def save_case(
    work_dir: str | Path, data_identifier: str, case: str, data: np.ndarray, seg: np.ndarray | None,
    properties: dict[str, Any],
) -> None:
    """Write one case atomically: arrays first, properties last (the properties file marks completion)."""
    p = case_paths(work_dir, data_identifier, case)
    with atomic_path(p.data) as tmp:
        np.save(tmp, np.ascontiguousarray(data, dtype=cache_dtype(data)))
    if seg is not None:
        with atomic_path(p.seg) as tmp:
            np.save(tmp, np.ascontiguousarray(seg, dtype=np.int8))
    # compact JSON: class_locations holds thousands of coordinates
    write_bytes_atomic(p.properties, json.dumps(properties, separators=(",", ":")).encode("utf-8"))


def list_cached_cases(work_dir: str | Path, data_identifier: str) -> list[str]:
    """Names of the cases with a properties file in the cache, sorted."""
    d = cache_dir(work_dir, data_identifier)
    if not d.is_dir():
        return []
    return sorted(f.stem for f in d.glob("*.json") if not f.name.startswith("."))


def labelled_cases(work_dir: str | Path, data_identifier: str) -> list[str]:
    """The cached cases with a label (what training samples); PlanError saying to run `plan` when there is none."""
    cases = [c for c in list_cached_cases(work_dir, data_identifier) if is_cached(work_dir, data_identifier, c)]
    if not cases:
        raise PlanError(f"no labelled case in the preprocessed cache {Path(work_dir) / 'preprocessed' / data_identifier}; "
                        "run `medseg3d plan DATA_DIR -o WORK_DIR` first (it preprocesses the training cases)")
    return cases


def load_case(
    work_dir: str | Path, data_identifier: str, case: str, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """`(data (C, X, Y, Z) float16 or float32, seg (X, Y, Z) int8 or None, properties)` of one cached case.

    With `mmap` the arrays are read-only memory maps. Raises PlanError when the case is missing.
    """
    p = case_paths(work_dir, data_identifier, case)
    if not p.properties.is_file() or not p.data.is_file():
        raise PlanError(
            f"case {case} is not in the preprocessed cache {p.data.parent}; rerun `medseg3d plan` to complete it"
        )
    mode = "r" if mmap else None
    props = json.loads(p.properties.read_text(encoding="utf-8"))
    data = np.load(p.data, mmap_mode=mode)
    seg = np.load(p.seg, mmap_mode=mode) if p.seg.is_file() else None
    return data, seg, props


def disk_footprint(work_dir: str | Path, data_identifier: str) -> int:
    """Bytes used by the cache folder of `data_identifier`."""
    d = cache_dir(work_dir, data_identifier)
    return sum(f.stat().st_size for f in d.glob("*") if f.is_file()) if d.is_dir() else 0
