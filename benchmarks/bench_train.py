"""Training throughput, medseg3d vs nnU-Net v2, same plan, same machine, repetitions in alternating order.

Both train 3d_fullres fold 0 of the same dataset with the same patch, batch and network size
(nnU-Net's plan is read and imposed on medseg3d with --patch-size/--batch-size/--features), one
augmentation worker each, `--threads` torch threads. Each runs 2 epochs of `--iterations`
iterations; epoch 1 is warm-up (worker start, oneDNN kernel creation), epoch 2 is measured:
iterations per second (data wait included), the fraction of that epoch spent waiting for a batch,
and the peak PSS/RSS of the whole process tree (trainer + workers; sampled every 0.2 s). One run at
a time; `--reps` repetitions alternate the order of the tools (`benchmarks/_fair.py`); the report
gives every run, the medians per tool, and medseg3d / nnU-Net ratios of the medians with the
per-repetition ratios beside them (`like_for_like`: both fp32 on the CPU; bf16 vs nnU-Net's fp32 is
a different precision).
medseg3d runs as: bf16 autocast (its default on CPUs with native bf16); fp32 as a real fp32 CPU run
does by default (channels-last network and batches, torch.compile; compile time falls in the warm-up
epoch); fp32 eager on contiguous memory (what it did before, and nnU-Net's way on the CPU).
nnU-Net is driven from Python (`nnUNetv2_train -tr` fails here, docs/benchmarks.md) in the bench venv.

    /work/venv-bench/bin/python benchmarks/bench_train.py --data /work/shared/data/Task04_Hippocampus \
        --iterations 8 --out /tmp/bench_train.json

On a GPU (each tool at its defaults there; nnU-Net compiles on CUDA by default; 12 workers each;
the report adds peak CUDA memory per trainer process):

    python benchmarks/bench_train.py --device cuda --workers 12 --nnunet-compile --iterations 50 \
        --tools nnunet,medseg3d_default,medseg3d_default_compile --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fair import alternating, median
from _procmem import tree_memory

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------- process-tree memory sampler
def run_measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Run `cmd`; wall time and peak tree RSS/PSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    peak = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            r, p = tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], r), max(peak[1], p)
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    th.join()
    if rc != 0:
        raise SystemExit(f"{cmd[:4]} failed with exit code {rc}")
    return {"wall_s": time.perf_counter() - t0, "peak_tree_rss": peak[0], "peak_tree_pss": peak[1]}


# ---------------------------------------------------------------- children
def child_nnunet(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(args.task_id), "3d_fullres", 0, device=torch.device(args.device))
    trainer.num_iterations_per_epoch = args.iterations
    trainer.num_val_iterations_per_epoch = 1
    trainer.num_epochs = 2
    trainer.on_train_start()
    epochs = []
    for _ in range(2):
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        wait, outs = 0.0, []
        t0 = time.perf_counter()
        for _ in range(args.iterations):
            t = time.perf_counter()
            batch = next(trainer.dataloader_train)
            wait += time.perf_counter() - t
            outs.append(trainer.train_step(batch))
        dt = time.perf_counter() - t0
        trainer.on_train_epoch_end(outs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            vals = [trainer.validation_step(next(trainer.dataloader_val))]
            trainer.on_validation_epoch_end(vals)
        trainer.on_epoch_end()
        epochs.append({"iterations_per_s": args.iterations / dt, "data_wait_fraction": wait / dt})
    trainer.on_train_end()
    Path(args.report).write_text(json.dumps({"epochs": epochs, "patch_size": list(trainer.configuration_manager.patch_size),
                                             "batch_size": trainer.configuration_manager.batch_size,
                                             **_cuda_peak(args.device)}))


def child_medseg3d(args: argparse.Namespace) -> None:
    import csv

    import torch

    torch.set_num_threads(args.threads)
    from medseg3d.logging_utils import setup_logging
    from medseg3d.training import TrainConfig, train_fold

    setup_logging()
    tc = TrainConfig(epochs=2, iterations_per_epoch=args.iterations, val_iterations=1, batch_size=args.batch_size,
                     patch_size=tuple(args.patch_size), features=args.features, num_workers=args.workers,
                     amp=_tri(args.amp), device=args.device, final_validation=False, compile=_tri(args.compile),
                     channels_last=_tri(args.channels_last))
    fd = train_fold(args.work, "3d_fullres", 0, tc)
    with open(fd / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    epochs = [{"iterations_per_s": float(r["iterations_per_s"]), "data_wait_fraction": float(r["data_wait_fraction"])}
              for r in rows]
    Path(args.report).write_text(json.dumps({"epochs": epochs, **_cuda_peak(args.device)}))


def _cuda_peak(device: str) -> dict:
    """Peak CUDA memory allocated by this process (bytes), where it ran on CUDA."""
    import torch

    return {"cuda_max_allocated": torch.cuda.max_memory_allocated()} if device.startswith("cuda") else {}


#: precision each tool trains in on a CPU (nnU-Net autocasts on CUDA only): memory and speed ratios
#: between different precisions are listed, never quoted as like-for-like
PRECISION = {"nnunet": "fp32", "medseg3d_bf16": "bf16", "medseg3d_fp32": "fp32", "medseg3d_fp32_eager": "fp32",
             "medseg3d_default": "default", "medseg3d_default_compile": "default"}
KEYS = ("iterations_per_s", "peak_tree_pss", "peak_tree_rss", "cuda_max_allocated")


def _value(run: dict, key: str) -> float | None:
    return run["measured"]["iterations_per_s"] if key == "iterations_per_s" else run.get(key)


def _medians(runs: list[dict]) -> dict[str, float]:
    """Median over the repetitions of each figure (each run is kept in all_runs)."""
    return {k: median([_value(r, k) for r in runs]) for k in KEYS if _value(runs[0], k) is not None}


def _ratios(ours: list[dict], theirs: list[dict], name: str) -> dict:
    """medseg3d / nnU-Net: of the medians, and per repetition (the two runs of the same repetition)."""
    mine, nn = _medians(ours), _medians(theirs)
    out: dict = {"like_for_like": PRECISION.get(name) == "fp32" and _on_cpu(ours)}
    for k in mine:
        if k in nn:
            out[k] = mine[k] / nn[k]
            out[f"{k}_per_rep"] = [_value(a, k) / _value(b, k) for a, b in zip(ours, theirs)]
    return out


def _on_cpu(runs: list[dict]) -> bool:
    """Runs on a CPU have no CUDA peak: there both tools' fp32 runs are like for like."""
    return "cuda_max_allocated" not in runs[0]


def _tri(v: int) -> bool | None:
    """-1 -> None (medseg3d's default), 0/1 -> False/True."""
    return None if v < 0 else bool(v)


# ---------------------------------------------------------------- parent
def nnunet_plan(pre: Path) -> dict:
    """nnU-Net's 3d_fullres patch (in medseg3d's nibabel axis order), batch and features."""
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    c = plans["configurations"]["3d_fullres"]
    back = plans["transpose_backward"]
    patch = [c["patch_size"][back[a]] for a in range(3)][::-1]  # see bench_plan.py: undo transpose + reader order
    return {"patch_size": patch, "batch_size": c["batch_size"],
            "features": c["architecture"]["arch_kwargs"]["features_per_stage"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/Task04_Hippocampus"))
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task-id", type=int, default=4)
    ap.add_argument("--nnunet-base", type=Path, help="reuse nnUNet_raw/_preprocessed under this folder")
    ap.add_argument("--reps", type=int, default=3, help="repetitions in alternating order; medians are reported")
    ap.add_argument("--tools", default="nnunet,medseg3d_bf16,medseg3d_fp32,medseg3d_fp32_eager",
                    help="comma-separated subset")
    ap.add_argument("--out", type=Path, default=Path("bench_train.json"))
    ap.add_argument("--child", choices=["nnunet", "medseg3d"])
    ap.add_argument("--report")
    ap.add_argument("--work")
    ap.add_argument("--patch-size", type=int, nargs=3)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--features", type=int, nargs="+")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: both tools train there")
    ap.add_argument("--workers", type=int, default=1, help="augmentation workers of each tool (12 is nnU-Net's "
                    "usual count on a GPU)")
    ap.add_argument("--nnunet-compile", action="store_true",
                    help="let nnU-Net torch.compile (its default on CUDA; it never compiles on the CPU)")
    ap.add_argument("--amp", type=int, default=1)
    ap.add_argument("--compile", type=int, default=-1)
    ap.add_argument("--channels-last", type=int, default=-1)
    args = ap.parse_args()
    if args.child == "nnunet":
        return child_nnunet(args)
    if args.child == "medseg3d":
        return child_medseg3d(args)

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    base = args.nnunet_base or tmp / "nnunet"
    env = dict(os.environ, nnUNet_n_proc_DA=str(args.workers), nnUNet_compile="t" if args.nnunet_compile else "f",
               OMP_NUM_THREADS=str(args.threads))
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[k] = str(base / k)
    bin_dir = Path(sys.executable).parent
    pre_root = base / "nnUNet_preprocessed"
    if not any(pre_root.glob(f"Dataset{args.task_id:03d}_*/nnUNetPlans_3d_fullres")):
        stage = tmp / f"Task{args.task_id:02d}_{args.data.name.split('_', 1)[-1]}"
        stage.mkdir(parents=True)
        for sub in ("imagesTr", "labelsTr"):
            (stage / sub).symlink_to((args.data / sub).resolve())
        (stage / "imagesTs").mkdir()
        shutil.copy(args.data / "dataset.json", stage / "dataset.json")
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            Path(env[k]).mkdir(parents=True, exist_ok=True)
        subprocess.run([str(bin_dir / "nnUNetv2_convert_MSD_dataset"), "-i", str(stage), "-overwrite_id",
                        str(args.task_id), "-np", "2"], env=env, check=True)
        subprocess.run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(args.task_id), "-c", "3d_fullres",
                        "-np", "2", "-npfp", "2", "--no_pbar"], env=env, check=True)
    ds = next(pre_root.glob(f"Dataset{args.task_id:03d}_*"))
    plan = nnunet_plan(ds)
    work = tmp / "medseg3d_work"
    subprocess.run([str(bin_dir / "medseg3d"), "plan", str(args.data), "-o", str(work), "--configs", "3d_fullres"],
                   env=env, check=True)
    common = [sys.executable, str(HERE), "--iterations", str(args.iterations), "--threads", str(args.threads),
              "--device", args.device, "--workers", str(args.workers)]
    tools = [
        ("nnunet", ["--child", "nnunet", "--task-id", str(args.task_id)]),
        ("medseg3d_bf16", ["--child", "medseg3d", "--amp", "1"]),
        # what `medseg3d train` does in fp32 on a CPU for a real run (>= 500 iterations): channels-last + compile
        ("medseg3d_fp32", ["--child", "medseg3d", "--amp", "0", "--compile", "1"]),
        # the same without compile and channels-last (the default before; short runs still skip compile)
        ("medseg3d_fp32_eager", ["--child", "medseg3d", "--amp", "0", "--compile", "0", "--channels-last", "0"]),
        # every setting at medseg3d's default for the device (on CUDA: bf16 or fp16 AMP, eager)
        ("medseg3d_default", ["--child", "medseg3d", "--amp", "-1"]),
        ("medseg3d_default_compile", ["--child", "medseg3d", "--amp", "-1", "--compile", "1"]),
    ]
    tools = [t for t in tools if t[0] in args.tools.split(",")]
    all_runs: dict[str, list[dict]] = {name: [] for name, _ in tools}
    for rep in range(args.reps):
        for name, extra in alternating(tools, rep):
            report = tmp / f"{name}.json"
            cmd = common + extra + ["--report", str(report)]
            if name.startswith("medseg3d"):
                shutil.rmtree(work / "results", ignore_errors=True)
                cmd += ["--work", str(work), "--patch-size", *map(str, plan["patch_size"]), "--batch-size",
                        str(plan["batch_size"]), "--features", *map(str, plan["features"])]
            m = run_measured(cmd, env)
            m.update(json.loads(report.read_text()))
            m["measured"] = m["epochs"][-1]
            m["load_average_after"] = float(Path("/proc/loadavg").read_text().split()[0])
            all_runs[name].append(m)
            print(f"rep {rep} {name}: {m['measured']['iterations_per_s']:.4f} it/s, data wait "
                  f"{100 * m['measured']['data_wait_fraction']:.1f}%, peak PSS {m['peak_tree_pss'] / 1e9:.2f} GB, "
                  f"load {m['load_average_after']}", file=sys.stderr)
    result = {"dataset": str(args.data), "iterations_per_epoch": args.iterations, "threads": args.threads,
              "plan": plan, "cpu_count": os.cpu_count(), "reps": args.reps,
              "order": "one run at a time, tool order alternating per repetition", "all_runs": all_runs,
              "medians": {name: _medians(rs) for name, rs in all_runs.items()},
              "ratios_vs_nnunet": {name: _ratios(rs, all_runs["nnunet"], name)
                                   for name, rs in all_runs.items() if name != "nnunet"}}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["ratios_vs_nnunet"], indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
