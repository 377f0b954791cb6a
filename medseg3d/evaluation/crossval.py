"""Cross-validation summary and postprocessing choice of a trained model folder.

Reads every fold's validation predictions `WORK_DIR/results/<CONFIG>/<ARCH>/fold_<K>/validation/*.nii.gz`,
pairs them with the dataset's reference labels (`dataset_dir` of `WORK_DIR/plans.json`), and writes
into `WORK_DIR/results/<CONFIG>/<ARCH>/`:

* `crossval_summary.json`: the evaluation summary of all folds' predictions together (format of
  `medseg3d.evaluation.evaluate.summarize`) plus `folds` (fold -> case names);
* `postprocessing.json`: the largest-component decision (`medseg3d.postprocess`), which
  `medseg3d predict` applies.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from medseg3d.errors import DatasetError, InputError, Problem
from medseg3d.evaluation.choose_postprocessing import decide, variant_dice
from medseg3d.evaluation.evaluate import (
    CasePair,
    EvaluationError,
    case_key,
    failed_cases,
    load_pair,
    pair_available,
    run_cases,
    summarize,
    with_failures,
    write_summary_json,
)
from medseg3d.evaluation.metrics import case_metrics
from medseg3d.io import load_dataset, write_json_atomic
from medseg3d.paths import model_dir_of
from medseg3d.plans.schema import Plans
from medseg3d.postprocess import POSTPROCESSING_FILE

log = logging.getLogger(__name__)

SUMMARY_FILE = "crossval_summary.json"
_FOLD_RE = re.compile(r"^fold_(\d+)$")


def gather_fold_predictions(model_dir: Path, only_folds: Sequence[int] | None = None
                            ) -> tuple[dict[str, Path], dict[int, list[str]]]:
    """`{case: prediction path}` over every `fold_K/validation/` and `{fold: [cases]}`.

    `only_folds`: look at these folds only (`find-best --folds`); the caller then compares the
    returned folds with the ones it asked for. Raises `InputError` when no fold has validation
    predictions and `DatasetError` when one case is predicted by two folds.
    """
    preds: dict[str, Path] = {}
    folds: dict[int, list[str]] = {}
    problems: list[Problem] = []
    fold_dirs = sorted((d for d in model_dir.glob("fold_*") if _FOLD_RE.match(d.name)
                        and (only_folds is None or int(d.name.split("_")[1]) in only_folds)),
                       key=lambda d: int(d.name.split("_")[1]))
    for fold_dir in fold_dirs:
        fold = int(fold_dir.name.split("_")[1])
        val = fold_dir / "validation"
        files = sorted(p for p in val.glob("*.nii*")
                       if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith(".")) if val.is_dir() else []
        if not files:
            log.warning("%s has no validation predictions; fold %d is left out", val, fold)
            continue
        folds[fold] = []
        for path in files:
            key = case_key(path.name)
            if key in preds:
                problems.append(Problem(key, str(path), f"is also predicted in {preds[key].parent.parent.name}",
                                        "each case belongs to one fold's validation set; remove the stray file"))
                continue
            preds[key] = path
            folds[fold].append(key)
    if problems:
        raise DatasetError("cross-validation folds overlap", problems)
    if not preds:
        raise InputError(
            f"no validation predictions under {model_dir}/fold_*/validation/; train the folds first "
            f"(`medseg3d train WORK_DIR --config CONFIG --fold K`)"
        )
    if only_folds is None and len(folds) != 5:
        log.warning("found %d fold(s) with validation predictions (%s), not 5", len(folds), sorted(folds))
    return preds, folds


def reference_labels(plans: Plans) -> dict[str, Path]:
    """`{case: reference label path}` of the dataset the plan was made from."""
    root = plans.dataset_dir
    if not str(root) or not root.is_dir():
        raise InputError(
            f"the dataset folder recorded in plans.json ({root}) does not exist; move the dataset back "
            "or re-plan with `medseg3d plan DATA_DIR -o WORK_DIR`"
        )
    spec = load_dataset(root)
    return {c.name: c.label for c in spec.cases if c.label is not None}


def _crossval_case(pair: CasePair, labels: list[int]) -> tuple[dict, dict]:
    """Metrics and postprocessing variants of one case, from one read of its files."""
    ref, pred, spacing = load_pair(pair)
    metrics = {"case": pair.name, "pred": str(pair.pred), "ref": str(pair.ref), "spacing": list(spacing),
               **case_metrics(ref, pred, spacing, labels)}
    return metrics, variant_dice(ref, pred, labels)


def evaluate_crossval(work_dir: str | Path, config: str, arch: str | None = None,
                      workers: int | None = None, labels: list[int] | None = None) -> tuple[dict, dict]:
    """Summarise all folds of `WORK_DIR/results/<config>/<arch>` and choose the postprocessing.

    Args:
        arch: architecture folder; default the configuration's `architecture` in plans.json.
        labels: the classes the returned summary reports (`evaluate --model --labels`); default
            all. The files written into the model folder (summary, postprocessing chosen on every
            class) do not depend on it, so reporting a subset never changes what `predict` applies.

    Returns:
        (summary, decision); both are also written into the model folder.

    Raises:
        EvaluationError: some cases could not be evaluated (no reference, other grid, unreadable):
        the summary of the others is written (with `failed`), postprocessing.json is not (it is
        chosen on every fold's cases), and the error names each failed case.
    """
    work_dir = Path(work_dir)
    plans = Plans.load(work_dir)
    conf = plans.configuration(config)
    arch = arch or conf.raw.get("architecture") or "unet"
    model_dir = model_dir_of(work_dir, config, arch)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir} does not exist; train it first or check --config/--arch")
    preds, folds = gather_fold_predictions(model_dir)
    pairs, unmatched = pair_available(preds, reference_labels(plans), str(plans.dataset_dir))
    all_labels = sorted(c for c in plans.labels if c > 0)
    if labels is not None:
        unknown = [c for c in labels if c not in all_labels]
        if unknown:
            raise InputError(f"--labels {','.join(map(str, unknown))}: not a foreground class of this plan; "
                             f"valid: {', '.join(f'{c} ({plans.labels[c]})' for c in all_labels)}")
    results, failed = run_cases(_crossval_case, pairs, workers, "cross-validation", all_labels)
    good = [r for r in results if r is not None]
    summary = summarize([m for m, _ in good], all_labels)
    summary = {"work_dir": str(work_dir), "configuration": config, "architecture": arch,
               "folds": {str(k): v for k, v in folds.items()}, **summary}
    problems = sorted([*unmatched, *failed], key=lambda p: p.case or "")
    if problems:
        summary = with_failures(summary, problems)
        write_summary_json(summary, model_dir / SUMMARY_FILE)
        raise EvaluationError(
            "cross-validation", failed_cases(problems), len(pairs) + len(unmatched),
            f"the others were evaluated into {model_dir / SUMMARY_FILE}; {POSTPROCESSING_FILE} is chosen only "
            "when every case can be evaluated", summary)
    decision = decide([v for _, v in good], all_labels)
    write_summary_json(summary, model_dir / SUMMARY_FILE)
    write_json_atomic(model_dir / POSTPROCESSING_FILE, decision)
    log.info("wrote %s and %s", model_dir / SUMMARY_FILE, model_dir / POSTPROCESSING_FILE)
    if labels is not None and sorted(labels) != all_labels:
        summary = {**{k: v for k, v in summary.items() if k not in ("labels", "cases", "per_class_mean", "mean")},
                   **summarize([m for m, _ in good], sorted(labels))}
    return summary, decision
