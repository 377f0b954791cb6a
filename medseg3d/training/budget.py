"""What a plan's time budget (`medseg3d plan --time-budget`) makes of a training run's defaults.

The plan's `time_budget` entry chose the network (features, patch and batch: the configuration view
already carries them, see `ConfigurationPlan.for_architecture`) and a schedule; here the schedule
becomes `TrainConfig` values: optimiser, learning rate, epochs, iterations and validation batches per
epoch, the budget and the final validation's reserve. Options the user gave keep their value. The
budget then works as `train --time-budget` always has (`_fit_budget` in the trainer): when this
machine is slower than measured, the epochs are cut after the first ones, so the run overruns by at
most one epoch; with the reserve held back, the final validation ends inside the budget too. When it
is faster, the plan's epochs may grow (`max_epochs`: nnU-Net's 1000) so the budget is used, unless the
user gave `--epochs`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

from medseg3d.errors import PlanError
from medseg3d.plans.budget import NNUNET_EPOCHS, format_duration, replan_schedule

log = logging.getLogger(__name__)

#: TrainConfig fields a time budget decides (when the user did not give them).
BUDGET_FIELDS = ("optimizer", "lr", "epochs", "iterations_per_epoch", "val_iterations")


def budget_train_values(view: Any, time_budget_s: float | None, given: Collection[str] = (), *,
                        final_validation: bool = True, device_type: str | None = None,
                        features: Sequence[int] | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """`TrainConfig` keyword values from the time budget of configuration view `view` (empty without one).

    view: `plans.configuration(name).for_architecture(arch)`; time_budget_s: this run's budget
    (None: the plan's); given: `BUDGET_FIELDS` the user set, which are left out; final_validation:
    False when the run has none (`--no-final-validation`, `--fold all`), so nothing is reserved;
    device_type: where this run trains (`cpu`/`cuda`), to warn when the timings came from another;
    features, batch_size: `--features` / `--batch-size` of a run that overrides the planned network:
    the schedule and the reserve then come from that width's timing (`replan_schedule`); features the
    plan did not time keep the planned width's schedule, with a warning, and the budget's cut decides.
    """
    entry = view.time_budget
    if not entry:
        return {}
    if entry.get("architecture") != view.architecture:
        log.warning("the plan's time budget was chosen for %s, not %s: this run keeps %s's own schedule%s",
                    entry.get("architecture"), view.architecture, view.architecture,
                    "" if time_budget_s is None else " (cut to the budget)")
        return {}
    budget_s = float(time_budget_s if time_budget_s is not None else entry["budget_s"])
    try:
        plan = replan_schedule(entry, budget_s, validation=final_validation, features=features,
                               batch_size=batch_size)
    except PlanError:
        if features is None:
            raise
        log.warning("features %s are none of the widths the plan timed: the schedule is the planned %s width's, and "
                    "the budget's cut decides after the first epochs", "-".join(map(str, features)),
                    entry["choice"].get("width"))
        plan = replan_schedule(entry, budget_s, validation=final_validation, batch_size=batch_size)
    if device_type is not None and device_type != entry.get("device"):
        log.warning("the time budget was timed on %s; this run trains on %s, so the schedule is a guess and the "
                    "budget's cut decides (after the first epochs)", entry.get("device_name"), device_type)
    values: dict[str, Any] = {"optimizer": plan.optimizer, "lr": plan.lr, "epochs": plan.epochs,
                              "iterations_per_epoch": plan.iterations_per_epoch,
                              "val_iterations": plan.val_iterations}
    kept = sorted(set(given) & set(values))
    values = {k: v for k, v in values.items() if k not in given}
    log.info("time budget %s (plan: %s): %s, features %s%s", format_duration(budget_s),
             format_duration(float(entry["budget_s"])), ", ".join(f"{k} {v}" for k, v in values.items()) or "-",
             "-".join(map(str, plan.features)), f"; given on the command line: {', '.join(kept)}" if kept else "")
    if "epochs" in values:  # the plan's epoch count is an estimate: a faster machine may run more (never past nnU-Net's)
        values["max_epochs"] = max(NNUNET_EPOCHS, int(values["epochs"]))
    values.update(time_budget_s=budget_s, time_reserve_s=plan.reserve_s if final_validation else 0.0)
    return values
