"""`medseg3d evaluate`: metrics of a prediction folder, or the cross-validation summary of a model.

    medseg3d evaluate PRED_DIR REF_DIR [--labels 1,2] [--json FILE] [--csv FILE] [--workers N] [--overlays DIR]
    medseg3d evaluate --model WORK_DIR --config 3d_fullres [--arch unet] [--workers N]
"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from medseg3d.errors import InputError


def parse_labels(text: str | None) -> list[int] | None:
    """`"1,2"` -> `[1, 2]`; None/empty -> None (every class found). `InputError` on anything else."""
    if not text:
        return None
    try:
        labels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise InputError(f"--labels {text!r}: give comma-separated class ids, e.g. --labels 1,2") from exc
    if not labels or labels[0] < 1:
        raise InputError(f"--labels {text!r}: class ids must be >= 1 (0 is background)")
    return labels


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def summary_table(summary: dict, title: str) -> Table:
    """A rich table: one row per class (means over cases) and one overall row."""
    table = Table(title=title)
    for name in ("class", "Dice", "IoU", "HD95 mm", "precision", "recall", "HD95 n/a"):
        table.add_column(name, justify="right")
    for c, row in summary["per_class_mean"].items():
        table.add_row(str(c), _fmt(row["dice"]), _fmt(row["iou"]), _fmt(row["hd95"], 3), _fmt(row["precision"]),
                      _fmt(row["recall"]), str(row["hd95_excluded"]))
    m = summary["mean"]
    table.add_row("mean", _fmt(m["dice"]), _fmt(m["iou"]), _fmt(m["hd95"], 3), _fmt(m["precision"]),
                  _fmt(m["recall"]), str(m["hd95_excluded"]), style="bold")
    table.caption = (f"{summary['num_cases']} cases; per case means: PA {_fmt(m['pa'])}, MPA {_fmt(m['mpa'])}, "
                     f"mIoU {_fmt(m['miou'])}, FWIoU {_fmt(m['fwiou'])}. HD95 n/a = cases with one side empty "
                     "(left out of the HD95 mean)")
    return table


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command to `app`."""

    @app.command("evaluate")
    def evaluate(
        pred_dir: Path = typer.Argument(None, help="Folder of predicted label maps (.nii.gz, .nrrd, .mha, ...)."),
        ref_dir: Path = typer.Argument(None, help="Folder of reference label maps, matched by file name."),
        labels: str = typer.Option(None, "--labels", "-l", help="Classes to report, e.g. 1,2 (default: all found)."),
        json_out: Path = typer.Option(None, "--json", help="Write every metric of every case to this JSON file."),
        csv_out: Path = typer.Option(None, "--csv", help="Write one row per case and class to this CSV file."),
        workers: int = typer.Option(0, "--workers", "-j", help="Worker processes (0 = automatic)."),
        model: Path = typer.Option(None, "--model", "-m", help="WORK_DIR: summarise its cross-validation folds."),
        config: str = typer.Option("3d_fullres", "--config", "-c", help="Configuration (with --model)."),
        arch: str = typer.Option(None, "--arch", help="Architecture folder (with --model; default: the plan's)."),
        overlays: Path = typer.Option(None, "--overlays",
                                      help="Write PNG overlays (image, reference, prediction; three slices through "
                                           "the largest error) of the 3 worst cases into this folder."),
        images: Path = typer.Option(None, "--images", help="Images for --overlays (default: imagesTr beside "
                                                           "REF_DIR=labelsTr, imagesTs beside labelsTs)."),
    ) -> None:
        """Dice, IoU, HD95 (mm), precision/recall, volumes, PA/MPA/mIoU/FWIoU; or, with --model, the
        cross-validation summary and the largest-component postprocessing choice."""
        from medseg3d.evaluation.evaluate import (
            EvaluationError,
            evaluate_folders,
            write_summary_csv,
            write_summary_json,
        )

        out = Console()
        n_workers = workers or None
        if model is not None:
            if pred_dir is not None or ref_dir is not None:
                raise InputError("give either PRED_DIR REF_DIR or --model WORK_DIR, not both")
            from medseg3d.evaluation.crossval import SUMMARY_FILE, evaluate_crossval
            from medseg3d.paths import model_dir_of

            try:
                summary, decision = evaluate_crossval(model, config, arch, workers=n_workers,
                                                      labels=parse_labels(labels))
            except EvaluationError as exc:  # the good cases' table first, then the failed cases (exit 2)
                out.print(summary_table(exc.summary, f"cross-validation {config} (cases that could be evaluated)"))
                raise
            if json_out is not None:
                write_summary_json(summary, json_out)
            if csv_out is not None:
                write_summary_csv(summary, csv_out)
            out.print(summary_table(summary, f"cross-validation {config}/{summary['architecture']}"))
            steps = (["largest component of all foreground"] if decision["largest_component_foreground"] else []) + [
                f"largest component of class {c}" for c in decision["largest_component_classes"]]
            out.print(f"postprocessing: {', '.join(steps) or 'none'} (mean Dice {decision['dice_before']:.4f} -> "
                      f"{decision['dice_after']:.4f})")
            out.print(f"written: {model_dir_of(model, config, summary['architecture']) / SUMMARY_FILE}")
            return
        if pred_dir is None or ref_dir is None:
            raise InputError("give PRED_DIR and REF_DIR (or --model WORK_DIR --config CONFIG)")
        if overlays is not None:
            from medseg3d.evaluation.overlays import default_image_dir

            images = images or default_image_dir(ref_dir)
            if images is None or not images.is_dir():
                raise InputError(f"--overlays needs the images: give --images DIR (no imagesTr/imagesTs folder "
                                 f"beside {ref_dir}{'' if images is None else f'; {images} is not a folder'})")
        try:
            summary = evaluate_folders(pred_dir, ref_dir, parse_labels(labels), n_workers, json_out, csv_out)
        except EvaluationError as exc:  # the good cases' table first, then the failed cases (exit 2)
            out.print(summary_table(exc.summary, f"{pred_dir} vs {ref_dir} (cases that could be evaluated)"))
            raise
        out.print(summary_table(summary, f"{pred_dir} vs {ref_dir}"))
        if overlays is not None:
            from medseg3d.evaluation.overlays import overlays_of_summary

            written = overlays_of_summary(summary, images, overlays)
            out.print(f"overlays of the {len(written)} worst case(s): {', '.join(p.name for p in written)} in {overlays}",
                      markup=False)
