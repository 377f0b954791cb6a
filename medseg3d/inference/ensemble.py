"""Ensembles of saved probabilities: average `CASE.npz` maps case by case, write labels.

The probability files are those `medseg3d predict --save-probabilities` and training's final
validation with `--save-probabilities` write (`medseg3d.inference.writer.write_probabilities`): key
`probabilities`, `(K, X, Y, Z)` float32 on the input's original grid. They carry no geometry; both
writers put the label map `CASE.nii.gz` (written with the input's exact header; `.nrrd`/`.mha` when
predict wrote that format) beside each one, and its geometry is what the ensemble's labels are
written with, in its format.

Averaging is one function (`average_probabilities`) shared by `medseg3d ensemble`, `find-best` and
`predict --best`, so the three give bit-identical labels from the same probabilities. Memory: one
case at a time, at most two `(K, X, Y, Z)` float32 arrays (the running sum and the one just read).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medseg3d.errors import CasesFailedError, InputError, OutputError, describe_case_error
from medseg3d.logging_utils import console

log = logging.getLogger(__name__)

PROBABILITY_SUFFIX = ".npz"


class EnsembleError(CasesFailedError):
    """Some cases could not be ensembled (the others were written); lists each case and why."""


@dataclass
class EnsembleSummary:
    """What `ensemble_folders` did: cases written, skipped (output existed), failed `(case, why)`."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def read_probabilities(path: Path) -> np.ndarray:
    """`(K, X, Y, Z)` float32 probabilities of `path` (`.npz`, key `probabilities`).

    `InputError` naming the file when it is missing, unreadable or lacks the key.
    """
    path = Path(path)
    fix = "rerun the prediction with --save-probabilities (or the final validation: `medseg3d train ... " \
          "--validation-only --save-probabilities`)"
    try:
        with np.load(path, allow_pickle=False) as data:
            if "probabilities" not in data.files:
                raise InputError(f"{path} holds no 'probabilities' array (keys: {', '.join(data.files)}); {fix}")
            probs = data["probabilities"]
    except FileNotFoundError as exc:
        raise InputError(f"{path} does not exist; {fix}") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc}); {fix}") from exc
    if probs.ndim != 4:
        raise InputError(f"{path}: probabilities have shape {probs.shape}, expected (K, X, Y, Z); {fix}")
    return probs.astype(np.float32, copy=False)


def average_probabilities(maps: Iterable[np.ndarray]) -> np.ndarray:
    """Mean of `(K, X, Y, Z)` probability maps, float32: summed in the given order, then divided.

    Consumes `maps` lazily (pass a generator to hold one input at a time beside the sum).
    `ValueError` when the shapes differ or there is none.
    """
    total: np.ndarray | None = None
    n = 0
    for m in maps:
        if total is None:
            total = np.array(m, dtype=np.float32, copy=True)
        else:
            if m.shape != total.shape:
                raise ValueError(f"probability maps differ in shape: {tuple(m.shape)} vs {tuple(total.shape)}")
            total += m
        n += 1
    if total is None:
        raise ValueError("no probability maps to average")
    total /= np.float32(n)
    return total


def labels_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """Argmax over classes of `(K, X, Y, Z)` -> labels `(X, Y, Z)` uint8 (uint16 above 256 classes).

    Slab by slab along the first axis, so no full-size int64 temporary is made.
    """
    out = np.empty(probs.shape[1:], dtype=np.uint8 if probs.shape[0] <= 256 else np.uint16)
    for x in range(0, probs.shape[1], 16):
        out[x:x + 16] = np.argmax(probs[:, x:x + 16], axis=0)
    return out


def ensemble_labels(paths: Sequence[Path]) -> np.ndarray:
    """Labels `(X, Y, Z)` of the averaged probabilities in `paths` (one `.npz` per member, one case)."""
    return labels_from_probabilities(average_probabilities(read_probabilities(p) for p in paths))


def _label_beside(npz: Path) -> Path | None:
    """The label map `predict` wrote beside `CASE.npz` (`CASE.nii.gz`, `.nii`, `.nrrd`, `.mha`, ...)."""
    from medseg3d.io.formats import IMAGE_SUFFIXES

    stem = npz.name[: -len(PROBABILITY_SUFFIX)]
    for ending in IMAGE_SUFFIXES:
        candidate = npz.with_name(stem + ending)
        if candidate.is_file():
            return candidate
    return None


def _written_suffix(name: str) -> str:
    """The ending an ensemble writes beside a member's `name`: its own format (`.mhd`/`.nhdr` pairs as
    one compressed `.mha`/`.nrrd` file, as `predict` writes them)."""
    from medseg3d.io.formats import OUTPUT_SUFFIX, file_format

    return ".nii" if name.lower().endswith(".nii") else OUTPUT_SUFFIX[file_format(name) or "nifti"]


def probability_cases(folder: Path) -> dict[str, Path]:
    """`{case: CASE.npz}` directly in `folder`; `InputError` when it is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give folders written by `medseg3d predict --save-probabilities`")
    return {p.name[: -len(PROBABILITY_SUFFIX)]: p for p in sorted(folder.glob(f"*{PROBABILITY_SUFFIX}"))
            if not p.name.startswith(".")}


def ensemble_folders(in_dirs: Sequence[str | Path], out_dir: str | Path, *, postprocessing: dict | None = None,
                     overwrite: bool = False) -> EnsembleSummary:
    """Average the probabilities of every case found in all `in_dirs` and write `out_dir/CASE.nii.gz`
    (or `.nrrd`/`.mha`: the format of the label map beside the case's first `.npz`).

    Each label map gets the geometry of the label map beside the case's first `.npz` (the input's
    own geometry, as `predict` wrote it; a NIfTI's header unchanged), then `postprocessing` (a `medseg3d.postprocess` decision).
    A case missing from some folder, without that label file, or whose maps differ in shape fails
    alone; at the end `EnsembleError` names every failed case. Existing outputs are skipped unless
    `overwrite`; every file is written atomically.
    """
    from medseg3d.inference.writer import output_path, write_segmentation
    from medseg3d.io import read_label
    from medseg3d.postprocess import apply_postprocessing

    dirs = [Path(d) for d in in_dirs]
    if len(dirs) < 2:
        raise InputError("give at least two probability folders to ensemble")
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise InputError("the same folder is given twice; each member of the ensemble is one folder")
    found = [probability_cases(d) for d in dirs]
    names = sorted(set().union(*found))
    if not names:
        raise InputError(f"no CASE.npz in {', '.join(map(str, dirs))}; predict with --save-probabilities first")
    out_dir = Path(out_dir)
    summary = EnsembleSummary()
    todo: list[str] = []
    for name in names:
        lacking = [str(d) for d, f in zip(dirs, found) if name not in f]
        if lacking:
            why = f"no {name}.npz in {', '.join(lacking)}; predict it there with --save-probabilities or leave that " \
                  "folder out"
            summary.failed.append((name, why))
        else:
            todo.append(name)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("ensembling", total=len(todo))
        for name in todo:
            paths = [f[name] for f in found]
            try:
                geometry_file = _label_beside(paths[0])
                if geometry_file is None:
                    raise InputError(f"no {name}.nii.gz (or .nrrd, .mha) beside {paths[0]} to take the geometry "
                                     "from; copy the label map predict wrote with it back into that folder")
                out = output_path(out_dir, name, _written_suffix(geometry_file.name))
                if out.exists() and not overwrite:
                    summary.skipped.append(name)
                    continue
                geometry = read_label(geometry_file)
                try:
                    seg = ensemble_labels(paths)
                except ValueError as exc:
                    raise InputError(f"{exc} ({', '.join(map(str, paths))}): the folders were predicted "
                                     "from different images") from exc
                if seg.shape != geometry.spatial_shape:
                    raise InputError(f"probabilities of shape {seg.shape} do not fit {geometry_file} "
                                     f"{geometry.spatial_shape}")
                out_dir.mkdir(parents=True, exist_ok=True)
                write_segmentation(apply_postprocessing(seg, postprocessing), geometry, out, overwrite=overwrite)
                summary.written.append(name)
            except OutputError:
                raise
            except Exception as exc:
                why = describe_case_error(exc, "ensemble")
                log.error("case %s failed: %s", name, why)
                log.debug("traceback of case %s", name, exc_info=True)
                summary.failed.append((name, why))
            finally:
                bar.advance(task)
    log.info("ensembled %d case(s) into %s, %d skipped (existing), %d failed", len(summary.written), out_dir,
             len(summary.skipped), len(summary.failed))
    if summary.failed:
        raise EnsembleError("ensemble", summary.failed, len(names), f"the others were written to {out_dir}", summary)
    return summary
