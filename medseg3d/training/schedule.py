"""The optimiser, the learning-rate schedule and the time budget of a training run.

`make_optimizer` (nnU-Net's SGD or AdamW), `poly_lr` (nnU-Net's poly schedule), `_fit_budget` (the
number of epochs fitted to `--time-budget` after each of the first epochs) and `budget_deadline`
(the clock time at which the training loop stops, even inside an epoch).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from medseg3d.training import state as st
from medseg3d.training.config import TrainConfig
from medseg3d.training.distributed import DistInfo

log = logging.getLogger("medseg3d.training.trainer")


def make_optimizer(net: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """nnU-Net's SGD (Nesterov, `tc.momentum`) or AdamW (betas 0.9/0.999), both at `tc.lr` and `tc.weight_decay`.

    AdamW reaches a usable model in far fewer iterations (the demo's short CPU schedule); SGD is
    what the long recipe is tuned for. The poly schedule drives both.
    """
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(net.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay,
                           nesterov=True)


def poly_lr(lr0: float, epoch: int, epochs: int, exponent: float) -> float:
    """nnU-Net's poly schedule: `lr0 * (1 - epoch / epochs) ** exponent`."""
    return lr0 * (1 - epoch / epochs) ** exponent


def _fit_budget(tc: TrainConfig, state: st.RunState, elapsed: float, epoch_times: list[float],
                max_epochs: int, info: DistInfo, device: torch.device) -> None:
    """Size the run (and so the poly schedule) so it ends within `time_budget_s` (seconds).

    Over the first three epochs of this invocation the number of epochs is re-estimated from the
    latest epoch's time (the first one carries warm-up: autocast kernels, worker start-up), never
    beyond `max_epochs` (what was asked for, or for a plan's time budget nnU-Net's 1000: the plan's
    count is an estimate, and a 30-minute run whose epochs were 20% faster than timed ended 345 s
    early). After that, to what the mean of the last three epochs fits in the time left (a machine
    that slows part-way through still ends its poly schedule near lr 0 instead of being cut at a
    high lr; one that speeds up uses the time, up to `max_epochs`), and to the epochs done when one
    more epoch as slow as the slowest of the last three would overrun (the mean let a 15-minute run
    end 6 s past its deadline with epochs of 35-52 s). `max_epochs`: the cap (`tc.max_epochs` or the
    epochs the run started with); `epoch_times`: wall seconds per epoch including its validation
    batches and checkpoint writes.
    """
    budget = float(tc.time_budget_s or 0) - float(tc.time_reserve_s or 0)  # the final validation's reserve
    remaining = budget - elapsed
    if len(epoch_times) <= 3:
        per_epoch = epoch_times[-1] if len(epoch_times) == 1 else float(np.mean(epoch_times[1:]))
        fit = min(max_epochs, state.epoch + max(0, int(remaining / max(per_epoch, 1e-6))))
    else:
        recent = epoch_times[-3:]
        fit = state.epoch if remaining < max(recent) else \
            min(max_epochs, state.epoch + int(remaining / float(np.mean(recent))))
    t = torch.tensor([fit], device=device)
    if info.enabled:  # rank 0 decides, so every rank runs the same number of epochs
        torch.distributed.broadcast(t, 0)
    new = int(t.item())
    if new != tc.epochs:
        log.info("time budget %.0f s: %.0f s left, %.1f s per epoch; training %d epochs instead of %d",
                 budget, remaining, epoch_times[-1], new, tc.epochs)
        tc.epochs = new


def budget_deadline(tc: TrainConfig, run_start: float) -> float | None:
    """`time.perf_counter()` value at which training must stop (the budget minus the final validation's
    reserve, counted from `run_start`), or None without `--time-budget`. The loop checks it after
    every iteration, so a network whose first epoch alone is longer than the budget still stops in time."""
    if tc.time_budget_s is None:
        return None
    return run_start + float(tc.time_budget_s) - float(tc.time_reserve_s or 0)
