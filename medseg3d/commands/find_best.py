"""`medseg3d find-best`: the best configuration, architecture or pair of them on cross-validation.

    medseg3d find-best WORK_DIR [--folds 0,1,2,3,4] [--configs 2d,3d_fullres] [--archs unet] [--no-ensembles]
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from medseg3d.errors import InputError


def _names(text: str | None) -> list[str] | None:
    if text is None or not text.strip():
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_folds(text: str) -> list[int]:
    """`"0,1,2"` -> `[0, 1, 2]`; `InputError` on anything else."""
    try:
        folds = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError as exc:
        raise InputError(f"--folds {text!r} must be comma-separated fold numbers, e.g. 0,1,2,3,4") from exc
    if not folds or folds[0] < 0:
        raise InputError(f"--folds {text!r} must name folds 0, 1, ...")
    return folds


def ranking_table(selection: dict) -> Table:
    """Rich table: one row per candidate (ranked), per-class Dice and the mean."""
    labels = selection["labels"]
    table = Table(title=f"cross-validation, folds {','.join(map(str, selection['folds']))} "
                        f"({selection['num_cases']} cases): Dice")
    for name in ("rank", "candidate", *(f"{k} {v}" for k, v in labels.items()), "mean"):
        table.add_column(name, justify="left" if name == "candidate" else "right")
    for c in selection["candidates"]:
        table.add_row(str(c["rank"]), c["name"], *(f"{c['per_class_dice'][k]:.4f}" for k in labels),
                      f"{c['mean_dice']:.4f}", style="bold" if c["rank"] == 1 else None)
    return table


def register(app: typer.Typer) -> None:
    """Add the `find-best` command to `app`."""

    @app.command("find-best")
    def find_best_command(
        work_dir: Path = typer.Argument(..., help="WORK_DIR with results/<CONFIG>/<ARCH>/fold_<K>/validation/."),
        folds: str = typer.Option("0,1,2,3,4", "--folds", "-f", help="Folds every candidate must have validated."),
        configs: str | None = typer.Option(None, "--configs", help="Configurations to compare (default: all planned)."),
        archs: str | None = typer.Option(None, "--archs", help="Architectures to compare (default: all trained)."),
        no_ensembles: bool = typer.Option(False, "--no-ensembles", help="Compare single models only."),
    ) -> None:
        """Rank every trained model and pairwise ensemble on cross-validation, choose the winner's
        postprocessing; writes WORK_DIR/selection.json and selection.md (used by `predict --best`)."""
        from medseg3d.evaluation.selection import REPORT_FILE, SELECTION_FILE, find_best

        selection = find_best(work_dir, parse_folds(folds), _names(configs), _names(archs),
                              ensembles=not no_ensembles)
        out = Console()
        out.print(ranking_table(selection))
        w = selection["winner"]
        pp = w["postprocessing"]
        steps = (["largest component of all foreground"] if pp["largest_component_foreground"] else []) + [
            f"largest component of class {c}" for c in pp["largest_component_classes"]]
        out.print(f"winner: {w['name']} (mean Dice {w['mean_dice']:.4f}); postprocessing: {', '.join(steps) or 'none'}"
                  f" (mean Dice {w['mean_dice_postprocessed']:.4f})")
        for line in selection["missing"]:
            out.print(f"not compared: {line}", markup=False)
        out.print(f"written: {work_dir / SELECTION_FILE}, {work_dir / REPORT_FILE}; predict with "
                  f"`medseg3d predict -m {work_dir} --best -i IMAGES -o OUT`", markup=False)
