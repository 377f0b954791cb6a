"""Where a trained model lives under WORK_DIR: the one home of the model-folder layout.

    WORK_DIR/results/<CONFIG>/<ARCH>/            model folder (crossval_summary.json, postprocessing.json)
    WORK_DIR/results/<CONFIG>/<ARCH>/fold_<K>/   one fold (checkpoints, log, validation/), K in 0..4 or `all`

Training writes these folders, `predict` and `evaluate --model` read them; all three ask here.
"""

from __future__ import annotations

from pathlib import Path


def model_dir_of(work_dir: str | Path, config: str, arch: str) -> Path:
    """`WORK_DIR/results/<CONFIG>/<ARCH>`."""
    return Path(work_dir) / "results" / config / arch


def fold_dir_of(work_dir: str | Path, config: str, arch: str, fold: int | str) -> Path:
    """`WORK_DIR/results/<CONFIG>/<ARCH>/fold_<K>/` (K an int or `all`)."""
    return model_dir_of(work_dir, config, arch) / f"fold_{fold}"
