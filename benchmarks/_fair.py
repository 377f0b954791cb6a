"""One budget rule, one clock and one run order for timed medseg3d vs nnU-Net comparisons.

Shared by `e2e_hippocampus.py` (and its nnU-Net driver `_nnunet_budget_train.py`; issue 20's
`budget_hippocampus.py` is to reuse both), `bench_predict.py`, `bench_train.py`, `bench_plan.py`,
`bench_evaluate.py` and `bench_networks.py`, so every timed comparison follows the same rules:

* **Budget rule.** The number of epochs is sized by `medseg3d train --time-budget`'s own rule
  (`_fit_budget` in `medseg3d/training/trainer.py`), *called* here rather than copied, so nnU-Net is
  cut exactly the way medseg3d cuts itself: over the first three epochs the count is re-estimated
  (after epoch 1 from its time, after epochs 2 and 3 from the mean of the epochs after the first,
  which carries the warm-up: worker start, oneDNN kernels, compilation); from then on the run ends
  when one more epoch of that mean would overrun the budget. The poly learning-rate decay follows
  the count (nnU-Net's `PolyLRScheduler.max_steps`, medseg3d's `poly_lr(..., epochs)`).
* **Clock.** Wall clock (`time.perf_counter`), started immediately before the first training
  iteration, after the tool's setup (imports, dataset unpacking, network build, data-loader start);
  that is where medseg3d's trainer starts its budget clock. Setup and the final validation are
  timed separately and reported, never charged to the budget. An epoch's time (what the rule is
  given) runs from its first training iteration to the end of its validation iterations; checkpoint
  saving and logging fall between epochs and count in the elapsed time only.
* **Run order.** Timed runs never share the machine: they run one after the other (`run_logged`
  waits for each), and repeated comparisons alternate the order of the tools (`alternating`) and
  report medians and each tool's own seconds. The load average is recorded before and after each
  run so a loaded machine shows in the report.
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

RULE = ("medseg3d train --time-budget's rule (medseg3d/training/trainer.py _fit_budget), clock started at the first "
        "training iteration; setup and final validation timed separately")


def fit_epochs(budget_s: float, elapsed_s: float, epoch_times: Sequence[float], epochs_done: int,
               requested_epochs: int, planned_epochs: int) -> int:
    """Total number of epochs the run should have, by medseg3d's `--time-budget` rule.

    `elapsed_s`: seconds on the budget clock so far; `epoch_times`: seconds of each epoch of this run
    (first included); `epochs_done`: epochs finished; `requested_epochs`: the count asked for at the
    start (1000 for both tools' defaults); `planned_epochs`: the count in force before this call. The
    result is `epochs_done` when the run must stop now.
    """
    import torch

    from medseg3d.training.config import TrainConfig
    from medseg3d.training.distributed import DistInfo
    from medseg3d.training.state import RunState
    from medseg3d.training.trainer import _fit_budget

    tc = TrainConfig(epochs=max(1, planned_epochs), time_budget_s=budget_s)
    _fit_budget(tc, RunState(epoch=epochs_done), elapsed_s, list(epoch_times), requested_epochs, DistInfo(),
                torch.device("cpu"))
    return int(tc.epochs)


@dataclass
class BudgetClock:
    """The budget clock of one training process (see the module docstring for the rule).

    `launch_wall`: `time.time()` when the process was launched (the parent passes it, so setup
    includes the interpreter's start and imports); `start()` right before the first training
    iteration; `end_epoch()` after each epoch's validation iterations; `stop()` when training ends.
    """

    budget_s: float
    requested_epochs: int = 1000
    launch_wall: float = field(default_factory=time.time)
    planned_epochs: int = 0
    epoch_times: list[float] = field(default_factory=list)
    start_wall: float | None = None
    end_wall: float | None = None
    _t0: float | None = None

    def __post_init__(self) -> None:
        self.planned_epochs = self.planned_epochs or self.requested_epochs

    def start(self) -> None:
        """Start the clock: call immediately before the first training iteration."""
        self._t0, self.start_wall = time.perf_counter(), time.time()

    def elapsed(self) -> float:
        """Seconds on the clock since `start()`."""
        if self._t0 is None:
            raise RuntimeError("BudgetClock.start() was not called")
        return time.perf_counter() - self._t0

    def end_epoch(self, epoch_s: float) -> int:
        """Record one epoch of `epoch_s` seconds; returns the total number of epochs to run."""
        self.epoch_times.append(float(epoch_s))
        self.planned_epochs = fit_epochs(self.budget_s, self.elapsed(), self.epoch_times, len(self.epoch_times),
                                         self.requested_epochs, self.planned_epochs)
        return self.planned_epochs

    def stop(self) -> None:
        """Training is over (before the final validation)."""
        self.end_wall = time.time()

    def report(self) -> dict[str, float | int | list[float] | str]:
        """Setup, training and epoch seconds for the JSON report."""
        if self.start_wall is None or self.end_wall is None:
            raise RuntimeError("BudgetClock: start() and stop() must both have been called")
        return {"rule": RULE, "budget_s": self.budget_s, "setup_s": self.start_wall - self.launch_wall,
                "train_s": self.end_wall - self.start_wall, "epochs": len(self.epoch_times),
                "epoch_times_s": self.epoch_times, "clock_start_wall": self.start_wall,
                "train_end_wall": self.end_wall}


# ---------------------------------------------------------------------------- medseg3d's side of the clock
def medseg3d_phases(fold_dir: Path, launch_wall: float, end_wall: float) -> dict[str, float | int | list[float]]:
    """Setup, training and after-training seconds of one `medseg3d train` process, on the same clock.

    medseg3d's trainer runs the budget clock itself; its start is recovered from the fold's files:
    `training_log.txt` stamps every "epoch N/M:" line (logging's local-time `asctime`, millisecond
    resolution) and `metrics.csv` holds each epoch's seconds, so the clock started at the first epoch
    line's stamp minus the first epoch's seconds (the line is written after that epoch's checkpoint,
    well under a second later). `end_wall - last epoch line` is the final validation and save.
    """
    import csv

    with open(fold_dir / "metrics.csv") as fh:
        epoch_times = [float(r["epoch_time_s"]) for r in csv.DictReader(fh)]
    stamps = []
    for line in (fold_dir / "training_log.txt").read_text().splitlines():
        head, _, msg = line.partition(": ")
        if msg.startswith("epoch ") and "/" in msg.split()[1]:
            stamps.append(datetime.strptime(head[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    if not stamps or not epoch_times:
        raise RuntimeError(f"{fold_dir}: no epoch lines in training_log.txt / metrics.csv")
    start = stamps[0] - epoch_times[0]
    return {"setup_s": start - launch_wall, "train_s": stamps[-1] - start, "after_training_s": end_wall - stamps[-1],
            "epochs": len(epoch_times), "epoch_times_s": epoch_times, "clock_start_wall": start,
            "train_end_wall": stamps[-1]}


# ---------------------------------------------------------------------------- run order
def load_average() -> float:
    """The 1-minute load average (a quiet 2-core machine reads below 0.5 between runs)."""
    return os.getloadavg()[0]


def settle(threshold: float = 0.5, timeout_s: float = 180.0, poll_s: float = 5.0) -> float:
    """Wait until the 1-minute load average falls below `threshold` (or `timeout_s` passes); returns it.

    Between two long timed runs the previous run's own load takes about 1.5 min to decay below 0.5 on
    two cores; a load that stays above says another job is on the machine (the report shows it).
    """
    end = time.monotonic() + timeout_s
    while load_average() >= threshold and time.monotonic() < end:
        time.sleep(poll_s)
    return load_average()


@dataclass
class Run:
    """One finished process: its command, exit code, wall-clock launch/end and the load around it."""

    cmd: list[str]
    returncode: int
    launch_wall: float
    end_wall: float
    load_before: float
    load_after: float

    @property
    def seconds(self) -> float:
        return self.end_wall - self.launch_wall

    def as_dict(self) -> dict:
        return {**asdict(self), "seconds": self.seconds}


def run_logged(cmd: list[str], env: dict[str, str], log: Path) -> Run:
    """Run `cmd` to the end (never alongside another timed run), output to `log`; returns its `Run`."""
    logging.getLogger(__name__).info("$ %s", " ".join(cmd))
    print("$", " ".join(cmd), flush=True)
    load = load_average()
    launch = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    return Run(cmd, rc, launch, time.time(), load, load_average())


def alternating(tools: Sequence[T], rep: int) -> list[T]:
    """The tools in their order on even repetitions, reversed on odd ones (no tool always goes first)."""
    return list(tools) if rep % 2 == 0 else list(tools)[::-1]


def median(values: Sequence[float]) -> float:
    """Median of the repetitions (the figure the reports quote; each repetition is kept beside it)."""
    return float(statistics.median(values))
