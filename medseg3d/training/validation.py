"""Validation of a fold: pseudo-Dice on patches each epoch, full sliding-window validation at the end.

The final validation shares `medseg3d.inference.predict_case` with `medseg3d predict`, writes one
NIfTI per validation case into `fold_K/validation/` (original geometry) and `summary.json` with
per-case and mean Dice per class.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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


def dice_per_class(ref: np.ndarray, pred: np.ndarray, labels: list[int]) -> dict[str, float | None]:
    """Dice of each label id between integer arrays of equal shape; None when absent from both."""
    out: dict[str, float | None] = {}
    for c in labels:
        r, p = ref == c, pred == c
        den = int(r.sum()) + int(p.sum())
        out[str(c)] = None if den == 0 else 2.0 * int((r & p).sum()) / den
    return out


def final_validation(net: nn.Module, work_dir: Path, plans: Any, config_name: str, val_cases: list[str],
                     out_dir: Path, device: torch.device, *, step: float = 0.5, mirroring: bool = True) -> Path | None:
    """Predict every validation case from the raw dataset and write `out_dir/summary.json`.

    Returns the summary path, or None (with a warning) when the dataset folder recorded in
    plans.json is gone (the trained checkpoints stay valid).
    """
    from medseg3d.inference.writer import write_segmentation
    from medseg3d.inference.predictor import predict_case
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
    todo = [c for c in val_cases if c in cases]
    with console.status(f"final validation of {len(todo)} case(s)") if todo else _null():
        for name in todo:
            case = cases[name]
            image = read_volume(case.images)
            seg, _ = predict_case([net], image, plans, config_name, step=step, use_mirroring=mirroring,
                                  device=device, case=name)
            write_segmentation(seg, image, out_dir / f"{name}.nii.gz", overwrite=True)
            ref = read_label(case.label).array[0]
            per_case.append({"case": name, "dice": dice_per_class(ref, seg, labels)})
            log.info("validation %s: Dice %s", name, per_case[-1]["dice"])
    mean = {}
    for c in labels:
        vals = [pc["dice"][str(c)] for pc in per_case if pc["dice"][str(c)] is not None]
        mean[str(c)] = float(np.mean(vals)) if vals else None
    summary = {"config": config_name, "labels": {str(k): v for k, v in plans.labels.items()},
               "mean_dice": mean, "cases": per_case}
    path = out_dir / "summary.json"
    write_json_atomic(path, summary)
    log.info("validation mean Dice per class: %s -> %s", mean, path)
    return path


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
