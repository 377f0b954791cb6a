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
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import (  # noqa: F401 (gpu_peer.py reads some as gpu_suite.X)
    CAPS,
    DRY_CAPS,
    FINAL_RESERVE_S,
    GPUDATA,
    HERE,
    JUNIT,
    LOG,
    MINI,
    MINIMA,
    PARTS,
    REPORT,
    ROOT,
    SHARED_TASK04,
    SITE,
    SUMMARY,
    WHEEL_DIRS,
    child_env,
    now_iso,
    read_tail,
    run_logged,
    status_of,
    tail,
    write_json,
)
from _gpu_ddp import ddp_forced_main
from _gpu_parts import child_main


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
