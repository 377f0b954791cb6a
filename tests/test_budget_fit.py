"""`train --time-budget`'s epoch fitting (`training.schedule._fit_budget`) with injected epoch times: no timed tests."""

from __future__ import annotations

import pytest
import torch

from medseg3d.errors import ConfigError


def test_the_trainer_holds_the_reserve_back():
    """`_fit_budget` with injected epoch times: the reserve shrinks the epochs that fit."""
    from medseg3d.training import state as st
    from medseg3d.training.config import TrainConfig
    from medseg3d.training.distributed import DistInfo
    from medseg3d.training.trainer import _fit_budget

    run = st.RunState()
    run.epoch = 1
    plain = TrainConfig(epochs=100, time_budget_s=100.0)
    _fit_budget(plain, run, 10.0, [10.0], 100, DistInfo(), torch.device("cpu"))
    reserved = TrainConfig(epochs=100, time_budget_s=100.0, time_reserve_s=40.0)
    _fit_budget(reserved, run, 10.0, [10.0], 100, DistInfo(), torch.device("cpu"))
    assert (plain.epochs, reserved.epochs) == (10, 6)  # 1 + 90 / 10 vs 1 + 50 / 10
    with pytest.raises(ConfigError, match="time_reserve_s"):
        TrainConfig(time_reserve_s=5.0)


def test_time_budget_reestimates_after_warmup_and_guards_overrun():
    """The slow first epoch (warm-up) does not shrink the run: epochs 2-3 re-size it; later an overrun stops it."""
    from medseg3d.training import state as st
    from medseg3d.training.config import TrainConfig
    from medseg3d.training.distributed import DistInfo
    from medseg3d.training.trainer import _fit_budget

    tc = TrainConfig(epochs=100, time_budget_s=100.0)
    info = DistInfo()
    run = st.RunState()
    run.epoch = 1
    _fit_budget(tc, run, 20.0, [20.0], 100, info, torch.device("cpu"))
    assert tc.epochs == 5                      # 1 + 80 s / 20 s
    run.epoch = 2
    _fit_budget(tc, run, 22.0, [20.0, 2.0], 100, info, torch.device("cpu"))
    assert tc.epochs == 41                     # 2 + 78 s / 2 s
    run.epoch = 30
    _fit_budget(tc, run, 99.0, [20.0, 2.0, 2.0, 2.0], 100, info, torch.device("cpu"))
    assert tc.epochs == 30                     # one more 2 s epoch would overrun
    # the slowest recent epoch decides, not the mean: 10 s left, epochs of 8, 8 and 11 s (mean 9)
    tc.epochs, run.epoch = 100, 40
    _fit_budget(tc, run, 90.0, [20.0, 8.0, 8.0, 8.0, 8.0, 11.0], 100, info, torch.device("cpu"))
    assert tc.epochs == 40
    tc.epochs = 100
    _fit_budget(tc, run, 85.0, [20.0, 8.0, 8.0, 8.0, 8.0, 11.0], 100, info, torch.device("cpu"))
    assert tc.epochs == 41                     # 15 s left: one more 9 s epoch, so the schedule ends there
    # a machine that slows part-way through shrinks the schedule rather than being cut at a high lr
    tc.epochs, run.epoch, tc.time_budget_s = 40, 20, 1000.0
    _fit_budget(tc, run, 500.0, [20.0] + [20.0] * 16 + [40.0, 40.0, 40.0], 100, info, torch.device("cpu"))
    assert tc.epochs == 20 + int(500 / 40)     # 500 s left at 40 s per epoch
    _fit_budget(tc, run, 500.0, [20.0] * 20, 100, info, torch.device("cpu"))
    assert tc.epochs == 45                     # fast again: it grows back to what fits (20 + 500 / 20) ...
    _fit_budget(tc, run, 500.0, [20.0] * 20, 40, info, torch.device("cpu"))
    assert tc.epochs == 40                     # ... never past the cap (the epochs asked for, or max_epochs)


def test_a_plan_budget_run_faster_than_timed_uses_its_budget():
    """The plan's epochs are an estimate: a run whose epochs are faster grows to max_epochs' cap, --epochs does not.

    Measured: Task04's 30-minute plan chose 25 epochs of a timed 68 s; they took 54 s, and the run ended
    345 s early (docs/benchmarks.md, "Plans for a time budget").
    """
    from medseg3d.training import state as st
    from medseg3d.training.config import TrainConfig
    from medseg3d.training.distributed import DistInfo
    from medseg3d.training.trainer import _fit_budget

    tc = TrainConfig(epochs=25, max_epochs=1000, time_budget_s=1800.0, time_reserve_s=26.0)
    run, info = st.RunState(), DistInfo()
    times = [105.0, 59.0, 51.0]
    for epoch in range(1, 4):
        run.epoch = epoch
        _fit_budget(tc, run, sum(times[:epoch]), times[:epoch], 1000, info, torch.device("cpu"))
    assert tc.epochs == 3 + int((1774.0 - 215.0) / 55.0)  # 31: the time left at the mean of epochs 2-3
    fixed = TrainConfig(epochs=25, time_budget_s=1800.0, time_reserve_s=26.0)  # --epochs 25: the user's cap
    for epoch in range(1, 4):
        run.epoch = epoch
        _fit_budget(fixed, run, sum(times[:epoch]), times[:epoch], 25, info, torch.device("cpu"))
    assert fixed.epochs == 25
    with pytest.raises(ConfigError, match="max_epochs"):
        TrainConfig(epochs=25, max_epochs=10)
