"""Plans for a time budget on real data: `medseg3d plan --time-budget B` vs nnU-Net's default trainer cut to B.

For each budget (minutes, `--budgets 15,30,60`), on Task04 Hippocampus fold 0 (medseg3d's
deterministic split, handed to nnU-Net as its splits_final.json):

1. `medseg3d plan DATA -o OUT/medseg3d_<B>m --configs 3d_fullres --time-budget <B>m` times candidate
   networks on this machine and stores the choice (width, optimiser, schedule, the reason) in
   plans.json; then `medseg3d train ... --fold 0 --num-workers 1` with nothing else: the plan's
   schedule, and the final validation (sliding window + mirror TTA) inside the budget.
2. nnU-Net v2's default trainer (`_nnunet_budget_train.py`: its own plan, network, SGD and poly
   schedule; 50 iterations per epoch) with the budget for its training alone, the epochs set by
   medseg3d's `--time-budget` rule and clock (`_fair.py`), then its final validation after the
   budget, timed apart. So nnU-Net gets the budget plus its validation time: the comparison leans
   its way.

The two trainings run one after the other, each alone on the machine (`--threads` torch threads,
one data worker; each waits up to `--settle-s` for the load average to fall below 0.5). Both fold-0
validations are scored by `medseg3d evaluate` against the same references before the next budget.

    python benchmarks/budget_hippocampus.py --data ../shared/data/Task04_Hippocampus --out /tmp/budget \\
        --budgets 15,30,60

takes about 3 x (2 B + 10) minutes. Writes OUT/budget_report.json after every step (a stopped run
keeps what it measured; rerunning skips budgets already scored unless `--redo`) and prints the
markdown table for docs/benchmarks.md. Needs nnunetv2 (`pip install -e ".[bench]"`).
Task04 is CC-BY-SA 4.0 (Medical Segmentation Decathlon).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _fair import RULE, load_average, medseg3d_phases, run_logged, settle  # noqa: E402
from e2e_hippocampus import NAME, prepare_nnunet_raw, run_env, score, train_one  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="MSD Task04_Hippocampus folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budgets", default="15,30,60", help="comma-separated minutes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tools", default="medseg3d,nnunet")
    ap.add_argument("--settle-s", type=float, default=180.0)
    ap.add_argument("--redo", action="store_true", help="retrain budgets already in the report")
    ap.add_argument("--train-args", default="",
                    help="extra `medseg3d train` arguments for an experiment against the plan's choice, e.g. "
                         "'--features 16,32,64,128 --batch-size 2' (the plan is still `plan --time-budget B`)")
    ap.add_argument("--tag", default="", help="suffix of the report key and work dir (an experiment's own row)")
    return ap.parse_args()


def nnunet_preprocess(args: argparse.Namespace, out: Path, env: dict[str, str], splits: list[dict]) -> float | None:
    """nnU-Net's plan and preprocessing (once for all budgets) with medseg3d's split; its seconds."""
    pre = out / "nnunet" / "preprocessed" / NAME
    seconds = None
    if not (pre / "nnUNetPlans_3d_fullres").is_dir():
        prepare_nnunet_raw(args.data, out / "nnunet" / "raw")
        run = run_logged(["nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "3d_fullres", "-np", "2"], env,
                         out / "nnunet_plan.log")
        if run.returncode:
            sys.exit(f"nnUNetv2_plan_and_preprocess failed; see {out / 'nnunet_plan.log'}")
        seconds = run.seconds
    (pre / "splits_final.json").write_text(json.dumps(splits, indent=2))
    return seconds


def medseg3d_budget(args: argparse.Namespace, minutes: float, out: Path, env: dict[str, str],
                    splits: list[dict]) -> tuple[Path, dict]:
    """Plan with `--time-budget` and train with the plan's schedule; the work dir and its row."""
    from medseg3d.paths import fold_dir_of
    from medseg3d.plans import Plans

    name = f"medseg3d_{minutes:g}m{args.tag}"
    work = out / name
    log = out / f"{name}_plan.log"
    settle(timeout_s=args.settle_s)  # the plan times training steps: on a quiet machine
    run = run_logged([sys.executable, "-m", "medseg3d", "plan", str(args.data), "-o", str(work), "--configs",
                      "3d_fullres", "--gpu-memory", "8", "--time-budget", f"{minutes:g}m"], env, log)
    if run.returncode:
        sys.exit(f"medseg3d plan failed; see {log}")
    (work / "splits.json").write_text(json.dumps(splits, indent=2))
    view = Plans.load(work).configuration("3d_fullres").for_architecture(None)  # the budget's width
    row: dict = {"plan_s": run.seconds, "choice": view.time_budget, "features": list(view.features),
                 "patch": list(view.patch_size), "batch": view.batch_size, "train_args": args.train_args}
    fold_dir = fold_dir_of(work, "3d_fullres", "unet", 0)
    if fold_dir.exists():
        import shutil

        shutil.rmtree(fold_dir)
    settled = settle(timeout_s=args.settle_s)
    log = out / f"{name}_train.log"
    extra = shlex.split(args.train_args)
    run = run_logged([sys.executable, "-m", "medseg3d", "train", str(work), "--config", "3d_fullres", "--fold", "0",
                      "--num-workers", "1", *extra], env, log)
    if run.returncode:
        sys.exit(f"medseg3d train failed (exit {run.returncode}); see {log}")
    if extra:  # what the run trained, from its checkpoint (the flags may override the plan's network and batch)
        import torch

        ck = torch.load(fold_dir / "checkpoint_final.pt", map_location="cpu", weights_only=True)
        row.update(features=list(ck["network_kwargs"]["features"]),
                   batch=int(ck["train_config"].get("batch_size") or row["batch"]))
    times = medseg3d_phases(fold_dir, run.launch_wall, run.end_wall)
    row.update(times, process_s=run.seconds, load_before=run.load_before, load_after=run.load_after,
               load_settled=settled, overrun_s=run.seconds - minutes * 60)
    return work, row


def print_table(report: dict) -> None:
    print("\n| budget | tool | network / schedule | epochs x it | whole run s | Dice 1 | Dice 2 | mean Dice | "
          "HD95 1 | HD95 2 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for minutes, r in report["budgets"].items():
        for tool in ("medseg3d", "nnunet"):
            t, s = r.get(f"{tool}_train"), r.get("scores", {}).get(tool)
            if not t or not s:
                continue
            pc = s["per_class"]
            if tool == "medseg3d":
                c = (t.get("choice") or {}).get("choice", {})
                what = (f"{'-'.join(map(str, t['features']))}, {c.get('optimizer', '?')}, "
                        f"patch {'x'.join(map(str, t['patch']))} x {t['batch']}")
                whole = t["process_s"]
            else:
                what = "nnU-Net default (SGD, poly), its plan"
                whole = t.get("process_s", float("nan"))
            its = (t.get("choice") or {}).get("choice", {}).get("iterations_per_epoch") if tool == "medseg3d" \
                else t.get("iterations_per_epoch", 50)
            print(f"| {minutes} min | {tool} | {what} | {t['epochs']} x {its} | {whole:.0f} | {pc['1']['dice']:.4f} | "
                  f"{pc['2']['dice']:.4f} | {s['mean']['dice']:.4f} | {pc['1']['hd95']:.2f} | {pc['2']['hd95']:.2f} |")


def main() -> None:
    args = parse_args()
    args.data = args.data.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = run_env(out, args.threads)
    from medseg3d.data.splits import make_splits
    from medseg3d.io import load_dataset

    splits = make_splits([c.name for c in load_dataset(args.data).cases])
    path = out / "budget_report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.setdefault("budgets", {})
    report.update(threads_each=args.threads, rule=RULE, cpu_count=os.cpu_count(), load_start=load_average(),
                  nnunet_budget="the budget for training; its final validation after it, timed apart")
    tools = [t for t in args.tools.split(",") if t]
    if "nnunet" in tools:
        report["nnunet_plan_s"] = nnunet_preprocess(args, out, env, splits) or report.get("nnunet_plan_s")
    for minutes in (float(b) for b in args.budgets.split(",") if b):
        key = f"{minutes:g}{args.tag}"
        if key in report["budgets"] and "scores" in report["budgets"][key] and not args.redo:
            continue
        row: dict = {}
        report["budgets"][key] = row
        work = out / f"medseg3d_{minutes:g}m{args.tag}"
        for tool in tools:
            t0 = time.time()
            if tool == "medseg3d":
                work, row["medseg3d_train"] = medseg3d_budget(args, minutes, out, env, splits)
            else:  # the e2e benchmark's nnU-Net run: same rule, same clock
                ns = argparse.Namespace(budget_min=minutes, settle_s=args.settle_s, fold=0, threads=args.threads,
                                        iterations_per_epoch=50, val_iterations=5, no_final_validation=False,
                                        medseg3d_args="")
                row[f"{tool}_train"] = train_one(tool, ns, out, work, env)
            row[f"{tool}_wall_s"] = time.time() - t0
            path.write_text(json.dumps(report, indent=1, default=str))
        ns = argparse.Namespace(data=args.data, fold=0, medseg3d_args="")
        row["scores"] = {k: v for k, v in score(ns, out, work, splits[0]["val"]).items() if k in tools or k == "val_cases"}
        path.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)


if __name__ == "__main__":
    main()
