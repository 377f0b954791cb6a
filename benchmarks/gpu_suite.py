#!/usr/bin/env python3
"""The GPU suite (issue 17): every CUDA figure of medseg3d from one short device call, and its CPU dry run.

On a bare GPU machine (the device tool's nvidia-h200: PyTorch, numpy, scipy, rich, typer, pytest
preinstalled; no nibabel, no network), from the repository root, with `.whl` and `.gpudata` carried
(both made by `benchmarks/gpu_wheels.sh`; the exact `run` calls are in docs/benchmarks.md, "GPU suite
(how to run)"):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out $OUT

  install  the carried wheels (`.whl/*.whl`, `.whl_sitk/*.whl`) into /tmp/site with pip (no index,
           no deps); children get /tmp/site and the repository on PYTHONPATH (medseg3d is not installed).
  tests    the `gpu`-marked tests (every tests/test_*.py holding a gpu mark; tests/test_gpu.py).
  train    `medseg3d plan` + `medseg3d train` of Task04 fold 0 (`.gpudata/Task04_Hippocampus`) at
           medseg3d's CUDA defaults (precision, workers, memory format: nothing overridden), a few
           epochs cut by `--time-budget`: iterations/s and data-wait fraction of the epochs after the
           first, peak CUDA memory (max_memory_allocated / max_memory_reserved) beside the planner's
           `estimated_memory_gb`, and the bytes per feature-map element that would calibrate
           `medseg3d.plans.memory` to the measured peak.
  predict  the 4 held-out shipped cases (hippocampus_mini/imagesTs) with the model of `train` (a
           short fallback model when `train` failed), on CUDA with and without mirror TTA: seconds
           per case, peak CUDA memory, and Dice of the CUDA labels against the CPU (fp32) labels of
           the same model (>= 0.999 per case).
  oom      `medseg3d train --batch-size N` in a subprocess, N sized from the plan to need 1.5x the
           GPU's memory: exit code 2 and a one-paragraph `Error:` message naming what to lower, no
           traceback.
  ddp      `torchrun --nproc_per_node 1 -m medseg3d train ...` as a user types it, and the same run with
           the process group forced at world size 1 (medseg3d joins one only for WORLD_SIZE > 1), so
           NCCL, the DDP wrapper and the all-reduces really run: exit codes, backend, metrics.

Each part runs in its own process with a timeout carved from a global budget (`--budget-s`, default
450 s), so one failing, hanging or crashing part is recorded and the others still run, and the
whole call ends well inside 8 minutes. Written under `--out` (rewritten after every part, so a kill
keeps what was done): gpu_suite_report.json, gpu_suite_summary.txt, gpu_suite_log.txt (every
part's output) and gpu_tests_junit.xml.

    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu_dry   # the same code on the CPU, tiny sizes
    python3 benchmarks/gpu_suite.py --peer --out $OUT           # medseg3d vs nnU-Net v2 (gpu_peer.py)
    python3 benchmarks/gpu_suite.py --install-only              # only install the carried wheels

`--dry-run` (tests/test_gpu_suite.py runs it): the shipped hippocampus_mini, a 4-8-16-16 network on
16x24x16 patches, a few iterations, the CPU for "CUDA" (so CPU-vs-"CUDA" Dice is exactly 1), gloo
instead of NCCL, and the out-of-memory error simulated: a forward hook raises
`torch.cuda.OutOfMemoryError` inside the real `medseg3d train` command, so the CLI's handling of it
is checked end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
MINI = ROOT / "medseg3d" / "resources" / "hippocampus_mini"
GPUDATA = ROOT / ".gpudata" / "Task04_Hippocampus"
SHARED_TASK04 = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"
SITE = Path("/tmp/site")
WHEEL_DIRS = (".whl", ".whl_sitk")

REPORT = "gpu_suite_report.json"
SUMMARY = "gpu_suite_summary.txt"
LOG = "gpu_suite_log.txt"
JUNIT = "gpu_tests_junit.xml"

PARTS = ("tests", "train", "predict", "oom", "ddp")
#: Most seconds each part may take on the device, and the least it needs to be worth starting; a
#: part's timeout is its cap, cut so that every later part still gets its minimum.
CAPS = {"tests": 100, "train": 200, "predict": 90, "oom": 75, "ddp": 110}
MINIMA = {"tests": 30, "train": 60, "predict": 30, "oom": 20, "ddp": 40}
DRY_CAPS = {"tests": 240, "train": 240, "predict": 180, "oom": 120, "ddp": 180}
FINAL_RESERVE_S = 5.0  # for the last report write

#: The dry run's network, patch and precision (medseg3d train overrides; tests/test_train.py's TINY). fp32: on
#: a CPU with native bf16 the bf16 default is another code path than CUDA's, and an intermittently huge
#: gradient was seen there (the report of issue 17's suite).
TINY = ["--patch-size", "16,24,16", "--features", "4,8,16,16", "--batch-size", "2", "--no-amp", "--no-val-tta"]
#: Held-out shipped cases the dry run predicts (the device run predicts all 4).
DRY_PREDICT_CASES = 2
#: Training schedule of `train`: device / dry run (the time budget cuts the device run when slower).
TRAIN_SCHEDULE = {"device": {"epochs": 4, "iterations": 120, "val_iterations": 5},
                  "dry": {"epochs": 2, "iterations": 3, "val_iterations": 1}}
DICE_MIN = 0.999
FOLDS = {"train": 0, "fallback": 0, "ddp_forced": 2, "ddp_plain": 3, "oom": 4}

SIMULATED_OOM = r"""
import sys
import torch

def _oom(module, args):
    if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module.training and torch.is_grad_enabled():
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 64.00 GiB. GPU 0 has a total capacity of 8.00 GiB "
            "(simulated by benchmarks/gpu_suite.py --dry-run)")

torch.nn.modules.module.register_module_forward_pre_hook(_oom)
from medseg3d.cli import main

sys.argv[0] = "medseg3d"
main(sys.argv[1:])
"""


# ============================================================================ small helpers
def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename): a kill never leaves half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def read_tail(path: Path, n: int = 3000) -> str:
    try:
        return tail(path.read_text(errors="replace"), n)
    except OSError:
        return ""


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(site: Path | None) -> dict[str, str]:
    """Environment of every child: the installed wheels and the repository first on PYTHONPATH, unbuffered."""
    env = dict(os.environ)
    paths = ([str(site)] if site is not None else []) + [str(ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    return env


def run_logged(cmd: list[str], log_path: Path, timeout: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Run `cmd` in its own process group, output appended to `log_path`; (exit code or None on timeout, s).

    On timeout the whole group (the command and its workers / torchrun ranks) is killed; after a
    normal exit whatever the command left in its group is killed too.
    """
    t0 = time.perf_counter()
    with open(log_path, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, time.perf_counter() - t0


def run_captured(cmd: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd` (own process group, killed on timeout); exit code, stdout, stderr, seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    # echo into this part's log (the child's own stdout goes there)
    print(f"$ {' '.join(cmd)}\n--- stdout\n{tail(out, 20000)}\n--- stderr\n{tail(err, 20000)}\n--- exit {rc}",
          flush=True)
    return {"rc": rc, "stdout": out, "stderr": err, "seconds": time.perf_counter() - t0}


def exit_text(res: dict) -> str:
    return f"timed out after {res['seconds']:.0f} s" if res["rc"] is None else f"exit {res['rc']}"


def cli_in_process(argv: list[str]) -> int:
    """Exit code of `medseg3d ARGV` run in this process (the CLI's own main, SystemExit caught)."""
    from medseg3d.cli import main

    print(f"$ medseg3d {' '.join(argv)}", flush=True)
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def medseg_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "medseg3d", *map(str, args)]


def fold_dir(work: Path, fold: int) -> Path | None:
    """`WORK/results/3d_fullres/<arch>/fold_K` that exists (the plan's architecture), else None."""
    found = sorted((work / "results" / "3d_fullres").glob(f"*/fold_{fold}"))
    return found[0] if found else None


def clear_fold(work: Path, fold: int) -> None:
    import shutil

    for d in (work / "results" / "3d_fullres").glob(f"*/fold_{fold}"):
        shutil.rmtree(d, ignore_errors=True)


def metrics_rows(fd: Path | None) -> list[dict[str, str]]:
    if fd is None or not (fd / "metrics.csv").is_file():
        return []
    with open(fd / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def floats(rows: list[dict[str, str]], key: str) -> list[float]:
    out = []
    for r in rows:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            out.append(float(r[key]))
    return out


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def status_of(checks: dict[str, bool]) -> str:
    return "pass" if checks and all(checks.values()) else "fail"


# ============================================================================ the parts (child side)
def _device(spec: dict) -> str:
    return spec["device"]


def _cuda_peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak(device: str) -> dict[str, float | None]:
    import torch

    if device != "cuda":
        return {"max_allocated_gb": None, "max_reserved_gb": None}
    torch.cuda.synchronize()
    return {"max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
            "max_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}


def _fallback_plan(spec: dict) -> Path:
    """The shipped hippocampus_mini planned into `fallback_work` (once; a rerun of `medseg3d plan` reuses it)."""
    fb = Path(spec["fallback_work"])
    if not (fb / "plans.json").is_file():
        res = run_captured(medseg_cli("plan", MINI, "-o", fb, "--configs", "3d_fullres"),
                           max(10.0, spec["deadline"] - time.time() - 20), dict(os.environ))
        if res["rc"] != 0:
            raise RuntimeError(f"fallback `medseg3d plan` of the shipped data failed ({exit_text(res)}): "
                               f"{tail(res['stderr'], 1500)}")
    return fb


def _planned_work(spec: dict) -> tuple[Path, str]:
    """A planned WORK_DIR: the `train` part's (Task04) when its plans.json exists, else the shipped set planned."""
    work = Path(spec["work"])
    if (work / "plans.json").is_file():
        return work, f"{spec['data_name']} (planned by the train part)"
    return _fallback_plan(spec), "hippocampus_mini (fallback plan: the train part left no plans.json)"


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


def part_ddp(spec: dict) -> dict:
    """torchrun --nproc_per_node 1: the user's command, and the same with the process group forced (NCCL/gloo)."""
    dev, dry = _device(spec), spec["dry_run"]
    work, plan_source = _planned_work(spec)
    backend = "nccl" if dev == "cuda" else "gloo"
    common = ["--epochs", "1", "--iterations-per-epoch", "3" if dry else "10", "--val-iterations", "1",
              "--no-final-validation", "--device", dev] + (TINY + ["--num-workers", "1"] if dry else [])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    scratch = Path(spec["scratch"])
    forced_report = scratch / "ddp_forced.json"
    forced_report.unlink(missing_ok=True)
    runs: dict[str, dict] = {}
    for name, fold, cmd in (
        ("plain", FOLDS["ddp_plain"], torchrun + ["--master_port", str(free_port()), "-m", "medseg3d", "train",
                                                  str(work), "--fold", str(FOLDS["ddp_plain"]), *common]),
        ("forced", FOLDS["ddp_forced"], torchrun + ["--master_port", str(free_port()), str(HERE), "--ddp-forced",
                                                    str(forced_report), "--", "train", str(work), "--fold",
                                                    str(FOLDS["ddp_forced"]), *common]),
    ):
        clear_fold(work, fold)
        left = spec["deadline"] - time.time()
        res = run_captured(cmd, max(10.0, left / (2 if name == "plain" else 1) - 3), dict(os.environ))
        text = res["stdout"] + res["stderr"]
        rows = metrics_rows(fold_dir(work, fold))
        runs[name] = {"exit_code": res["rc"], "seconds": res["seconds"], "epochs": len(rows),
                      "train_loss": floats(rows, "train_loss"),
                      "joined_process_group": "process group" in text and "joined" in text,
                      "output_tail": "" if res["rc"] == 0 else tail(text, 2500)}
    forced = json.loads(forced_report.read_text()) if forced_report.is_file() else {}
    runs["forced"]["process_group"] = forced
    checks = {"plain_exit_0": runs["plain"]["exit_code"] == 0, "plain_trained": runs["plain"]["epochs"] >= 1,
              "forced_exit_0": runs["forced"]["exit_code"] == 0, "forced_trained": runs["forced"]["epochs"] >= 1,
              f"forced_backend_{backend}": forced.get("backend") == backend,
              "forced_ddp_wrapped": forced.get("ddp_wrapped", 0) >= 1,
              "forced_all_reduce_ran": forced.get("all_reduce_calls", 0) >= 1,
              "losses_finite": all(math.isfinite(v) for r in ("plain", "forced") for v in runs[r]["train_loss"])}
    finding = None
    if not runs["plain"]["joined_process_group"]:
        finding = ("torchrun --nproc_per_node 1 trains without a process group: init_distributed() joins one only "
                   "for WORLD_SIZE > 1, so the plain run exercises no DDP code; the forced run does "
                   f"({forced.get('backend', '?')}).")
    return {"status": status_of(checks), "checks": checks, "device": dev, "backend_expected": backend,
            "work": plan_source, "runs": runs, "finding": finding}


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


def ddp_forced_main(report: Path, argv: list[str]) -> int:
    """Under torchrun: `medseg3d train` with the process group joined at any WORLD_SIZE (here 1), recorded."""
    import torch
    import torch.distributed as dist

    from medseg3d.training import distributed as mdist
    from medseg3d.training import trainer

    seen: dict[str, Any] = {"ddp_wrapped": 0, "all_reduce_calls": 0}

    class ForcedInfo(mdist.DistInfo):
        @property
        def enabled(self) -> bool:  # DDP code paths at world size 1 too
            return True

    def init_forced(device_kind: str) -> mdist.DistInfo:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        seen.update(backend=str(dist.get_backend()), world_size=dist.get_world_size(), rank=dist.get_rank())
        print(f"gpu_suite: rank {rank}/{world} joined the {seen['backend']} process group (forced at world size "
              f"{world})", flush=True)
        return ForcedInfo(rank, world, local)

    ddp_init = torch.nn.parallel.DistributedDataParallel.__init__

    def counting_init(self, *a: Any, **k: Any) -> None:
        seen["ddp_wrapped"] += 1
        seen["device_ids"] = str(k.get("device_ids"))
        ddp_init(self, *a, **k)

    all_reduce = dist.all_reduce

    def counting_all_reduce(*a: Any, **k: Any) -> Any:
        seen["all_reduce_calls"] += 1
        return all_reduce(*a, **k)

    torch.nn.parallel.DistributedDataParallel.__init__ = counting_init  # type: ignore[method-assign]
    dist.all_reduce = counting_all_reduce
    trainer.init_distributed = init_forced
    rc = 1
    try:
        rc = cli_in_process(argv)
    finally:
        seen["exit_code"] = rc
        write_json(report, seen)
    return rc


# ============================================================================ install, environment
def install_wheels(site: Path, dirs: tuple[str, ...] = WHEEL_DIRS) -> dict:
    """pip-install every carried wheel into `site` (no index, no deps); `site` goes first on sys.path."""
    wheels = sorted(str(p) for d in dirs for p in (ROOT / d).glob("*.whl"))
    info: dict[str, Any] = {"target": str(site), "wheels": [Path(w).name for w in wheels]}
    if not wheels:
        info["status"] = "no wheels carried"
        return info
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *wheels]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    info.update(seconds=time.perf_counter() - t0, exit_code=res.returncode,
                status="installed" if res.returncode == 0 else "failed", output=tail(res.stdout + res.stderr, 2000))
    if res.returncode == 0:
        sys.path.insert(0, str(site))
    return info


def environment(dry: bool) -> dict:
    env: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                           "platform": platform.platform(), "cpus": os.cpu_count(), "dry_run": dry}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda_available"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(gpu=p.name, gpu_total_gb=p.total_memory / 2**30, cuda=torch.version.cuda,
                       cudnn=torch.backends.cudnn.version(), bf16_supported=bool(torch.cuda.is_bf16_supported()),
                       nccl_available=bool(torch.distributed.is_nccl_available()))
    except Exception as exc:  # noqa: BLE001
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    for mod in ("nibabel", "numpy", "scipy", "typer", "rich", "pytest"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            env[mod] = f"missing ({type(exc).__name__})"
    try:
        env["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True, timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_head"] = None
    return env


def probe_environment(env: dict[str, str], dry: bool) -> dict:
    """`environment()` read in a child with `env`, so the calling process never initialises CUDA itself."""
    code = (f"import json, sys; sys.path.insert(0, {str(HERE.parent)!r}); "
            f"import gpu_suite; print(json.dumps(gpu_suite.environment({dry})))")
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                           check=False)
    try:
        return json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": tail(probe.stdout + probe.stderr, 2000)}


def find_data(explicit: str | None, dry: bool) -> Path:
    if dry:
        return Path(explicit) if explicit else MINI
    for cand in ([Path(explicit)] if explicit else []) + [GPUDATA, SHARED_TASK04]:
        if (cand / "dataset.json").is_file():
            return cand
    return Path(explicit) if explicit else GPUDATA


# ============================================================================ parent
def summary_lines(report: dict) -> list[str]:
    env = report["environment"]
    lines = [(f"medseg3d GPU suite ({report['mode']}), {report['started']}, {report.get('elapsed_s', 0):.0f} s of "
              f"{report['budget_s']:.0f} s budget"),
             (f"  {env.get('gpu', 'no GPU')} | torch {env.get('torch')} | CUDA {env.get('cuda', '-')} | "
              f"{env.get('cpus')} CPUs | install: {report['install'].get('status')}")]
    for name in report["selected"]:
        p = report["parts"].get(name)
        if p is None:
            lines.append(f"  {name:8s} not run yet")
            continue
        st = p.get("status")
        head = f"  {name:8s} {st:8s} {p.get('seconds', 0):6.1f} s"
        failed = [k for k, v in (p.get("checks") or {}).items() if not v]
        if p.get("error"):
            head += f"  {p['error'][:200]}"
        elif failed:
            head += f"  failed checks: {', '.join(failed)}"
        lines.append(head)
        if name == "tests" and p.get("counts"):
            lines.append(f"           {p['counts']}")
        if name == "train" and p.get("iterations_per_s") is not None:
            m = p["memory"]
            alloc = m.get("max_allocated_gb")
            lines.append(f"           {p['iterations_per_s']:.2f} it/s, data wait {100 * p['data_wait_fraction']:.1f}% "
                         f"({p['run']['default_workers']} default workers), batch {p['run']['batch_size']} of "
                         f"{'x'.join(map(str, p['run']['patch_size']))}")
            lines.append("           peak CUDA " + (f"{alloc:.2f} GB allocated / {m['max_reserved_gb']:.2f} GB reserved"
                                                   if alloc else "- (no CUDA)")
                         + f"; planned {m['predicted_for_this_run_gb']:.3f} GB"
                         + (f" (measured/planned {m['measured_over_predicted']:.2f})" if alloc else ""))
        if name == "predict" and p.get("runs"):
            for key, r in p["runs"].items():
                pk = (r.get("peak_cuda") or {}).get("max_allocated_gb")
                lines.append(f"           {key:16s} {r['seconds_per_case'] or 0:.3f} s/case"
                             + (f", peak {pk:.2f} GB" if pk else ""))
            for key, c in p["device_vs_cpu"].items():
                lines.append(f"           device vs CPU ({key}): min case Dice {c['min_case_mean_dice']}")
        if name == "oom" and "exit_code" in p:
            lines.append(f"           {'simulated' if p['simulated'] else 'real'} OOM: exit {p['exit_code']}, "
                         f"message: {(p['message'] or '-')[:300]}")
        if name == "ddp" and p.get("runs"):
            r = p["runs"]
            lines.append(f"           plain exit {r['plain']['exit_code']} (process group: "
                         f"{r['plain']['joined_process_group']}), forced exit {r['forced']['exit_code']} "
                         f"backend {r['forced'].get('process_group', {}).get('backend')}")
    for f in report.get("findings", []):
        lines.append(f"  finding: {f}")
    return lines


def findings_of(report: dict) -> list[str]:
    out = []
    parts = report["parts"]
    oom = parts.get("oom", {})
    if oom.get("status") == "fail":
        out.append(f"oom: `medseg3d train` out of CUDA memory exits {oom.get('exit_code')}"
                   + (" with a traceback" if not oom["checks"].get("no_traceback") else "")
                   + " instead of exit 2 with a one-paragraph message (checks failed: "
                   + ", ".join(k for k, v in oom["checks"].items() if not v) + ")")
    ddp = parts.get("ddp", {})
    if ddp.get("finding"):
        out.append("ddp: " + ddp["finding"])
    train = parts.get("train", {})
    if train.get("status") in ("pass", "fail") and train.get("goals") and not train["goals"]["data_wait_below_5pct"] \
            and not report["dry_run"]:
        out.append(f"train: data wait {100 * (train.get('data_wait_fraction') or 0):.1f}% >= 5% with "
                   f"{train['run']['default_workers']} default workers")
    mem = train.get("memory", {})
    if mem.get("measured_over_predicted") and not 0.67 <= mem["measured_over_predicted"] <= 1.5:
        out.append(f"train: measured peak / planned memory = {mem['measured_over_predicted']:.2f}; calibrated bytes "
                   f"per element {mem.get('calibrated_bytes_per_element', 0):.2f} vs the analytic "
                   f"{mem['analytic_bytes_per_element']:.2f}")
    return out


def save(report: dict, out: Path, logs: list[Path]) -> None:
    report["findings"] = findings_of(report)
    write_json(out / REPORT, report)
    (out / SUMMARY).write_text("\n".join(summary_lines(report)) + "\n")
    with open(out / LOG, "w", errors="replace") as fh:
        for p in logs:
            if p.is_file():
                fh.write(f"\n{'=' * 30} {p.name}\n")
                fh.write(read_tail(p, 2_000_000))


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--ddp-forced"]:  # under torchrun, see part_ddp
        sep = args_in.index("--")
        return ddp_forced_main(Path(args_in[1]), args_in[sep + 1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_suite_out"),
                    help="folder for the report, summary, log (default: $OUT, else ./gpu_suite_out)")
    ap.add_argument("--dry-run", action="store_true", help="the same parts on the CPU at tiny sizes")
    ap.add_argument("--peer", action="store_true", help="medseg3d vs nnU-Net v2 side by side (benchmarks/gpu_peer.py)")
    ap.add_argument("--install-only", action="store_true", help="install the carried wheels into --site and stop")
    ap.add_argument("--budget-s", type=float, default=450.0, help="whole-call time budget in seconds (default 450)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--data", default=None, help="Task04_Hippocampus folder (default: .gpudata/Task04_Hippocampus)")
    ap.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--site", type=Path, default=SITE, help="pip --target folder for the carried wheels")
    ap.add_argument("--wheel-dirs", default=",".join(WHEEL_DIRS),
                    help="comma-separated folders of wheels to install (default: .whl,.whl_sitk)")
    ap.add_argument("--install", dest="install", action="store_true", default=None,
                    help="install carried wheels even in a dry run")
    ap.add_argument("--no-install", dest="install", action="store_false", help="never install wheels")
    ap.add_argument("--inject-failure", default=None, help=argparse.SUPPRESS)  # tests: make one part raise
    ap.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(args_in)
    if args.child:
        return child_main(args.child, args.spec)
    os.environ["PYTHONUNBUFFERED"] = "1"
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    start = time.time()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    do_install = (not args.dry_run) if args.install is None else args.install
    wheel_dirs = tuple(d for d in args.wheel_dirs.split(",") if d)
    install = install_wheels(args.site, wheel_dirs) if do_install else {"status": "skipped (dry run: this environment's packages)"
                                                            if args.dry_run else "skipped (--no-install)"}
    site = args.site if install.get("status") == "installed" else None
    if install.get("status") == "failed":
        print(f"wheel install failed:\n{install.get('output')}", flush=True)
    if args.install_only:
        print(json.dumps(install, indent=1))
        return 0 if install.get("status") != "failed" else 1
    if args.peer:
        sys.path.insert(0, str(HERE.parent))
        import gpu_peer

        return gpu_peer.main(args, rest, install, site, deadline)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    selected = [p for p in args.parts.split(",") if p]
    unknown = [p for p in selected if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
    scratch = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    scratch.mkdir(parents=True, exist_ok=True)
    env = child_env(site)
    environ = probe_environment(env, args.dry_run)
    device = "cpu" if args.dry_run or not environ.get("cuda_available") else "cuda"
    data = find_data(args.data, args.dry_run)
    report: dict[str, Any] = {
        "suite": "medseg3d GPU suite (issue 17), benchmarks/gpu_suite.py", "mode": "dry-run" if args.dry_run else "device",
        "dry_run": args.dry_run, "device": device, "started": now_iso(), "budget_s": args.budget_s,
        "environment": environ, "install": install, "data": str(data), "selected": selected, "parts": {},
        "statuses": {},
    }
    if str(environ.get("nibabel", "")).startswith("missing"):
        report["warning_packages"] = ("nibabel is not importable: carry .whl (benchmarks/gpu_wheels.sh makes it); the "
                                      "parts that read NIfTI files will fail")
    if not args.dry_run and device != "cuda":
        report["warning"] = "no CUDA device: the parts run on the CPU at full size (use --dry-run for the tiny run)"
    logs: list[Path] = []
    caps = DRY_CAPS if args.dry_run else CAPS
    common = {"dry_run": args.dry_run, "device": device, "data": str(data), "data_name": data.name,
              "work": str(scratch / "work"), "fallback_work": str(scratch / "work_fallback"),
              "scratch": str(scratch), "junit": str(args.out / JUNIT), "inject_failure": args.inject_failure}
    if not (data / "dataset.json").is_file():
        report["warning"] = (f"no dataset at {data}: carry .gpudata (benchmarks/gpu_wheels.sh copies "
                             "Task04_Hippocampus there); parts needing it fall back to the shipped data")
    save(report, args.out, logs)
    for i, name in enumerate(selected):
        remaining = deadline - time.time() - FINAL_RESERVE_S
        later = sum(MINIMA[p] for p in selected[i + 1:])
        timeout = min(caps[name], max(remaining - later, min(remaining, MINIMA[name])))
        if remaining < MINIMA[name] / 2:
            report["parts"][name] = {"status": "skipped", "reason": f"time budget: {remaining:.0f} s left",
                                     "seconds": 0.0}
            report["statuses"][name] = "skipped"
            save(report, args.out, logs)
            print(f"[gpu_suite] {name}: skipped, {remaining:.0f} s left", flush=True)
            continue
        spec_path, result_path, log_path = (scratch / f"spec_{name}.json", scratch / f"result_{name}.json",
                                            scratch / f"log_{name}.txt")
        result_path.unlink(missing_ok=True)
        write_json(spec_path, {**common, "part": name, "deadline": time.time() + timeout - 3,
                               "result": str(result_path)})
        logs.append(log_path)
        print(f"[gpu_suite] {name}: running (timeout {timeout:.0f} s)", flush=True)
        rc, secs = run_logged([sys.executable, str(HERE), "--child", name, "--spec", str(spec_path)], log_path,
                              timeout, env)
        if result_path.is_file():
            result = json.loads(result_path.read_text())
        elif rc is None:
            result = {"status": "timeout", "error": f"no result within {timeout:.0f} s (killed)"}
        else:
            result = {"status": "error", "error": f"the part's process exited {rc} without a result"}
        if result.get("status") in ("error", "timeout"):
            result["log_tail"] = read_tail(log_path, 3000)
        result["seconds"] = secs
        result["timeout_s"] = timeout
        report["parts"][name] = result
        report["statuses"][name] = result["status"]
        report["elapsed_s"] = time.time() - start
        save(report, args.out, logs)
        print(f"[gpu_suite] {name}: {result['status']} in {secs:.1f} s", flush=True)
    report["elapsed_s"] = time.time() - start
    report["finished"] = now_iso()
    save(report, args.out, logs)
    print((args.out / SUMMARY).read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
