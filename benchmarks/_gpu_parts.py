"""The parts of the GPU suite (`gpu_suite.py`): tests, train, predict, oom, ddp; each runs in its own child.

What each part measures and checks is described in `gpu_suite.py`'s docstring; `child_main` runs one part
from its spec and writes its result; the `ddp` part lives in `_gpu_ddp.py`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import (
    DICE_MIN,
    DRY_PREDICT_CASES,
    FOLDS,
    MINI,
    ROOT,
    SIMULATED_OOM,
    TINY,
    TRAIN_SCHEDULE,
    _cuda_peak,
    _cuda_peak_reset,
    _device,
    _fallback_plan,
    _planned_work,
    clear_fold,
    cli_in_process,
    exit_text,
    floats,
    fold_dir,
    mean,
    medseg_cli,
    metrics_rows,
    run_captured,
    status_of,
    tail,
    write_json,
)
from _gpu_ddp import part_ddp


def part_tests(spec: dict) -> dict:
    """The gpu-marked tests, through pytest; per-test outcomes from its JUnit XML."""
    import xml.etree.ElementTree as ET

    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text(errors="replace"))
    junit = Path(spec["junit"])
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", f"--junitxml={junit}",
           *files]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, timeout=max(5.0, spec["deadline"] - time.time()), check=False).returncode
    outcomes: dict[str, dict[str, str]] = {}
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome, message = "passed", ""
            for kind in ("failure", "error", "skipped"):
                el = case.find(kind)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                    message = (el.get("message") or el.text or "")[:500]
                    break
            outcomes[name] = {"outcome": outcome, "seconds": case.get("time", ""), "message": message}
    counts = {k: sum(1 for o in outcomes.values() if o["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    checks = {"pytest_exit_0": rc == 0, "gpu_tests_collected": len(outcomes) > 0,
              "no_failures": counts["failed"] == 0 and counts["error"] == 0}
    if spec["device"] == "cuda":
        checks["ran_on_cuda"] = counts["passed"] > 0
    return {"status": status_of(checks), "checks": checks, "files": files, "exit_code": rc, "counts": counts,
            "tests": outcomes}


def part_train(spec: dict) -> dict:
    """Plan + train fold 0 at the defaults of the device; speed, data wait, peak memory vs the plan's estimate."""
    import torch

    from medseg3d.plans.memory import BYTES_PER_ELEMENT, GIB, activation_elements, analytic_bytes
    from medseg3d.training.runtime import default_workers

    dev, dry = _device(spec), spec["dry_run"]
    data, work = Path(spec["data"]), Path(spec["work"])
    sched = TRAIN_SCHEDULE["dry" if dry else "device"]
    res = run_captured(medseg_cli("plan", data, "-o", work, "--configs", "3d_fullres"),
                       max(10.0, spec["deadline"] - time.time() - 30), dict(os.environ))
    if res["rc"] != 0:
        raise RuntimeError(f"`medseg3d plan` failed ({exit_text(res)}): {tail(res['stderr'], 1500)}")
    plans = json.loads((work / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    clear_fold(work, FOLDS["train"])
    left = spec["deadline"] - time.time()
    budget = max(10.0, 0.75 * left - 20)  # the training loop's --time-budget; worker start-up and the end outside it
    args = ["train", str(work), "--fold", str(FOLDS["train"]), "--epochs", str(sched["epochs"]),
            "--iterations-per-epoch", str(sched["iterations"]), "--val-iterations", str(sched["val_iterations"]),
            "--no-final-validation", "--time-budget", f"{budget:.0f}", "--device", dev]
    if dry:
        args += TINY
    _cuda_peak_reset(dev)
    t0 = time.perf_counter()
    rc = cli_in_process(args)
    train_s = time.perf_counter() - t0
    peak = _cuda_peak(dev)
    fd = fold_dir(work, FOLDS["train"])
    rows = metrics_rows(fd)
    measured = rows[1:] or rows  # epoch 1 carries warm-up (workers, cuDNN autotuning)
    ips, wait = mean(floats(measured, "iterations_per_s")), mean(floats(measured, "data_wait_fraction"))
    losses = floats(rows, "train_loss")
    log_text = (fd / "training_log.txt").read_text(errors="replace") if fd and (fd / "training_log.txt").is_file() else ""
    run_lines = [ln.strip() for ln in log_text.splitlines() if " patch " in ln or "runtime:" in ln or "AMP" in ln
                 or "fp32" in ln][:4]
    # what the run used: the plan's network, patch and batch (the dry run overrides them)
    patch = [16, 24, 16] if dry else cfg["patch_size"]
    feats = [4, 8, 16, 16] if dry else cfg["features"]
    batch = 2 if dry else cfg["batch_size"]
    k = len(plans["labels"])
    elements = activation_elements(patch, cfg["strides"], feats, k)
    predicted_gb = float(cfg["estimated_memory_gb"]) if not dry else analytic_bytes(patch, cfg["strides"], feats,
                                                                                   batch, k) / GIB
    memory: dict[str, Any] = {
        "plan_estimated_memory_gb": float(cfg["estimated_memory_gb"]),
        "plan_gpu_memory_gb": plans.get("gpu_memory_gb"),
        "predicted_for_this_run_gb": predicted_gb,
        "analytic_for_this_run_gb": analytic_bytes(patch, cfg["strides"], feats, batch, k) / GIB,
        "feature_map_elements_per_sample": elements,
        "analytic_bytes_per_element": BYTES_PER_ELEMENT[3],
        **peak,
    }
    if peak["max_allocated_gb"]:
        memory["measured_over_predicted"] = peak["max_allocated_gb"] / predicted_gb if predicted_gb else None
        memory["measured_over_analytic"] = peak["max_allocated_gb"] / memory["analytic_for_this_run_gb"]
        memory["calibrated_bytes_per_element"] = peak["max_allocated_gb"] * GIB / (batch * elements)
    checks = {"plan_exit_0": True, "train_exit_0": rc == 0, "metrics_written": len(rows) > 0,
              "iterations_per_s_positive": bool(ips and ips > 0),
              "data_wait_in_0_1": wait is not None and 0.0 <= wait <= 1.0,
              "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses)}
    if dev == "cuda":
        checks["peak_memory_measured"] = bool(peak["max_allocated_gb"])
    return {
        "status": status_of(checks), "checks": checks, "data": str(data), "device": dev,
        "plan": {"patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"], "features": cfg["features"],
                 "estimated_memory_gb": cfg["estimated_memory_gb"], "gpu_memory_gb": plans.get("gpu_memory_gb"),
                 "plan_seconds": res["seconds"]},
        "run": {"patch_size": patch, "batch_size": batch, "features": feats, "epochs_done": len(rows),
                "iterations_per_epoch": sched["iterations"], "time_budget_s": round(budget),
                "train_seconds": train_s, "exit_code": rc, "log_lines": run_lines,
                "default_workers": default_workers(torch.device(dev))},
        "iterations_per_s": ips, "data_wait_fraction": wait,
        "epochs": [{"epoch": r.get("epoch"), "iterations_per_s": r.get("iterations_per_s"),
                    "data_wait_fraction": r.get("data_wait_fraction"), "train_loss": r.get("train_loss"),
                    "epoch_time_s": r.get("epoch_time_s")} for r in rows],
        "goals": {"data_wait_below_5pct": wait is not None and wait < 0.05},
        "memory": memory,
    }


def _model_for_predict(spec: dict) -> tuple[Path, int, str]:
    """(WORK_DIR, fold, what) with a checkpoint_final.pt: the train part's, else a short fallback training run."""
    work = Path(spec["work"])
    fd = fold_dir(work, FOLDS["train"])
    if fd is not None and (fd / "checkpoint_final.pt").is_file():
        return work, FOLDS["train"], f"{spec['data_name']} fold {FOLDS['train']} trained by the train part"
    fb = _fallback_plan(spec)
    fd = fold_dir(fb, FOLDS["fallback"])
    if fd is None or not (fd / "checkpoint_final.pt").is_file():
        clear_fold(fb, FOLDS["fallback"])
        args = ["train", str(fb), "--fold", str(FOLDS["fallback"]), "--epochs", "1", "--iterations-per-epoch",
                "3" if spec["dry_run"] else "20", "--val-iterations", "1", "--no-final-validation",
                "--device", spec["device"], "--num-workers", "1" if spec["dry_run"] else "4"]
        if spec["dry_run"]:
            args += TINY
        res = run_captured(medseg_cli(*args), max(10.0, spec["deadline"] - time.time() - 30), dict(os.environ))
        if res["rc"] != 0:
            raise RuntimeError(f"fallback training failed ({exit_text(res)}): {tail(res['stderr'], 1500)}")
    return fb, FOLDS["fallback"], "hippocampus_mini, a short fallback run (the train part left no model)"


def _labels(path: Path):
    import nibabel as nib
    import numpy as np

    return np.asarray(nib.load(str(path)).dataobj)


def _dice_between(a_dir: Path, b_dir: Path, classes: list[int]) -> dict[str, Any]:
    """Per case: Dice of each class between the label maps of two folders (1 when both lack it), agreement."""
    import numpy as np

    per_case = {}
    for f in sorted(a_dir.glob("*.nii.gz")):
        a, b = _labels(f), _labels(b_dir / f.name)
        dice = {}
        for c in classes:
            den = int((a == c).sum() + (b == c).sum())
            dice[str(c)] = 1.0 if den == 0 else 2.0 * int(((a == c) & (b == c)).sum()) / den
        per_case[f.name.split(".nii")[0]] = {"dice": dice, "mean_dice": float(np.mean(list(dice.values()))),
                                             "voxel_agreement": float((a == b).mean())}
    means = [v["mean_dice"] for v in per_case.values()]
    return {"cases": per_case, "min_case_mean_dice": min(means) if means else None,
            "min_class_dice": min((d for v in per_case.values() for d in v["dice"].values()), default=None)}


def part_predict(spec: dict) -> dict:
    """Held-out shipped cases on the device with and without TTA, against the CPU fp32 labels of the same model."""
    import torch

    from medseg3d.inference.folder import predict_folder

    dev, dry = _device(spec), spec["dry_run"]
    work, fold, model = _model_for_predict(spec)
    plans = json.loads((work / "plans.json").read_text())
    classes = sorted(int(c) for c in plans["labels"] if int(c) > 0)
    out = Path(spec["scratch"]) / "predict"
    inputs = MINI / "imagesTs"
    if dry:  # fewer cases, same code: a folder of links to the first ones
        files = sorted(inputs.glob("*.nii.gz"))[:DRY_PREDICT_CASES]
        inputs = out / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        for f in files:
            link = inputs / f.name
            if not link.exists():
                link.symlink_to(f)
    n_cases = len(list(inputs.glob("*.nii.gz")))
    dev_precision = "fp32" if dry else "auto"  # auto on CUDA: fp16, what `medseg3d predict` does there
    variants = [("cpu_fp32_tta", "cpu", "fp32", True), ("cpu_fp32_notta", "cpu", "fp32", False),
                ("device_tta", dev, dev_precision, True), ("device_notta", dev, dev_precision, False)]
    if dev == "cuda":
        variants += [("device_fp32_tta", dev, "fp32", True)]

    def run(name: str, device: str, precision: str, tta: bool, src: Path) -> dict:
        if device == "cuda":
            torch.cuda.empty_cache()
        _cuda_peak_reset(device)
        t0 = time.perf_counter()
        s = predict_folder(work, src, out / name, config="3d_fullres", folds=[fold], checkpoint="final",
                           use_mirroring=tta, device=device, overwrite=True, precision=precision)
        wall = time.perf_counter() - t0
        secs = sorted(s.seconds.values())
        return {"device": device, "precision": precision, "tta": tta, "cases": len(s.predicted), "wall_s": wall,
                "seconds_per_case": mean(secs), "seconds_each": secs,
                "peak_cuda": _cuda_peak(device) if device == "cuda" else None}

    first = min(inputs.glob("*.nii.gz"))
    warm = run("warmup", dev, dev_precision, False, first)  # CUDA context, kernels: not in the timed runs
    results = {name: run(name, d, p, t, inputs) for name, d, p, t in variants}
    comparisons = {"tta": _dice_between(out / "device_tta", out / "cpu_fp32_tta", classes),
                   "notta": _dice_between(out / "device_notta", out / "cpu_fp32_notta", classes)}
    if "device_fp32_tta" in results:
        comparisons["fp32_tta"] = _dice_between(out / "device_fp32_tta", out / "cpu_fp32_tta", classes)
    checks = {f"{name}_all_cases": r["cases"] == n_cases for name, r in results.items()}
    for key in ("tta", "notta"):
        m = comparisons[key]["min_case_mean_dice"]
        checks[f"dice_{key}_at_least_{DICE_MIN}"] = m is not None and m >= DICE_MIN
    return {"status": status_of(checks), "checks": checks, "model": model, "work": str(work), "inputs": str(inputs),
            "device": dev, "warmup_s": warm["wall_s"], "runs": results, "device_vs_cpu": comparisons}


def part_oom(spec: dict) -> dict:
    """An out-of-memory `medseg3d train` (oversized --batch-size) in a subprocess: exit 2, clear message, no traceback."""
    import torch

    dev, dry = _device(spec), spec["dry_run"]
    work, plan_source = _planned_work(spec)
    plans = json.loads((work / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    clear_fold(work, FOLDS["oom"])
    base = ["train", str(work), "--fold", str(FOLDS["oom"]), "--epochs", "1", "--iterations-per-epoch", "1",
            "--val-iterations", "0", "--no-final-validation", "--num-workers", "0", "--no-augment"]
    sizing: dict[str, Any] = {}
    if dev == "cuda" and not dry:
        total = torch.cuda.get_device_properties(0).total_memory
        per_sample = float(cfg["estimated_memory_gb"]) * 2**30 / max(1, int(cfg["batch_size"]))
        voxels = math.prod(int(p) for p in cfg["patch_size"])
        host_per_sample = voxels * (4 * len(plans["channel_names"]) + 8) * 2  # image + int64 label, pinned copy
        want = math.ceil(1.5 * total / max(per_sample, 1.0))
        cap = int(16e9 // host_per_sample)  # the batch is built on the host first: stay within 16 GB of RAM
        n = max(2, min(want, cap))
        sizing = {"gpu_total_gb": total / 2**30, "plan_gb_per_sample": per_sample / 2**30, "batch_size": n,
                  "batch_needed_for_1_5x": want, "host_gb_for_the_batch": n * host_per_sample / 1e9,
                  "note": "capped by host RAM: may fit" if n < want else ""}
        cmd = medseg_cli(*base, "--device", "cuda", "--batch-size", str(n))
        simulated = False
    else:
        cmd = [sys.executable, "-c", SIMULATED_OOM, *base, "--device", "cpu", *TINY]
        simulated = True
    res = run_captured(cmd, max(10.0, spec["deadline"] - time.time() - 5), dict(os.environ))
    text = res["stdout"] + res["stderr"]
    err = res["stderr"]
    idx = err.rfind("Error:")
    message = err[idx:].strip() if idx >= 0 else ""
    checks = {"exit_code_2": res["rc"] == 2, "no_traceback": "Traceback" not in text,
              "error_message_printed": bool(message),
              "says_out_of_memory": "out of memory" in message.lower(),
              "one_paragraph": bool(message) and "\n\n" not in message and len(message) <= 1000,
              "names_an_option_to_lower": "--batch-size" in message or "--patch-size" in message}
    return {"status": status_of(checks), "checks": checks, "simulated": simulated, "device": dev,
            "work": plan_source, "command": " ".join(cmd[:2] + ["..."] + cmd[-4:]) if simulated else " ".join(cmd),
            "sizing": sizing, "exit_code": res["rc"], "seconds": res["seconds"], "message": message,
            "output_tail": "" if checks["no_traceback"] and checks["exit_code_2"] else tail(text, 2500)}


PART_FUNCS = {"tests": part_tests, "train": part_train, "predict": part_predict, "oom": part_oom, "ddp": part_ddp}


def child_main(part: str, spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    result_path = Path(spec["result"])
    try:
        if spec.get("inject_failure") == part:
            raise RuntimeError(f"failure injected into part {part!r} (--inject-failure, for the suite's own test)")
        result = PART_FUNCS[part](spec)
    except Exception as exc:  # noqa: BLE001 (the parent records it); the other parts still run
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:3000]}
    write_json(result_path, result)
    return 0
