"""Choose the best model of a WORK_DIR on cross-validation: `medseg3d find-best` (nnU-Net's
`nnUNetv2_find_best_configuration`).

Candidates: every trained (configuration, architecture) that has validation predictions of every
requested fold (a cascade also needs its previous stage's folds, which `predict --best` runs first) (`WORK_DIR/results/<CONFIG>/<ARCH>/fold_<K>/validation/CASE.nii.gz`), and every
pair of those whose folds also hold the probabilities (`CASE.npz`, `train --save-probabilities`).
All are scored on the same cases (the requested folds' validation cases, present for every
candidate) against the dataset's reference labels (`crossval.reference_labels`):

* a single model by its validation label maps, which are what `predict` writes for the case;
* an ensemble by the argmax of the two members' probabilities averaged case by case
  (`medseg3d.inference.ensemble`, what `medseg3d ensemble` and `predict --best` compute).

Score: mean foreground Dice (mean over classes of the mean over cases, `metrics.dice_per_class`),
as `evaluate --model` reports. The winner is the best score (a tie goes to the single model, then
to the name). Postprocessing is chosen on the winner's predictions with the cross-validation chooser
(`choose_postprocessing`). Memory: one case at a time, at most two probability maps of it.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medseg3d.errors import DatasetError, InputError, MedsegError, Problem
from medseg3d.evaluation.choose_postprocessing import decide, variant_dice
from medseg3d.evaluation.crossval import gather_fold_predictions, reference_labels
from medseg3d.evaluation.evaluate import check_geometry
from medseg3d.evaluation.metrics import dice_per_class
from medseg3d.inference.best import FORMAT_VERSION, SELECTION_FILE, load_selection  # noqa: F401
from medseg3d.logging_utils import console
from medseg3d.paths import fold_dir_of, model_dir_of

log = logging.getLogger(__name__)

REPORT_FILE = "selection.md"
REPORT_DIR = "selection"


class NoCandidateError(MedsegError):
    """No (configuration, architecture) has validation predictions of every requested fold."""


@dataclass
class TrainedModel:
    """One (configuration, architecture) with every requested fold's validation predictions."""

    configuration: str
    architecture: str
    predictions: dict[str, Path]            # case -> validation label map
    fold_of: dict[str, int]                 # case -> fold whose validation predicted it
    probabilities: dict[str, Path] | None   # case -> CASE.npz; None unless every case has one
    settings: dict = field(default_factory=dict)  # step, mirroring of the final validation (summary.json)

    @property
    def name(self) -> str:
        return f"{self.configuration}/{self.architecture}"


def _command(work_dir: Path, config: str, arch: str, fold: int, validation_only: bool) -> str:
    extra = " --validation-only" if validation_only else ""
    return f"`medseg3d train {work_dir} --config {config} --arch {arch} --fold {fold}{extra} --save-probabilities`"


def _validation_settings(work_dir: Path, config: str, arch: str, folds: Sequence[int]) -> dict:
    """`{"step", "mirroring"}` the folds' final validations ran with (summary.json), None when unknown."""
    seen = []
    for k in folds:
        path = fold_dir_of(work_dir, config, arch, k) / "validation" / "summary.json"
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = {}
        seen.append((summary.get("step"), summary.get("mirroring")))
    if len(set(seen)) > 1:
        log.warning("%s/%s: the folds were validated with different settings %s; predict --best uses fold %d's",
                    config, arch, sorted(set(seen), key=str), folds[0])
    step, mirroring = seen[0]
    return {"step": step, "mirroring": mirroring}


def scan_models(work_dir: Path, plans, folds: Sequence[int], configs: Sequence[str] | None = None,
                archs: Sequence[str] | None = None) -> tuple[list[TrainedModel], list[str]]:
    """Every model with all `folds` validated, and one line per thing missing (with the command that makes it)."""
    models: list[TrainedModel] = []
    missing: list[str] = []
    for config in configs or list(plans.configurations):
        plans.configuration(config)  # ConfigError naming the valid ones
        root = work_dir / "results" / config
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        names = list(archs) if archs else (found or [plans.configuration(config).architecture])
        for arch in names:
            mdir = model_dir_of(work_dir, config, arch)
            lacking = []
            for k in folds:
                if (fold_dir_of(work_dir, config, arch, k) / "validation").is_dir() and any(
                        (fold_dir_of(work_dir, config, arch, k) / "validation").glob("*.nii*")):
                    continue
                trained = (fold_dir_of(work_dir, config, arch, k) / "checkpoint_final.pt").is_file()
                lacking.append(f"fold {k} {'has no validation predictions' if trained else 'is not trained'} "
                               f"({_command(work_dir, config, arch, k, trained)})")
            prev = plans.configuration(config).previous_stage
            if prev:  # predict --best runs the previous stage's folds first: a cascade without them cannot win
                lacking += [f"its previous stage {prev} fold {k} is not trained (`medseg3d train {work_dir} --config "
                            f"{prev} --arch {arch} --fold {k}`)" for k in folds
                            if not (fold_dir_of(work_dir, prev, arch, k) / "checkpoint_final.pt").is_file()]
            if lacking:
                missing.append(f"{config}/{arch}: " + "; ".join(lacking))
                continue
            preds, by_fold = gather_fold_predictions(mdir, folds)
            probs = {c: p.parent / f"{c}.npz" for c, p in preds.items()}
            no_probs = sorted(c for c, p in probs.items() if not p.is_file())
            if no_probs:
                folds_without = sorted({k for k, cases in by_fold.items() if set(cases) & set(no_probs)})
                missing.append(f"{config}/{arch}: no probabilities (CASE.npz) for {len(no_probs)} of {len(preds)} "
                               f"validation case(s) in fold(s) {', '.join(map(str, folds_without))}; it is scored "
                               f"alone, ensembles need them ("
                               + ", ".join(_command(work_dir, config, arch, k, True) for k in folds_without) + ")")
            models.append(TrainedModel(config, arch, preds, {c: k for k, cs in by_fold.items() for c in cs},
                                       None if no_probs else probs, _validation_settings(work_dir, config, arch, folds)))
    return models, missing


@dataclass
class Candidate:
    """A single model or a pair of models (ensemble) and its Dice per case and class."""

    members: tuple[TrainedModel, ...]
    case_dice: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return " + ".join(m.name for m in self.members)

    def per_class(self, labels: Sequence[int]) -> dict[int, float]:
        return {c: float(np.mean([d[c] for d in self.case_dice.values()])) for c in labels}

    def mean(self, labels: Sequence[int]) -> float:
        return float(np.mean(list(self.per_class(labels).values())))


def candidate_prediction(cand: Candidate, case: str) -> np.ndarray:
    """The candidate's label map `(X, Y, Z)` of a validation case (before postprocessing)."""
    from medseg3d.inference.ensemble import ensemble_labels
    from medseg3d.io import read_label

    if len(cand.members) == 1:
        return read_label(cand.members[0].predictions[case]).array[0]
    return ensemble_labels([m.probabilities[case] for m in cand.members])  # type: ignore[index]


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def score(candidates: Sequence[Candidate], cases: Sequence[str], refs: dict[str, Path], labels: list[int]) -> None:
    """Fill every candidate's `case_dice`, case by case (the reference read once per case).

    `DatasetError` lists every prediction on another grid than its reference (or unreadable).
    """
    from medseg3d.io import read_label

    problems: list[Problem] = []
    with _bar() as bar:
        task = bar.add_task("scoring candidates", total=len(cases))
        for case in cases:
            ref_vol = read_label(refs[case])
            ref = ref_vol.array[0]
            for cand in candidates:
                try:
                    if len(cand.members) == 1:
                        pred_vol = read_label(cand.members[0].predictions[case])
                        problem = check_geometry(case, pred_vol.affine, ref_vol.affine, pred_vol.spatial_shape,
                                                 ref_vol.spatial_shape, str(cand.members[0].predictions[case]))
                        if problem is not None:
                            problems.append(problem)
                            continue
                        pred = pred_vol.array[0]
                    else:
                        pred = candidate_prediction(cand, case)
                        if pred.shape != ref.shape:
                            problems.append(Problem(case, str(cand.members[0].probabilities[case]),  # type: ignore[index]
                                                    f"probabilities of shape {pred.shape} do not fit the reference "
                                                    f"{ref.shape}", "rerun that fold's validation"))
                            continue
                except InputError as exc:
                    problems.append(Problem(case, None, str(exc), "rerun that fold's validation"))
                    continue
                cand.case_dice[case] = dice_per_class(ref, pred, labels)
            bar.advance(task)
    if problems:
        raise DatasetError("some validation predictions cannot be scored", problems)


def postprocessed_case_dice(variants: dict[str, dict[int, float]], decision: dict,
                            labels: Sequence[int]) -> dict[int, float]:
    """Per-class Dice of one case after `decision`, from its `variant_dice` (as `decide` counts it)."""
    fg = decision["largest_component_foreground"]
    base, per_class = ("fg", "cls_fg") if fg else ("base", "cls_base")
    chosen = set(decision["largest_component_classes"])
    return {c: variants[per_class if c in chosen else base][c] for c in labels}


def choose_postprocessing(winner: Candidate, cases: Sequence[str], refs: dict[str, Path],
                          labels: list[int]) -> tuple[dict, dict[str, dict[int, float]]]:
    """The postprocessing decision on the winner's predictions and its per-case Dice after it."""
    from medseg3d.io import read_label

    variants = {}
    with _bar() as bar:
        task = bar.add_task(f"postprocessing of {winner.name}", total=len(cases))
        for case in cases:
            variants[case] = variant_dice(read_label(refs[case]).array[0], candidate_prediction(winner, case), labels)
            bar.advance(task)
    decision = decide(list(variants.values()), labels)
    return decision, {c: postprocessed_case_dice(v, decision, labels) for c, v in variants.items()}


def find_best(work_dir: str | Path, folds: Sequence[int] = (0, 1, 2, 3, 4), configs: Sequence[str] | None = None,
              archs: Sequence[str] | None = None, ensembles: bool = True, report: bool = True) -> dict:
    """Score every candidate, pick the winner and its postprocessing; write `WORK_DIR/selection.json`
    (and, with `report`, `selection.md` with its plots). Returns the selection (the JSON's content).

    Raises `NoCandidateError` (naming what is missing and the commands that make it) when no
    model has every requested fold validated.
    """
    from medseg3d.io import write_json_atomic
    from medseg3d.plans.schema import Plans

    work_dir = Path(work_dir)
    folds = sorted({int(k) for k in folds})
    if not folds:
        raise InputError("--folds is empty; give e.g. --folds 0,1,2,3,4")
    plans = Plans.load(work_dir)
    models, missing = scan_models(work_dir, plans, folds, configs, archs)
    for line in missing:
        log.warning("%s", line)
    if not models:
        raise NoCandidateError(
            f"no trained model under {work_dir / 'results'} has validation predictions of fold(s) "
            f"{', '.join(map(str, folds))}:\n  " + "\n  ".join(missing or ["nothing is trained"])
            + "\nTrain (or validate) those folds, or pass --folds with the folds that exist")
    case_sets = [set(m.predictions) for m in models]
    cases = sorted(set.intersection(*case_sets))
    refs = reference_labels(plans)
    left_out = sorted(set.union(*case_sets) - set(cases))
    if left_out:
        log.warning("%d case(s) are not validated by every candidate and are left out: %s", len(left_out),
                    ", ".join(left_out[:5]))
    no_ref = [c for c in cases if c not in refs]
    if no_ref:
        raise DatasetError("validation cases without a reference label", [
            Problem(c, None, f"has no label in {plans.dataset_dir}", "restore the dataset plans.json names")
            for c in no_ref])
    if not cases:
        raise NoCandidateError("the candidates share no validation case; train them with the same splits.json")
    labels = sorted(c for c in plans.labels if c > 0)
    candidates = [Candidate((m,)) for m in models]
    if ensembles:
        with_probs = [m for m in models if m.probabilities is not None]
        candidates += [Candidate(pair) for pair in itertools.combinations(with_probs, 2)]
    score(candidates, cases, refs, labels)
    ranked = sorted(candidates, key=lambda c: (-c.mean(labels), len(c.members), c.name))
    winner = ranked[0]
    decision, post_dice = choose_postprocessing(winner, cases, refs, labels)
    selection = _selection_dict(work_dir, plans, folds, cases, ranked, winner, decision, post_dice, labels, missing,
                                ensembles)
    write_json_atomic(work_dir / SELECTION_FILE, selection)
    log.info("wrote %s", work_dir / SELECTION_FILE)
    if report:
        from medseg3d.evaluation.selection_report import write_report

        write_report(work_dir, plans, selection, winner, refs, post_dice)
    return selection


def _selection_dict(work_dir: Path, plans, folds: list[int], cases: list[str], ranked: list[Candidate],
                    winner: Candidate, decision: dict, post_dice: dict[str, dict[int, float]], labels: list[int],
                    missing: list[str], ensembles: bool) -> dict:
    def member(m: TrainedModel) -> dict:
        return {"configuration": m.configuration, "architecture": m.architecture, "checkpoint": "final",
                "step": m.settings.get("step"), "mirroring": m.settings.get("mirroring")}

    def as_str(d: dict[int, float]) -> dict[str, float]:
        return {str(c): float(v) for c, v in d.items()}

    post_per_class = {c: float(np.mean([d[c] for d in post_dice.values()])) for c in labels}
    return {
        "format_version": FORMAT_VERSION, "work_dir": str(work_dir), "folds": folds,
        "labels": {str(c): plans.labels[c] for c in labels}, "num_cases": len(cases), "cases": cases,
        "ensembles": ensembles,
        "candidates": [{"rank": i + 1, "name": c.name, "kind": "single" if len(c.members) == 1 else "ensemble",
                        "members": [member(m) for m in c.members], "mean_dice": c.mean(labels),
                        "per_class_dice": as_str(c.per_class(labels)),
                        "case_dice": {k: as_str(v) for k, v in c.case_dice.items()}} for i, c in enumerate(ranked)],
        "winner": {"name": winner.name, "members": [member(m) for m in winner.members],
                   "mean_dice": winner.mean(labels), "per_class_dice": as_str(winner.per_class(labels)),
                   "postprocessing": decision, "mean_dice_postprocessed": float(np.mean(list(post_per_class.values()))),
                   "per_class_dice_postprocessed": as_str(post_per_class),
                   "case_dice_postprocessed": {k: as_str(v) for k, v in post_dice.items()}},
        "missing": missing,
    }
