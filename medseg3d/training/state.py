"""Run state of a fold: random states, the checkpoint payload, and restoring it for `--resume`."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg3d.errors import CheckpointError
from medseg3d.inference.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What changes during training besides the weights: next epoch, EMA/best pseudo-Dice, history."""

    epoch: int = 0                      # the next epoch to run (0-based)
    ema_dice: float | None = None
    best_ema: float = -1.0
    epochs_since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    aux: dict[str, Any] = field(default_factory=dict)  # the auxiliary loss's state (HFD class centres)


def rng_states() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) random states, as tensors and plain data.

    numpy's `(name, uint32 keys (624,), pos, has_gauss, cached_gaussian)` is stored with the keys
    as a list of ints, so `load_checkpoint` needs no numpy class to read it (weights_only).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out: dict[str, Any] = {"python": random.getstate(),
                           "numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
                           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned (numpy's keys as a list, or an ndarray in older checkpoints)."""
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_payload(net: nn.Module, optimizer: torch.optim.Optimizer | None, scaler: Any, state: RunState,
                 meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict of docs/architecture.md (`meta` carries plan_hash, architecture, network_kwargs, ...)."""
    payload = dict(meta)
    payload.update({
        "model": net.state_dict(),
        "epoch": state.epoch,
        "log": list(state.history),
        "run_state": {"ema_dice": state.ema_dice, "best_ema": state.best_ema,
                      "epochs_since_best": state.epochs_since_best, "stopped_early": state.stopped_early},
    })
    if state.aux:
        payload["aux_state"] = dict(state.aux)
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
        payload["scaler"] = scaler.state_dict() if scaler is not None else None
        payload["rng"] = rng_states()
    return payload


def save(path: Path, net: nn.Module, optimizer: torch.optim.Optimizer | None, scaler: Any, state: RunState,
         meta: dict[str, Any]) -> None:
    """Atomic checkpoint write (temporary file, then rename)."""
    save_checkpoint(path, make_payload(net, optimizer, scaler, state, meta))


#: What `--resume` must find unchanged in the network: checkpoint key -> the `medseg3d train` flag that sets it.
NETWORK_FLAGS = {"architecture": "--arch", "network_kwargs": "--features", "in_channels": None, "num_classes": None}


def network_differences(ckpt: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """How the network `meta` describes (this run) differs from the one `ckpt` was trained as, one line each."""
    out = []
    for key, flag in NETWORK_FLAGS.items():
        old, new = ckpt.get(key), meta.get(key)
        if key == "network_kwargs" and isinstance(old, dict) and isinstance(new, dict):
            for k in sorted(set(old) | set(new)):
                if _plain(old.get(k)) != _plain(new.get(k)):
                    how = f" (resume with --features {','.join(map(str, old[k]))})" if k == "features" else ""
                    out.append(f"{k}: checkpoint {_plain(old.get(k))}, this run {_plain(new.get(k))}{how}")
        elif _plain(old) != _plain(new):
            out.append(f"{key}: checkpoint {old}, this run {new}" + (f" (resume with {flag} {old})" if flag else ""))
    return out


def _plain(v: Any) -> Any:
    """Tuples as lists, so a value compares equal however it travelled (JSON, pickle)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def resume(path: Path, net: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, plan_identity: dict[str, Any],
           device: torch.device, meta: dict[str, Any] | None = None, legacy_hash: str | None = None) -> RunState:
    """Restore weights, optimiser, scaler, random states and run state from `path`.

    CheckpointError (from `load_checkpoint`) when the file is truncated/corrupt or of another plan;
    and, with `meta` (this run's checkpoint description), when the network it asks for differs from
    the checkpoint's (`--arch`, `--features`): the message lists what differs and how to resume.
    """
    ckpt = load_checkpoint(path, expected_plan=plan_identity, map_location=device, legacy_hash=legacy_hash)
    diffs = network_differences(ckpt, meta) if meta is not None else []
    if diffs:
        raise CheckpointError(f"{path} was trained as another network than this run asks for: {'; '.join(diffs)}. "
                              "Resume with the flags it was trained with, or train without --resume into "
                              "another WORK_DIR (or delete the fold folder) to start this network afresh")
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} holds weights that do not fit this run's network ({str(exc).splitlines()[0]}); "
                              "resume with the --arch/--features it was trained with, or start the fold afresh") from exc
    saved_opt = (ckpt.get("train_config") or {}).get("optimizer", "sgd")
    wanted = "adamw" if isinstance(optimizer, torch.optim.AdamW) else "sgd"
    if ckpt.get("optimizer") is not None and saved_opt != wanted:
        raise CheckpointError(
            f"{path} was trained with --optimizer {saved_opt}; resume with --optimizer {saved_opt}, "
            f"or start this fold afresh in another WORK_DIR to use {wanted}"
        )
    if ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng"):
        rng = dict(ckpt["rng"])
        rng["torch"] = rng["torch"].cpu()
        set_rng_states(rng)
    rs = ckpt.get("run_state", {})
    state = RunState(epoch=int(ckpt.get("epoch", 0)), ema_dice=rs.get("ema_dice"), best_ema=rs.get("best_ema", -1.0),
                     epochs_since_best=int(rs.get("epochs_since_best", 0)), history=list(ckpt.get("log", [])),
                     stopped_early=bool(rs.get("stopped_early", False)), aux=dict(ckpt.get("aux_state") or {}))
    log.info("resumed from %s at epoch %d", path, state.epoch)
    return state
