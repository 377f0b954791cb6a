"""`plan --time-budget` (issue 20, items 1 and 3): the stored entry and its replanned schedule, the network
identity it implies, the trainer's reserve, and one CLI run on the shipped data (the choice rules themselves:
tests/test_budget_rules.py).

No test asserts on a measured time: the rules get made-up seconds, and the measuring test only checks
that numbers come back and are stored with their device.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from medseg3d.errors import PlanError
from medseg3d.plans import Plans
from medseg3d.plans import budget as bud
from medseg3d.plans.planner import plan_from_fingerprint
from tests._budget import CPU, FACTS, widths
from tests._synth import SHIPPED
from tests.test_plans import CASES, GOLDEN, synthetic_fingerprint


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (as tests/test_train.py): on a shared 2-core machine two threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_replanned_schedule_keeps_the_network():
    entry = _entry(2400)
    same = bud.replan_schedule(entry, 2400)
    assert same.to_dict() == entry["choice"]
    half = bud.replan_schedule(entry, 1200)
    assert (half.features, half.optimizer) == (same.features, same.optimizer) and half.epochs < same.epochs
    without = bud.replan_schedule(entry, 2400, validation=False)
    assert without.reserve_s == 0 and without.epochs >= same.epochs


def test_a_run_that_trains_another_timed_width_or_batch_gets_its_schedule_and_reserve():
    """`train --features/--batch-size` overriding the choice: schedule and reserve follow what trains (session 10:
    a 1/2-width run on the 1/4 width's reserve validated 75 s against 32.7 s held back)."""
    entry = _entry(1800)
    planned = bud.replan_schedule(entry, 1800)
    assert planned.width == "1/4"
    half = bud.replan_schedule(entry, 1800, features=[16, 32, 64, 128])
    t_half = next(bud.WidthTiming.from_dict(t) for t in entry["measured"] if t["width"] == "1/2")
    assert half.width == "1/2" and half.features == [16, 32, 64, 128]
    assert math.isclose(half.reserve_s, bud.validation_reserve(t_half, FACTS), rel_tol=1e-3)
    assert half.reserve_s > planned.reserve_s and "instead of the planned 1/4" in half.reason
    # batch 2 of the 7 timed: a step costs 2/7 of the timed one, the per-window validation cost stays
    small = bud.replan_schedule(entry, 1800, features=[16, 32, 64, 128], batch_size=2)
    assert small.batch_size == 2 and math.isclose(small.reserve_s, half.reserve_s, rel_tol=1e-3)
    assert small.epochs * small.iterations_per_epoch > 3 * half.epochs * half.iterations_per_epoch
    assert bud.replan_schedule(entry, 1800, features=planned.features, batch_size=7).to_dict() == planned.to_dict()
    with pytest.raises(PlanError, match="none of the widths"):
        bud.replan_schedule(entry, 1800, features=[24, 48, 96, 192])


def test_train_values_follow_overridden_features_and_warn_for_an_untimed_width(caplog):
    from medseg3d.plans.schema import ConfigurationPlan
    from medseg3d.training.budget import budget_train_values

    plans = plan_from_fingerprint(synthetic_fingerprint(**CASES["small"]), gpu_memory_gb=8.0)
    raw = copy.deepcopy(plans.raw["configurations"]["3d_fullres"])
    raw["time_budget"] = _entry(1800)
    view = ConfigurationPlan("3d_fullres", raw).for_architecture(None)
    planned = budget_train_values(view, None)
    half = budget_train_values(view, None, features=[16, 32, 64, 128], batch_size=2)
    assert half["time_reserve_s"] > planned["time_reserve_s"]
    untimed = budget_train_values(view, None, features=[24, 48, 96, 192])
    assert untimed == planned and "none of the widths the plan timed" in caplog.text


def _entry(budget_s: float, timings: dict | None = None) -> dict:
    """A `time_budget` entry as `medseg3d.plans.timing.time_budget_entry` writes it, from injected timings."""
    ts = widths(timings or CPU)
    choice = bud.choose_budget_plan(ts, budget_s, FACTS)
    return {"rules_version": bud.RULES_VERSION, "budget_s": budget_s, "device": "cpu", "device_name": "cpu: test",
            "precision": "fp32", "channels_last": True, "architecture": "unet", "architecture_options": {},
            "in_channels": 1, "steps_timed": 3, "measured": [t.to_dict() for t in ts], "facts": FACTS.to_dict(),
            "choice": choice.to_dict(), "reason": choice.reason}


def test_the_stored_entry_round_trips_and_reproduces_the_choice(tmp_path):
    plans = plan_from_fingerprint(synthetic_fingerprint(**CASES["small"]), gpu_memory_gb=8.0)
    raw = plans.to_dict()
    raw["configurations"]["3d_fullres"]["time_budget"] = _entry(2400)
    Plans(raw).save(tmp_path / "plans.json")
    entry = Plans.load(tmp_path).configuration("3d_fullres").time_budget
    assert entry == json.loads(json.dumps(_entry(2400)))
    assert bud.BudgetPlan.from_dict(entry["choice"]).to_dict() == entry["choice"]
    again = bud.choose_budget_plan([bud.WidthTiming.from_dict(t) for t in entry["measured"]], entry["budget_s"],
                                   bud.BudgetFacts.from_dict(entry["facts"]))
    assert again.to_dict() == entry["choice"]  # the choice is reproducible from plans.json alone
    broken = copy.deepcopy(entry["choice"])
    del broken["epochs"]
    with pytest.raises(PlanError, match="time_budget"):
        bud.BudgetPlan.from_dict(broken)


def test_plans_without_a_budget_are_nnunets_and_a_budget_changes_the_network_identity():
    plans = plan_from_fingerprint(synthetic_fingerprint(**CASES["small"]), gpu_memory_gb=8.0)
    assert all("time_budget" not in c for c in plans.raw["configurations"].values())
    golden = json.loads((GOLDEN / "plans_small.json").read_text())
    assert {k: v for k, v in plans.to_dict().items() if k != "medseg3d_version"} == golden  # as before
    name = "3d_fullres"
    plain_hash, plain_view = plans.network_hash(name), plans.configuration(name).for_architecture(None)
    raw = plans.to_dict()
    entry = _entry(2400)
    entry["choice"]["patch_size"] = list(plain_view.patch_size)
    raw["configurations"][name]["time_budget"] = entry
    budgeted = Plans(raw)
    view = budgeted.configuration(name).for_architecture(None)
    assert view.features == entry["choice"]["features"] != plain_view.features
    assert view.network_kwargs()["features"] == entry["choice"]["features"]  # what train builds, predict rebuilds
    assert budgeted.network_identity(name)["configuration"]["features"] == entry["choice"]["features"]
    assert budgeted.network_hash(name) != plain_hash
    # another architecture than the one timed keeps nnU-Net's keys
    assert budgeted.configuration(name).for_architecture("fcn").features == plain_view.features
    # the timings, device and reason are not part of the identity: another machine's timing, same choice
    other = copy.deepcopy(raw)
    other["configurations"][name]["time_budget"]["device_name"] = "cpu: elsewhere"
    other["configurations"][name]["time_budget"]["measured"][0]["seconds_per_iteration"] = 123.0
    assert Plans(other).network_hash(name) == budgeted.network_hash(name)


def test_train_values_from_the_plan_leave_given_flags_alone():
    from medseg3d.plans.schema import ConfigurationPlan
    from medseg3d.training.budget import budget_train_values

    plans = plan_from_fingerprint(synthetic_fingerprint(**CASES["small"]), gpu_memory_gb=8.0)
    raw = copy.deepcopy(plans.raw["configurations"]["3d_fullres"])
    raw["time_budget"] = _entry(2400)
    view = ConfigurationPlan("3d_fullres", raw).for_architecture(None)
    values = budget_train_values(view, None, given=["lr"])
    choice = raw["time_budget"]["choice"]
    assert values == {"optimizer": "adamw", "epochs": choice["epochs"], "max_epochs": 1000, "iterations_per_epoch": 50,
                      "val_iterations": 5, "time_budget_s": 2400.0, "time_reserve_s": choice["reserve_s"]}
    assert "max_epochs" not in budget_train_values(view, None, given=["epochs"])  # --epochs given: it caps the run
    assert budget_train_values(view, 1200.0)["epochs"] < choice["epochs"]
    assert budget_train_values(view, None, final_validation=False)["time_reserve_s"] == 0.0
    assert budget_train_values(ConfigurationPlan("3d_fullres", raw).for_architecture("fcn"), None) == {}


def test_measuring_returns_numbers_with_the_device_and_reuses_them(monkeypatch):
    """Real steps of tiny networks on the CPU: numbers come back and are stored with the device (no time asserted)."""
    from medseg3d.plans import timing

    fp = synthetic_fingerprint(spacing=(1.0, 1.0, 1.0), shape=(12, 12, 12), n_cases=5)
    plans = plan_from_fingerprint(fp, gpu_memory_gb=8.0, configs=["3d_fullres"])
    monkeypatch.setattr(timing, "STEPS", 2)  # fewer steps, fp32 (bf16's first steps on a CPU are slow): a quick test
    monkeypatch.setattr(timing, "_runtime_defaults", lambda device, dims: (None, False, "fp32"))
    monkeypatch.setattr(timing, "CONTENDED_SHARE", 0.0)  # reused however busy this machine is (tested below)
    entry = timing.time_budget_entry(plans, "3d_fullres", 1e9, 5, torch.device("cpu"))
    assert entry["device"] == "cpu" and entry["device_name"].startswith("cpu: ")
    assert [t["width"] for t in entry["measured"]] == ["1x", "1/2", "1/4"]
    for t in entry["measured"]:
        assert t["seconds_per_iteration"] > 0 and t["seconds_per_forward"] > 0
    assert entry["choice"]["reason"] == entry["reason"] and entry["facts"]["validation_cases"] == 1
    # on the same device the timings are reused, not measured again: the same entry
    monkeypatch.setattr(timing, "time_width", lambda *a, **k: pytest.fail("timed again"))
    assert timing.time_budget_entry(plans, "3d_fullres", 1e9, 5, torch.device("cpu"), entry) == entry
    # another device name: timed again
    moved = {**entry, "device_name": "cpu: another machine"}
    monkeypatch.setattr(timing, "time_width", lambda *a, **k: (2.0, 0.5, 0.98))
    fresh = timing.time_budget_entry(plans, "3d_fullres", 100.0, 5, torch.device("cpu"), moved)
    # at 2 s per iteration 100 s give fewer iterations than any option needs: the wider widths are not timed
    assert [("skipped" in t) for t in fresh["measured"]] == [True, True, False]
    assert fresh["choice"]["width"] == "1/4"
    assert all(0.0 < t["cpu_share"] <= 1.0 for t in entry["measured"])  # the real timing's share of the CPU


def test_timings_taken_on_a_busy_cpu_are_warned_about_and_timed_again(monkeypatch, caplog):
    """A CPU share below CONTENDED_SHARE (other work held the cores) warns, and the next plan retimes it."""
    from medseg3d.plans import timing

    fp = synthetic_fingerprint(spacing=(1.0, 1.0, 1.0), shape=(12, 12, 12), n_cases=5)
    plans = plan_from_fingerprint(fp, gpu_memory_gb=8.0, configs=["3d_fullres"])
    monkeypatch.setattr(timing, "_runtime_defaults", lambda device, dims: (None, False, "fp32"))
    monkeypatch.setattr(timing, "time_width", lambda *a, **k: (0.01, 0.004, 0.4))
    with caplog.at_level("WARNING", logger="medseg3d.plans.timing"):
        busy = timing.time_budget_entry(plans, "3d_fullres", 1e9, 5, torch.device("cpu"))
    assert [t["cpu_share"] for t in busy["measured"]] == [0.4, 0.4, 0.4]
    assert "busy with other work" in caplog.text and "re-plan on a quiet machine" in caplog.text
    calls = []
    monkeypatch.setattr(timing, "time_width", lambda *a, **k: calls.append(1) or (0.005, 0.002, 0.97))
    quiet = timing.time_budget_entry(plans, "3d_fullres", 1e9, 5, torch.device("cpu"), busy)
    assert len(calls) == 3 and [t["seconds_per_iteration"] for t in quiet["measured"]] == [0.005] * 3
    monkeypatch.setattr(timing, "time_width", lambda *a, **k: pytest.fail("timed again"))
    assert timing.time_budget_entry(plans, "3d_fullres", 1e9, 5, torch.device("cpu"), quiet) == quiet


def run_cli(argv, capsys):
    from medseg3d.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out + out.err


def test_plan_time_budget_then_train_honours_it(tmp_path, capsys, monkeypatch):
    """`plan --time-budget 2m` on the shipped data, then a 20 s `train`: it stops and validates (CPU)."""
    from medseg3d.plans import timing

    monkeypatch.setattr(timing, "CONTENDED_SHARE", 0.0)  # the re-plan below reuses the timings on a busy machine too
    work = tmp_path / "work"
    code, out = run_cli(["plan", str(SHIPPED), "-o", str(work), "--configs", "3d_fullres", "-j", "1",
                         "--time-budget", "2m"], capsys)
    assert code == 0, out
    plans = Plans.load(work)
    entry = plans.configuration("3d_fullres").time_budget
    assert entry["budget_s"] == 120.0 and entry["device"] == "cpu" and "time budget" in out
    choice = entry["choice"]
    assert plans.configuration("3d_fullres").for_architecture(None).features == choice["features"]
    mtime = (work / "plans.json").stat().st_mtime_ns
    code, out = run_cli(["plan", str(SHIPPED), "-o", str(work), "--configs", "3d_fullres", "-j", "1",
                         "--time-budget", "120"], capsys)
    assert code == 0 and (work / "plans.json").stat().st_mtime_ns == mtime, out  # reused timings: same plan
    code, out = run_cli(["plan", "--show", str(work)], capsys)
    assert code == 0 and "reason" in out and "chosen" in out

    code, out = run_cli(["train", str(work), "--fold", "0", "--time-budget", "20", "--no-compile"], capsys)
    assert code == 0, out
    fold = work / "results" / "3d_fullres" / "unet" / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert summary["cases"] and summary["mean_dice"]  # the final validation ran
    assert "time budget 20 s" in out and "adamw" in (fold / "training_log.txt").read_text()
    from medseg3d.inference.checkpoint import load_checkpoint

    ckpt = load_checkpoint(fold / "checkpoint_final.pt",
                           expected_plan=Plans.load(work).network_identity("3d_fullres"))
    assert ckpt["network_kwargs"]["features"] == choice["features"]  # predict rebuilds the chosen network
    assert ckpt["train_config"]["optimizer"] == "adamw" and ckpt["train_config"]["time_budget_s"] == 20.0

    bad, out = run_cli(["train", str(work), "--fold", "1", "--time-budget", "soon"], capsys)
    assert bad == 2 and "900s, 60m, 1.5h" in out and "Traceback" not in out
    # planned again without --time-budget: nnU-Net's plan, its network identity as before
    code, out = run_cli(["plan", str(SHIPPED), "-o", str(work), "--configs", "3d_fullres", "-j", "1"], capsys)
    plain = Plans.load(work)
    assert code == 0 and plain.configuration("3d_fullres").time_budget is None
    assert plain.configuration("3d_fullres").features == [32, 64, 128, 256]


def test_the_budget_stops_training_inside_a_long_first_epoch(tmp_path, capsys):
    """A network whose one epoch is far longer than the budget (the zoo's FC-DenseNet on 2 CPU cores:
    no 50-iteration epoch in 37 min against a 15-min budget) stops at the first iteration past it."""

    work = tmp_path / "work"
    code, out = run_cli(["plan", str(SHIPPED), "-o", str(work), "--configs", "3d_fullres", "-j", "1"], capsys)
    assert code == 0, out
    code, out = run_cli(["train", str(work), "--fold", "0", "--time-budget", "2", "--iterations-per-epoch", "100000",
                         "--epochs", "50", "--features", "4,8,8,8", "--batch-size", "2", "--val-iterations", "1",
                         "--num-workers", "0", "--device", "cpu", "--no-final-validation"], capsys)
    assert code == 0, out
    fold = work / "results" / "3d_fullres" / "unet" / "fold_0"
    rows = (fold / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # one (cut) epoch
    header, row = rows[0].split(","), rows[1].split(",")
    done = int(row[header.index("iterations")])
    assert 1 <= done < 100000
    assert "training stops here" in (fold / "training_log.txt").read_text()
    ckpt = torch.load(fold / "checkpoint_final.pt", weights_only=True)
    assert ckpt["epoch"] == 1
