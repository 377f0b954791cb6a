"""`predict_folder`: the model folder's fold networks over a folder (or file) of cases.

Model folder: `WORK_DIR/results/<CONFIG>/<ARCH>/fold_<K>/checkpoint_<final|best|latest>.pt`, each
checkpoint carrying the hash of `WORK_DIR/plans.json`. Outputs `OUTPUT_DIR/CASE.nii.gz` (uint8, the
input's exact header; or the input's NRRD/MHA format, or a DICOM SEG for a DICOM series: `--output-format`),
optionally `CASE.npz` probabilities.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from medseg3d.device import resolve_device
from medseg3d.errors import (
    CasesFailedError,
    CheckpointError,
    InputError,
    OutputError,
    describe_case_error,
    is_out_of_memory,
)
from medseg3d.inference.checkpoint import build_model_from_checkpoint, load_checkpoint
from medseg3d.inference.predictor import predict_case
from medseg3d.inference.writer import output_endings, output_path, write_probabilities, write_segmentation
from medseg3d.io.volume import Volume
from medseg3d.logging_utils import console
from medseg3d.paths import fold_dir_of, model_dir_of

log = logging.getLogger(__name__)

CHECKPOINT_KINDS = ("final", "best", "latest")


class PredictionError(CasesFailedError):
    """Some cases could not be predicted (the others were); lists each case and why."""


@dataclass
class PredictSummary:
    """What `predict_folder` did: case names predicted / skipped (output existed) / failed (name, why)."""

    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def available_folds(mdir: Path, checkpoint: str) -> list[int | str]:
    """Folds under `mdir` holding `checkpoint_<checkpoint>.pt`: numbers sorted, then `"all"` (fold_all)."""
    folds: list[int | str] = []
    for p in sorted(mdir.glob("fold_*")):
        m = re.fullmatch(r"fold_(\d+|all)", p.name)
        if m and (p / f"checkpoint_{checkpoint}.pt").is_file():
            folds.append(int(m.group(1)) if m.group(1).isdigit() else "all")
    return sorted(f for f in folds if f != "all") + [f for f in folds if f == "all"]  # type: ignore[operator]


def select_folds(work_dir: Path, config: str, arch: str, folds: list[int | str] | None, checkpoint: str) -> list[int | str]:
    """The folds to use: `folds`, or with `folds=None` every numbered fold with `checkpoint_<checkpoint>.pt`
    (or `fold_all` when there is no numbered one); `"all"` names `fold_all`.

    CheckpointError lists which folds exist when a requested one (or any) is missing.
    """
    if checkpoint not in CHECKPOINT_KINDS:
        raise InputError(f"--checkpoint {checkpoint!r} is not one of {', '.join(CHECKPOINT_KINDS)}")
    mdir = model_dir_of(work_dir, config, arch)
    have = available_folds(mdir, checkpoint)
    if folds is None:
        if not have:
            raise CheckpointError(
                f"no fold under {mdir} has checkpoint_{checkpoint}.pt; train one first "
                f"(`medseg3d train {work_dir} --config {config} --fold 0`) or pick --checkpoint best/latest")
        numbered = [f for f in have if f != "all"]
        folds = numbered or have
    missing = [f for f in folds if f not in have]
    if missing:
        listed = ", ".join(str(f) for f in have) or "none"
        raise CheckpointError(
            f"fold(s) {', '.join(str(f) for f in missing)} have no checkpoint_{checkpoint}.pt under {mdir}; "
            f"folds with one: {listed}. Pass --folds with those, or train the missing folds")
    return list(folds)


def load_fold_checkpoint(
    work_dir: Path, config: str, arch: str, fold: int | str, checkpoint: str, plan_identity: dict[str, Any],
    legacy_hash: str | None = None,
) -> dict[str, Any]:
    """The checked checkpoint dict of one fold (`load_checkpoint` against `plan_identity`, and of `config`)."""
    fdir = fold_dir_of(work_dir, config, arch, fold)
    ckpt = load_checkpoint(fdir / f"checkpoint_{checkpoint}.pt", expected_plan=plan_identity, legacy_hash=legacy_hash)
    if ckpt.get("configuration") not in (None, config):
        raise CheckpointError(f"{fdir} holds a checkpoint of configuration {ckpt['configuration']!r}, "
                              f"not {config!r}; move it to results/{ckpt['configuration']}/")
    return ckpt


def load_fold_models(
    work_dir: Path, config: str, arch: str, folds: list[int | str] | None, checkpoint: str, plan_identity: dict[str, Any],
    legacy_hash: str | None = None,
) -> list[nn.Module]:
    """One eval-mode network per fold of `select_folds` (`folds=None`: every trained numbered fold).

    CheckpointError lists which folds exist when a requested one (or any) is missing.
    """
    folds = select_folds(work_dir, config, arch, folds, checkpoint)
    models = []
    for f in folds:
        ckpt = load_fold_checkpoint(work_dir, config, arch, f, checkpoint, plan_identity, legacy_hash)
        models.append(build_model_from_checkpoint(ckpt))
        del ckpt
    log.info("loaded %d fold model(s) %s from %s (checkpoint_%s)", len(models), folds,
             model_dir_of(work_dir, config, arch), checkpoint)
    return models


def split_part(items: list, num_parts: int, part_id: int) -> list:
    """Part `part_id` of `num_parts` (round robin): every item lands in exactly one part."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise InputError(f"--part-id must be in 0..{num_parts - 1} and --num-parts >= 1 "
                         f"(got part {part_id} of {num_parts})")
    return items[part_id::num_parts]


def predict_folder(
    work_dir: str | Path,
    input_path: str | Path,
    output_dir: str | Path,
    *,
    config: str = "3d_fullres",
    arch: str | None = None,
    folds: list[int | str] | None = None,
    checkpoint: str = "final",
    step: float = 0.5,
    use_mirroring: bool = True,
    device: str = "auto",
    save_probabilities: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    overwrite: bool = False,
    precision: str = "auto",
    batch_size: int | None = None,
    output_format: str = "auto",
    series_uid: str | None = None,
    models: list[nn.Module] | None = None,
    previous_stage: str | Path | None = None,
    previous_models: list[nn.Module] | None = None,
    backend: str = "auto",
) -> PredictSummary:
    """Predict every case of `input_path` (folder in MSD/nnU-Net naming, or one file) into `output_dir`.

    Existing outputs are kept unless `overwrite`. A bad case (wrong channels or spacing, unreadable,
    NaN, too large for the GPU, ...) is logged and the others go on, whether found at discovery or
    while predicting; at the end PredictionError (non-zero exit) names every failed case and why.
    An output that cannot be written (no permission, full disk: `OutputError`) stops the folder at
    once, as it is not the case's fault. `batch_size`: network inputs per forward pass (default:
    `predictor.default_batch_size`). `models` skips checkpoint loading (tests, benchmarks).
    `output_format`: `auto` (the input's format; DICOM series -> DICOM SEG), `nifti`, `nrrd`, `mha` or
    `dicom-seg` (`writer.output_endings`); `series_uid` chooses the series of DICOM folders holding several.
    A cascade configuration (`3d_cascade_fullres`) first runs its previous stage (`3d_lowres`, the
    same folds of the same architecture, or `previous_models`) on each image, or reads the previous
    stage's labels `CASE.nii.gz` from the folder `previous_stage` (a case without one fails alone).
    `backend`: what runs the fold networks (`inference.backends`: auto, torch, onnxruntime, openvino).
    """
    from medseg3d.io import read_volume
    from medseg3d.io.dataset import input_cases_and_problems
    from medseg3d.plans.schema import Plans

    work_dir, output_dir = Path(work_dir), Path(output_dir)
    if not 0 < step <= 1:
        raise InputError(f"--step must be in (0, 1] (a fraction of the patch), got {step}")
    plans = Plans.load(work_dir)
    cfg = plans.configuration(config)
    arch = arch or cfg.architecture
    dev = resolve_device(device)
    from medseg3d.inference.backends import backend_of, resolve_backend, to_backend
    from medseg3d.inference.predictor import resolve_amp

    runs_on = resolve_backend(backend, dev, resolve_amp(precision, dev), precision)  # an unusable backend fails before any work
    if models is None and folds is not None:  # a mistyped fold is reported before any work
        have = available_folds(model_dir_of(work_dir, config, arch), checkpoint)
        if any(f not in have for f in folds):
            # raises, listing the folds that exist
            load_fold_models(work_dir, config, arch, folds, checkpoint, plans.network_identity(config, arch),
                                  plans.file_hash)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be >= 1 (network inputs per forward pass), got {batch_size}")
    found, problems = input_cases_and_problems(input_path, plans.num_channels, series_uid=series_uid)
    entries = sorted([(c.name, c, "") for c in found] + [(name, None, why) for name, why in problems],
                     key=lambda e: e[0])
    summary = PredictSummary()
    cases = []
    for name, case, why in split_part(entries, num_parts, part_id):
        if case is None:
            log.error("case %s cannot be predicted: %s", name, why)
            summary.failed.append((name, why))
        else:
            cases.append(case)
    endings = output_endings(cases, output_format)  # an impossible --output-format is refused before any work
    todo = pending_outputs(cases, output_dir, endings, overwrite, summary)
    n_unusable = len(summary.failed)  # refused at discovery; the total counts them with the cases tried
    if not todo:
        return _finish(summary, n_unusable, output_dir)
    if models is None:
        models = load_fold_models(work_dir, config, arch, folds, checkpoint, plans.network_identity(config, arch),
                                  plans.file_hash)
    models = [m.to(dev).eval() for m in models]
    from medseg3d.cascade import extra_channels

    models = to_backend(models, runs_on, in_channels=plans.num_channels + extra_channels(plans, config),
                        source=str(work_dir), patch_size=cfg.for_architecture(arch).patch_size,
                        required=backend != "auto")
    if backend_of(models) != "torch":
        precision = "fp32"  # the other backends run float32: no autocast around them (auto's torch fallback keeps it)
    prev_name = cfg.previous_stage
    if prev_name and previous_stage is None and previous_models is None:  # one command runs both stages
        previous_models = load_fold_models(work_dir, prev_name, arch, folds, checkpoint,
                                           plans.network_identity(prev_name, arch), plans.file_hash)
    previous_models = [m.to(dev).eval() for m in previous_models or []]
    if previous_models and prev_name:  # the lowres stage runs on the same backend as `predict --config <lowres>` would
        previous_models = to_backend(previous_models, runs_on,
                                     in_channels=plans.num_channels + extra_channels(plans, prev_name),
                                     source=str(work_dir), required=backend != "auto",
                                     patch_size=plans.configuration(prev_name).for_architecture(arch).patch_size)
    postprocessing = _load_postprocessing(model_dir_of(work_dir, config, arch))
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        t_cases = bar.add_task("cases", total=len(todo))
        t_win = bar.add_task("windows", total=None)
        for case, out in todo:
            bar.update(t_win, completed=0, total=None, description=f"windows {case.name}")
            t0 = time.perf_counter()
            try:
                image = read_volume(case.images, series_uid=case.series_uid)
                geometry = Volume(np.zeros((1, 1, 1, 1), np.uint8), image.affine, image.header)
                prev_seg = None
                if prev_name and previous_stage is not None:
                    prev_seg = _previous_labels(Path(previous_stage), case.name, image, prev_name)
                box = [image]
                del image  # predict_case then holds the only reference and frees the voxels after preprocessing
                seg, probs = predict_case(
                    models, box.pop(), plans, config, step=step, use_mirroring=use_mirroring, device=dev,
                    postprocessing=postprocessing, return_probabilities=save_probabilities,
                    precision=precision, batch_size=batch_size, progress=lambda n: bar.advance(t_win, n),
                    case=case.name, arch=arch, previous_models=previous_models, previous_seg=prev_seg)
                write_segmentation(seg, geometry, out, overwrite=overwrite, source=case, labels=plans.labels)
                if probs is not None:
                    write_probabilities(probs, output_dir / f"{case.name}.npz", overwrite=True)
                summary.predicted.append(case.name)
                summary.seconds[case.name] = time.perf_counter() - t0
            except OutputError:
                raise  # no permission / full disk: every later case would fail the same way
            except Exception as exc:
                why = describe_case_error(exc, "predict")
                log.error("case %s failed: %s", case.name, why)
                log.debug("traceback of case %s", case.name, exc_info=True)
                summary.failed.append((case.name, why))
                if is_out_of_memory(exc):
                    _free_cuda_cache()
            bar.advance(t_cases)
    log.info("predicted %d case(s) into %s, %d skipped, %d failed", len(summary.predicted), output_dir,
             len(summary.skipped), len(summary.failed))
    return _finish(summary, len(todo) + n_unusable, output_dir)


def _previous_labels(folder: Path, case: str, image: Volume, stage: str) -> np.ndarray:
    """The previous stage's labels `(X, Y, Z)` of `case` from `folder/CASE.nii[.gz]`, checked against the image grid."""
    from medseg3d.io import read_label

    path = next((folder / f"{case}{e}" for e in (".nii.gz", ".nii") if (folder / f"{case}{e}").is_file()), None)
    if path is None:
        raise InputError(f"--previous-stage {folder} has no {case}.nii.gz (the {stage} prediction of this case); "
                         f"predict it with `medseg3d predict --config {stage}` into that folder first")
    lab = read_label(path)
    if tuple(lab.array.shape[1:]) != tuple(image.array.shape[1:]) or not np.allclose(lab.affine, image.affine,
                                                                                      atol=1e-3):
        raise InputError(f"{path} does not have the grid of the image of case {case} (shape "
                         f"{tuple(lab.array.shape[1:])} vs {tuple(image.array.shape[1:])}, or another affine); "
                         f"give the {stage} prediction of this very image")
    return np.asarray(lab.array[0])


def pending_outputs(cases: list, output_dir: Path, endings: dict[str, str], overwrite: bool,
                    summary: PredictSummary) -> list[tuple[Any, Path]]:
    """`(case, output path)` of the cases to predict: an existing output is skipped (listed in `summary`,
    counted in the log) unless `overwrite`. `endings`: file ending per case name."""
    todo = []
    for case in cases:
        out = output_path(output_dir, case.name, endings[case.name])
        if out.exists() and not overwrite:
            summary.skipped.append(case.name)
        else:
            todo.append((case, out))
    if summary.skipped:
        log.info("%d case(s) skipped: their output exists in %s (pass --overwrite to redo them)",
                 len(summary.skipped), output_dir)
    return todo


def _finish(summary: PredictSummary, total: int, output_dir: Path) -> PredictSummary:
    """`summary`, or PredictionError naming every failed case (with `summary` attached) when any failed."""
    if summary.failed:
        raise PredictionError("predict", summary.failed, total, f"the others were written to {output_dir}", summary)
    return summary


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load_postprocessing(mdir: Path) -> dict | None:
    try:
        from medseg3d.postprocess import load_postprocessing
    except ImportError:
        log.debug("medseg3d.postprocess is not available; no postprocessing")
        return None
    return load_postprocessing(mdir)
