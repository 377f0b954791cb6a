"""`medseg3d plan` vs `nnUNetv2_plan_and_preprocess -c 3d_fullres`, side by side in one run.

    python benchmarks/bench_plan.py [--data /work/shared/data/Task04_Hippocampus] [--aniso] [--np 2] [--reps 2]
    python benchmarks/bench_plan.py --calibrate [--calib-python /work/venv-bench/bin/python]

Both tools get the same data, the same number of processes, an 8 GB budget and dataset
verification. Measured per run: wall time, peak RSS of the whole process tree (sums of RSS and of PSS
over the process and its children, sampled from /proc every 50 ms; PSS counts pages shared by forked
workers once) and the disk footprint of what each
writes (medseg3d WORK_DIR; nnU-Net's nnUNet_preprocessed/DatasetXXX). nnU-Net's MSD conversion
(`nnUNetv2_convert_MSD_dataset`, a step medseg3d does not need) is run once beforehand and
reported separately. `--aniso` also runs both on a copy with the last axis at 3 mm
(benchmarks/make_anisotropic.py) and compares the planned 3d_fullres. Prints JSON and markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fair import alternating, median
from _procmem import tree_memory

ROOT = Path(__file__).resolve().parents[1]


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `cmd`; wall seconds, peak tree RSS and PSS (bytes), peak single-process RSS so far (bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = peak_pss = 0
    while proc.poll() is None:
        rss, pss = tree_memory(proc.pid)
        peak, peak_pss = max(peak, rss), max(peak_pss, pss)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    import resource

    single = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"wall_s": wall, "peak_tree_rss": peak, "peak_tree_pss": peak_pss, "max_single_rss_so_far": single}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def nnunet_env(base: Path) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (base / k).mkdir(parents=True, exist_ok=True)
        env[k] = str(base / k)
    env["nnUNet_n_proc_DA"] = "1"
    return env


def convert_msd(data: Path, base: Path, bench_bin: Path, task_id: int, np_: int, env: dict) -> float:
    """Stage the MSD folder (its converter wants imagesTs) and convert it; returns seconds."""
    stage = base / f"Task{task_id:02d}_{data.name.split('_', 1)[-1]}"
    stage.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        (stage / sub).symlink_to((data / sub).resolve())
    (stage / "imagesTs").mkdir()
    shutil.copy(data / "dataset.json", stage / "dataset.json")
    t0 = time.perf_counter()
    subprocess.run([str(bench_bin / "nnUNetv2_convert_MSD_dataset"), "-i", str(stage),
                    "-overwrite_id", str(task_id), "-np", str(np_)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def nnunet_3d_fullres(pre: Path) -> dict:
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    c = plans["configurations"]["3d_fullres"]
    back = plans["transpose_backward"]
    arch = c["architecture"]["arch_kwargs"]
    strides = arch["strides"]
    pools_t = [sum(1 for s in strides if s[a] == 2) for a in range(3)]
    # nnU-Net lists axes transposed (coarsest first) in its readers' order, which is the reverse of
    # nibabel's (SimpleITKIO, and NibabelIO which transposes to match it): undo both
    def ours(values):
        nn_order = [values[back[a]] for a in range(3)]
        return nn_order[::-1]

    return {
        "spacing": ours(c["spacing"]),
        "patch_size": ours(c["patch_size"]),
        "pools_per_axis": ours(pools_t),
        "batch_size": c["batch_size"],
        "features": arch["features_per_stage"],
        "transpose_forward": plans["transpose_forward"],
    }


def ours_3d_fullres(work: Path) -> dict:
    plans = json.loads((work / "plans.json").read_text())
    c = plans["configurations"]["3d_fullres"]
    return {
        "spacing": c["spacing"], "patch_size": c["patch_size"],
        "pools_per_axis": [sum(1 for s in c["strides"] if s[a] == 2) for a in range(3)],
        "batch_size": c["batch_size"], "features": c["features"],
    }


def bench_dataset(data: Path, label: str, task_id: int, args: argparse.Namespace, tmp: Path) -> dict:
    bench_bin = Path(args.bench_venv) / "bin"
    ours_bin = Path(args.ours_bin)
    base = tmp / label
    env = nnunet_env(base)
    conv_s = convert_msd(data, base, bench_bin, task_id, args.np, env)
    runs: dict[str, list[dict]] = {"medseg3d": [], "nnunet": []}
    for rep in range(args.reps):
        for tool in alternating(["medseg3d", "nnunet"], rep):  # one at a time, the order alternating
            if tool == "medseg3d":
                work = base / f"medseg3d_work_{rep}"
                cmd = [str(ours_bin), "plan", str(data), "-o", str(work), "--workers", str(args.np),
                       "--gpu-memory", "8", "--configs", "3d_fullres"]
                m = measure(cmd)
                m["disk_bytes"] = du(work)
                m["cache_bytes"] = du(work / "preprocessed")
                m["plan"] = ours_3d_fullres(work)
            else:
                pre = Path(env["nnUNet_preprocessed"])
                shutil.rmtree(pre, ignore_errors=True)
                pre.mkdir()
                cmd = [str(bench_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(task_id), "-c", "3d_fullres",
                       "-np", str(args.np), "-npfp", str(args.np), "--verify_dataset_integrity", "--no_pbar",
                       "-gpu_memory_target", "8"]
                m = measure(cmd, env)
                ds = next(pre.iterdir())
                m["disk_bytes"] = du(ds)
                m["cache_bytes"] = du(ds / "nnUNetPlans_3d_fullres")
                m["plan"] = nnunet_3d_fullres(ds)
            runs[tool].append(m)
            print(f"[{label}] rep {rep} {tool}: {m['wall_s']:.1f} s, peak RSS {m['peak_tree_rss'] / 1e6:.0f} MB, "
                  f"disk {m['disk_bytes'] / 1e6:.1f} MB", file=sys.stderr)

    def best(tool: str, key: str) -> float:
        return min(r[key] for r in runs[tool])

    def med(tool: str, key: str) -> float:
        return median([r[key] for r in runs[tool]])

    return {
        "dataset": str(data), "np": args.np, "reps": args.reps, "nnunet_msd_conversion_s": conv_s,
        "runs": runs,
        "ratios_nnunet_over_medseg3d": {
            "wall_time": best("nnunet", "wall_s") / best("medseg3d", "wall_s"),
            "peak_tree_rss": best("nnunet", "peak_tree_rss") / best("medseg3d", "peak_tree_rss"),
            "peak_tree_pss": best("nnunet", "peak_tree_pss") / best("medseg3d", "peak_tree_pss"),
            "disk_total": runs["nnunet"][0]["disk_bytes"] / runs["medseg3d"][0]["disk_bytes"],
            "disk_cache": runs["nnunet"][0]["cache_bytes"] / runs["medseg3d"][0]["cache_bytes"],
        },
        # the medians of each tool's runs (the best-of figures above pair each tool's best run)
        "median_ratios_nnunet_over_medseg3d": {k: med("nnunet", k) / med("medseg3d", k)
                                               for k in ("wall_s", "peak_tree_rss", "peak_tree_pss")},
        "plan_medseg3d": runs["medseg3d"][0]["plan"], "plan_nnunet": runs["nnunet"][0]["plan"],
    }


def markdown(results: list[dict]) -> str:
    lines = ["| data | medseg3d wall | nnU-Net wall | speed-up | peak PSS (ours / nnU-Net) | PSS ratio "
             "| peak RSS sum (ours / nnU-Net) | disk (ours / nnU-Net) | disk ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ours, nn = r["runs"]["medseg3d"], r["runs"]["nnunet"]
        q = r["ratios_nnunet_over_medseg3d"]
        lines.append(
            f"| {Path(r['dataset']).name} | {min(x['wall_s'] for x in ours):.1f} s | "
            f"{min(x['wall_s'] for x in nn):.1f} s | {q['wall_time']:.1f}x | "
            f"{min(x['peak_tree_pss'] for x in ours) / 1e6:.0f} / {min(x['peak_tree_pss'] for x in nn) / 1e6:.0f} MB | "
            f"{q['peak_tree_pss']:.1f}x | "
            f"{min(x['peak_tree_rss'] for x in ours) / 1e6:.0f} / {min(x['peak_tree_rss'] for x in nn) / 1e6:.0f} MB | "
            f"{ours[0]['disk_bytes'] / 1e6:.1f} / {nn[0]['disk_bytes'] / 1e6:.1f} MB | "
            f"{q['disk_total']:.2f}x |")
    lines.append("")
    lines.append("| data | tool | spacing (mm) | patch | pools per axis | batch |")
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        for tool in ("medseg3d", "nnunet"):
            p = r[f"plan_{tool}"]
            lines.append(f"| {Path(r['dataset']).name} | {tool} | {p['spacing']} | {p['patch_size']} | "
                         f"{p['pools_per_axis']} | {p['batch_size']} |")
    return "\n".join(lines)


# ---- CPU calibration of the analytic memory model ---------------------------------------------

_CHILD = r"""
import json, resource, sys, torch
a = json.loads(sys.argv[1])
torch.set_num_threads(2)
try:
    from medseg3d.networks import build_network
    net = build_network("unet", in_channels=a["in_ch"], num_classes=a["ncls"], dims=len(a["patch"]),
                        strides=a["strides"], kernel_sizes=a["kernels"], features=a["features"], deep_supervision=True)
    which = "medseg3d unet"
except ImportError:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    d = len(a["patch"])
    net = PlainConvUNet(a["in_ch"], len(a["features"]), a["features"], getattr(torch.nn, f"Conv{d}d"), a["kernels"],
                        a["strides"], 2, a["ncls"], 1, conv_bias=True, norm_op=getattr(torch.nn, f"InstanceNorm{d}d"),
                        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                        nonlin_kwargs={"inplace": True}, deep_supervision=True)
    which = "nnU-Net PlainConvUNet"
net.train()
x = torch.randn(a["batch"], a["in_ch"], *a["patch"])
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
base = rss()
with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a["bf16"]):
    out = net(x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    loss = sum(o.float().mean() for o in outs)
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"step_bytes": peak - base, "net": which}))
"""


def calibrate(args: argparse.Namespace) -> list[dict]:
    """Measure CPU peak memory of one forward+backward (fp32 and bf16 autocast) against the analytic count."""
    sys.path.insert(0, str(ROOT))
    from medseg3d.plans.memory import BYTES_PER_ELEMENT, activation_elements
    from medseg3d.plans.rules import features_per_stage, pool_and_conv_props

    shapes = [[32, 32, 32], [40, 56, 40], [48, 64, 48], [64, 64, 64], [128, 128], [256, 256]]
    rows = []
    for patch in shapes:
        _, strides, kernels, patch, _ = pool_and_conv_props([1.0] * len(patch), patch)
        feats = features_per_stage(len(strides), len(patch))
        for bf16 in (False, True):
            batch = 2
            spec = {"patch": patch, "strides": strides, "kernels": kernels, "features": feats, "batch": batch,
                    "in_ch": 1, "ncls": 3, "bf16": bf16}
            out = subprocess.run([args.calib_python, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-2000:])
            got = json.loads(out.stdout.strip().splitlines()[-1])
            elems = activation_elements(patch, strides, feats, 3) * batch
            rows.append({"patch": patch, "batch": batch, "bf16": bf16, "elements": elems, "net": got["net"],
                         "measured_bytes": got["step_bytes"], "bytes_per_element": got["step_bytes"] / elems,
                         "model_cuda_amp_bytes": elems * BYTES_PER_ELEMENT[len(patch)]})
            print(f"calibrate {patch} bf16={bf16}: {got['step_bytes'] / 1e6:.0f} MB, "
                  f"{got['step_bytes'] / elems:.2f} B/element", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrate", action="store_true", help="only measure CPU memory vs the analytic model")
    ap.add_argument("--calib-python", default=str(ROOT / ".venv" / "bin" / "python"),
                    help="interpreter for calibration (needs medseg3d.networks or dynamic_network_architectures)")
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/Task04_Hippocampus"))
    ap.add_argument("--aniso", action="store_true", help="also bench a 3 mm through-plane copy")
    ap.add_argument("--np", type=int, default=2, help="processes for both tools")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--bench-venv", default="/work/venv-bench", help="venv with nnunetv2")
    ap.add_argument("--ours-bin", default=str(ROOT / ".venv" / "bin" / "medseg3d"))
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    if args.calibrate:
        rows = calibrate(args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        print("| patch | batch | precision | activation elements | measured peak step memory | bytes/element |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {'x'.join(map(str, r['patch']))} | {r['batch']} | {'bf16 autocast' if r['bf16'] else 'fp32'} | "
                  f"{r['elements'] / 1e6:.1f} M | {r['measured_bytes'] / 1e6:.0f} MB | {r['bytes_per_element']:.2f} |")
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_plan_"))
    try:
        results = [bench_dataset(args.data, "iso", 4, args, tmp)]
        if args.aniso:
            aniso = tmp / "Task04_aniso3mm"
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_anisotropic.py"), str(args.data),
                            str(aniso)], check=True, stdout=subprocess.DEVNULL)
            results.append(bench_dataset(aniso, "aniso", 5, args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = json.dumps(results, indent=1)
    if args.json:
        args.json.write_text(out)
    print(out)
    print(markdown(results))


if __name__ == "__main__":
    main()
