"""The architecture table on real data: every registered architecture, Task04 Hippocampus fold 0, same recipe, same budget.

For each architecture, one after the other (never two trainings at once; each waits for the load
average to settle first): `medseg3d plan --arch NAME` (the patch and batch sized for that
architecture's memory; the cache is shared), `medseg3d train --arch NAME --fold 0 --time-budget S`
with one recipe for all (AdamW, lr 1e-3, features 16-32-64-128 per the plan's four stages, 50
iterations and 5 validation batches per epoch, one data worker, the CPU defaults otherwise), its
final validation (sliding window + mirror TTA), then `medseg3d evaluate` of fold 0's validation
cases against the references. Per architecture the report holds per-class Dice and HD95,
parameters, seconds per training iteration (median epoch time / iterations), epochs done, peak
RSS of the training process tree (sampled every 0.5 s) and each phase's seconds.

Run on a quiet machine (the budget is wall-clock); 15 minutes each for 8 architectures takes about
2 h 30 min on 2 cores:

    python benchmarks/zoo_hippocampus.py --data ../shared/data/Task04_Hippocampus --out /tmp/zoo --budget-min 15

On a GPU (`--device cuda`), 5 minutes each. Smoke test (numbers meaningless):

    python benchmarks/zoo_hippocampus.py --data ../shared/data/Task04_Hippocampus --out /tmp/zoo_smoke \
        --budget-min 0.5 --archs fcn,unet --settle-s 0

Writes OUT/zoo_report.json (updated after each architecture, so a stopped run keeps what it
measured; `--archs` reruns some) and prints the markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _fair import load_average, settle
from _procmem import tree_memory

RECIPE = ["--optimizer", "adamw", "--lr", "1e-3", "--iterations-per-epoch", "50", "--val-iterations", "5",
          "--num-workers", "1"]
FEATURES = [16, 32, 64, 128, 256, 320, 320]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="MSD Task04_Hippocampus folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-min", type=float, default=15.0, help="training minutes per architecture")
    ap.add_argument("--archs", default="", help="comma-separated (default: every registered architecture)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--settle-s", type=float, default=240.0, help="wait up to this long for load < 0.5")
    return ap.parse_args()


def run_sampled(cmd: list[str], log: Path) -> dict:
    """Run `cmd` with output to `log`, sampling its process tree's RSS every 0.5 s; seconds and peak."""
    print("$", " ".join(cmd), flush=True)
    peak = [0]
    with open(log, "w") as fh:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_memory(proc.pid)[0])
                time.sleep(0.5)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        th.join()
    return {"returncode": rc, "seconds": time.time() - t0, "peak_rss_mb": peak[0] / 1e6}


def one(arch: str, args: argparse.Namespace, work: Path) -> dict:
    from medseg3d.paths import fold_dir_of
    from medseg3d.plans import Plans

    out = args.out
    med = [sys.executable, "-m", "medseg3d"]
    plan = run_sampled([*med, "plan", str(args.data), "-o", str(work), "--configs", "3d_fullres", "--arch", arch,
                        "--gpu-memory", "8"], out / f"{arch}_plan.log")
    if plan["returncode"]:
        return {"error": f"plan failed, see {out / f'{arch}_plan.log'}"}
    view = Plans.load(work).configuration("3d_fullres").for_architecture(arch)
    features = ",".join(str(f) for f in FEATURES[: len(view.features)])
    fold_dir = fold_dir_of(work, "3d_fullres", arch, args.fold)
    if fold_dir.exists():
        import shutil

        shutil.rmtree(fold_dir)
    settled = settle(timeout_s=args.settle_s)
    train = run_sampled([*med, "train", str(work), "--config", "3d_fullres", "--fold", str(args.fold), "--arch", arch,
                         "--time-budget", str(args.budget_min * 60), "--features", features, "--device", args.device,
                         *RECIPE], out / f"{arch}_train.log")
    row: dict = {"arch": arch, "patch": list(view.patch_size), "batch": view.batch_size, "features": features,
                 "load_settled": settled, "train_process_s": train["seconds"], "peak_rss_mb": train["peak_rss_mb"]}
    if train["returncode"]:
        row["error"] = f"train failed (exit {train['returncode']}), see {out / f'{arch}_train.log'}"
        return row
    import csv

    import torch

    with open(fold_dir / "metrics.csv") as fh:  # a budget-cut last epoch has fewer iterations (its own column)
        rows = list(csv.DictReader(fh))
    per_it = [float(r["epoch_time_s"]) / int(r.get("iterations") or 50) for r in rows]
    ckpt = torch.load(fold_dir / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    row.update(epochs=len(rows), iterations=sum(int(r.get("iterations") or 50) for r in rows),
               s_per_iteration=statistics.median(per_it),
               parameters=int(sum(v.numel() for v in ckpt["model"].values())),
               options=ckpt["network_kwargs"].get("options", {}))
    report = out / f"{arch}_evaluation.json"
    ev = run_sampled([*med, "evaluate", str(fold_dir / "validation"), str(args.data / "labelsTr"), "--labels", "1,2",
                      "--json", str(report)], out / f"{arch}_evaluate.log")
    if ev["returncode"]:
        row["error"] = f"evaluate failed, see {out / f'{arch}_evaluate.log'}"
        return row
    summary = json.loads(report.read_text())
    per = summary["per_class_mean"]
    row.update(val_cases=summary["num_cases"], dice={c: per[c]["dice"] for c in per}, hd95={c: per[c]["hd95"] for c in per},
               mean_dice=summary["mean"]["dice"])
    return row


def print_table(report: dict) -> None:
    print("\n| architecture | Dice 1 | Dice 2 | mean Dice | HD95 1 mm | HD95 2 mm | parameters | s/iteration | "
          "epochs | peak RSS MB | patch x batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arch, r in report["rows"].items():
        if "error" in r:
            print(f"| `{arch}` | {r['error']} |||||||||")
            continue
        d, h = r["dice"], r["hd95"]
        print(f"| `{arch}` | {d['1']:.3f} | {d['2']:.3f} | {r['mean_dice']:.3f} | {h['1']:.2f} | {h['2']:.2f} | "
              f"{r['parameters']:,} | {r['s_per_iteration']:.2f} | {r['epochs']} | {r['peak_rss_mb']:.0f} | "
              f"{'x'.join(map(str, r['patch']))} x {r['batch']} |")


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from medseg3d.networks import list_architectures

    archs = [a.strip() for a in args.archs.split(",") if a.strip()] or list_architectures()
    work = args.out / "work"
    path = args.out / "zoo_report.json"
    report = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    report.update(budget_min=args.budget_min, device=args.device, fold=args.fold, recipe=RECIPE,
                  load_start=load_average())
    for arch in archs:
        t0 = time.time()
        report["rows"][arch] = one(arch, args, work) | {"wall_s": time.time() - t0}
        path.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)


if __name__ == "__main__":
    main()
