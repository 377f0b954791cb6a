"""Hippocampus end to end at an equal wall-clock budget: medseg3d vs nnU-Net v2 (fold 0, 3d_fullres).

Both tools plan and preprocess the same MSD Task04 Hippocampus data, train fold 0 of the same split
(medseg3d's deterministic split, handed to nnU-Net as its splits_final.json) for the same wall-clock
budget, run side by side at the same time with the same number of threads and one data worker each,
then predict their validation cases with sliding window + mirror TTA. Both sets of predictions are
scored by `medseg3d evaluate` against the same references.

Run in the bench environment (`pip install -e .[bench]`):

    python benchmarks/e2e_hippocampus.py --data ../shared/data/Task04_Hippocampus --out /tmp/e2e \
        --budget-min 20 --threads 1

Writes OUT/e2e_report.json and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def prepare_nnunet_raw(data: Path, raw_root: Path, dataset_id: int = 4) -> str:
    """Write the MSD set as nnU-Net v2 raw (`CASE_0000.nii.gz`, v2 dataset.json); returns the name."""
    from medseg3d.io import load_dataset

    spec = load_dataset(data)
    name = f"Dataset{dataset_id:03d}_Hippocampus"
    target = raw_root / name
    (target / "imagesTr").mkdir(parents=True, exist_ok=True)
    (target / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case in spec.cases:
        img, lab = target / "imagesTr" / f"{case.name}_0000.nii.gz", target / "labelsTr" / f"{case.name}.nii.gz"
        if not img.exists():
            shutil.copyfile(case.images[0], img)
        if not lab.exists():
            shutil.copyfile(case.label, lab)
    meta = {"channel_names": {str(i): n for i, n in enumerate(spec.channel_names)},
            "labels": {n: i for i, n in spec.labels.items()}, "numTraining": len(spec.cases), "file_ending": ".nii.gz"}
    (target / "dataset.json").write_text(json.dumps(meta, indent=2))
    return name


def timed(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    print("$", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-min", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per tool (they run at the same time)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--score-only", action="store_true",
                        help="skip planning and training; score the validations already in OUT")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget_s = args.budget_min * 60
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "nnUNet_raw": str(out / "nnunet" / "raw"), "nnUNet_preprocessed": str(out / "nnunet" / "preprocessed"),
           "nnUNet_results": str(out / "nnunet" / "results"), "nnUNet_n_proc_DA": "1", "nnUNet_compile": "f",
           "COLUMNS": "160"}

    work = out / "medseg3d"
    name = "Dataset004_Hippocampus"
    from medseg3d.data.splits import make_splits
    from medseg3d.io import load_dataset

    splits = make_splits([c.name for c in load_dataset(args.data).cases])
    val_cases = splits[args.fold]["val"]
    if args.score_only:
        wall = json.loads((out / "e2e_report.json").read_text())["wall_s_both"] if (out / "e2e_report.json").is_file() \
            else float("nan")
    else:
        wall = train_both(args, out, work, env, splits, budget_s)
    score(args, out, work, name, val_cases, wall)


def train_both(args: argparse.Namespace, out: Path, work: Path, env: dict[str, str], splits: list[dict],
               budget_s: float) -> float:
    """Plan, preprocess and train both tools side by side; returns the wall time of the training."""
    # 1. plan + preprocess with both tools (sequentially; timed separately in bench_plan.py)
    subprocess.run([sys.executable, "-m", "medseg3d", "plan", str(args.data), "-o", str(work), "--configs", "3d_fullres",
                    "--gpu-memory", "8"], env=env, check=True)
    name = prepare_nnunet_raw(args.data, out / "nnunet" / "raw")
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "3d_fullres", "-np", "2"], env=env, check=True,
                   stdout=subprocess.DEVNULL)

    # 2. one split for both: medseg3d's deterministic split, also as nnU-Net's splits_final.json
    (work / "splits.json").write_text(json.dumps(splits, indent=2))
    (out / "nnunet" / "preprocessed" / name / "splits_final.json").write_text(json.dumps(splits, indent=2))

    # 3. train both at the same time, same budget, same threads, one data worker each
    start = time.time()
    ours = timed([sys.executable, "-m", "medseg3d", "train", str(work), "--config", "3d_fullres", "--fold", str(args.fold),
                  "--time-budget", str(budget_s), "--num-workers", "1", "--iterations-per-epoch", "50",
                  "--val-iterations", "5"], env, out / "medseg3d_train.log")
    theirs = timed([sys.executable, str(HERE / "_nnunet_budget_train.py"), "--budget-s", str(budget_s), "--fold",
                    str(args.fold), "--threads", str(args.threads), "--report", str(out / "nnunet_train.json")],
                   env, out / "nnunet_train.log")
    codes = (ours.wait(), theirs.wait())
    if any(codes):
        sys.exit(f"training failed (exit codes medseg3d {codes[0]}, nnU-Net {codes[1]}); see the logs in {out}")
    return time.time() - start


def score(args: argparse.Namespace, out: Path, work: Path, name: str, val_cases: list[str], wall: float) -> None:
    """Score both fold validations with `medseg3d evaluate`; write OUT/e2e_report.json, print the table."""
    # 4. score both fold-0 validations with medseg3d evaluate against the same references
    from medseg3d.evaluation.evaluate import evaluate_pairs, pair_with_references, list_label_files

    refs = {k: v for k, v in list_label_files(args.data / "labelsTr").items() if k in val_cases}
    ours_dir = work / "results" / "3d_fullres" / "unet" / f"fold_{args.fold}" / "validation"
    theirs_dir = out / "nnunet" / "results" / name / "nnUNetTrainer__nnUNetPlans__3d_fullres" / f"fold_{args.fold}" / "validation"
    report = {"budget_min": args.budget_min, "threads_each": args.threads, "wall_s_both": wall, "val_cases": len(val_cases)}
    for tool, folder in (("medseg3d", ours_dir), ("nnunet", theirs_dir)):
        preds = {k: v for k, v in list_label_files(folder).items() if k in val_cases}
        summary = evaluate_pairs(pair_with_references(preds, refs, str(args.data / "labelsTr")), [1, 2], workers=2)
        report[tool] = {"per_class": summary["per_class_mean"], "mean": summary["mean"], "num_cases": summary["num_cases"]}
    report["nnunet_train"] = json.loads((out / "nnunet_train.json").read_text())
    metrics = (work / "results" / "3d_fullres" / "unet" / f"fold_{args.fold}" / "metrics.csv").read_text().splitlines()
    report["medseg3d_train"] = {"epochs": len(metrics) - 1, "last_row": metrics[-1], "header": metrics[0]}
    (out / "e2e_report.json").write_text(json.dumps(report, indent=2, default=str))
    report = json.loads((out / "e2e_report.json").read_text())  # class keys as strings, as in the file

    print(f"\n| tool | Dice 1 (Anterior) | Dice 2 (Posterior) | mean Dice | HD95 1 mm | HD95 2 mm |")
    print("|---|---|---|---|---|---|")
    for tool in ("medseg3d", "nnunet"):
        pc = report[tool]["per_class"]
        print(f"| {tool} | {pc['1']['dice']:.4f} | {pc['2']['dice']:.4f} | {report[tool]['mean']['dice']:.4f} | "
              f"{pc['1']['hd95']:.3f} | {pc['2']['hd95']:.3f} |")
    print(json.dumps({k: report[k] for k in ("nnunet_train", "medseg3d_train")}, indent=2))


if __name__ == "__main__":
    main()
