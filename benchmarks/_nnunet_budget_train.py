"""Train nnU-Net v2 (fold F of 3d_fullres) under a wall-clock budget, from Python.

Run by `benchmarks/e2e_hippocampus.py` in the bench environment with nnUNet_raw/_preprocessed/_results
set. `nnUNetv2_train -tr <variant>` cannot be used here (design.md: its trainer lookup fails with the
CPU torch wheel), so this drives nnUNetTrainer's own epoch methods. The schedule is sized to the
budget the same way medseg3d's `--time-budget` does it: the first epoch is timed, then the number of
epochs (and so the poly learning-rate decay) is set so training ends within the budget. The final
full validation (sliding window + mirror TTA, written to fold_F/validation) runs after the budget.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="4")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--iterations-per-epoch", type=int, default=50)
    parser.add_argument("--val-iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(args.dataset, "3d_fullres", args.fold, device=torch.device("cpu"))
    trainer.num_iterations_per_epoch = args.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = args.val_iterations
    trainer.num_epochs = 1000
    start = time.perf_counter()
    trainer.on_train_start()
    trainer.lr_scheduler.max_steps = trainer.num_epochs
    epoch_times = []
    epoch = 0
    while True:
        t0 = time.perf_counter()
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
        trainer.on_train_epoch_end(outs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            vals = [trainer.validation_step(next(trainer.dataloader_val)) for _ in range(trainer.num_val_iterations_per_epoch)]
            trainer.on_validation_epoch_end(vals)
        trainer.on_epoch_end()
        epoch_times.append(time.perf_counter() - t0)
        epoch += 1
        if epoch == 1:  # size the schedule to the budget from the first epoch's time
            total = max(1, int((args.budget_s - (time.perf_counter() - start)) / epoch_times[0]) + 1)
            trainer.num_epochs = total
            trainer.lr_scheduler.max_steps = total
        elapsed = time.perf_counter() - start
        if epoch >= trainer.num_epochs or elapsed + sum(epoch_times) / len(epoch_times) > args.budget_s:
            break
    train_s = time.perf_counter() - start
    trainer.on_train_end()
    t0 = time.perf_counter()
    trainer.perform_actual_validation(False)
    report = {"epochs": epoch, "iterations": epoch * trainer.num_iterations_per_epoch, "train_seconds": train_s,
              "validation_seconds": time.perf_counter() - t0, "threads": args.threads}
    with open(args.report, "w") as fh:
        json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
