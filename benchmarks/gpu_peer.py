"""`benchmarks/gpu_suite.py --peer`: medseg3d vs nnU-Net v2 side by side on the GPU, in one device call.

Needs nnunetv2 and its stack, carried as wheels in two calls while the machine stays warm (a call
carries 64 MiB, SimpleITK's wheel alone is 53 MB): call 1 carries `.whl` (nibabel, nnunetv2 and its
small dependencies) and `.gpudata` and installs them (the suite itself, or `--install-only`); this
call carries `.whl_sitk` (SimpleITK) and finds call 1's /tmp/site and .gpudata still there. See
docs/benchmarks.md, "GPU suite (how to run)"; benchmarks/gpu_wheels.sh makes the three folders.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --peer --out $OUT

Parts (each a process with a timeout from the same budget as the suite, `--budget-s`, 450 s):
  predict  `medseg3d predict` against nnU-Net's `nnUNetPredictor`, both on CUDA (precision: each tool's
           CUDA default, fp16 autocast for both), the same randomly initialised topology (medseg3d's
           hippocampus plan; `bench_predict.setup_hippocampus`), the shipped held-out cases, with and
           without mirror TTA, each tool in a fresh process after one untimed warm-up case: seconds per
           case, peak CUDA memory, nnU-Net / medseg3d.
  train    `benchmarks/bench_train.py --device cuda` (nnU-Net's plan imposed on both, 2 epochs, the
           second measured: iterations/s, data wait, peak CUDA memory; nnU-Net compiles, as it does on
           CUDA by default; medseg3d at its CUDA defaults) with nnU-Net's usual 12 workers each.
bench_train.py calls the console scripts next to its Python (`medseg3d`, `nnUNetv2_convert_MSD_dataset`,
`nnUNetv2_plan_and_preprocess`), which a `pip --target` install does not put there: it runs under a
Python of a small venv made here whose bin holds those scripts and whose site-packages reach this
interpreter's packages and /tmp/site.

Options after --peer: --iterations N (50), --reps N (1), --tools LIST (nnunet,medseg3d_default),
--workers N (12), --peer-parts predict,train. With --dry-run: the CPU, 2 iterations, 1 worker, the
shipped hippocampus_mini.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_suite as gs

HERE = Path(__file__).resolve()
REPORT = "gpu_peer_report.json"
SUMMARY = "gpu_peer_summary.txt"
LOG = "gpu_peer_log.txt"
NEEDED = ("nibabel", "SimpleITK", "nnunetv2", "acvl_utils", "dynamic_network_architectures", "batchgenerators",
          "batchgeneratorsv2", "blosc2", "cc3d")
PEER_PARTS = ("predict", "train")
MINIMA = {"predict": 40, "train": 120}
CAPS = {"predict": 130, "train": 600}
RUN_LINE = re.compile(r"rep (\d+) (\S+): ([\d.]+) it/s, data wait ([\d.]+)%, peak PSS ([\d.]+) GB")


# ---------------------------------------------------------------------------- environment
def check_imports(env: dict[str, str]) -> dict[str, str]:
    """Version (or the import error) of each package the comparison needs, in a child with `env`."""
    code = ("import importlib, json\nout = {}\n"
            f"for m in {list(NEEDED)!r}:\n"
            "    try:\n        mod = importlib.import_module(m)\n"
            "        out[m] = str(getattr(mod, '__version__', 'ok'))\n"
            "    except Exception as e:\n        out[m] = 'MISSING: %s: %s' % (type(e).__name__, e)\n"
            "print(json.dumps(out))")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=gs.ROOT, check=False)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": gs.tail(res.stdout + res.stderr, 1500)}


def make_peer_python(root: Path, env: dict[str, str]) -> Path:
    """A venv whose bin holds `medseg3d` and the nnUNetv2_* scripts, and whose site-packages reach this
    interpreter's packages (torch, ...) and PYTHONPATH's (/tmp/site, the repository). Returns its python."""
    venv = root / "peer_venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    import site

    dirs = [d for d in [*site.getsitepackages(), site.getusersitepackages()] if Path(d).is_dir()]
    Path(purelib, "_gpu_peer.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
    scripts = {"medseg3d": ("medseg3d.cli", "main")}
    code = ("import json; from importlib.metadata import entry_points\n"
            "print(json.dumps({e.name: e.value for e in entry_points(group='console_scripts') "
            "if e.name.startswith('nnUNetv2_')}))")
    res = subprocess.run([str(py), "-c", code], env=env, capture_output=True, text=True, cwd=gs.ROOT, check=False)
    try:
        for name, value in json.loads(res.stdout.strip().splitlines()[-1]).items():
            mod, _, attr = value.partition(":")
            scripts[name] = (mod.strip(), attr.strip())
    except (IndexError, ValueError):
        print(f"no nnUNetv2 entry points found: {gs.tail(res.stderr, 800)}", flush=True)
    for name, (mod, attr) in scripts.items():
        path = venv / "bin" / name
        # the __main__ guard as pip writes it: nnU-Net's spawned workers import this file again
        path.write_text(f"#!{py}\nimport sys\nfrom {mod} import {attr.split('.')[0]}\n\n"
                        f"if __name__ == '__main__':\n    sys.exit({attr}())\n")
        path.chmod(0o755)
    return py


# ---------------------------------------------------------------------------- children (predict)
def _peak(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def child_setup(spec: dict) -> dict:
    import bench_predict

    wd, med_in, nn_in, info = bench_predict.setup_hippocampus(Path(spec["bench"]), spec["cases"])
    return {"work_dir": str(wd), "medseg_input": str(med_in), "nnunet_input": str(nn_in), **info}


def child_medseg(spec: dict) -> dict:
    import torch

    from medseg3d.inference.folder import predict_folder

    torch.set_num_threads(spec["threads"])
    dev = spec["device"]
    files = sorted(Path(spec["input"]).glob("*.nii.gz"))
    kw = {"config": "3d_fullres", "step": 0.5, "use_mirroring": spec["tta"], "device": dev, "overwrite": True,
          "precision": spec["precision"]}
    t0 = time.perf_counter()
    predict_folder(spec["work_dir"], files[0], Path(spec["output"]) / "warmup", **kw)
    warm = time.perf_counter() - t0
    _reset(dev)
    t0 = time.perf_counter()
    s = predict_folder(spec["work_dir"], spec["input"], spec["output"], **kw)
    total = time.perf_counter() - t0
    per = sorted(s.seconds.values())
    return {"cases": len(s.predicted), "total_s": total, "per_case_s": per, "s_per_case": total / max(1, len(per)),
            "warmup_s": warm, "peak_cuda_gb": _peak(dev)}


def child_nnunet(spec: dict) -> dict:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.set_num_threads(spec["threads"])
    dev = spec["device"]
    plans = json.loads(Path(spec["nnunet_plans"]).read_text())
    dataset_json = json.loads(Path(spec["nnunet_dataset_json"]).read_text())
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, len(dataset_json["channel_names"]),
                                 len(dataset_json["labels"]), allow_init=True, deep_supervision=False)
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=spec["tta"],
                           perform_everything_on_device=dev == "cuda", device=torch.device(dev), allow_tqdm=False)
    pred.manual_initialization(net, pm, cm, [net.state_dict()], dataset_json, "nnUNetTrainer", (0, 1, 2))
    inputs = sorted(Path(spec["input"]).glob("*_0000.nii*"))
    out = Path(spec["output"])
    out.mkdir(parents=True, exist_ok=True)

    def one(p: Path, dst: Path) -> float:
        t = time.perf_counter()
        pred.predict_from_files_sequential([[str(p)]], [str(dst / p.name.split("_0000")[0])], save_probabilities=False,
                                           overwrite=True)
        return time.perf_counter() - t

    (out / "warmup").mkdir(exist_ok=True)
    warm = one(inputs[0], out / "warmup")
    _reset(dev)
    t0 = time.perf_counter()
    per = [one(p, out) for p in inputs]
    total = time.perf_counter() - t0
    return {"cases": len(per), "total_s": total, "per_case_s": sorted(per), "s_per_case": total / max(1, len(per)),
            "warmup_s": warm, "peak_cuda_gb": _peak(dev)}


CHILDREN = {"setup": child_setup, "medseg": child_medseg, "nnunet": child_nnunet}


def child_main(kind: str, spec_path: Path, result_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    gs.write_json(result_path, CHILDREN[kind](spec))
    return 0


# ---------------------------------------------------------------------------- parts (parent side)
def run_child(py: Path, kind: str, spec: dict, scratch: Path, tag: str, timeout: float, env: dict,
              log: Path) -> dict:
    spec_path, res_path = scratch / f"peer_spec_{tag}.json", scratch / f"peer_res_{tag}.json"
    res_path.unlink(missing_ok=True)
    gs.write_json(spec_path, spec)
    rc, secs = gs.run_logged([str(py), str(HERE), "--peer-child", kind, str(spec_path), str(res_path)], log,
                             timeout, env)
    if not res_path.is_file():
        raise RuntimeError(f"{tag}: {'timed out' if rc is None else f'exit {rc}'} without a result; see the log")
    out = json.loads(res_path.read_text())
    out["process_s"] = secs
    return out


def part_predict(ctx: dict, timeout: float) -> dict:
    t_end = time.time() + timeout
    py, scratch, env, log, dev = ctx["py"], ctx["scratch"], ctx["env"], ctx["log"], ctx["device"]
    bench = scratch / "bench_predict"
    cases = 2 if ctx["dry_run"] else 4  # the shipped held-out cases (the dry run: the first two)
    setup = run_child(py, "setup", {"bench": str(bench), "cases": cases}, scratch, "setup", t_end - time.time(), env,
                      log)
    runs: dict[str, dict] = {}
    precision = "auto"  # medseg3d on CUDA: fp16 autocast, as nnU-Net's predictor
    for tta in (True, False):
        t = "tta" if tta else "notta"
        base = {"threads": ctx["threads"], "tta": tta, "device": dev}
        order = [("nnunet", {**base, "input": setup["nnunet_input"], "output": str(bench / f"o_nn_{t}"),
                             "nnunet_plans": str(bench / "nnunet_plans.json"),
                             "nnunet_dataset_json": str(bench / "nnunet_dataset.json")}),
                 ("medseg", {**base, "precision": precision, "work_dir": setup["work_dir"],
                             "input": setup["medseg_input"], "output": str(bench / f"o_ms_{t}")})]
        if not tta:
            order.reverse()  # alternate which tool runs first
        for kind, spec in order:
            runs[f"{'nnunet' if kind == 'nnunet' else 'medseg3d'}_{t}"] = run_child(
                py, kind, spec, scratch, f"{kind}_{t}", max(10.0, t_end - time.time()), env, log)
    ratios = {}
    for t in ("tta", "notta"):
        nn, ms = runs.get(f"nnunet_{t}"), runs.get(f"medseg3d_{t}")
        if nn and ms:
            ratios[t] = {"speed_nnunet_over_medseg3d": nn["s_per_case"] / ms["s_per_case"],
                         "peak_cuda_nnunet_over_medseg3d": (nn["peak_cuda_gb"] / ms["peak_cuda_gb"]
                                                            if nn.get("peak_cuda_gb") and ms.get("peak_cuda_gb")
                                                            else None)}
    checks = {f"{k}_all_cases": v["cases"] == len(setup["cases"]) for k, v in runs.items()}
    return {"status": gs.status_of(checks), "checks": checks, "setup": setup, "precision": "fp16 autocast (both)"
            if dev == "cuda" else "medseg3d auto / nnU-Net fp32 (CPU)", "runs": runs, "ratios": ratios}


def part_train(ctx: dict, timeout: float) -> dict:
    py, scratch, env, log, dev, opts = ctx["py"], ctx["scratch"], ctx["env"], ctx["log"], ctx["device"], ctx["opts"]
    out_json = scratch / "bench_train.json"
    out_json.unlink(missing_ok=True)
    cmd = [str(py), str(gs.ROOT / "benchmarks" / "bench_train.py"), "--data", str(ctx["data"]), "--device", dev,
           "--workers", str(opts.workers), "--iterations", str(opts.iterations), "--reps", str(opts.reps),
           "--tools", opts.tools, "--threads", str(ctx["threads"]), "--out", str(out_json)]
    if dev == "cuda":
        cmd.append("--nnunet-compile")  # nnU-Net's default on CUDA
    start = log.stat().st_size if log.is_file() else 0
    rc, secs = gs.run_logged(cmd, log, timeout, env)
    text = log.read_text(errors="replace")[start:]
    lines = [{"rep": int(m[1]), "tool": m[2], "iterations_per_s": float(m[3]), "data_wait_fraction": float(m[4]) / 100,
              "peak_tree_pss_gb": float(m[5])} for m in RUN_LINE.finditer(text)]
    result: dict[str, Any] = {"command": " ".join(cmd), "exit_code": rc, "seconds": secs, "runs_seen": lines}
    if out_json.is_file():
        bench = json.loads(out_json.read_text())
        result["bench_train"] = {k: bench.get(k) for k in ("plan", "iterations_per_epoch", "reps", "medians",
                                                           "ratios_vs_nnunet", "cpu_count", "order")}
    checks = {"bench_train_exit_0": rc == 0, "report_written": out_json.is_file(),
              "every_tool_ran": {r["tool"] for r in lines} >= set(opts.tools.split(","))}
    result.update(status=gs.status_of(checks), checks=checks)
    if rc != 0:
        result["log_tail"] = gs.tail(text, 3000)
    return result


PART_FUNCS = {"predict": part_predict, "train": part_train}


def summary_lines(report: dict) -> list[str]:
    env = report.get("environment", {})
    lines = [(f"medseg3d vs nnU-Net v2 ({report['mode']}), {report['started']}, {report.get('elapsed_s', 0):.0f} s; "
              f"{env.get('gpu', 'no GPU')}, torch {env.get('torch')}")]
    if report.get("error"):
        lines.append(f"  error: {report['error']}")
    for name, p in report.get("parts", {}).items():
        lines.append(f"  {name:8s} {p.get('status')} {p.get('seconds', 0):.0f} s {p.get('error', '')[:300]}")
        if name == "predict" and p.get("runs"):
            for k, r in p["runs"].items():
                pk = r.get("peak_cuda_gb")
                lines.append(f"           {k:16s} {r['s_per_case']:.3f} s/case" + (f", peak {pk:.2f} GB" if pk else ""))
            for t, r in p.get("ratios", {}).items():
                lines.append(f"           {t}: nnU-Net / medseg3d seconds per case {r['speed_nnunet_over_medseg3d']:.2f}")
        if name == "train":
            for r in p.get("runs_seen", []):
                lines.append(f"           rep {r['rep']} {r['tool']:26s} {r['iterations_per_s']:.3f} it/s, data wait "
                             f"{100 * r['data_wait_fraction']:.1f}%")
            for tool, r in ((p.get("bench_train") or {}).get("ratios_vs_nnunet") or {}).items():
                lines.append(f"           {tool}: it/s ratio to nnU-Net {r.get('iterations_per_s', float('nan')):.2f}"
                             + (f", peak CUDA ratio {r['cuda_max_allocated']:.2f}" if r.get("cuda_max_allocated") else ""))
    return lines


def save(report: dict, out: Path, log: Path) -> None:
    gs.write_json(out / REPORT, report)
    (out / SUMMARY).write_text("\n".join(summary_lines(report)) + "\n")
    if log.is_file():
        (out / LOG).write_text(gs.read_tail(log, 4_000_000))


def main(args: argparse.Namespace, rest: list[str], install: dict, site: Path | None, deadline: float) -> int:
    ap = argparse.ArgumentParser(prog="gpu_suite.py --peer")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--tools", default="nnunet,medseg3d_default")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--peer-parts", default=",".join(PEER_PARTS))
    opts = ap.parse_args(rest)
    start = time.time()
    scratch = args.work_dir or Path("/tmp/gpu_peer_work")
    scratch.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = scratch / "peer_log.txt"
    log.write_text("")
    if site is None and args.site.is_dir() and any(args.site.iterdir()):
        site = args.site  # installed by the call before this one (the machine was still warm)
    env = gs.child_env(site)
    environ = gs.probe_environment(env, args.dry_run)
    device = "cpu" if args.dry_run or not environ.get("cuda_available") else "cuda"
    data = gs.find_data(args.data, args.dry_run)
    opts.iterations = opts.iterations or (2 if args.dry_run else 50)
    opts.workers = opts.workers or (1 if args.dry_run else 12)
    threads = opts.threads or (2 if args.dry_run else 4)
    report: dict[str, Any] = {"suite": "medseg3d vs nnU-Net v2 on the GPU (issue 17), gpu_suite.py --peer",
                              "mode": "dry-run" if args.dry_run else "device", "device": device,
                              "started": gs.now_iso(), "budget_s": args.budget_s, "environment": environ,
                              "install": install, "site": str(site) if site else None, "data": str(data),
                              "options": vars(opts), "parts": {}}
    packages = check_imports(env)
    report["packages"] = packages
    missing = [m for m, v in packages.items() if str(v).startswith("MISSING") or m == "error"]
    problem = None
    if missing:
        problem = (f"not importable: {', '.join(missing)}. The peer call needs call 1 (carry .whl and .gpudata, "
                   "`gpu_suite.py --install-only` or the suite) right before it, while the machine is warm, and "
                   "carries .whl_sitk itself (benchmarks/gpu_wheels.sh makes both)")
    elif not (data / "dataset.json").is_file():
        problem = (f"no dataset at {data}: .gpudata was not carried by the call before this one, or the machine "
                   "was not warm any more (a fresh one starts bare)")
    if problem:
        report["error"] = problem
        report["elapsed_s"] = time.time() - start
        save(report, args.out, log)
        print("\n".join(summary_lines(report)), flush=True)
        return 0
    py = make_peer_python(scratch, env)
    ctx = {"py": py, "scratch": scratch, "env": env, "log": log, "device": device, "data": data, "opts": opts,
           "threads": threads, "dry_run": args.dry_run}
    selected = [p for p in opts.peer_parts.split(",") if p]
    for i, name in enumerate(selected):
        remaining = deadline - time.time() - gs.FINAL_RESERVE_S
        later = sum(MINIMA[p] for p in selected[i + 1:])
        timeout = min(CAPS[name], max(remaining - later, min(remaining, MINIMA[name])))
        if remaining < MINIMA[name] / 2:
            report["parts"][name] = {"status": "skipped", "reason": f"time budget: {remaining:.0f} s left"}
            continue
        print(f"[gpu_peer] {name}: running (timeout {timeout:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            result = PART_FUNCS[name](ctx, timeout)
        except Exception as exc:  # noqa: BLE001 (recorded; the next part still runs)
            result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:3000],
                      "log_tail": gs.read_tail(log, 3000)}
        result["seconds"] = time.perf_counter() - t0
        result["timeout_s"] = timeout
        report["parts"][name] = result
        report["elapsed_s"] = time.time() - start
        save(report, args.out, log)
        print(f"[gpu_peer] {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
    report["elapsed_s"] = time.time() - start
    report["finished"] = gs.now_iso()
    save(report, args.out, log)
    print("\n".join(summary_lines(report)), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peer-child"]:
        sys.exit(child_main(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])))
    sys.exit(gs.main(["--peer", *sys.argv[1:]]))
