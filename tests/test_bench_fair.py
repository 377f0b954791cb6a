"""benchmarks/_fair.py: the budget rule and clock shared by the timed medseg3d vs nnU-Net benchmarks.

Injected timings only (no timed tests): the rule must be medseg3d's own `--time-budget` rule, re-estimate
after the warm-up epoch (the old e2e driver froze nnU-Net's epoch count from the first epoch), and the
medseg3d side of the clock must be recovered from a fold's files.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _fair


def test_rule_reestimates_after_the_warm_up_epoch() -> None:
    # 3600 s budget, a 600 s first epoch (warm-up), then 480 s epochs
    assert _fair.fit_epochs(3600, 600, [600], 1, 1000, 1000) == 6  # what the old driver froze
    assert _fair.fit_epochs(3600, 1080, [600, 480], 2, 1000, 6) == 7  # re-estimated without the warm-up
    assert _fair.fit_epochs(3600, 1560, [600, 480, 480], 3, 1000, 7) == 7
    # after three epochs: continue while one more mean epoch fits, else stop now
    assert _fair.fit_epochs(3600, 3000, [600] + [480] * 5, 6, 1000, 7) == 7
    assert _fair.fit_epochs(3600, 3480, [600] + [480] * 6, 7, 1000, 7) == 7
    assert _fair.fit_epochs(3600, 3200, [600] + [480] * 5, 6, 1000, 7) == 6  # 400 s left < 480 s
    assert _fair.fit_epochs(3600, 10, [10], 1, 40, 40) == 40  # never beyond what was asked for


def test_rule_is_medseg3d_trainers_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg3d.training import trainer

    calls = []
    real = trainer._fit_budget

    def spy(*a: object, **k: object) -> None:
        calls.append(a)
        real(*a, **k)

    monkeypatch.setattr(trainer, "_fit_budget", spy)
    _fair.fit_epochs(100, 10, [10], 1, 1000, 1000)
    assert len(calls) == 1  # called, not copied: one home for the rule


def test_clock_starts_at_first_iteration_and_reports_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    now = {"perf": 0.0, "wall": 1000.0}
    monkeypatch.setattr(_fair.time, "perf_counter", lambda: now["perf"])
    monkeypatch.setattr(_fair.time, "time", lambda: now["wall"])
    clock = _fair.BudgetClock(100.0, requested_epochs=1000, launch_wall=990.0)
    clock.start()  # 10 s of setup before the first iteration
    epochs = []
    while len(clock.epoch_times) < clock.planned_epochs:
        dt = 30.0 if not clock.epoch_times else 20.0
        now["perf"] += dt
        now["wall"] += dt
        epochs.append(clock.end_epoch(dt))
    clock.stop()
    rep = clock.report()
    assert epochs == [3, 4, 4, 4]  # sized 3 from the 30 s warm-up epoch, re-estimated to 4 from the 20 s ones
    assert rep["setup_s"] == pytest.approx(10.0)
    assert rep["train_s"] == pytest.approx(90.0)
    assert rep["epochs"] == 4


def test_medseg3d_phases_from_fold_files(tmp_path: Path) -> None:
    fold = tmp_path / "fold_0"
    fold.mkdir()
    (fold / "metrics.csv").write_text("epoch,epoch_time_s\n0,30.0\n1,20.0\n")
    t0 = datetime(2026, 12, 1, 9, 0, 0)

    def stamp(s: float) -> str:  # logging's asctime: local time, milliseconds
        return datetime.fromtimestamp(t0.timestamp() + s).strftime("%Y-%m-%d %H:%M:%S,%f")[:23]

    (fold / "training_log.txt").write_text(
        f"{stamp(1)} INFO medseg3d.training.trainer: fold 0 of 3d_fullres/unet: 1 training\n"
        f"{stamp(40.5)} INFO medseg3d.training.trainer: epoch 1/2: train loss 1.0\n"
        f"{stamp(61)} INFO medseg3d.training.trainer: epoch 2/2: train loss 0.9\n")
    ph = _fair.medseg3d_phases(fold, launch_wall=t0.timestamp(), end_wall=t0.timestamp() + 70)
    assert ph["setup_s"] == pytest.approx(10.5, abs=1e-3)  # first epoch line 40.5 s minus its 30 s
    assert ph["train_s"] == pytest.approx(50.5, abs=1e-3)
    assert ph["after_training_s"] == pytest.approx(9.0, abs=1e-3)
    assert ph["epochs"] == 2


def test_alternating_order() -> None:
    assert _fair.alternating(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert _fair.alternating(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert _fair.median([3.0, 1.0, 2.0]) == 2.0


def test_bench_predict_alternates_and_pairs_like_with_like(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import bench_predict

    order: list[str] = []
    seconds = {"nnunet": [4.0, 6.0, 5.0], "medseg3d_fp32": [2.0, 2.0, 3.0], "medseg3d_bf16": [1.0, 1.0, 1.0]}

    def fake_child(kind: str, spec: dict, tag: str, workdir: Path) -> dict:
        name = tag.split("_", 1)[1]
        order.append(name)
        s = seconds[name][sum(n == name for n in order) - 1]
        return {"cases": 2, "total_s": 2 * s, "per_case_s": [s, s], "peak_rss_mb": 1000.0 if name == "nnunet" else 500.0,
                "process_wall_s": 2 * s, "load_before": 0.0, "load_after": 0.0}

    monkeypatch.setattr(bench_predict, "run_child", fake_child)
    tools = [("nnunet", "nnunet", {}), ("medseg3d_fp32", "medseg", {"precision": "fp32"}),
             ("medseg3d_bf16", "medseg", {"precision": "bf16"})]
    res = bench_predict.compare(tools, 3, tmp_path, "t")
    assert order[:6] == ["nnunet", "medseg3d_fp32", "medseg3d_bf16", "medseg3d_bf16", "medseg3d_fp32", "nnunet"]
    assert res["nnunet"]["median_s_per_case"] == 5.0
    fp32, bf16 = res["ratios"]["medseg3d_fp32"], res["ratios"]["medseg3d_bf16"]
    assert fp32["like_for_like"] and not bf16["like_for_like"]
    assert fp32["speed_median"] == pytest.approx(5.0 / 2.0)
    assert fp32["speed_per_rep"] == pytest.approx([2.0, 3.0, 5.0 / 3.0])  # each rep's own pair
    assert fp32["peak_rss_median"] == pytest.approx(2.0)
    assert "[other precision]" in bench_predict.table("t", res)


def test_settle_waits_for_the_load_to_fall(monkeypatch: pytest.MonkeyPatch) -> None:
    loads = iter([1.8, 1.2, 0.7, 0.4, 0.4])
    slept: list[float] = []
    monkeypatch.setattr(_fair, "load_average", lambda: next(loads))
    monkeypatch.setattr(_fair.time, "sleep", slept.append)
    assert _fair.settle(0.5, timeout_s=1e6, poll_s=5) == 0.4
    assert slept == [5, 5, 5]
