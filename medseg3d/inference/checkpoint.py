"""Checkpoints: atomic save, checked load, and the network rebuilt from what the checkpoint says.

Checkpoint dict (docs/architecture.md): `format_version`, `plan_hash`, `configuration`,
`architecture`, `network_kwargs` (dims, strides, kernel_sizes, features), `in_channels`,
`num_classes`, `model` (state_dict), and for resuming `optimizer`, `scaler`, `epoch`, `rng`, `log`.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg3d.errors import CheckpointError
from medseg3d.io.atomic import atomic_path

log = logging.getLogger(__name__)

#: The checkpoint layout this medseg3d writes and reads.
FORMAT_VERSION = 1

REQUIRED_KEYS = ("format_version", "plan_hash", "architecture", "network_kwargs", "in_channels", "num_classes", "model")

_FIX_CORRUPT = ("resume from another checkpoint (`medseg3d train ... --resume` picks checkpoint_latest.pt; "
                "copy checkpoint_best.pt over it if that one is intact) or retrain this fold")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` with `torch.save` atomically (temp file + rename): never a half-written file.

    `format_version` is filled in when absent.
    """
    payload = dict(payload)
    payload.setdefault("format_version", FORMAT_VERSION)
    with atomic_path(path, overwrite=True) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: str | Path, *, expected_plan_hash: str | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` and check it.

    Raises CheckpointError naming the file when it is missing, truncated or corrupt, of an unknown
    `format_version`, lacks a required key, or (with `expected_plan_hash`) was trained with another plan.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train this fold first (`medseg3d train`) "
                              "or pick another with --checkpoint/--folds")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            AttributeError, ImportError, IndexError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                              f"{_FIX_CORRUPT}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a medseg3d checkpoint dict; {_FIX_CORRUPT}")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version {version!r}; this medseg3d reads "
                              f"{FORMAT_VERSION}. Use the medseg3d version that wrote it, or retrain")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; {_FIX_CORRUPT}")
    if expected_plan_hash is not None and ckpt["plan_hash"] != expected_plan_hash:
        raise CheckpointError(
            f"checkpoint {path} was trained with another plan (plan hash {str(ckpt['plan_hash'])[:12]}..., "
            f"the current plans.json has {expected_plan_hash[:12]}...): plans.json changed after training. "
            "Restore the plans.json it was trained with, or retrain this fold with the current plan")
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
