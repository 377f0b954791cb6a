"""`benchmarks/gpu_suite.py --dry-run`: every part of the GPU suite on the CPU at tiny sizes, so the script a
device session runs in one call cannot rot (issue 17). The figures themselves come from a device run
(docs/benchmarks.md, "GPU suite (how to run)").
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
PARTS = ["tests", "train", "predict", "oom", "ddp"]

pytestmark = pytest.mark.slow


def run_suite(out: Path, *extra: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict]:
    cmd = [sys.executable, str(SUITE), "--dry-run", "--out", str(out), "--work-dir", str(out.parent / f"{out.name}_work"),
           *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res, json.loads((out / "gpu_suite_report.json").read_text())


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> tuple[dict, Path, float]:
    out = tmp_path_factory.mktemp("gpu_suite") / "out"
    t0 = time.perf_counter()
    _, report = run_suite(out)
    return report, out, time.perf_counter() - t0


def test_dry_run_writes_report_summary_log_and_junit(dry):
    report, out, seconds = dry
    for name in ("gpu_suite_report.json", "gpu_suite_summary.txt", "gpu_suite_log.txt", "gpu_tests_junit.xml"):
        assert (out / name).stat().st_size > 0, name
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files
    assert report["mode"] == "dry-run" and report["device"] == "cpu" and report["selected"] == PARTS
    assert set(report["parts"]) == set(PARTS) and set(report["statuses"]) == set(PARTS)
    assert report["environment"]["torch"] == torch.__version__
    assert report["install"]["status"].startswith("skipped")
    assert 0 < report["elapsed_s"] <= report["budget_s"] and seconds < 600
    for name in PARTS:
        part = report["parts"][name]
        assert part["seconds"] > 0 and part["timeout_s"] > 0, name
        assert isinstance(part.get("checks"), dict) and part["checks"], name
    summary = (out / "gpu_suite_summary.txt").read_text()
    assert all(f"  {name} " in summary for name in PARTS)


def test_dry_run_parts_pass(dry):
    report, _, _ = dry
    for name in PARTS:
        part = report["parts"][name]
        assert part["status"] == "pass", (name, part.get("error"), {k: v for k, v in part["checks"].items() if not v},
                                          part.get("log_tail", "")[-2000:])


def test_gpu_tests_are_collected_and_skipped_with_a_reason(dry):
    tests = dry[0]["parts"]["tests"]
    assert "tests/test_gpu.py" in tests["files"] and "tests/test_plans.py" in tests["files"]
    names = list(tests["tests"])
    assert any("test_gpu" in n for n in names) and any("test_cuda_trial_measures_memory" in n for n in names)
    if not torch.cuda.is_available():
        assert tests["counts"]["skipped"] == len(names) >= 7
        assert all("CUDA" in t["message"] for t in tests["tests"].values())


def test_train_figures(dry):
    train = dry[0]["parts"]["train"]
    assert train["iterations_per_s"] > 0 and 0.0 <= train["data_wait_fraction"] <= 1.0
    assert train["run"]["epochs_done"] == 2 and train["run"]["exit_code"] == 0
    assert train["run"]["default_workers"] == 1  # on the CPU; 12 per GPU on CUDA
    assert train["run"]["patch_size"] == [16, 24, 16] and train["run"]["batch_size"] == 2
    mem = train["memory"]
    assert mem["plan_estimated_memory_gb"] > 0 and mem["predicted_for_this_run_gb"] > 0
    assert mem["feature_map_elements_per_sample"] > 0
    assert mem["max_allocated_gb"] is None and mem["max_reserved_gb"] is None  # no CUDA in a dry run
    assert len(train["epochs"]) == 2 and all(float(e["train_loss"]) > 0 for e in train["epochs"])


def test_predict_device_against_cpu_dice_is_exactly_one(dry):
    pred = dry[0]["parts"]["predict"]
    assert "train part" in pred["model"]
    assert set(pred["runs"]) == {"cpu_fp32_tta", "cpu_fp32_notta", "device_tta", "device_notta"}
    for r in pred["runs"].values():
        assert r["cases"] == 2 and r["seconds_per_case"] > 0 and len(r["seconds_each"]) == 2
    for key in ("tta", "notta"):
        cmp = pred["device_vs_cpu"][key]
        assert cmp["min_case_mean_dice"] == 1.0 and cmp["min_class_dice"] == 1.0
        assert len(cmp["cases"]) == 2 and all(c["voxel_agreement"] == 1.0 for c in cmp["cases"].values())


def test_ddp_plain_and_forced_process_group(dry):
    ddp = dry[0]["parts"]["ddp"]
    plain, forced = ddp["runs"]["plain"], ddp["runs"]["forced"]
    assert plain["exit_code"] == 0 and plain["epochs"] == 1
    assert forced["exit_code"] == 0 and forced["epochs"] == 1
    pg = forced["process_group"]
    assert pg["backend"] == "gloo" and pg["world_size"] == 1 and pg["ddp_wrapped"] >= 1 and pg["all_reduce_calls"] >= 1
    # medseg3d joins a process group only for WORLD_SIZE > 1: the suite reports that as a finding
    assert plain["joined_process_group"] is False and any(f.startswith("ddp:") for f in dry[0]["findings"])


def test_oom_is_simulated_and_checked(dry):
    oom = dry[0]["parts"]["oom"]
    assert oom["simulated"] is True and oom["exit_code"] is not None
    assert set(oom["checks"]) == {"exit_code_2", "no_traceback", "error_message_printed", "says_out_of_memory",
                                  "one_paragraph", "names_an_option_to_lower"}


def test_oom_gives_exit_2_and_a_one_paragraph_message(dry):
    """`torch.cuda.OutOfMemoryError` raised inside `medseg3d train` (simulated): exit 2, one paragraph, no traceback."""
    oom = dry[0]["parts"]["oom"]
    assert oom["status"] == "pass", (oom["checks"], oom.get("output_tail", "")[-1500:])
    assert oom["exit_code"] == 2 and oom["message"].startswith("Error: ") and "out of memory" in oom["message"]


def test_a_failing_part_is_recorded_and_the_next_one_uses_its_fallback(tmp_path):
    _, report = run_suite(tmp_path / "out", "--parts", "train,predict", "--inject-failure", "train")
    train, pred = report["parts"]["train"], report["parts"]["predict"]
    assert train["status"] == "error" and "failure injected" in train["error"] and train["log_tail"]
    assert pred["status"] == "pass" and "fallback" in pred["model"]
    assert pred["device_vs_cpu"]["tta"]["min_case_mean_dice"] == 1.0


def test_the_budget_skips_parts_and_the_report_is_still_written(tmp_path):
    res, report = run_suite(tmp_path / "out", "--budget-s", "2")
    assert report["statuses"] == {name: "skipped" for name in PARTS}
    assert all("time budget" in report["parts"][n]["reason"] for n in PARTS)
    assert "skipped" in res.stdout


def test_peer_dry_run_against_nnunet(tmp_path):
    """`--peer --dry-run`: medseg3d vs nnU-Net v2 on the CPU (2 iterations, 2 cases); where nnunetv2 is installed."""
    pytest.importorskip("nnunetv2")
    pytest.importorskip("SimpleITK")
    out = tmp_path / "out"
    cmd = [sys.executable, str(SUITE), "--peer", "--dry-run", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "gpu_peer_report.json").read_text())
    assert "error" not in report, report["error"]
    pred, train = report["parts"]["predict"], report["parts"]["train"]
    assert pred["status"] == "pass" and set(pred["runs"]) == {"nnunet_tta", "medseg3d_tta", "nnunet_notta",
                                                               "medseg3d_notta"}
    assert all(r["cases"] == 2 and r["s_per_case"] > 0 for r in pred["runs"].values())
    assert pred["ratios"]["tta"]["speed_nnunet_over_medseg3d"] > 0
    assert train["status"] == "pass", train.get("log_tail", "")[-2000:]
    assert {r["tool"] for r in train["runs_seen"]} == {"nnunet", "medseg3d_default"}
    assert train["bench_train"]["ratios_vs_nnunet"]["medseg3d_default"]["iterations_per_s"] > 0
