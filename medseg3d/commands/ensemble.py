"""`medseg3d ensemble`: average saved probability folders into label maps.

    medseg3d ensemble IN_DIR1 IN_DIR2 [...] -o OUT [--postprocessing FILE] [--overwrite]
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the `ensemble` command to `app`."""

    @app.command("ensemble")
    def ensemble(
        in_dirs: list[Path] = typer.Argument(..., help="Folders of CASE.npz (predict --save-probabilities), two or more."),
        output: Path = typer.Option(..., "-o", "--output", help="Folder for the label maps (CASE.nii.gz, or the format predict wrote beside the .npz)."),
        postprocessing: Path | None = typer.Option(None, "--postprocessing",
                                                   help="postprocessing.json to apply (evaluate --model writes one)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs (default: skip them)."),
    ) -> None:
        """Average the probabilities of each case over the folders and write its labels with the input's geometry."""
        from medseg3d.inference.ensemble import ensemble_folders
        from medseg3d.postprocess import read_postprocessing

        decision = read_postprocessing(postprocessing) if postprocessing is not None else None
        summary = ensemble_folders(in_dirs, output, postprocessing=decision, overwrite=overwrite)
        typer.echo(f"ensembled {len(summary.written)}, skipped {len(summary.skipped)} (existing outputs) -> {output}")
