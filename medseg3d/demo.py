"""`medseg3d demo`: the whole pipeline on the shipped hippocampus subset, in one command.

verify -> plan -> train (a short schedule on all 16 training cases) -> predict the 4 held-out
cases -> evaluate against their references -> print the Dice table and where every artefact is.
Sized to finish in about 7 minutes on 2 CPU cores; on CUDA it takes a fraction of that.
Rerunning reuses what is already done (plan, a finished model, existing predictions).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from medseg3d.errors import InputError

log = logging.getLogger(__name__)

CONFIG = "3d_fullres"
ARCH = "unet"


@dataclass(frozen=True)
class DemoSchedule:
    """The demo's short training schedule (what the user chose, not what the plan decided).

    A network with a quarter of nnU-Net's features per stage, trained with AdamW (lr 1e-3, poly
    decay): on the shipped data it learns both classes within the first 50 iterations where
    nnU-Net's SGD needs several hundred, which is what a 7-minute CPU budget allows. The 420 s
    budget ends training on 2 cores (about 20 epochs of 50 iterations in fp32, channels-last, on an
    AVX2 CPU; held-out mean Dice 0.835 measured, docs/benchmarks.md); faster machines stop at 40 epochs.
    """

    epochs: int = 40
    iterations_per_epoch: int = 50
    val_iterations: int = 2
    features: tuple[int, ...] = (8, 16, 32, 64)
    lr: float = 1e-3
    optimizer: str = "adamw"
    time_budget_s: float = 420.0


def shipped_dataset() -> Path:
    """Folder of the shipped `hippocampus_mini` dataset (inside the installed package)."""
    path = Path(str(resources.files("medseg3d.resources") / "hippocampus_mini"))
    if not (path / "dataset.json").is_file():
        raise InputError(f"the shipped demo data is missing from {path}; reinstall medseg3d (pip install -e .)")
    return path


def run_demo(out: Path, device: str = "auto", schedule: DemoSchedule | None = None,
             on_verified: Callable[[Any], None] | None = None) -> dict:
    """Run the demo into `out`; returns the evaluation summary of the held-out cases.

    `on_verified(summary)` receives the shipped dataset's `DatasetSummary` once it is verified (the
    `demo` command prints it); the library itself prints nothing.
    """
    from medseg3d.evaluation.evaluate import evaluate_folders
    from medseg3d.inference.folder import predict_folder
    from medseg3d.io import verify_dataset
    from medseg3d.paths import fold_dir_of
    from medseg3d.preprocess.run import plan_and_preprocess
    from medseg3d.training.config import TrainConfig
    from medseg3d.training.trainer import train_fold

    schedule = schedule or DemoSchedule()
    data = shipped_dataset()
    out = Path(out)
    work = out / "work"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    log.info("1/5 verify %s", data)
    verified = verify_dataset(data)
    if on_verified is not None:
        on_verified(verified)
    timings["verify"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log.info("2/5 plan and preprocess into %s", work)
    plan_and_preprocess(data, work, gpu_memory_gb=None, configs=[CONFIG], workers=2, arch=ARCH)
    timings["plan"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fold_dir = fold_dir_of(work, CONFIG, ARCH, "all")
    if (fold_dir / "checkpoint_final.pt").is_file():
        log.info("3/5 train: %s already holds a finished model; reusing it", fold_dir)
    else:
        resume = (fold_dir / "checkpoint_latest.pt").is_file()
        log.info("3/5 train %s/%s on all training cases (at most %d epochs x %d iterations, cut by a %.0f s "
                 "budget%s)", CONFIG, ARCH, schedule.epochs, schedule.iterations_per_epoch, schedule.time_budget_s,
                 ", resuming" if resume else "")
        tc = TrainConfig(
            architecture=ARCH, epochs=schedule.epochs, iterations_per_epoch=schedule.iterations_per_epoch,
            val_iterations=schedule.val_iterations, features=list(schedule.features), lr=schedule.lr,
            optimizer=schedule.optimizer,
            # compiling costs 1-2 min of the 7-min budget on 2 cores: the short run stays eager
            # (channels-last still applies on the CPU in fp32)
            compile=False,
            device=device, time_budget_s=schedule.time_budget_s, resume=resume, final_validation=False,
        )
        train_fold(work, CONFIG, "all", tc)
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    predictions = out / "predictions"
    log.info("4/5 predict the held-out cases into %s", predictions)
    predict_folder(work, data / "imagesTs", predictions, config=CONFIG, arch=ARCH, folds=None,
                   checkpoint="final", device=device)
    timings["predict"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log.info("5/5 evaluate against %s", data / "labelsTs")
    summary = evaluate_folders(predictions, data / "labelsTs", labels=[1, 2], workers=2,
                               json_path=out / "evaluation.json", csv_path=out / "evaluation.csv")
    timings["evaluate"] = time.perf_counter() - t0
    summary["timings_s"] = timings
    summary["artefacts"] = {
        "dataset": str(data), "plans": str(work / "plans.json"), "fingerprint": str(work / "dataset_fingerprint.json"),
        "preprocessed": str(work / "preprocessed"), "model": str(fold_dir), "predictions": str(predictions),
        "evaluation": str(out / "evaluation.json"),
    }
    return summary
