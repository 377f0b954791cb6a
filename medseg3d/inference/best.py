"""`medseg3d predict --best`: predict with exactly what `medseg3d find-best` selected.

`WORK_DIR/selection.json` names the winner: one (configuration, architecture) or a pair of them,
the folds it was scored on, the final-validation settings (window step, mirror TTA) its scores
came from, and the postprocessing chosen on it. Each member's fold networks (`checkpoint_final.pt`
of the selected folds) predict a case through `predict_case`, as the final validation did; a
single model's labels are its own, an ensemble's are the argmax of the members' probabilities
averaged with `medseg3d.inference.ensemble.average_probabilities` (what `find-best` scored); then
the selected postprocessing. On a validation case with its own fold selected this reproduces the
scored prediction bit for bit (tested). Memory: one case, at most two probability maps of it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medseg3d.device import resolve_device
from medseg3d.errors import InputError, OutputError, describe_case_error
from medseg3d.inference.ensemble import average_probabilities, labels_from_probabilities
from medseg3d.inference.folder import PredictSummary, _finish, load_fold_models, pending_outputs, split_part
from medseg3d.inference.predictor import predict_case
from medseg3d.inference.writer import write_segmentation
from medseg3d.io.volume import Volume
from medseg3d.logging_utils import console

log = logging.getLogger(__name__)

SELECTION_FILE = "selection.json"
FORMAT_VERSION = 1

#: What `predict` uses when a selection does not record its validation settings (older summaries).
DEFAULT_STEP = 0.5
DEFAULT_MIRRORING = True


def predict_best(work_dir: str | Path, input_path: str | Path, output_dir: str | Path, *, device: str = "auto",
                 precision: str = "auto", batch_size: int | None = None, num_parts: int = 1, part_id: int = 0,
                 overwrite: bool = False) -> PredictSummary:
    """Predict every case of `input_path` into `output_dir/CASE.nii.gz` with the selected setup.

    Existing outputs are skipped unless `overwrite`; a bad case fails alone and `PredictionError`
    names every failed case at the end (as `predict_folder`).
    """
    from medseg3d.io import read_volume
    from medseg3d.io.dataset import input_cases_and_problems
    from medseg3d.plans.schema import Plans

    work_dir, output_dir = Path(work_dir), Path(output_dir)
    if not work_dir.is_dir():
        raise InputError(f"--best needs the WORK_DIR that `medseg3d find-best` wrote selection.json into; "
                         f"{work_dir} is not a folder")
    selection = load_selection(work_dir)
    winner = selection["winner"]
    folds = [int(f) for f in selection["folds"]]
    decision = winner.get("postprocessing")
    plans = Plans.load(work_dir)
    dev = resolve_device(device)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be >= 1 (network inputs per forward pass), got {batch_size}")
    members = []
    for m in winner["members"]:
        config, arch = m["configuration"], m["architecture"]
        plans.configuration(config)
        step = DEFAULT_STEP if m.get("step") is None else float(m["step"])
        mirroring = DEFAULT_MIRRORING if m.get("mirroring") is None else bool(m["mirroring"])
        members.append((config, arch, step, mirroring))
    log.info("predicting with the selection of %s: %s, folds %s, postprocessing %s", work_dir / "selection.json",
             winner["name"], folds, decision)
    found, problems = input_cases_and_problems(input_path, plans.num_channels)
    entries = sorted([(c.name, c, "") for c in found] + [(n, None, why) for n, why in problems], key=lambda e: e[0])
    summary = PredictSummary()
    cases = []
    for name, case, why in split_part(entries, num_parts, part_id):
        if case is None:
            log.error("case %s cannot be predicted: %s", name, why)
            summary.failed.append((name, why))
        else:
            cases.append(case)
    endings = {c.name: ".nii" if c.images[0].name.endswith(".nii") else ".nii.gz" for c in cases}
    todo = pending_outputs(cases, output_dir, endings, overwrite, summary)
    n_unusable = len(summary.failed)
    if not todo:
        return _finish(summary, n_unusable, output_dir)
    nets = [[n.to(dev).eval() for n in load_fold_models(work_dir, config, arch, folds, "final",
                                                        plans.network_identity(config, arch), plans.file_hash)]
            for config, arch, _, _ in members]
    # a cascade member runs its previous stage (3d_lowres, the same folds and architecture) first
    previous = [[n.to(dev).eval() for n in load_fold_models(work_dir, prev, arch, folds, "final",
                                                            plans.network_identity(prev, arch), plans.file_hash)]
                if (prev := plans.configuration(config).previous_stage) else None
                for config, arch, _, _ in members]
    output_dir.mkdir(parents=True, exist_ok=True)

    def run(case_name: str, image: Volume, k: int, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        config, arch, step, mirroring = members[k]
        return predict_case(nets[k], image, plans, config, step=step, use_mirroring=mirroring, device=dev,
                            postprocessing=None if probabilities else decision, return_probabilities=probabilities,
                            precision=precision, batch_size=batch_size, case=case_name, arch=arch,
                            previous_models=previous[k])

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("cases (best)", total=len(todo))
        for case, out in todo:
            t0 = time.perf_counter()
            try:
                image = read_volume(case.images)
                if len(members) == 1:
                    seg = run(case.name, image, 0, False)[0]
                else:
                    probs = average_probabilities(run(case.name, image, k, True)[1] for k in range(len(members)))
                    seg = labels_from_probabilities(probs)
                    del probs
                    from medseg3d.postprocess import apply_postprocessing

                    seg = apply_postprocessing(seg, decision)
                write_segmentation(seg, image, out, overwrite=overwrite)
                summary.predicted.append(case.name)
                summary.seconds[case.name] = time.perf_counter() - t0
            except OutputError:
                raise
            except Exception as exc:
                why = describe_case_error(exc, "predict")
                log.error("case %s failed: %s", case.name, why)
                log.debug("traceback of case %s", case.name, exc_info=True)
                summary.failed.append((case.name, why))
            bar.advance(task)
    log.info("predicted %d case(s) into %s with %s, %d skipped, %d failed", len(summary.predicted), output_dir,
             winner["name"], len(summary.skipped), len(summary.failed))
    return _finish(summary, len(todo) + n_unusable, output_dir)


def load_selection(work_dir: str | Path) -> dict:
    """`WORK_DIR/selection.json`; `InputError` saying how to make it when it is missing or malformed."""
    path = Path(work_dir) / SELECTION_FILE
    fix = f"run `medseg3d find-best {work_dir}` first"
    if not path.is_file():
        raise InputError(f"{path} does not exist; {fix}")
    try:
        selection = json.loads(path.read_text(encoding="utf-8"))
        members = selection["winner"]["members"]
        ok = (selection.get("format_version") == FORMAT_VERSION and isinstance(selection["folds"], list)
              and members and all(isinstance(m.get("configuration"), str) and isinstance(m.get("architecture"), str)
                                  for m in members))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path} is not a readable selection ({exc}); {fix}") from exc
    if not ok:
        raise InputError(f"{path} is not a selection of this medseg3d (format_version {FORMAT_VERSION}); {fix}")
    return selection
