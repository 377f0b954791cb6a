"""PNG overlays of a case: image, reference and prediction on three orthogonal slices through the
largest error, for the worst cases of an evaluation (`medseg3d evaluate --overlays DIR`) or of the
model `medseg3d find-best` selected.

The slices cross at the voxel of the largest connected component of `ref != pred` (26-connected)
nearest to that component's centre of mass; with no error at all, at the centre of the reference's
foreground (or of the volume). Rows: image alone, image + reference, image + prediction; columns:
the slice normal to axis 0, 1 and 2 of the file's voxel grid, each drawn with its voxel spacing
(mm) as aspect ratio. matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg3d.errors import InputError
from medseg3d.io.atomic import atomic_path
from medseg3d.postprocess import largest_component

log = logging.getLogger(__name__)

NUM_WORST = 3


def worst_cases(case_dice: Mapping[str, float], n: int = NUM_WORST) -> list[str]:
    """The `n` cases with the lowest mean foreground Dice (ties by name), worst first."""
    return [c for c, _ in sorted(case_dice.items(), key=lambda kv: (kv[1], kv[0]))[:n]]


def error_focus(ref: np.ndarray, pred: np.ndarray) -> tuple[int, ...]:
    """Voxel index `(x, y, z)` the overlay's slices go through (see the module docstring)."""
    wrong = ref != pred
    if wrong.any():
        mask = largest_component(wrong)
    elif (ref > 0).any():
        mask = ref > 0
    else:
        return tuple(int(s) // 2 for s in ref.shape)
    centre = np.asarray(ndimage.center_of_mass(mask))
    points = np.argwhere(mask)
    nearest = points[np.argmin(((points - centre) ** 2).sum(1))]
    return tuple(int(v) for v in nearest)


def _slice(arr: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice normal to `axis`, transposed so the first remaining axis runs left to right."""
    return np.take(arr, index, axis=axis).T


def write_overlay(image: np.ndarray, ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], path: Path,
                  title: str = "") -> Path:
    """Write the overlay PNG of one case to `path` (atomically) and return it.

    Args:
        image: intensities `(X, Y, Z)` (one channel).
        ref, pred: integer label maps `(X, Y, Z)` on the image's grid.
        spacing: voxel size in mm per axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (image.shape == ref.shape == pred.shape) or image.ndim != 3:
        raise InputError(f"{title or path}: image {image.shape}, reference {ref.shape} and prediction {pred.shape} "
                         "must be 3D arrays of one shape for an overlay")
    focus = error_focus(ref, pred)
    lo, hi = (float(v) for v in np.percentile(image, [0.5, 99.5]))
    top = max(int(ref.max(initial=0)), int(pred.max(initial=0)), 1)
    cmap = plt.get_cmap("tab10", 10)
    fig, axes = plt.subplots(3, 3, figsize=(10, 10))
    for col in range(3):
        rest = [a for a in range(3) if a != col]
        aspect = float(spacing[rest[1]]) / float(spacing[rest[0]])
        img = _slice(image, col, focus[col])
        for row, (labels, name) in enumerate(((None, "image"), (ref, "reference"), (pred, "prediction"))):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", aspect=aspect,
                      interpolation="nearest")
            if labels is not None:
                lab = _slice(labels, col, focus[col])
                ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=max(top, 9), alpha=0.5,
                          origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name}, axis {col} = {focus[col]}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    where = "the largest error" if (ref != pred).any() else "the reference's centre (no error)"
    fig.suptitle(f"{title} (slices through {where} at voxel {focus})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=70)
    plt.close(fig)
    return path


def image_file(image_dir: Path, case: str) -> Path | None:
    """The case's (first channel) image in `image_dir`: `CASE.nii.gz`, `CASE_0000.nii.gz` (or `.nii`)."""
    for stem in (case, f"{case}_0000"):
        for ending in (".nii.gz", ".nii"):
            p = Path(image_dir) / f"{stem}{ending}"
            if p.is_file():
                return p
    return None


def default_image_dir(ref_dir: Path) -> Path | None:
    """`imagesTr` beside `labelsTr` (`imagesTs` beside `labelsTs`, ...) when it exists."""
    ref_dir = Path(ref_dir)
    if "labels" not in ref_dir.name:
        return None
    candidate = ref_dir.parent / ref_dir.name.replace("labels", "images")
    return candidate if candidate.is_dir() else None


def overlays_of_summary(summary: dict, image_dir: Path, out_dir: Path, n: int = NUM_WORST) -> list[Path]:
    """Overlays of the `n` worst cases of an evaluation summary (`evaluate_folders`) into `out_dir/CASE.png`.

    Each case reads its `pred` and `ref` files from the summary and its image from `image_dir`;
    a case without an image is skipped with a warning.
    """
    from medseg3d.io import read_label, read_volume

    dice = {r["case"]: float(np.mean([v["dice"] for v in r["per_class"].values()])) if r["per_class"] else 1.0
            for r in summary["cases"]}
    by_case = {r["case"]: r for r in summary["cases"]}
    written = []
    for case in worst_cases(dice, n):
        img_path = image_file(image_dir, case)
        if img_path is None:
            log.warning("no image of case %s in %s (CASE.nii.gz or CASE_0000.nii.gz): no overlay", case, image_dir)
            continue
        ref = read_label(by_case[case]["ref"])
        pred = read_label(by_case[case]["pred"])
        image = read_volume(img_path).array[0]
        written.append(write_overlay(image, ref.array[0], pred.array[0], ref.spacing, Path(out_dir) / f"{case}.png",
                                     f"{case}: mean Dice {dice[case]:.4f}"))
    log.info("wrote %d overlay(s) into %s", len(written), out_dir)
    return written
