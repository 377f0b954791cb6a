"""Largest-connected-component postprocessing, as chosen on cross-validation.

The decision is a dict (written by `medseg3d.evaluation.choose_postprocessing` to
`WORK_DIR/results/<CONFIG>/<ARCH>/postprocessing.json`):

    {"largest_component_foreground": bool, "largest_component_classes": [class ids],
     "dice_before": float, "dice_after": float}

`apply_postprocessing` first keeps only the largest component of all foreground together (if
chosen), then, for each listed class, only that class' largest component; removed voxels become
background (0). Components are connected through faces, edges and corners (26-neighbourhood in 3D).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg3d.errors import InputError
from medseg3d.geometry import bounding_box

log = logging.getLogger(__name__)

POSTPROCESSING_FILE = "postprocessing.json"


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest connected component of `mask` (`(X, Y, Z)` or any ndim).

    Full connectivity (26 neighbours in 3D). An empty mask returns an empty mask; ties keep the
    component with the lowest label (first in C order).
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labelled, num = ndimage.label(mask, structure=structure)
    if num <= 1:
        return mask.copy()
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def remove_all_but_largest(seg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Copy of `seg` with every voxel of `mask` outside its largest component set to 0."""
    mask = np.asarray(mask, dtype=bool)
    box = bounding_box(mask)  # labelling only the box finds the same components on far fewer voxels
    out = seg.copy()
    if box is None:
        return out
    sub = mask[box]
    keep = largest_component(sub)
    region = out[box]
    region[sub & ~keep] = 0
    return out


def apply_postprocessing(seg: np.ndarray, decision: dict | None) -> np.ndarray:
    """Apply a postprocessing decision to an integer label map `seg` `(X, Y, Z)`; returns a new array.

    `decision` None (or with nothing chosen) returns an unchanged copy.
    """
    out = np.array(seg, copy=True)
    if not decision:
        return out
    if decision.get("largest_component_foreground"):
        out = remove_all_but_largest(out, out > 0)
    for c in decision.get("largest_component_classes", []) or []:
        out = remove_all_but_largest(out, out == int(c))
    return out


def make_decision(
    foreground: bool, classes: Iterable[int], dice_before: float, dice_after: float
) -> dict:
    """The decision dict in the file format above."""
    return {
        "largest_component_foreground": bool(foreground),
        "largest_component_classes": sorted(int(c) for c in classes),
        "dice_before": float(dice_before),
        "dice_after": float(dice_after),
    }


def load_postprocessing(model_dir: str | Path) -> dict | None:
    """Read `model_dir/postprocessing.json` (`model_dir` = `WORK_DIR/results/<CONFIG>/<ARCH>`).

    Returns None when the file does not exist (no postprocessing chosen yet); raises `InputError`
    naming the file when it is unreadable or malformed.
    """
    path = Path(model_dir) / POSTPROCESSING_FILE
    if not path.is_file():
        log.debug("no %s; predictions are not postprocessed", path)
        return None
    return read_postprocessing(path)


def read_postprocessing(path: str | Path) -> dict:
    """The decision in the JSON file `path` (any name: `ensemble --postprocessing FILE`).

    `InputError` naming the file when it is missing, unreadable or malformed.
    """
    path = Path(path)
    fix = "delete it and rerun `medseg3d evaluate --model WORK_DIR --config CONFIG` to choose again"
    if not path.is_file():
        raise InputError(f"{path} does not exist; give the postprocessing.json that `medseg3d evaluate --model` "
                         "wrote into the model folder")
    try:
        decision = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc}); {fix}") from exc
    if not isinstance(decision, dict):
        raise InputError(f"{path} must hold a JSON object; {fix}")
    fg = decision.get("largest_component_foreground")
    classes = decision.get("largest_component_classes")
    if not isinstance(fg, bool) or not isinstance(classes, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in classes
    ):
        raise InputError(
            f"{path} needs 'largest_component_foreground' (true/false) and 'largest_component_classes' "
            f"(list of class ids > 0); {fix}"
        )
    return decision
