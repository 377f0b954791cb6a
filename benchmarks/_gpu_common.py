"""Constants and small process helpers of the GPU suite (`gpu_suite.py`), shared by its parts and `gpu_peer.py`."""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "gpu_suite.py"  # the suite's entry point (children, torchrun)
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
