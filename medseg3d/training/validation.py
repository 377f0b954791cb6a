"""Validation of a fold: pseudo-Dice on patches each epoch, full sliding-window validation at the end.

The final validation shares `medseg3d.inference.predict_case` with `medseg3d predict`, writes one
NIfTI per validation case into `fold_K/validation/` (original geometry) and `summary.json` with
per-case and mean Dice per class (`medseg3d.evaluation.metrics.dice_per_class`) and the cases that
failed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg3d.errors import CasesFailedError, OutputError, describe_case_error
from medseg3d.io.atomic import write_json_atomic
from medseg3d.logging_utils import console

log = logging.getLogger(__name__)


def confusion_counts(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`(3, K-1)` float64 tp, fp, fn per foreground class of argmax(`logits (B, K, *S)`) vs `target (B, 1, *S)`."""
    pred = logits.argmax(1)
    tgt = target[:, 0] if target.dim() == logits.dim() else target
    out = torch.zeros(3, num_classes - 1, dtype=torch.float64, device=logits.device)
    for c in range(1, num_classes):
        p, t = pred == c, tgt == c
        out[0, c - 1] = (p & t).sum()
        out[1, c - 1] = (p & ~t).sum()
        out[2, c - 1] = (~p & t).sum()
    return out


def dice_from_counts(counts: torch.Tensor) -> list[float]:
    """Dice per foreground class from `(3, K-1)` counts; NaN where a class is absent from both."""
    tp, fp, fn = counts.double().cpu()
    den = 2 * tp + fp + fn
    return [float(2 * a / d) if d > 0 else float("nan") for a, d in zip(tp, den)]


def final_validation(net: nn.Module, work_dir: Path, plans: Any, config_name: str, val_cases: list[str],
                     out_dir: Path, device: torch.device, *, step: float = 0.5, mirroring: bool = True,
                     arch: str | None = None, save_probabilities: bool = False,
                     previous_models: list[nn.Module] | None = None) -> Path | None:
    """Predict every validation case from the raw dataset and write `out_dir/summary.json`.

    `save_probabilities` also writes `out_dir/CASE.npz` (`(K, X, Y, Z)` float32 on the case's
    original grid, `writer.write_probabilities`, as `predict --save-probabilities`), which
    `find-best` and `ensemble` average; without it a `CASE.npz` left by an earlier run is removed,
    so no file ever describes another model than the label map beside it. summary.json records
    `step` and `mirroring`, which `predict --best` reuses.

    Dice per class is `medseg3d.evaluation.metrics.dice_per_class` (1 when a class is absent from
    both, as `medseg3d evaluate` reports). A case that fails (unreadable, wrong channels, NaN, out of
    GPU memory, ...) never stops the others: they are predicted and summarised, the failed ones are
    listed under `failed` in summary.json, then `CasesFailedError` names each (the trained
    checkpoints are already saved). An output that cannot be written (`OutputError`) stops at once.
    Returns the summary path, or None (with a warning) when the dataset folder recorded in
    plans.json is gone (the trained checkpoints stay valid).
    """
    from medseg3d.evaluation.metrics import dice_per_class
    from medseg3d.inference.predictor import predict_case
    from medseg3d.inference.writer import write_probabilities, write_segmentation
    from medseg3d.io import load_dataset, read_label, read_volume

    root = Path(plans.dataset_dir)
    if not str(plans.dataset_dir) or not root.is_dir():
        log.warning("final validation skipped: the dataset folder in plans.json (%s) is gone; move it back and "
                    "rerun with --resume to validate", root)
        return None
    cases = {c.name: c for c in load_dataset(root).cases}
    missing = [c for c in val_cases if c not in cases]
    if missing:
        log.warning("final validation skips %d case(s) not in %s: %s", len(missing), root, ", ".join(missing[:5]))
    labels = sorted(k for k in plans.labels if k > 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    net.eval()
    per_case = []
    failed: list[tuple[str, str]] = []
    todo = [c for c in val_cases if c in cases]
    with console.status(f"final validation of {len(todo)} case(s)") if todo else _null():
        for name in todo:
            case = cases[name]
            try:
                image = read_volume(case.images)
                seg, probs = predict_case([net], image, plans, config_name, step=step, use_mirroring=mirroring,
                                          device=device, case=name, arch=arch, return_probabilities=save_probabilities,
                                          previous_models=previous_models)
                write_segmentation(seg, image, out_dir / f"{name}.nii.gz", overwrite=True)
                if probs is not None:
                    write_probabilities(probs, out_dir / f"{name}.npz", overwrite=True)
                    del probs
                else:
                    (out_dir / f"{name}.npz").unlink(missing_ok=True)
                ref = read_label(case.label).array[0]
                dice = dice_per_class(ref, seg, labels)
            except OutputError:
                raise
            except Exception as exc:
                why = describe_case_error(exc, "validation")
                log.error("validation %s failed: %s", name, why)
                log.debug("traceback of validation case %s", name, exc_info=True)
                failed.append((name, why))
                continue
            per_case.append({"case": name, "dice": {str(c): v for c, v in dice.items()}})
            log.info("validation %s: Dice %s", name, per_case[-1]["dice"])
    mean = {str(c): (float(np.mean([pc["dice"][str(c)] for pc in per_case])) if per_case else None) for c in labels}
    summary = {"config": config_name, "labels": {str(k): v for k, v in plans.labels.items()},
               "step": step, "mirroring": mirroring, "probabilities": save_probabilities,
               "mean_dice": mean, "cases": per_case, "failed": [{"case": n, "why": w} for n, w in failed]}
    path = out_dir / "summary.json"
    write_json_atomic(path, summary)
    log.info("validation mean Dice per class: %s -> %s", mean, path)
    if failed:
        raise CasesFailedError("final validation", failed, len(todo),
                               f"the others were predicted into {out_dir} and summarised in {path}; the trained "
                               "checkpoints are saved", summary)
    return path


def validate_fold(work_dir: Path, plans: Any, config_name: str, arch: str, fold: int | str, val_cases: list[str],
                  device: torch.device, *, step: float = 0.5, mirroring: bool = True,
                  save_probabilities: bool = False) -> Path | None:
    """`final_validation` of `fold_K/checkpoint_final.pt`, loaded as `predict` loads it.

    The network is rebuilt from the checkpoint (eval mode, contiguous memory, no deep supervision),
    so the validation predictions are those `medseg3d predict --folds K` gives for the same images
    and settings, bit for bit (the trained network may be channels-last or compiled). Used at the end
    of training and by `medseg3d train --validation-only`; `CheckpointError` names a missing or
    foreign checkpoint.
    """
    from medseg3d.inference.checkpoint import build_model_from_checkpoint, load_checkpoint
    from medseg3d.paths import fold_dir_of

    fold_dir = fold_dir_of(work_dir, config_name, arch, fold)
    path = fold_dir / "checkpoint_final.pt"
    if not path.is_file():
        from medseg3d.errors import CheckpointError

        raise CheckpointError(f"{path} does not exist: fold {fold} of {config_name}/{arch} has not finished "
                              f"training; train it (`medseg3d train {work_dir} --config {config_name} --arch {arch} "
                              f"--fold {fold}`, --resume to continue) before validating it")
    ckpt = load_checkpoint(path, expected_plan=plans.network_identity(config_name, arch), legacy_hash=plans.file_hash)
    net = build_model_from_checkpoint(ckpt).to(device)
    del ckpt
    previous = []
    prev_name = plans.configuration(config_name).previous_stage
    if prev_name:  # a cascade stage: the same fold of the previous stage segments each case first, as predict does
        from medseg3d.cascade import require_previous_fold

        prev_ckpt = load_checkpoint(require_previous_fold(work_dir, plans, config_name, arch, fold)
                                    / "checkpoint_final.pt", expected_plan=plans.network_identity(prev_name, arch),
                                    legacy_hash=plans.file_hash)
        previous = [build_model_from_checkpoint(prev_ckpt).to(device)]
        del prev_ckpt
    return final_validation(net, work_dir, plans, config_name, val_cases, fold_dir / "validation", device,
                            step=step, mirroring=mirroring, arch=arch, save_probabilities=save_probabilities,
                            previous_models=previous)


def validate_trained_fold(work_dir: str | Path, config_name: str, fold: int | str, *, arch: str | None = None,
                          device: str = "auto", step: float = 0.5, mirroring: bool = True,
                          save_probabilities: bool = False) -> Path:
    """`medseg3d train --validation-only`: rerun the final validation of a trained fold; returns the fold folder.

    The validation cases are the fold's in `WORK_DIR/splits.json` (the ones it was trained without).
    """
    from medseg3d.data.splits import fold_cases, load_or_create_splits
    from medseg3d.device import resolve_device
    from medseg3d.errors import ConfigError, PlanError
    from medseg3d.logging_utils import add_file_log
    from medseg3d.paths import fold_dir_of
    from medseg3d.plans import Plans
    from medseg3d.preprocess.cache import list_cached_cases

    work_dir = Path(work_dir)
    if str(fold) == "all":
        raise ConfigError("--validation-only needs a numbered fold: fold 'all' trains on every case and has no "
                          "validation cases")
    plans = Plans.load(work_dir / "plans.json")
    cfg = plans.configuration(config_name)
    arch = (arch or cfg.architecture).lower()
    if not (work_dir / "splits.json").is_file():
        raise PlanError(f"{work_dir / 'splits.json'} does not exist, so fold {fold} was never trained here; "
                        f"train it first (`medseg3d train {work_dir} --config {config_name} --fold {fold}`)")
    splits = load_or_create_splits(work_dir, list_cached_cases(work_dir, cfg.for_architecture(arch).data_identifier),
                                   write=False)
    _, val_cases = fold_cases(splits, fold, [])
    fold_dir = fold_dir_of(work_dir, config_name, arch, fold)
    handler = add_file_log(fold_dir / "training_log.txt") if fold_dir.is_dir() else None
    try:
        log.info("validation only: fold %s of %s/%s, %d case(s), step %s, mirroring %s, probabilities %s", fold,
                 config_name, arch, len(val_cases), step, mirroring, save_probabilities)
        validate_fold(work_dir, plans, config_name, arch, fold, val_cases, resolve_device(device), step=step,
                      mirroring=mirroring, save_probabilities=save_probabilities)
    finally:
        if handler is not None:
            logging.getLogger("medseg3d").removeHandler(handler)
            handler.close()
    return fold_dir


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
