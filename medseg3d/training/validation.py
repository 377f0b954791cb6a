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
                     arch: str | None = None) -> Path | None:
    """Predict every validation case from the raw dataset and write `out_dir/summary.json`.

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
    from medseg3d.inference.writer import write_segmentation
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
                seg, _ = predict_case([net], image, plans, config_name, step=step, use_mirroring=mirroring,
                                      device=device, case=name, arch=arch)
                write_segmentation(seg, image, out_dir / f"{name}.nii.gz", overwrite=True)
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
               "mean_dice": mean, "cases": per_case, "failed": [{"case": n, "why": w} for n, w in failed]}
    path = out_dir / "summary.json"
    write_json_atomic(path, summary)
    log.info("validation mean Dice per class: %s -> %s", mean, path)
    if failed:
        raise CasesFailedError("final validation", failed, len(todo),
                               f"the others were predicted into {out_dir} and summarised in {path}; the trained "
                               "checkpoints are saved", summary)
    return path


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
