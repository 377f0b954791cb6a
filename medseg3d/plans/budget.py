"""Time-budget planning: the network and schedule that fit a training time budget (pure rules).

`medseg3d plan DATA -o WORK --time-budget 60m` times a few real training steps of candidate widths
of the plan's network on this machine (`medseg3d.plans.timing`); `choose_budget_plan` then turns
those seconds, the budget and a few dataset facts into a `BudgetPlan`: features, patch, batch,
optimiser, learning rate, epochs x iterations per epoch, and the reason as text. Nothing here
measures or imports torch, so the rules are tested with injected timings (tests/test_budget_rules.py).

The rules (docs/planning.md, "Time budget"; the thresholds are design choices whose measurement on
Task04 is still to be done):

1. The final validation is reserved first: validation cases (a fifth of the dataset) x sliding
   windows per case (step 0.5 on the median image) x mirror variants x the measured seconds of one
   window's forward pass, times `VALIDATION_MARGIN` for what the estimate leaves out (reading,
   resampling back, writing). Training gets the rest of the budget.
2. Options, tried in this order: the plan's width with nnU-Net's SGD (lr 0.01, 250 iterations and
   50 validation batches per epoch), then the plan's width, 1/2 and 1/4 of it with AdamW (lr 1e-3,
   50 + 5 per epoch: the hand-made CPU recipe). The first whose iterations within the training time
   reach its optimiser's minimum (`MIN_ITERATIONS`) is chosen; when the plan's width with SGD holds
   nnU-Net's full 1000 epochs, the result is exactly nnU-Net's plan. An AdamW choice then steps to the
   next narrower width while that one trains at least `WIDTH_TRADE` times as many iterations and the
   wider one fewer than `TRADE_BELOW` (a halved width is worth it when it buys twice the steps near the
   minimum, where that was measured; rules version 4). When none reaches its minimum,
   the narrowest AdamW option is chosen and the reason says the budget is too short.
3. Epochs: as many as fit (at most 1000; an epoch costs the timed steps x `EPOCH_OVERHEAD`); when
   fewer than `MIN_EPOCHS` would fit, the epochs are shortened (fewer iterations each) so that `MIN_EPOCHS` do, which keeps the poly schedule and the
   `train --time-budget` cut (at most one epoch over) fine-grained.
4. Patch and batch stay the plan's (sized for memory); no rule changes them yet.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

from medseg3d.errors import ConfigError, PlanError

#: Version of these rules, stored with each choice (a later rule change is visible in plans.json).
RULES_VERSION = 4
#: nnU-Net's number of epochs; also the most any budget plan trains.
NNUNET_EPOCHS = 1000
#: Per optimiser: initial learning rate, training iterations and validation batches per epoch.
SCHEDULES: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.01, "iterations": 250, "val_iterations": 50},    # nnU-Net v2's recipe
    "adamw": {"lr": 1e-3, "iterations": 50, "val_iterations": 5},    # the hand-made CPU recipe
}
#: Fewest training iterations an option needs to be chosen (design choices, docs/planning.md):
#: SGD, a tenth of nnU-Net's 250 000 (it needs several hundred iterations before a small class
#: appears at all); AdamW, the 800 of the hand-made recipe's known-good 40 CPU minutes (rules
#: version 1 had 500, which at 60 CPU minutes on Task04 picked the 1x width for 550 iterations
#: over the 1/2 width's 2,150: a wider network does not make up for a quarter of the steps).
MIN_ITERATIONS = {"sgd": 25_000, "adamw": 800}
#: An AdamW choice steps to the next narrower width (half the features) while that one trains at least
#: this many times its iterations (rules version 4; docs/planning.md rule 2). Measured on Task04 fold 0,
#: 2-core CPUs: 1/4 width x 1,550 iterations (0.862 mean Dice) matched 1/2 width x 800 (0.860), a
#: break-even near 2x; the 1/2 width x 2,700 (0.876) beat the 1x width x 1,550 (0.870), so the full width
#: is worth less than that. Version 3 (widest reaching the minimum) chose the 1x width there.
WIDTH_TRADE = 2.0
#: ... but only away from a width that trains fewer than this many AdamW iterations (near the minimum, where
#: the trade was measured: both measured trades left widths with 800 and 1,550). Further from it the steps'
#: returns diminish and no measurement shows a narrower width paying off: on a 2-core Xeon with bf16, 60
#: minutes would otherwise step 1x (1,250) -> 1/2 (5,050) -> 1/4 (11,000 iterations of a 1/16-size net).
TRADE_BELOW = 1_600
#: Widths tried, as divisors of the plan's features per stage (1: nnU-Net's 32..320).
WIDTH_DIVISORS = (1, 2, 4)
#: Fewest epochs a schedule is cut into (shorter epochs below that).
MIN_EPOCHS = 10
#: Factor on the estimated final-validation time (reading, resampling, export are not in the estimate):
#: measured actual / estimate 1.45 on Task04 and 1.63 on its thick-slice copy (15-minute budgets).
VALIDATION_MARGIN = 2.0
#: Factor from the timed steps (random data, no loader) to a real epoch's wall time (the augmentation
#: worker shares the cores, plus validation batches' bookkeeping and checkpoint writes): measured on the
#: 2-core CPU, median real epoch / timed epoch 1.06 (Task04, 15 min), 1.21 (thick-slice copy, 15 min),
#: 1.25 (Task04, 60 min); not measured on a GPU.
EPOCH_OVERHEAD = 1.2
#: Folds of `splits.json`: a fold's final validation sees a fifth of the cases.
FOLDS = 5

_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str | float, what: str = "--time-budget") -> float:
    """Seconds of a duration: `60m`, `1.5h`, `900s`, `900` (seconds), or a number of seconds.

    Raises ConfigError (naming `what` and the accepted forms) for anything else or a value <= 0.
    """
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ConfigError(f"{what} {text!r} is not a duration; give seconds (900), or a number with s, m or h "
                              "(900s, 60m, 1.5h)")
        seconds = float(m.group(1)) * _UNITS[unit]
    if not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"{what} must be a positive duration (got {text!r})")
    return seconds


def format_duration(seconds: float) -> str:
    """`3600` -> `60 min`, `90` -> `90 s`, `5400` -> `1.5 h` (for messages)."""
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 120:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:.3g} s"


def width_name(divisor: int) -> str:
    """`1` -> `1x`, `2` -> `1/2`, `4` -> `1/4`."""
    return "1x" if divisor == 1 else f"1/{divisor}"


def scaled_features(features: Sequence[int], divisor: int) -> list[int]:
    """The plan's features per stage divided by `divisor` (at least 1 each)."""
    return [max(1, int(f) // int(divisor)) for f in features]


@dataclass(frozen=True)
class WidthTiming:
    """One candidate width as measured on the device (seconds, per training process).

    `seconds_per_iteration`: one forward + backward + optimiser step at the plan's patch and batch
    (median after a warm-up); `seconds_per_forward`: one forward pass of that batch without
    gradients (validation batches; divided by the batch, one sliding window). Both None when the
    width was not measured (`skipped` says why). `cpu_share`: on a CPU, how much of its threads' time
    the timing process got (about 1 on a quiet machine; `plans.timing.CONTENDED_SHARE`).
    """

    width: str
    features: list[int]
    seconds_per_iteration: float | None = None
    seconds_per_forward: float | None = None
    skipped: str | None = None
    cpu_share: float | None = None  # CPU only: process CPU time / (wall x threads) while timing (plans.timing)

    @property
    def measured(self) -> bool:
        return self.seconds_per_iteration is not None and self.seconds_per_forward is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WidthTiming:
        return cls(width=str(d["width"]), features=[int(f) for f in d["features"]],
                   seconds_per_iteration=_opt_float(d.get("seconds_per_iteration")),
                   seconds_per_forward=_opt_float(d.get("seconds_per_forward")), skipped=d.get("skipped"),
                   cpu_share=_opt_float(d.get("cpu_share")))


@dataclass(frozen=True)
class BudgetFacts:
    """What the choice needs to know about the configuration and the dataset.

    patch_size: training patch (voxels); batch_size: patches per step; validation_cases: cases of
    one fold's final validation; windows_per_case: sliding windows on the median image (step 0.5);
    mirror_variants: forward passes per window with mirror TTA (2^number of mirror axes).
    """

    patch_size: list[int]
    batch_size: int
    validation_cases: int
    windows_per_case: int
    mirror_variants: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetFacts:
        return cls(patch_size=[int(p) for p in d["patch_size"]], batch_size=int(d["batch_size"]),
                   validation_cases=int(d["validation_cases"]), windows_per_case=int(d["windows_per_case"]),
                   mirror_variants=int(d["mirror_variants"]))


@dataclass(frozen=True)
class BudgetPlan:
    """The decision for one configuration: network, schedule and the seconds behind them.

    budget_s: the whole run, training + final validation; reserve_s: held back for the final
    validation; train_s: `budget_s - reserve_s`; expected_s: the estimated whole run of this choice
    (<= budget_s unless the budget is too short for one epoch and the validation).
    """

    budget_s: float
    width: str
    features: list[int]
    patch_size: list[int]
    batch_size: int
    optimizer: str
    lr: float
    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    reserve_s: float
    train_s: float
    expected_s: float
    reason: str
    considered: list[str] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        """Training iterations of the whole schedule (epochs x iterations per epoch)."""
        return self.epochs * self.iterations_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetPlan:
        try:
            return cls(budget_s=float(d["budget_s"]), width=str(d["width"]), features=[int(f) for f in d["features"]],
                       patch_size=[int(p) for p in d["patch_size"]], batch_size=int(d["batch_size"]),
                       optimizer=str(d["optimizer"]), lr=float(d["lr"]), epochs=int(d["epochs"]),
                       iterations_per_epoch=int(d["iterations_per_epoch"]), val_iterations=int(d["val_iterations"]),
                       reserve_s=float(d["reserve_s"]), train_s=float(d["train_s"]),
                       expected_s=float(d["expected_s"]), reason=str(d["reason"]),
                       considered=[str(c) for c in d.get("considered", [])])
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"the time_budget choice in plans.json is incomplete ({exc!r}); rerun `medseg3d plan "
                            "DATA_DIR -o WORK_DIR --time-budget ...`") from exc


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def validation_reserve(timing: WidthTiming, facts: BudgetFacts) -> float:
    """Seconds held back for the final validation of one fold with this width (rule 1)."""
    per_window = float(timing.seconds_per_forward or 0.0) / max(1, facts.batch_size)
    return facts.validation_cases * facts.windows_per_case * facts.mirror_variants * per_window * VALIDATION_MARGIN


def epoch_seconds(timing: WidthTiming, iterations: int, val_iterations: int) -> float:
    """Expected wall seconds of one epoch: the timed steps x `EPOCH_OVERHEAD`."""
    s_it, s_fwd = float(timing.seconds_per_iteration or 0.0), float(timing.seconds_per_forward or 0.0)
    return (iterations * s_it + val_iterations * s_fwd) * EPOCH_OVERHEAD


def schedule_for(timing: WidthTiming, optimizer: str, train_s: float) -> tuple[int, int, int]:
    """(epochs, iterations per epoch, validation batches per epoch) of `optimizer`'s schedule within
    `train_s` seconds at this width (rule 3): at most `NNUNET_EPOCHS`, at least one epoch of one iteration."""
    base = SCHEDULES[optimizer]
    its, val = int(base["iterations"]), int(base["val_iterations"])
    train_s = max(0.0, train_s)
    epochs = int(train_s // max(epoch_seconds(timing, its, val), 1e-9))
    if epochs < MIN_EPOCHS:  # short budget: shorter epochs, so that MIN_EPOCHS of them fit
        ratio = val / its
        per_iteration = epoch_seconds(timing, 1, 0) + ratio * epoch_seconds(timing, 0, 1)
        its = max(1, int(train_s // (MIN_EPOCHS * max(per_iteration, 1e-9))))
        val = max(1, round(its * ratio))
        epochs = int(train_s // max(epoch_seconds(timing, its, val), 1e-9))
    return max(1, min(NNUNET_EPOCHS, epochs)), its, val


def _options(timings: Sequence[WidthTiming]) -> list[tuple[WidthTiming, str]]:
    """(width, optimiser) in the order rule 2 tries them; widths are ordered widest first."""
    by_width = sorted(timings, key=lambda t: -sum(t.features))
    out = [(by_width[0], "sgd")] if by_width else []
    return out + [(t, "adamw") for t in by_width]


class _Option(NamedTuple):
    """One measured width x optimiser and the schedule it gets in the training time."""

    timing: WidthTiming
    opt: str
    epochs: int
    its: int  # iterations per epoch
    val: int  # validation batches per epoch
    reserve: float  # seconds reserved for the final validation

    @property
    def iterations(self) -> int:
        return self.epochs * self.its


def choose_budget_plan(timings: Sequence[WidthTiming], budget_s: float, facts: BudgetFacts) -> BudgetPlan:
    """The network and schedule for `budget_s` seconds (training + final validation) by the rules above.

    timings: the candidate widths (the plan's width first or not; widest = largest feature sum),
    measured or skipped. Raises PlanError when none is measured.
    """
    measured = [t for t in timings if t.measured]
    if not measured:
        raise PlanError("no candidate network was timed, so no time budget can be planned; rerun `medseg3d plan "
                        "--time-budget` (it times a few training steps on this machine)")
    plan_width = max(timings, key=lambda t: sum(t.features))
    considered: list[str] = []
    chosen: tuple[_Option, str] | None = None  # (option, why)
    adamw: list[_Option] = []  # measured AdamW options, widest first (the last: the fallback)
    for timing, opt in _options(timings):
        label = f"{timing.width} {opt}"
        if not timing.measured:
            considered.append(f"{label}: {timing.skipped or 'not timed'}")
            continue
        reserve = validation_reserve(timing, facts)
        train_s = budget_s - reserve
        option = _Option(timing, opt, *schedule_for(timing, opt, train_s), reserve)
        n = option.iterations
        if opt == "adamw":
            adamw.append(option)
        full = opt == "sgd" and timing is plan_width and option.its == SCHEDULES["sgd"]["iterations"] \
            and option.epochs >= NNUNET_EPOCHS
        ok = n >= MIN_ITERATIONS[opt]
        considered.append(f"{label}: {n:,} iterations ({option.epochs} x {option.its}) in "
                          f"{format_duration(max(0.0, train_s))}"
                          + (" >= nnU-Net's full 1000 epochs" if full else
                             f" {'>=' if ok else '<'} {MIN_ITERATIONS[opt]:,}"))
        if chosen is None and (full or ok):
            why = ("the budget holds nnU-Net's full schedule (1000 epochs x 250 iterations): nnU-Net's plan"
                   if full else f"the widest option whose {n:,} iterations reach the {MIN_ITERATIONS[opt]:,} "
                   f"{opt.upper() if opt == 'sgd' else 'AdamW'} needs")
            chosen = (option, why)
            if opt == "sgd":
                break
    if chosen is not None and chosen[0].opt == "adamw":  # the width trade: narrower while it buys WIDTH_TRADE x steps
        wide = chosen[0]
        pick = next(i for i, o in enumerate(adamw) if o is wide)
        while pick + 1 < len(adamw) and adamw[pick].iterations < TRADE_BELOW \
                and adamw[pick + 1].iterations >= WIDTH_TRADE * adamw[pick].iterations:
            pick += 1
        if adamw[pick] is not wide:
            narrow = adamw[pick]
            why = (f"the {wide.timing.width} width reaches the {MIN_ITERATIONS['adamw']:,} AdamW needs with "
                   f"{wide.iterations:,} iterations, but the {narrow.timing.width} width trains "
                   f"{narrow.iterations:,}, at least {WIDTH_TRADE:g}x as many per halving of the width")
            chosen = (narrow, why)
    if chosen is None and adamw:  # (every measured width has an AdamW option)
        why = (f"no option reaches its minimum number of iterations: the budget is too short for a good model; "
               f"the narrowest network trains the most ({adamw[-1].iterations:,} iterations)")
        chosen = (adamw[-1], why)
    if chosen is None:
        raise PlanError("no candidate network was timed; rerun `medseg3d plan --time-budget`")
    (timing, opt, epochs, its, val, reserve), why = chosen
    expected = epochs * epoch_seconds(timing, its, val)
    reason = (f"{format_duration(budget_s)} budget, {format_duration(reserve)} reserved for the final validation "
              f"({facts.validation_cases} cases x {facts.windows_per_case} windows x {facts.mirror_variants} "
              f"mirrorings): {timing.width} width {'-'.join(map(str, timing.features))} with {opt} lr "
              f"{SCHEDULES[opt]['lr']:g}, {epochs} epochs x {its} iterations, because {why}")
    return BudgetPlan(budget_s=float(budget_s), width=timing.width, features=list(timing.features),
                      patch_size=list(facts.patch_size), batch_size=int(facts.batch_size), optimizer=opt,
                      lr=float(SCHEDULES[opt]["lr"]), epochs=epochs, iterations_per_epoch=its, val_iterations=val,
                      reserve_s=round(reserve, 3), train_s=round(budget_s - reserve, 3),
                      expected_s=round(expected + reserve, 3), reason=reason, considered=considered)


def replan_schedule(entry: dict[str, Any], budget_s: float, validation: bool = True, *,
                    features: Sequence[int] | None = None, batch_size: int | None = None) -> BudgetPlan:
    """The stored choice of a `time_budget` entry, its schedule refitted to another budget or network.

    The optimiser stays what the plan chose; epochs, iterations and the final validation's reserve are
    refitted with the stored timing of the width the run trains: the chosen one, or `features` when the
    run overrides them with another timed width (`train --features`). `batch_size` (`train
    --batch-size`) other than the timed batch scales the timed seconds linearly (an estimate: on the
    2-core CPU the 1/2-width Task04 step took 0.74 s at batch 2 against 3.04 s at 7, a linear 0.87; the
    budget cut corrects it after the first epochs). The reserve follows the width too (session 10: a
    1/2-width run on the 1/4 width's reserve spent 75 s validating against 32.7 s held back, 33 s over).
    validation: False for a run without final validation (nothing reserved). Raises PlanError when
    `features` is no timed width or the chosen width's timing is missing.
    """
    plan = BudgetPlan.from_dict(entry["choice"])
    facts = BudgetFacts.from_dict(entry["facts"])
    width = plan.width
    timings = [WidthTiming.from_dict(t) for t in entry.get("measured", [])]
    if features is not None and [int(f) for f in features] != list(plan.features):
        other = next((t for t in timings if t.features == [int(f) for f in features] and t.measured), None)
        if other is None:
            raise PlanError(f"features {'-'.join(map(str, features))} are none of the widths the plan timed")
        width = other.width
    batch = int(batch_size) if batch_size else facts.batch_size
    if math.isclose(budget_s, plan.budget_s) and validation and width == plan.width and batch == facts.batch_size:
        return plan
    timing = next((t for t in timings if t.width == width), None)
    if timing is None or not timing.measured:
        raise PlanError(f"plans.json's time_budget lacks the timing of its chosen width {plan.width}; rerun "
                        "`medseg3d plan DATA_DIR -o WORK_DIR --time-budget ...`")
    if batch != facts.batch_size:  # per-window seconds stay; a step and a validation batch scale with the batch
        scale = batch / facts.batch_size
        timing = replace(timing, seconds_per_iteration=float(timing.seconds_per_iteration or 0.0) * scale,
                         seconds_per_forward=float(timing.seconds_per_forward or 0.0) * scale)
        facts = replace(facts, batch_size=batch)
    reserve = validation_reserve(timing, facts) if validation else 0.0
    epochs, its, val = schedule_for(timing, plan.optimizer, budget_s - reserve)
    expected = epochs * epoch_seconds(timing, its, val)
    network = "" if (width, batch) == (plan.width, plan.batch_size) else \
        f", trained at {width} width and batch {batch} instead of the planned {plan.width} and {plan.batch_size}"
    reason = (f"{plan.width} width and {plan.optimizer} as planned for {format_duration(plan.budget_s)}{network}; "
              f"schedule refitted to {format_duration(budget_s)}{'' if validation else ' without final validation'}: "
              f"{epochs} epochs x {its} iterations")
    return BudgetPlan(budget_s=float(budget_s), width=width, features=list(timing.features),
                      patch_size=plan.patch_size, batch_size=batch, optimizer=plan.optimizer, lr=plan.lr,
                      epochs=epochs, iterations_per_epoch=its, val_iterations=val, reserve_s=round(reserve, 3),
                      train_s=round(budget_s - reserve, 3), expected_s=round(expected + reserve, 3), reason=reason,
                      considered=[])
