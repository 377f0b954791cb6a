"""Model selection on real data: Task04 Hippocampus fold 0, 2d vs 3d_fullres vs their ensemble, by `find-best`.

One WORK_DIR planned with `medseg3d plan --configs 2d,3d_fullres`; each configuration's U-Net
trained on fold 0 with the same recipe and the same wall-clock budget as the architecture table
(`zoo_hippocampus.RECIPE`: AdamW, lr 1e-3, 50 iterations per epoch, features 16-32-64-... per the
plan's stages), one after the other (each waits for the load average to settle), with
`--save-probabilities` so the final validation (sliding window + mirror TTA) keeps `CASE.npz`;
then `medseg3d find-best --folds 0` scores the two single models and their ensemble (averaged
probabilities) on fold 0's 42 validation cases and picks postprocessing on the winner.

    python benchmarks/select_hippocampus.py --data ../shared/data/Task04_Hippocampus --out /tmp/select \\
        --budget-min 10

Writes OUT/select_report.json (training seconds, epochs, s/iteration per configuration, and the
find-best ranking with per-class Dice) and prints the markdown table for docs/benchmarks.md.
Task04 is CC-BY-SA 4.0 (Medical Segmentation Decathlon).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _fair import load_average, settle  # noqa: E402
from zoo_hippocampus import FEATURES, RECIPE, run_sampled  # noqa: E402

CONFIGS = ("2d", "3d_fullres")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="MSD Task04_Hippocampus folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-min", type=float, default=10.0, help="training minutes per configuration")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--settle-s", type=float, default=120.0, help="wait up to this long for load < 0.5")
    return ap.parse_args()


def train_one(config: str, args: argparse.Namespace, work: Path) -> dict:
    """Train `config`'s U-Net on fold 0 (validation with probabilities); its timing row."""
    from medseg3d.paths import fold_dir_of
    from medseg3d.plans import Plans

    view = Plans.load(work).configuration(config)
    features = ",".join(str(f) for f in FEATURES[: len(view.features)])
    fold_dir = fold_dir_of(work, config, "unet", 0)
    if fold_dir.exists():
        shutil.rmtree(fold_dir)
    settled = settle(timeout_s=args.settle_s)
    med = [sys.executable, "-m", "medseg3d"]
    train = run_sampled([*med, "train", str(work), "--config", config, "--fold", "0", "--time-budget",
                         str(args.budget_min * 60), "--features", features, "--device", args.device,
                         "--save-probabilities", *RECIPE], args.out / f"{config}_train.log")
    row = {"patch": list(view.patch_size), "batch": view.batch_size, "features": features, "load_settled": settled,
           "train_process_s": train["seconds"], "peak_rss_mb": train["peak_rss_mb"]}
    if train["returncode"]:
        return row | {"error": f"train failed (exit {train['returncode']}), see {args.out / f'{config}_train.log'}"}
    with open(fold_dir / "metrics.csv") as fh:  # a budget-cut last epoch has fewer iterations (its own column)
        rows = list(csv.DictReader(fh))
    per_it = [float(r["epoch_time_s"]) / int(r.get("iterations") or 50) for r in rows]
    return row | {"epochs": len(rows), "iterations": sum(int(r.get("iterations") or 50) for r in rows),
                  "s_per_iteration": statistics.median(per_it)}


def print_table(report: dict) -> None:
    print("\n| candidate | kind | Dice anterior | Dice posterior | mean Dice |")
    print("|---|---|---|---|---|")
    for c in report["selection"]["candidates"]:
        d = c["per_class_dice"]
        print(f"| {c['name']} | {c['kind']} | {d['1']:.4f} | {d['2']:.4f} | {c['mean_dice']:.4f} |")
    w = report["selection"]["winner"]
    print(f"\nwinner: {w['name']}, postprocessing {w.get('postprocessing')}")
    for config, r in report["training"].items():
        print(f"{config}: {r.get('epochs')} epochs, {r.get('s_per_iteration', float('nan')):.2f} s/iteration, "
              f"patch {r['patch']} x {r['batch']}, features {r['features']}")


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    med = [sys.executable, "-m", "medseg3d"]
    report: dict = {"budget_min": args.budget_min, "device": args.device, "fold": 0, "recipe": RECIPE,
                    "load_start": load_average(), "training": {}}
    plan = run_sampled([*med, "plan", str(args.data), "-o", str(work), "--configs", ",".join(CONFIGS),
                        "--gpu-memory", "8"], args.out / "plan.log")
    if plan["returncode"]:
        raise SystemExit(f"plan failed, see {args.out / 'plan.log'}")
    path = args.out / "select_report.json"
    for config in CONFIGS:
        t0 = time.time()
        report["training"][config] = train_one(config, args, work) | {"wall_s": time.time() - t0}
        path.write_text(json.dumps(report, indent=1, default=str))
    fb = run_sampled([*med, "find-best", str(work), "--folds", "0", "--configs", ",".join(CONFIGS)],
                     args.out / "find_best.log")
    report["find_best_s"] = fb["seconds"]
    if fb["returncode"]:
        raise SystemExit(f"find-best failed, see {args.out / 'find_best.log'}")
    report["selection"] = json.loads((work / "selection.json").read_text())
    for c in report["selection"]["candidates"]:
        c.pop("case_dice", None)  # per-case scores stay in WORK_DIR/selection.json
    path.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)


if __name__ == "__main__":
    main()
