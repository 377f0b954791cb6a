"""Train nnU-Net v2's default trainer (fold F of 3d_fullres) under a wall-clock budget, from Python.

Run by `benchmarks/e2e_hippocampus.py` (and issue 20's `budget_hippocampus.py`) with
nnUNet_raw/_preprocessed/_results set. `nnUNetv2_train -tr <variant>` cannot be used here (its
trainer lookup fails with the CPU torch wheel), so this drives `nnUNetTrainer`'s own methods in the
order of its `run_training` (on_train_start, then per epoch on_epoch_start, on_train_epoch_start,
train steps, on_train_epoch_end, validation steps, on_epoch_end; then on_train_end). nnU-Net itself
has no early stopping: `run_training` runs `num_epochs` (1000) epochs and the EMA pseudo-Dice only
chooses checkpoint_best. Here the epoch count, and with it the poly learning-rate decay
(`PolyLRScheduler.max_steps`), is set by the budget rule and clock of `benchmarks/_fair.py`, the
same as medseg3d's `--time-budget`: the clock starts after `on_train_start` (setup: network,
dataset unpacking, data loaders and their first batch), right before the first training iteration.
The final full validation (sliding window + mirror TTA of the final weights, written to
fold_F/validation) runs after the budget, timed separately, as medseg3d's does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fair import BudgetClock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="4")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--iterations-per-epoch", type=int, default=50)
    parser.add_argument("--val-iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--launch-wall", type=float, default=None,
                        help="time.time() when the parent launched this process (setup starts there)")
    parser.add_argument("--no-final-validation", action="store_true")
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    clock = BudgetClock(args.budget_s, requested_epochs=1000, launch_wall=args.launch_wall or time.time())
    torch.set_num_threads(args.threads)
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(args.dataset, "3d_fullres", args.fold, device=torch.device("cpu"))
    trainer.num_iterations_per_epoch = args.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = args.val_iterations
    trainer.num_epochs = clock.planned_epochs
    trainer.on_train_start()
    trainer.lr_scheduler.max_steps = trainer.num_epochs
    clock.start()
    while trainer.current_epoch < trainer.num_epochs:
        trainer.on_epoch_start()
        t0 = time.perf_counter()
        trainer.on_train_epoch_start()
        outs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
        trainer.on_train_epoch_end(outs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            vals = [trainer.validation_step(next(trainer.dataloader_val)) for _ in range(trainer.num_val_iterations_per_epoch)]
            trainer.on_validation_epoch_end(vals)
        epoch_s = time.perf_counter() - t0
        trainer.on_epoch_end()  # logging, checkpoint_best, progress plot; current_epoch += 1
        total = clock.end_epoch(epoch_s)
        trainer.num_epochs = total
        trainer.lr_scheduler.max_steps = max(total, 1)
    clock.stop()
    trainer.on_train_end()
    t0 = time.perf_counter()
    if not args.no_final_validation:
        trainer.perform_actual_validation(False)
    times = clock.report()
    report = {**times, "tool": "nnU-Net v2 nnUNetTrainer (default), fp32 on the CPU",
              "iterations": int(times["epochs"]) * trainer.num_iterations_per_epoch,
              "iterations_per_epoch": trainer.num_iterations_per_epoch, "val_iterations": args.val_iterations,
              "final_validation_s": time.perf_counter() - t0,
              "after_training_s": time.time() - float(times["train_end_wall"]), "threads": args.threads}
    Path(args.report).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
