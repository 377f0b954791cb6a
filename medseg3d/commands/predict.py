"""`medseg3d predict`: fold networks over a folder (or file) of images into label maps (NIfTI, NRRD, MHA, DICOM SEG)."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg3d.errors import InputError


def _parse_folds(text: str | None) -> list[int | str] | None:
    if text is None or not text.strip():
        return None
    folds: list[int | str] = []
    for f in (t.strip() for t in text.split(",") if t.strip()):
        if f == "all":
            folds.append("all")
            continue
        try:
            folds.append(int(f))
        except ValueError as exc:
            raise InputError(f"--folds {text!r} must be comma-separated fold numbers (or 'all' for fold_all), "
                             "e.g. 0,1,2,3,4") from exc
    return folds


def register(app: typer.Typer) -> None:
    """Add the `predict` command to `app`."""

    @app.command("predict")
    def predict(
        model: Path = typer.Option(..., "-m", "--model", help="WORK_DIR holding plans.json and results/, or a model "
                                                                  "package (FILE.zip from `medseg3d export`)."),
        input: Path = typer.Option(..., "-i", "--input", help="Folder of images (MSD or nnU-Net naming; NIfTI, NRRD, "
                                                              "MHA/MHD; DICOM series as sub-folders), one file, or "
                                                              "one DICOM series folder."),
        output: Path = typer.Option(..., "-o", "--output", help="Folder for the label maps CASE.nii.gz (or .nrrd, "
                                                                ".mha, .dcm: --output-format)."),
        config: str = typer.Option("3d_fullres", "--config", "-c", help="Plan configuration."),
        arch: str | None = typer.Option(None, "--arch", help="Architecture (default: the plan's)."),
        folds: str | None = typer.Option(None, "--folds", "-f",
                                         help="Comma-separated folds to average, 'all' = fold_all (default: every trained fold)."),
        checkpoint: str = typer.Option("final", "--checkpoint", help="final, best or latest."),
        step: float = typer.Option(0.5, "--step", help="Window step as a fraction of the patch (0.5 = 50% overlap)."),
        no_tta: bool = typer.Option(False, "--no-tta", help="No mirror test-time augmentation (about 8x faster in 3D)."),
        device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
        precision: str = typer.Option("auto", "--precision",
                                      help="auto (bf16 on CPUs with native bf16, fp16 on CUDA), fp32, bf16, fp16."),
        backend: str = typer.Option("auto", "--backend",
                                    help="What runs the networks: auto (torch for now), torch, onnxruntime or openvino "
                                         "(CPU, float32; "
                                         "`pip install \"medseg3d[onnx]\"` / `[openvino]`)."),
        batch_size: int | None = typer.Option(None, "--batch-size",
                                              help="Network inputs (windows x mirrorings) per forward pass; lower it "
                                                   "when the GPU runs out of memory (default: from the patch size; 1 for a 3D float32 "
                                                   "network of 32+ first-stage features on a CPU without AVX-512, "
                                                   "where batching was slower)."),
        save_probabilities: bool = typer.Option(False, "--save-probabilities",
                                                help="Also write CASE.npz with (K, X, Y, Z) probabilities."),
        num_parts: int = typer.Option(1, "--num-parts", help="Split the cases into this many parts ..."),
        part_id: int = typer.Option(0, "--part-id", help="... and predict this one (0-based)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs (default: skip them)."),
        output_format: str = typer.Option("auto", "--output-format",
                                          help="auto (the input's: NIfTI, NRRD, MHA; a DICOM series -> DICOM SEG), "
                                               "nifti, nrrd, mha or dicom-seg."),
        series_uid: str | None = typer.Option(None, "--series-uid",
                                              help="SeriesInstanceUID to read from DICOM folders holding several "
                                                   "series (default: refuse them)."),
        previous_stage: Path | None = typer.Option(None, "--previous-stage",
                                                   help="Cascade (--config 3d_cascade_fullres): a folder of the "
                                                        "3d_lowres predictions CASE.nii.gz to use instead of running "
                                                        "3d_lowres first (the default)."),
        best: bool = typer.Option(False, "--best", help="Predict with WORK_DIR/selection.json (`medseg3d find-best`): "
                                                   "its model or ensemble, folds, step, TTA and postprocessing."),
    ) -> None:
        """Predict label maps with sliding-window inference, mirror TTA and fold averaging."""
        from medseg3d.inference.folder import predict_folder

        if best:  # everything the model needs comes from the selection
            from medseg3d.inference.best import predict_best

            if folds is not None or arch is not None or save_probabilities or no_tta:
                raise InputError("--best predicts with the selection's folds, architecture and TTA; drop "
                                 "--folds/--arch/--no-tta/--save-probabilities (or predict without --best)")
            if output_format not in ("auto", "nifti") or series_uid is not None:
                raise InputError("--best writes NIfTI label maps; drop --output-format/--series-uid (or predict "
                                 "without --best)")
            if backend not in ("auto", "torch"):
                raise InputError("--best predicts with torch; drop --backend (or predict without --best)")
            done = predict_best(model, input, output, device=device, precision=precision, batch_size=batch_size,
                                num_parts=num_parts, part_id=part_id, overwrite=overwrite)
            typer.echo(f"predicted {len(done.predicted)}, skipped {len(done.skipped)} (existing outputs) -> {output}")
            return

        from medseg3d.package import is_package, predict_package

        extra = {} if previous_stage is None else {"previous_stage": previous_stage}
        summary = (predict_package if is_package(model) else predict_folder)(
            model, input, output, config=config, arch=arch, folds=_parse_folds(folds), checkpoint=checkpoint,
            step=step, use_mirroring=not no_tta, device=device, save_probabilities=save_probabilities,
            num_parts=num_parts, part_id=part_id, overwrite=overwrite, precision=precision, batch_size=batch_size,
            output_format=output_format, series_uid=series_uid, backend=backend,
            **extra,
        )
        typer.echo(f"predicted {len(summary.predicted)}, skipped {len(summary.skipped)} (existing outputs) -> {output}")
