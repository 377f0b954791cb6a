"""`medseg3d export`: a trained model folder as one zip (plan, labels, safetensors weights, manifest)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the `export` command to `app`."""

    @app.command("export")
    def export(
        work_dir: Path = typer.Argument(..., help="WORK_DIR holding plans.json and results/."),
        output: Path = typer.Option(..., "-o", "--output", help="The model package to write (FILE.zip)."),
        config: str = typer.Option("3d_fullres", "--config", "-c", help="Plan configuration."),
        arch: str | None = typer.Option(None, "--arch", help="Architecture (default: the plan's)."),
        folds: str | None = typer.Option(None, "--folds", "-f",
                                         help="Comma-separated folds, 'all' = fold_all (default: every trained fold)."),
        checkpoint: str = typer.Option("final", "--checkpoint", help="final or best."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing FILE.zip."),
        formats: list[str] = typer.Option([], "--format",
                                          help="Also export each fold's network for `predict --backend`: onnx "
                                               "(onnxruntime) or openvino (OpenVINO IR); repeat or comma-separate."),
    ) -> None:
        """Write a model package: `predict -m FILE.zip` then runs from it alone, with the same output."""
        from medseg3d.commands.predict import _parse_folds
        from medseg3d.package import write_package

        fmts = [f.strip() for text in formats for f in text.split(",") if f.strip()]
        manifest = write_package(work_dir, output, config=config, arch=arch, folds=_parse_folds(folds),
                                 checkpoint=checkpoint, overwrite=overwrite, formats=fmts)
        size = sum(m["bytes"] for m in manifest["members"].values()) / 1e6
        typer.echo(f"exported {manifest['configuration']}/{manifest['architecture']} folds "
                   f"{','.join(str(f) for f in manifest['folds'])} (checkpoint_{manifest['checkpoint']}, "
                   f"{size:.1f} MB" + (f", networks as {', '.join(fmts)}" if fmts else "") + f") -> {output}")
