"""The report of `medseg3d find-best`: `WORK_DIR/selection.md`, a bar plot of per-class Dice per
candidate (`WORK_DIR/selection/dice_per_class.png`) and overlays of the winner's worst validation
cases (`WORK_DIR/selection/overlays/CASE.png`, `medseg3d.evaluation.overlays`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg3d.evaluation.overlays import NUM_WORST, worst_cases, write_overlay
from medseg3d.io.atomic import atomic_path, write_bytes_atomic

log = logging.getLogger(__name__)

PLOT_FILE = "dice_per_class.png"
OVERLAY_DIR = "overlays"


def plot_dice(selection: dict, path: Path) -> Path:
    """Grouped bars: per-class (and mean) Dice, one bar per candidate in ranking order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = selection["labels"]
    groups = [*labels.values(), "mean"]
    cands = selection["candidates"]
    width = 0.8 / max(1, len(cands))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(groups) * max(1, len(cands)) * 0.5), 4.5))
    x = np.arange(len(groups))
    for i, c in enumerate(cands):
        values = [c["per_class_dice"][k] for k in labels] + [c["mean_dice"]]
        ax.bar(x + (i - (len(cands) - 1) / 2) * width, values, width, label=c["name"])
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"Dice (folds {','.join(map(str, selection['folds']))}, {selection['num_cases']} cases)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


def markdown(selection: dict, plot: Path | None, overlays: list[Path], root: Path) -> str:
    """`selection.md`: ranking table, the winner, its postprocessing, what is missing, the figures."""
    labels = selection["labels"]
    head = ["rank", "candidate", *labels.values(), "mean Dice"]
    intro = (f"Cross-validation on folds {', '.join(map(str, selection['folds']))} ({selection['num_cases']} "
             "validation cases); Dice per class is the mean over cases, the mean is over classes.")
    lines = [f"# Model selection of {selection['work_dir']}", "", intro, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in selection["candidates"]:
        cells = [str(c["rank"]), c["name"], *(f"{c['per_class_dice'][k]:.4f}" for k in labels), f"{c['mean_dice']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    w = selection["winner"]
    pp = w["postprocessing"]
    steps = (["largest component of all foreground"] if pp["largest_component_foreground"] else []) + [
        f"largest component of class {c}" for c in pp["largest_component_classes"]]
    verdict = (f"**Winner: {w['name']}**, mean Dice {w['mean_dice']:.4f}; postprocessing: "
               f"{', '.join(steps) or 'none'} (mean Dice {w['mean_dice_postprocessed']:.4f} after it).")
    lines += ["", verdict, "",
              f"Predict with exactly this: `medseg3d predict -m {selection['work_dir']} --best -i IMAGES -o OUT`."]
    if selection["missing"]:
        lines += ["", "## Not compared", "", *(f"- {m}" for m in selection["missing"])]
    if plot is not None:
        lines += ["", "## Dice per class", "", f"![Dice per class]({plot.relative_to(root).as_posix()})"]
    if overlays:
        lines += ["", f"## The winner's {len(overlays)} worst validation cases (after postprocessing)", ""]
        lines += [f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in overlays]
    return "\n".join(lines) + "\n"


def write_report(work_dir: Path, plans, selection: dict, winner, refs: dict[str, Path],
                 post_dice: dict[str, dict[int, float]]) -> Path:
    """Write the plot, the overlays and `selection.md`; returns the markdown's path."""
    from medseg3d.evaluation.selection import REPORT_DIR, REPORT_FILE, candidate_prediction
    from medseg3d.io import load_dataset, read_label, read_volume
    from medseg3d.postprocess import apply_postprocessing

    out = work_dir / REPORT_DIR
    plot = plot_dice(selection, out / PLOT_FILE)
    images = {c.name: c.images for c in load_dataset(plans.dataset_dir).cases}
    decision = selection["winner"]["postprocessing"]
    overlays = []
    for stale in sorted((out / OVERLAY_DIR).glob("*.png")):  # an earlier selection's worst cases
        stale.unlink()
    for case in worst_cases({c: float(np.mean(list(d.values()))) for c, d in post_dice.items()}, NUM_WORST):
        ref = read_label(refs[case])
        pred = apply_postprocessing(candidate_prediction(winner, case), decision)
        image = read_volume(images[case]).array[0]
        mean = float(np.mean(list(post_dice[case].values())))
        overlays.append(write_overlay(image, ref.array[0], pred, ref.spacing, out / OVERLAY_DIR / f"{case}.png",
                                      f"{case} ({winner.name}): mean Dice {mean:.4f}"))
    path = work_dir / REPORT_FILE
    write_bytes_atomic(path, markdown(selection, plot, overlays, work_dir).encode("utf-8"))
    log.info("wrote %s with %s and %d overlay(s)", path, plot, len(overlays))
    return path
