"""Choose largest-connected-component postprocessing on cross-validation predictions.

Greedy, as nnU-Net does: first keep only the largest component of all foreground together and keep
that step only if it raises the mean foreground Dice (mean over classes of the mean over cases);
then, on top of that, for each class keep only its largest component, kept per class only if it
raises that class' mean Dice (removing class-c voxels changes no other class' Dice, so the
per-class choices are independent and each one that raises its class raises the overall mean).
Every variant of a case is computed in one pass over the case (`variant_dice`), so the whole
choice costs one read of each prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg3d.evaluation.metrics import dice_per_class
from medseg3d.postprocess import make_decision, remove_all_but_largest


def variant_dice(ref: np.ndarray, pred: np.ndarray, labels: Sequence[int]) -> dict[str, dict[int, float]]:
    """Per-class Dice of one case under every candidate postprocessing.

    Args:
        ref, pred: integer label maps `(X, Y, Z)`.
        labels: foreground classes.

    Returns:
        `{"base": {c: dice}, "fg": {...}, "cls_base": {...}, "cls_fg": {...}}`: no postprocessing;
        largest foreground component; class c's largest component only (on the raw prediction);
        class c's largest component after the foreground step.
    """
    labels = [int(c) for c in labels]
    fg = remove_all_but_largest(pred, pred > 0)
    out = {"base": dice_per_class(ref, pred, labels), "fg": dice_per_class(ref, fg, labels),
           "cls_base": {}, "cls_fg": {}}
    for c in labels:
        for key, seg in (("cls_base", pred), ("cls_fg", fg)):
            out[key][c] = dice_per_class(ref, remove_all_but_largest(seg, seg == c), [c])[c]
    return out


def decide(variants: Sequence[dict[str, dict[int, float]]], labels: Sequence[int]) -> dict:
    """The postprocessing decision from every case's `variant_dice` (file format: `medseg3d.postprocess`)."""
    labels = [int(c) for c in labels]

    def class_means(key: str) -> dict[int, float]:
        return {c: float(np.mean([v[key][c] for v in variants])) for c in labels}

    base = class_means("base")
    fg = class_means("fg")
    before = float(np.mean(list(base.values())))
    use_fg = float(np.mean(list(fg.values()))) > before
    current = fg if use_fg else base
    per_class = class_means("cls_fg" if use_fg else "cls_base")
    classes = [c for c in labels if per_class[c] > current[c]]
    after = {c: (per_class[c] if c in classes else current[c]) for c in labels}
    return make_decision(use_fg, classes, before, float(np.mean(list(after.values()))))
