"""Cross-validation splits: a deterministic 5-fold split saved as `WORK_DIR/splits.json`.

`splits.json` is a list of `{"train": [case, ...], "val": [case, ...]}`, one entry per fold (the
same layout as nnU-Net's `splits_final.json`). A file the user wrote is honoured as it is, after a
check that every case it names is in the preprocessed cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg3d.errors import ConfigError
from medseg3d.io.atomic import write_json_atomic

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"


def make_splits(cases: Sequence[str], n_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """Deterministic k-fold split of `cases` (sorted first, then shuffled with `seed`).

    Fold k's validation set is every n_folds-th case of the shuffled list starting at k, so fold
    sizes differ by at most one. Raises ConfigError when there are fewer cases than folds.
    """
    names = sorted(set(cases))
    if len(names) < n_folds:
        raise ConfigError(f"{len(names)} cases cannot be split into {n_folds} folds; label more cases "
                          "or train with --fold all")
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    splits = []
    for k in range(n_folds):
        val = sorted(shuffled[k::n_folds])
        train = sorted(set(names) - set(val))
        splits.append({"train": train, "val": val})
    return splits


def load_or_create_splits(work_dir: str | Path, cases: Sequence[str], n_folds: int = 5,
                          seed: int = 12345, write: bool = True) -> list[dict[str, list[str]]]:
    """The splits of `WORK_DIR/splits.json`, written first from `make_splits` when absent.

    A present file is checked (list of dicts with `train` and `val` lists of known cases) and
    honoured; ConfigError names the file and the problem otherwise.
    """
    path = Path(work_dir) / SPLITS_FILE
    if not path.is_file():
        splits = make_splits(cases, n_folds, seed)
        if write:
            write_json_atomic(path, splits)
            log.info("wrote %d-fold split to %s", n_folds, path)
        return splits
    fix = f"fix it or delete {path} so a fresh {n_folds}-fold split is written"
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({exc}); {fix}") from exc
    if not isinstance(splits, list) or not splits:
        raise ConfigError(f"{path} must hold a non-empty list of {{'train': [...], 'val': [...]}}; {fix}")
    known = set(cases)
    for k, fold in enumerate(splits):
        if not isinstance(fold, dict) or not isinstance(fold.get("train"), list) or not isinstance(fold.get("val"), list):
            raise ConfigError(f"{path} fold {k} is not a {{'train': [...], 'val': [...]}} object; {fix}")
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
        if unknown:
            raise ConfigError(f"{path} fold {k} names cases that are not in the preprocessed cache: "
                              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; {fix}")
        if not fold["train"]:
            raise ConfigError(f"{path} fold {k} has no training cases; {fix}")
    return splits


def fold_cases(splits: list[dict[str, list[str]]], fold: int | str,
               all_cases: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(train, val)` case names of `fold` (an int, or "all": every case trains, none validates)."""
    if str(fold) == "all":
        return sorted(all_cases), []
    k = int(fold)
    if not 0 <= k < len(splits):
        raise ConfigError(f"fold {k} does not exist: splits.json has folds 0..{len(splits) - 1} (or use --fold all)")
    return list(splits[k]["train"]), list(splits[k]["val"])
