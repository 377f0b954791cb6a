"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Label maps are the files of every format `predict` writes (`.nii.gz`, `.nii`, `.nrrd`, `.mha`, ...;
`medseg3d.io.formats`), matched by file name without that suffix (a trailing `_0000` is ignored, so
`case_0000.nii.gz` matches `case.nrrd`). Every prediction needs a reference with the same shape,
spacing, origin and direction. A case that fails (no reference, other grid, unreadable file, negative
labels) never stops the others: the good cases are evaluated and written (JSON/CSV, with the failed
ones listed under `failed`), then one `EvaluationError` names every failed case, by case and file.
Cases run in parallel worker processes with a progress bar. Metric definitions:
`medseg3d.evaluation.metrics` and docs/evaluation.md.
"""

from __future__ import annotations

import csv
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medseg3d.errors import CasesFailedError, DatasetError, InputError, Problem, describe_case_error
from medseg3d.evaluation.metrics import CASE_KEYS, CLASS_KEYS, case_metrics, empty_class_result
from medseg3d.io import atomic_path, read_label, write_json_atomic
from medseg3d.io.formats import LISTED_SUFFIXES, is_image_file, strip_image_suffix
from medseg3d.logging_utils import console
from medseg3d.workers import resolve_workers

log = logging.getLogger(__name__)

#: Geometry tolerances: spacing relative, direction cosines absolute, origin in mm.
SPACING_RTOL = 1e-4
DIRECTION_ATOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
#: Keys averaged per class (HD95 skips NaN and reports how many it skipped).
MEAN_KEYS = ("dice", "iou", "hd95", "precision", "recall")


class EvaluationError(CasesFailedError):
    """Some cases could not be evaluated (the others were, and their summary is `summary`)."""


@dataclass(frozen=True)
class CasePair:
    """One case to evaluate: its name, the predicted and the reference label file."""

    name: str
    pred: Path
    ref: Path


def case_key(filename: str) -> str:
    """Matching key of a file name: no image suffix (NIfTI, NRRD, MHA), no trailing `_0000` channel index."""
    stem = strip_image_suffix(filename)
    return stem.removesuffix("_0000")


def list_label_files(folder: Path) -> dict[str, Path]:
    """`{case key: path}` of the label maps directly in `folder`: every format `predict` writes as a
    file (`.nii.gz`, `.nii`, `.nrrd`, `.nhdr`, `.mha`, `.mhd`; `medseg3d.io.formats`)."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give the folder holding the label maps ({LISTED_SUFFIXES})")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and is_image_file(path):
            key = case_key(path.name)
            if key in files:
                raise DatasetError(
                    f"two files in {folder} are the same case",
                    [Problem(key, path.name, f"duplicates {files[key].name}", "keep one file per case")],
                )
            files[key] = path
    return files


def match_cases(pred_dir: str | Path, ref_dir: str | Path) -> tuple[list[CasePair], list[Problem]]:
    """Pairs of prediction and reference files by case name, and a `Problem` per prediction without
    a reference (that case fails, the others go on); references without a prediction are skipped
    with a warning (e.g. one fold's validation cases against the whole dataset).
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds = list_label_files(pred_dir)
    refs = list_label_files(ref_dir)
    if not preds:
        raise InputError(f"{pred_dir} holds no predictions ({LISTED_SUFFIXES})")
    return pair_available(preds, refs, str(ref_dir))


def pair_available(preds: dict[str, Path], refs: dict[str, Path],
                   ref_where: str) -> tuple[list[CasePair], list[Problem]]:
    """Pair `{case: prediction}` with `{case: reference}`: the pairs, and a `Problem` per prediction
    without a reference in `ref_where`."""
    missing = sorted(set(preds) - set(refs))
    problems = [Problem(c, str(preds[c]), f"has no reference label map in {ref_where}",
                        f"add {c}.nii.gz to {ref_where} or remove the prediction") for c in missing]
    unused = len(set(refs) - set(preds))
    if unused:
        log.warning("%d reference(s) in %s have no prediction and are not evaluated", unused, ref_where)
    return [CasePair(c, preds[c], refs[c]) for c in sorted(set(preds) & set(refs))], problems


def pair_with_references(preds: dict[str, Path], refs: dict[str, Path], ref_where: str) -> list[CasePair]:
    """`pair_available` for callers that need every prediction paired: `DatasetError` lists the unpaired."""
    pairs, problems = pair_available(preds, refs, ref_where)
    if problems:
        raise DatasetError(f"predictions without a reference in {ref_where}", problems)
    return pairs


def check_geometry(name: str, pred_affine: np.ndarray, ref_affine: np.ndarray, pred_shape: tuple, ref_shape: tuple,
                   pred_file: str) -> Problem | None:
    """A `Problem` describing how the prediction's grid differs from the reference's, or None."""
    fix = "write the prediction on the reference's grid (same shape, spacing, origin, direction)"
    if tuple(pred_shape) != tuple(ref_shape):
        return Problem(name, pred_file, f"shape {tuple(pred_shape)} differs from the reference's {tuple(ref_shape)}", fix)
    sp_p = np.linalg.norm(pred_affine[:3, :3], axis=0)
    sp_r = np.linalg.norm(ref_affine[:3, :3], axis=0)
    if not np.allclose(sp_p, sp_r, rtol=SPACING_RTOL, atol=1e-6):
        return Problem(name, pred_file, f"spacing {np.round(sp_p, 5).tolist()} mm differs from the reference's "
                       f"{np.round(sp_r, 5).tolist()} mm", fix)
    if not np.allclose(pred_affine[:3, :3] / sp_p, ref_affine[:3, :3] / sp_r, atol=DIRECTION_ATOL):
        return Problem(name, pred_file, "direction (orientation) differs from the reference's", fix)
    if not np.allclose(pred_affine[:3, 3], ref_affine[:3, 3], atol=ORIGIN_ATOL_MM):
        return Problem(name, pred_file, f"origin {np.round(pred_affine[:3, 3], 4).tolist()} mm differs from the "
                       f"reference's {np.round(ref_affine[:3, 3], 4).tolist()} mm", fix)
    return None


def load_pair(pair: CasePair) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Reference `(X, Y, Z)`, prediction `(X, Y, Z)` and spacing (mm), geometry checked.

    Raises `DatasetError` (one problem naming the case) on a geometry mismatch or negative labels.
    """
    ref_vol = read_label(pair.ref)
    pred_vol = read_label(pair.pred)
    problem = check_geometry(pair.name, pred_vol.affine, ref_vol.affine, pred_vol.spatial_shape,
                             ref_vol.spatial_shape, str(pair.pred))
    if problem is None:
        for vol, path in ((ref_vol, pair.ref), (pred_vol, pair.pred)):
            if vol.array.size and vol.array.min() < 0:
                problem = Problem(pair.name, str(path), "holds negative label values", "labels must be 0..K-1")
    if problem is not None:
        raise DatasetError("cannot evaluate", [problem])
    return ref_vol.array[0], pred_vol.array[0], ref_vol.spacing


def evaluate_case(pair: CasePair, labels: Sequence[int] | None = None) -> dict:
    """Every metric of one case (see `metrics.case_metrics`) plus its name, files and spacing."""
    ref, pred, spacing = load_pair(pair)
    result = case_metrics(ref, pred, spacing, labels)
    return {"case": pair.name, "pred": str(pair.pred), "ref": str(pair.ref), "spacing": list(spacing), **result}


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds (spawn re-imports everything per worker: seconds).
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _guarded(fn: Callable[..., Any], pair: CasePair, *args: Any) -> tuple[Any, list[Problem]]:
    # DatasetError's problems do not survive pickling back from a worker, so they travel as a value.
    try:
        return fn(pair, *args), []
    except DatasetError as exc:
        return None, list(exc.problems) or [Problem(pair.name, str(pair.pred), str(exc), "see the message")]
    except Exception as exc:  # unreadable file, ...: this case fails, the others go on
        log.debug("case %s failed", pair.name, exc_info=True)
        return None, [Problem(pair.name, None, describe_case_error(exc, "evaluate"),
                              "replace or remove the file named, then rerun")]


def run_cases(fn: Callable[..., Any], pairs: Sequence[CasePair], workers: int | None, what: str,
              *args: Any) -> tuple[list, list[Problem]]:
    """`fn(pair, *args)` for every pair, in `workers` processes, with a progress bar, in pair order.

    Returns the results (None where a case failed) and the problems of the failed cases (sorted by
    case): one failing case never stops the others.
    """
    workers = default_workers(workers, len(pairs))
    results: list[Any] = [None] * len(pairs)
    problems: list[Problem] = []
    columns = (TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(what, total=len(pairs))
        if workers <= 1:
            for i, pair in enumerate(pairs):
                results[i], found = _guarded(fn, pair, *args)
                problems.extend(found)
                progress.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
                futures = {pool.submit(_guarded, fn, pair, *args): i for i, pair in enumerate(pairs)}
                for future in as_completed(futures):
                    results[futures[future]], found = future.result()
                    problems.extend(found)
                    progress.advance(task)
    return results, sorted(problems, key=lambda p: p.case or "")


def failed_cases(problems: Sequence[Problem]) -> list[tuple[str, str]]:
    """`(case, why)` of each problem, for `CasesFailedError` (the why names the file and the fix)."""
    return [(p.case or "?", Problem(None, p.file, p.what, p.fix).format()) for p in problems]


def with_failures(summary: dict, problems: Sequence[Problem]) -> dict:
    """`summary` plus `failed`: one `{case, file, what, fix}` per case that could not be evaluated."""
    return {**summary, "failed": [{"case": p.case, "file": p.file, "what": p.what, "fix": p.fix} for p in problems]}


def default_workers(workers: int | None, num_tasks: int) -> int:
    """`workers`, or (None/0) the CPU count capped at 8; never more than there are tasks."""
    return max(1, min(resolve_workers(workers, min(os.cpu_count() or 1, 8)), num_tasks))


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def summarize(case_results: list[dict], labels: Sequence[int] | None = None) -> dict:
    """Per-class means over cases and overall means (foreground classes averaged).

    Classes absent from both reference and prediction of a case are filled with the documented
    values (Dice = IoU = 1, HD95 = 0). NaN HD95 (one side empty) is left out of its mean; the
    number left out is `hd95_excluded`. Returns `{"labels", "num_cases", "cases", "per_class_mean",
    "mean"}`.
    """
    if labels is None:
        labels = sorted({int(c) for r in case_results for c in r["per_class"]})
    labels = [int(c) for c in labels]
    for r in case_results:
        r["per_class"] = {int(c): r["per_class"].get(int(c), empty_class_result()) for c in labels}
    per_class: dict[int, dict] = {}
    for c in labels:
        rows = [r["per_class"][c] for r in case_results]
        stats: dict[str, Any] = {}
        for key in MEAN_KEYS:
            values = [float(row[key]) for row in rows if not math.isnan(float(row[key]))]
            stats[key] = _mean(values)
        stats["hd95_excluded"] = sum(1 for row in rows if math.isnan(float(row["hd95"])))
        for key in ("tp", "fp", "fn"):
            stats[key] = int(sum(row[key] for row in rows))
        per_class[c] = stats
    mean: dict[str, Any] = {}
    for key in MEAN_KEYS:
        mean[key] = _mean([per_class[c][key] for c in labels if not math.isnan(per_class[c][key])])
    mean["hd95_excluded"] = sum(per_class[c]["hd95_excluded"] for c in labels)
    for key in CASE_KEYS:
        mean[key] = _mean([float(r[key]) for r in case_results])
    return {"labels": labels, "num_cases": len(case_results), "cases": case_results,
            "per_class_mean": per_class, "mean": mean}


def evaluate_pairs(pairs: Sequence[CasePair], labels: Sequence[int] | None = None, workers: int | None = None) -> dict:
    """Evaluate matched pairs in parallel and summarise (see `summarize`).

    `EvaluationError` (its `summary` that of the good cases) when some cases could not be evaluated.
    """
    summary, problems = _evaluate(pairs, labels, workers)
    if problems:
        raise EvaluationError("evaluate", failed_cases(problems), len(pairs), "the others were evaluated",
                              with_failures(summary, problems))
    return summary


def _evaluate(pairs: Sequence[CasePair], labels: Sequence[int] | None,
              workers: int | None) -> tuple[dict, list[Problem]]:
    """The summary of the pairs that could be evaluated and the problems of those that could not."""
    results, problems = run_cases(evaluate_case, pairs, workers, "evaluating", None if labels is None else list(labels))
    return summarize([r for r in results if r is not None], labels), problems


def evaluate_folders(pred_dir: str | Path, ref_dir: str | Path, labels: Sequence[int] | None = None,
                     workers: int | None = None, json_path: str | Path | None = None,
                     csv_path: str | Path | None = None) -> dict:
    """Evaluate every prediction in `pred_dir` against `ref_dir`; optionally write JSON and CSV.

    Args:
        labels: classes to report (default: every non-zero class found in references/predictions).
        workers: worker processes (default: CPU count, at most 8).

    Raises:
        EvaluationError: after the good cases were summarised (and written), naming each case that
        could not be evaluated; its `summary` is the summary of the good cases.
    """
    pairs, unmatched = match_cases(pred_dir, ref_dir)
    summary, failed = _evaluate(pairs, labels, workers)
    problems = sorted([*unmatched, *failed], key=lambda p: p.case or "")
    summary = {"pred_dir": str(pred_dir), "ref_dir": str(ref_dir), **summary}
    if problems:
        summary = with_failures(summary, problems)
    written = [str(p) for p in (json_path, csv_path) if p is not None]
    if json_path is not None:
        write_summary_json(summary, json_path)
    if csv_path is not None:
        write_summary_csv(summary, csv_path)
    if problems:
        others = f"the others were evaluated{' and written to ' + ', '.join(written) if written else ''}"
        raise EvaluationError("evaluate", failed_cases(problems), len(pairs) + len(unmatched), others, summary)
    return summary


def to_jsonable(obj: Any) -> Any:
    """Summary -> JSON-safe object: NaN/inf become null, int keys become strings."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_summary_json(summary: dict, path: str | Path) -> None:
    """Write the summary as JSON (atomic); NaN is written as null."""
    write_json_atomic(path, to_jsonable(summary))


def write_summary_csv(summary: dict, path: str | Path) -> None:
    """One row per case and class: case, label, the per-class metrics, then the per-case metrics."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case", "label", *CLASS_KEYS, *CASE_KEYS])
        for r in summary["cases"]:
            for c, row in r["per_class"].items():
                values = [("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k]) for k in CLASS_KEYS]
                writer.writerow([r["case"], c, *values, *(r[k] for k in CASE_KEYS)])
