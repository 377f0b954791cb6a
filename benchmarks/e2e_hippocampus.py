"""Hippocampus end to end at an equal wall-clock budget: medseg3d vs nnU-Net v2 (fold 0, 3d_fullres).

Both tools plan and preprocess the same MSD Task04 Hippocampus data, then train fold 0 of the same
split (medseg3d's deterministic split, handed to nnU-Net as its splits_final.json) **one after the
other, never at the same time**, each with the whole machine (`--threads` torch threads, one data
worker), 50 iterations and 5 validation iterations per epoch, under one budget rule and one clock
(`benchmarks/_fair.py`: medseg3d's `--time-budget` rule for both, the clock started at the first
training iteration; setup and the final validation timed separately). Each then predicts its
validation cases with sliding window + mirror TTA (its own final validation), and both sets are
scored by `medseg3d evaluate` against the same references. The report records each tool's own
seconds: planning, setup, training (the budget clock), final validation, and the load average
before and after each run (each training waits up to `--settle-s` for it to fall below 0.5, and
warns when it does not: a quiet 2-core machine reads below 0.5).

Run on a quiet machine (nothing else running: the figures are wall-clock), in an environment with
nnunetv2 (`pip install -e ".[bench]" torch==2.13.0`); a 60-minute budget takes about 2 h 20 min:

    python benchmarks/e2e_hippocampus.py --data ../shared/data/Task04_Hippocampus --out /tmp/e2e \
        --budget-min 60 --threads 2

Smoke test (minutes; a few cases' worth of budget, numbers meaningless):

    python benchmarks/e2e_hippocampus.py --data ../shared/data/Task04_Hippocampus --out /tmp/e2e_smoke \
        --budget-min 1 --iterations-per-epoch 2 --val-iterations 1 --no-final-validation --settle-s 0

Writes OUT/e2e_report.json and prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _fair import RULE, load_average, medseg3d_phases, run_logged, settle

NAME = "Dataset004_Hippocampus"
TOOLS = ("medseg3d", "nnunet")


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


def run_env(out: Path, threads: int) -> dict[str, str]:
    """Environment of both tools' runs: `threads` BLAS/OpenMP threads, nnU-Net's folders under
    `out/nnunet`, one augmentation worker, no compile; this interpreter's bin first on PATH (so
    `nnUNetv2_plan_and_preprocess` is found without an activated venv)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "nnUNet_raw": str(out / "nnunet" / "raw"), "nnUNet_preprocessed": str(out / "nnunet" / "preprocessed"),
            "nnUNet_results": str(out / "nnunet" / "results"), "nnUNet_n_proc_DA": "1", "nnUNet_compile": "f",
            "COLUMNS": "160", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-min", type=float, default=60.0, help="training budget of each tool (wall clock)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of each tool (one tool runs at a time: give it the whole machine)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--iterations-per-epoch", type=int, default=50)
    parser.add_argument("--val-iterations", type=int, default=5)
    parser.add_argument("--tools", default="medseg3d,nnunet", help="which tools to train, in this order")
    parser.add_argument("--medseg3d-args", default="",
                        help="extra `medseg3d train` options, e.g. \"--optimizer adamw --lr 0.001\"")
    parser.add_argument("--no-final-validation", action="store_true", help="smoke tests only: nothing to score")
    parser.add_argument("--settle-s", type=float, default=180.0,
                        help="wait up to this long before each training for the load average to fall below 0.5")
    parser.add_argument("--score-only", action="store_true",
                        help="skip planning and training; score the validations already in OUT")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.data = args.data.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = run_env(out, args.threads)
    work = out / "medseg3d"
    from medseg3d.data.splits import make_splits
    from medseg3d.io import load_dataset

    splits = make_splits([c.name for c in load_dataset(args.data).cases])
    report_path = out / "e2e_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if args.score_only:  # score the run that is there, with its own fold and medseg3d options
        args.fold = int(report.get("fold", args.fold))
        args.medseg3d_args = report.get("medseg3d_args", args.medseg3d_args)
    report.setdefault("fold", args.fold)
    if not args.score_only:  # the run's settings; --score-only keeps those of the run it scores
        report.update({"fold": args.fold, "budget_min": args.budget_min, "threads_each": args.threads, "rule": RULE,
                       "iterations_per_epoch": args.iterations_per_epoch, "val_iterations": args.val_iterations,
                       "medseg3d_args": args.medseg3d_args, "cpu_count": os.cpu_count(),
                       "run_order": "one tool at a time, in --tools order"})
        tools = [t for t in args.tools.split(",") if t]
        report.setdefault("plan", {}).update(plan_both(args, out, work, env, splits))
        for tool in tools:  # one at a time: each has the machine to itself
            report.pop(tool, None)  # a score of an earlier training of this tool no longer holds
            report[f"{tool}_train"] = train_one(tool, args, out, work, env)
            report_path.write_text(json.dumps(report, indent=2, default=str))
    if not args.no_final_validation:
        report.update(score(args, out, work, splits[args.fold]["val"]))
    report_path.write_text(json.dumps(report, indent=2, default=str))
    print_tables(report)


def plan_both(args: argparse.Namespace, out: Path, work: Path, env: dict[str, str], splits: list[dict]) -> dict:
    """Plan and preprocess with both tools, one after the other (skipped where already done); seconds each."""
    times: dict[str, float] = {}
    if not (work / "plans.json").is_file():
        run = run_logged([sys.executable, "-m", "medseg3d", "plan", str(args.data), "-o", str(work), "--configs",
                          "3d_fullres", "--gpu-memory", "8"], env, out / "medseg3d_plan.log")
        if run.returncode:
            sys.exit(f"medseg3d plan failed; see {out / 'medseg3d_plan.log'}")
        times["medseg3d_s"] = run.seconds
    pre = out / "nnunet" / "preprocessed" / NAME
    if not (pre / "nnUNetPlans_3d_fullres").is_dir():
        t0 = time.perf_counter()
        prepare_nnunet_raw(args.data, out / "nnunet" / "raw")
        times["nnunet_raw_copy_s"] = time.perf_counter() - t0
        run = run_logged(["nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "3d_fullres", "-np", "2"], env,
                         out / "nnunet_plan.log")
        if run.returncode:
            sys.exit(f"nnUNetv2_plan_and_preprocess failed; see {out / 'nnunet_plan.log'}")
        times["nnunet_s"] = run.seconds
    # one split for both: medseg3d's deterministic split, also as nnU-Net's splits_final.json
    (work / "splits.json").write_text(json.dumps(splits, indent=2))
    (pre / "splits_final.json").write_text(json.dumps(splits, indent=2))
    return times


def medseg3d_fold_dir(work: Path, args: argparse.Namespace) -> Path:
    from medseg3d.paths import fold_dir_of

    extra = shlex.split(args.medseg3d_args)
    arch = extra[extra.index("--arch") + 1] if "--arch" in extra else "unet"
    return fold_dir_of(work, "3d_fullres", arch, args.fold)


def nnunet_fold_dir(out: Path, fold: int) -> Path:
    return out / "nnunet" / "results" / NAME / "nnUNetTrainer__nnUNetPlans__3d_fullres" / f"fold_{fold}"


def train_one(tool: str, args: argparse.Namespace, out: Path, work: Path, env: dict[str, str]) -> dict:
    """Train one tool from scratch alone on the machine; its own seconds (setup, training, after)."""
    budget_s = args.budget_min * 60
    settled = settle(timeout_s=args.settle_s)  # let the previous run's load decay first
    if tool == "medseg3d":
        fold_dir = medseg3d_fold_dir(work, args)
        shutil.rmtree(fold_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "medseg3d", "train", str(work), "--config", "3d_fullres", "--fold",
               str(args.fold), "--time-budget", str(budget_s), "--num-workers", "1", "--iterations-per-epoch",
               str(args.iterations_per_epoch), "--val-iterations", str(args.val_iterations),
               *shlex.split(args.medseg3d_args)]
        if args.no_final_validation:
            cmd.append("--no-final-validation")
        run = run_logged(cmd, env, out / "medseg3d_train.log")
        if run.returncode:
            sys.exit(f"medseg3d train failed (exit {run.returncode}); see {out / 'medseg3d_train.log'}")
        times = medseg3d_phases(fold_dir, run.launch_wall, run.end_wall)
        times["iterations"] = int(times["epochs"]) * args.iterations_per_epoch
        log_lines = (fold_dir / "training_log.txt").read_text().splitlines()
        times["runtime"] = next((ln.split(": ", 1)[1] for ln in log_lines if ": fold " in ln), "")
    elif tool == "nnunet":
        shutil.rmtree(nnunet_fold_dir(out, args.fold), ignore_errors=True)
        report = out / "nnunet_train.json"
        launch = time.time()
        cmd = [sys.executable, str(HERE / "_nnunet_budget_train.py"), "--budget-s", str(budget_s), "--fold",
               str(args.fold), "--threads", str(args.threads), "--iterations-per-epoch",
               str(args.iterations_per_epoch), "--val-iterations", str(args.val_iterations), "--launch-wall",
               repr(launch), "--report", str(report)]
        if args.no_final_validation:
            cmd.append("--no-final-validation")
        run = run_logged(cmd, env, out / "nnunet_train.log")
        if run.returncode:
            sys.exit(f"nnU-Net training failed (exit {run.returncode}); see {out / 'nnunet_train.log'}")
        times = json.loads(report.read_text())
    else:
        sys.exit(f"unknown tool {tool!r} (choose from {', '.join(TOOLS)})")
    times.update({"process_s": run.seconds, "load_before": run.load_before, "load_after": run.load_after,
                  "load_settled": settled})
    if settled >= 0.5:
        print(f"warning: load average {settled:.2f} before {tool}'s training: the machine is not quiet, "
              "its seconds are not a clean figure", file=sys.stderr)
    return times


def score(args: argparse.Namespace, out: Path, work: Path, val_cases: list[str]) -> dict:
    """Score both fold validations with medseg3d's evaluator against the same references."""
    from medseg3d.evaluation.evaluate import evaluate_pairs, list_label_files, pair_with_references

    refs = {k: v for k, v in list_label_files(args.data / "labelsTr").items() if k in val_cases}
    scores: dict = {"val_cases": len(val_cases)}
    for tool, folder in (("medseg3d", medseg3d_fold_dir(work, args) / "validation"),
                         ("nnunet", nnunet_fold_dir(out, args.fold) / "validation")):
        if not folder.is_dir():
            continue
        preds = {k: v for k, v in list_label_files(folder).items() if k in val_cases}
        summary = evaluate_pairs(pair_with_references(preds, refs, str(args.data / "labelsTr")), [1, 2], workers=2)
        scores[tool] = json.loads(json.dumps({"per_class": summary["per_class_mean"], "mean": summary["mean"],
                                              "num_cases": summary["num_cases"]}, default=str))
    return scores


def print_tables(report: dict) -> None:
    """The accuracy table and each tool's own seconds, as markdown."""
    tools = [t for t in TOOLS if t in report]
    if tools:
        print(f"\n| fold {report['fold']}, {report.get('val_cases', '?')} validation cases | Dice 1 | Dice 2 | mean Dice | HD95 1 mm | HD95 2 mm |")
        print("|---|---|---|---|---|---|")
        for tool in tools:
            pc = report[tool]["per_class"]
            print(f"| {tool} | {pc['1']['dice']:.4f} | {pc['2']['dice']:.4f} | {report[tool]['mean']['dice']:.4f} | "
                  f"{pc['1']['hd95']:.3f} | {pc['2']['hd95']:.3f} |")
    print("\n| tool | plan s | setup s | training s (budget clock) | epochs x it | mean epoch s after the first "
          "| final validation + save s | load before / after |")
    print("|---|---|---|---|---|---|---|---|")
    for tool in TOOLS:
        t = report.get(f"{tool}_train")
        if not t:
            continue
        ep = t["epoch_times_s"]
        later = sum(ep[1:]) / len(ep[1:]) if len(ep) > 1 else float("nan")
        after = t.get("after_training_s", float("nan"))
        plan_s = report.get("plan", {}).get(f"{tool}_s", float("nan"))
        print(f"| {tool} | {plan_s:.0f} | {t['setup_s']:.1f} | {t['train_s']:.0f} | {t['epochs']} x "
              f"{report['iterations_per_epoch']} | {later:.1f} (first {ep[0]:.1f}) | {after:.0f} | "
              f"{t['load_before']:.2f} / {t['load_after']:.2f} |")
    print(f"\nbudget {report['budget_min']} min each, {report['threads_each']} threads, {report['rule']}; "
          f"load average now {load_average():.2f}")


if __name__ == "__main__":
    main()
