"""The time-budget rules (issue 20, item 2; docs/planning.md): `choose_budget_plan` on injected and
on measured timings, the duration parser and the final validation's reserve.

No test asserts on a measured time: the rules get seconds, made up or copied from benchmark reports.
"""

from __future__ import annotations

import math

import pytest

from medseg3d.errors import ConfigError, PlanError
from medseg3d.plans import budget as bud
from tests._budget import CPU, FACTS, GPU, PLAN_FEATURES, widths


def test_parse_duration_forms_and_refusals():
    assert bud.parse_duration("60m") == 3600.0
    assert bud.parse_duration("1.5h") == 5400.0
    assert bud.parse_duration("900s") == bud.parse_duration("900") == bud.parse_duration(900) == 900.0
    assert bud.parse_duration(" 2 min ") == 120.0
    for bad in ("", "soon", "10d", "-5m", "0", "1e3"):
        with pytest.raises(ConfigError, match="time-budget"):
            bud.parse_duration(bad)


def test_forty_cpu_minutes_choose_the_hand_made_recipe():
    """The known-good point: half width, AdamW lr 1e-3, 50 iterations per epoch."""
    plan = bud.choose_budget_plan(widths(CPU), 2400, FACTS)
    assert (plan.width, plan.features, plan.optimizer, plan.lr) == ("1/2", [16, 32, 64, 128], "adamw", 1e-3)
    assert plan.iterations_per_epoch == 50 and plan.val_iterations == 5
    assert plan.iterations >= bud.MIN_ITERATIONS["adamw"]
    assert plan.patch_size == FACTS.patch_size and plan.batch_size == FACTS.batch_size
    assert "1x adamw" in " ".join(plan.considered) and "1/2 width" in plan.reason and "AdamW" in plan.reason


def test_shorter_budget_goes_narrower_and_a_tiny_one_says_it_is_too_short():
    ten = bud.choose_budget_plan(widths(CPU), 600, FACTS)
    assert ten.width == "1/4" and ten.optimizer == "adamw"
    tiny = bud.choose_budget_plan(widths(CPU), 120, FACTS)
    assert tiny.width == "1/4" and "too short" in tiny.reason
    # fewer than MIN_EPOCHS epochs of 50 would fit: shorter epochs instead, at least one iteration each
    assert tiny.epochs >= bud.MIN_EPOCHS and 1 <= tiny.iterations_per_epoch < 50
    assert tiny.expected_s <= tiny.budget_s


def test_long_budget_on_a_fast_device_is_nnunets_plan():
    plan = bud.choose_budget_plan(widths(GPU), 24 * 3600, FACTS)
    assert (plan.features, plan.optimizer, plan.lr) == (PLAN_FEATURES, "sgd", 0.01)
    assert (plan.epochs, plan.iterations_per_epoch, plan.val_iterations) == (1000, 250, 50)
    assert "nnU-Net's plan" in plan.reason


def test_in_between_nnunets_recipe_shortened_then_adamw():
    hour = bud.choose_budget_plan(widths(GPU), 3600, FACTS)
    assert hour.optimizer == "sgd" and hour.features == PLAN_FEATURES and hour.iterations_per_epoch == 250
    assert bud.MIN_ITERATIONS["sgd"] <= hour.iterations < 1000 * 250 and hour.epochs < 1000
    short = bud.choose_budget_plan(widths(GPU), 600, FACTS)  # SGD would get < 25 000 iterations
    assert short.optimizer == "adamw" and short.features == PLAN_FEATURES


def measured(s_per_it: dict[str, float], s_per_fwd: dict[str, float]) -> list[bud.WidthTiming]:
    """Timings as `plan --time-budget` stored them in a benchmark report (seconds, batch 7)."""
    return [bud.WidthTiming(bud.width_name(d), bud.scaled_features(PLAN_FEATURES, d), s_per_it[bud.width_name(d)],
                            s_per_fwd[bud.width_name(d)], None) for d in bud.WIDTH_DIVISORS]


# Task04's plan timed on three 2-core CPUs (benchmarks/results/budget_hippocampus_cpu*.json):
BF16_EPYC = measured({"1x": 2.187, "1/2": 0.602, "1/4": 0.473}, {"1x": 0.685, "1/2": 0.146, "1/4": 0.119})
XEON = measured({"1x": 5.627, "1/2": 1.551, "1/4": 1.186}, {"1x": 1.790, "1/2": 0.452, "1/4": 0.290})
AVX2_EPYC = measured({"1x": 12.77, "1/2": 3.123, "1/4": 1.120}, {"1x": 3.290, "1/2": 0.797, "1/4": 0.340})
FAST_XEON = measured(  # session 12: the XEON string, ~3x faster that day
    {"1x": 2.190, "1/2": 0.5726, "1/4": 0.2649}, {"1x": 0.7294, "1/2": 0.1642, "1/4": 0.0716})


@pytest.mark.parametrize(("timings", "budget_min", "width", "traded"), [
    (BF16_EPYC, 60, "1/2", True),    # rules v3 chose 1x (1,300 iterations, measured 0.870); 1/2 trains 3.7x as many
    (BF16_EPYC, 30, "1/2", False),   # 1x misses 800; 1/4's 3,700 are < 2 x 1/2's 2,300 (measured 0.876)
    (XEON, 60, "1/2", False),        # 1x misses 800; 1/4's 2,450 are < 2 x 1,850 (measured 0.871)
    (AVX2_EPYC, 30, "1/4", False),   # 1/2 misses 800 (measured 0.862)
    (AVX2_EPYC, 120, "1/2", False),  # 1/4's step is 2.8x cheaper, but 1/2 trains > TRADE_BELOW already
    (AVX2_EPYC, 60, "1/4", True),    # 1/2 just reaches 800; 1/4 trains 2.8x as many
    (FAST_XEON, 60, "1/2", True),    # 1x 1,250 -> 1/2 5,050, which is past TRADE_BELOW: not on to 1/4's 11,000
])
def test_the_width_trade_on_measured_cpu_timings(timings, budget_min, width, traded):
    """Rule 2's width trade (rules version 4): a narrower width when it trains WIDTH_TRADE x the iterations."""
    plan = bud.choose_budget_plan(timings, budget_min * 60, FACTS)
    assert plan.width == width and plan.optimizer == "adamw" and plan.iterations >= bud.MIN_ITERATIONS["adamw"]
    assert ("as many per halving of the width" in plan.reason) == traded
    # every width is listed with its iterations, the narrower ones after the first that reached the minimum too
    assert [c.split(":")[0] for c in plan.considered] == ["1x sgd", "1x adamw", "1/2 adamw", "1/4 adamw"]


def test_the_width_trade_keeps_the_wide_network_where_narrow_ones_are_not_cheaper(monkeypatch):
    """On a GPU a narrow network's step is barely cheaper: the trade keeps the plan's width."""
    plan = bud.choose_budget_plan(widths(GPU), 600, FACTS)
    assert plan.features == PLAN_FEATURES and "halving" not in plan.reason
    # and with the trade factor raised, the bf16 CPU's 60 minutes keep version 3's choice
    monkeypatch.setattr(bud, "WIDTH_TRADE", 100.0)
    assert bud.choose_budget_plan(BF16_EPYC, 3600, FACTS).width == "1x"


def test_the_final_validation_is_reserved_first():
    t = widths(CPU)[1]  # 1/2 width
    reserve = bud.validation_reserve(t, FACTS)
    per_window = t.seconds_per_forward / FACTS.batch_size
    assert math.isclose(reserve, 42 * 1 * 8 * per_window * bud.VALIDATION_MARGIN)
    plan = bud.choose_budget_plan(widths(CPU), 2400, FACTS)
    assert math.isclose(plan.reserve_s, round(reserve, 3)) and math.isclose(plan.train_s + plan.reserve_s, 2400)
    epoch_s = (50 * 2.0 + 5 * 0.5) * bud.EPOCH_OVERHEAD  # timed steps x the loader's measured overhead
    assert math.isclose(bud.epoch_seconds(t, 50, 5), epoch_s)
    assert plan.epochs == int(plan.train_s // epoch_s) and plan.expected_s <= 2400
    # a validation four times as long (4 windows a case) leaves fewer epochs in the same budget
    bigger = bud.BudgetFacts(**{**FACTS.to_dict(), "windows_per_case": 4})
    assert bud.choose_budget_plan(widths(CPU), 2400, bigger).train_s < plan.train_s


def test_untimed_widths_are_named_and_none_timed_is_refused():
    plan = bud.choose_budget_plan(widths({"1/4": 1.0}), 600, FACTS)
    assert plan.width == "1/4" and any("not timed" in c for c in plan.considered)
    with pytest.raises(PlanError, match="time-budget"):
        bud.choose_budget_plan(widths({}), 600, FACTS)
