"""Checkpoints: atomic save, checked load, and the network rebuilt from what the checkpoint says.

Checkpoint dict (docs/architecture.md): `format_version`, `plan_hash`, `configuration`,
`architecture`, `network_kwargs` (dims, strides, kernel_sizes, features), `in_channels`,
`num_classes`, `model` (state_dict), and for resuming `optimizer`, `scaler`, `epoch`, `rng`, `log`.

Loading never runs code from the file: `torch.load(..., weights_only=True)` accepts tensors and
plain data (dict, list, tuple, str, int, float, bool, None) only, which is all a medseg3d
checkpoint holds (the numpy random state is stored as a list, see `training.state.rng_states`).
A file that needs any other class or function is refused with a CheckpointError (docs/training.md).
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg3d.errors import CheckpointError
from medseg3d.io.atomic import atomic_path
from medseg3d.plans.schema import identity_differences, identity_hash

log = logging.getLogger(__name__)

#: The checkpoint layout this medseg3d writes and reads.
FORMAT_VERSION = 1

REQUIRED_KEYS = ("format_version", "plan_hash", "architecture", "network_kwargs", "in_channels", "num_classes", "model")

_FIX_CORRUPT = ("resume from another checkpoint (`medseg3d train ... --resume` picks checkpoint_latest.pt; "
                "copy checkpoint_best.pt over it if that one is intact) or retrain this fold")


def _legacy_numpy_rng_globals() -> list[Any]:
    """What the numpy random state of a checkpoint written before format 1 stored it as a list needs.

    Exactly the reconstruction of a uint32 `ndarray` (no object arrays, no other class), allowed
    only where torch has `safe_globals` (2.5+); elsewhere such a checkpoint is refused.
    """
    core = getattr(np, "_core", None) or np.core  # numpy 2.x / 1.x
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _allowed_globals() -> Any:
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals(_legacy_numpy_rng_globals()) if safe_globals is not None else nullcontext()


def _refused_global(exc: BaseException) -> str | None:
    """The global a `weights_only` load refused (e.g. `builtins.exec`), or None for another failure."""
    text = str(exc)
    # torch 2.4+: "GLOBAL builtins.exec was not an allowed global"; torch 2.3: "Unsupported class builtins.exec"
    m = re.search(r"GLOBAL ([\w.]+) was not an allowed global|Can only build .* but got <class '([\w.]+)'>"
                  r"|reduce for unrecognized function ([\w.]+)|Unsupported class ([\w.]+)", text)
    # other WeightsUnpickler errors ("Unsupported operand", truncated data): a corrupt file
    return next(g for g in m.groups() if g) if m else None


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` with `torch.save` atomically (temp file + rename): never a half-written file.

    `format_version` is filled in when absent.
    """
    payload = dict(payload)
    payload.setdefault("format_version", FORMAT_VERSION)
    with atomic_path(path, overwrite=True) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: str | Path, *, expected_plan: dict[str, Any] | None = None, map_location: str | torch.device = "cpu",
    legacy_hash: str | None = None,
) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` and check it.

    Raises CheckpointError naming the file when it is missing, truncated or corrupt, of an unknown
    `format_version`, lacks a required key, or (with `expected_plan`, the `Plans.network_identity` of
    the configuration the caller uses) was trained with a plan that differs in what the network
    depends on; the message lists the differences when the checkpoint stores its `plan_identity`.
    `legacy_hash` (`Plans.file_hash`): also accepted for a checkpoint without `plan_identity` (written
    before plan hashes covered only the network's needs), whose plans.json is still the same file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train this fold first (`medseg3d train`) "
                              "or pick another with --checkpoint/--folds")
    try:
        with _allowed_globals():
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(exc)
        if refused is not None:
            raise CheckpointError(
                f"checkpoint {path} holds {refused}, which is neither a tensor nor plain data: medseg3d loads "
                "checkpoints with torch.load(weights_only=True) so that a file from elsewhere cannot run code, and "
                "refuses this one. It was not written by medseg3d (or was altered); use a checkpoint written by "
                "`medseg3d train`, or retrain this fold") from exc
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                              f"{_FIX_CORRUPT}") from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError,
            AttributeError, ImportError, IndexError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                              f"{_FIX_CORRUPT}") from exc
    return check_checkpoint(ckpt, path, expected_plan=expected_plan, legacy_hash=legacy_hash)


def check_checkpoint(
    ckpt: Any, path: str | Path, *, expected_plan: dict[str, Any] | None = None, legacy_hash: str | None = None,
    fix: str = _FIX_CORRUPT,
) -> dict[str, Any]:
    """`ckpt` (a loaded checkpoint dict, from a `.pt` file or a model package) after the checks of
    `load_checkpoint`: a dict of the known `format_version` with every required key, trained with
    the plan `expected_plan` (or, for a checkpoint without `plan_identity`, `legacy_hash`).

    `path` names the source in messages; `fix` is what to do when the checkpoint is damaged.
    """
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a medseg3d checkpoint dict; {fix}")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version {version!r}; this medseg3d reads "
                              f"{FORMAT_VERSION}. Use the medseg3d version that wrote it, or retrain")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; {fix}")
    legacy_ok = legacy_hash is not None and "plan_identity" not in ckpt and ckpt["plan_hash"] == legacy_hash
    if expected_plan is not None and ckpt["plan_hash"] != identity_hash(expected_plan) and not legacy_ok:
        stored = ckpt.get("plan_identity")
        what = "; ".join(identity_differences(stored, expected_plan)) if isinstance(stored, dict) else ""
        raise CheckpointError(
            f"checkpoint {path} was trained with another plan (plan hash {str(ckpt['plan_hash'])[:12]}..., "
            f"the current plans.json gives {identity_hash(expected_plan)[:12]}...)"
            + (f": {what}" if what else "") + ". Restore the plans.json it was trained with (or rerun "
            "`medseg3d plan` with the settings it was planned with), or retrain this fold with the current plan")
    return ckpt


def build_model_from_checkpoint(ckpt: dict[str, Any], *, deep_supervision: bool = False) -> nn.Module:
    """The network the checkpoint describes, with its weights loaded, in eval mode (on CPU).

    Raises CheckpointError when the stored weights do not fit the described network.
    """
    from medseg3d.networks import build_network  # networks import torch-heavy modules; keep this lazy

    model = build_network(
        ckpt["architecture"], in_channels=int(ckpt["in_channels"]), num_classes=int(ckpt["num_classes"]),
        deep_supervision=deep_supervision, **ckpt["network_kwargs"],
    )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit architecture {ckpt['architecture']!r} "
                              f"({exc}); {_FIX_CORRUPT}") from exc
    return model.eval()
