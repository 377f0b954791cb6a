"""`medseg3d train`: train one fold of a plan configuration (resumable; DDP under torchrun)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from medseg3d.errors import ConfigError


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r} must be integers separated by commas, e.g. 40,56,40") from exc


def _fold(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"--fold {text!r} must be a fold number (0-4) or 'all'") from exc


#: `train` options a plan's time budget decides, by TrainConfig field (a flag given on the command line wins).
_BUDGET_FLAGS = {"optimizer": "optimizer", "lr": "lr", "epochs": "epochs", "iterations_per_epoch": "iterations",
                 "val_iterations": "val_iterations"}


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was given on the command line (not its default). Compared by the enum's
    name: typer >= 0.29 vendors click as `typer._click`, so `click` itself may not be installed."""
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) == "COMMANDLINE"


def _plan_budget(ctx: typer.Context, work_dir: Path, config: str, arch: str | None, time_budget: str | None,
                 final_validation: bool, device: str, features: list[int] | None = None,
                 batch_size: int | None = None) -> dict:
    """TrainConfig values of this run's time budget: `time_budget_s` alone on a plan without a
    `time_budget` entry, else the plan's schedule (medseg3d.training.budget) for the flags not given."""
    from medseg3d.plans import Plans
    from medseg3d.plans.budget import parse_duration

    seconds = parse_duration(time_budget) if time_budget is not None else None
    plan_file = Path(work_dir) / "plans.json"
    if not plan_file.is_file():
        return {"time_budget_s": seconds}  # train_fold names the missing plan
    view = Plans.load(plan_file).configuration(config)
    view = view.for_architecture(arch)
    if not view.time_budget:
        return {"time_budget_s": seconds}
    import torch

    from medseg3d.training.budget import budget_train_values

    given = [f for f, p in _BUDGET_FLAGS.items() if _from_command_line(ctx, p)]
    kind = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
    values = budget_train_values(view, seconds, given, final_validation=final_validation, device_type=kind,
                                 features=features, batch_size=batch_size)
    return values or {"time_budget_s": seconds}


def register(app: typer.Typer) -> None:
    """Add the `train` command to `app`."""

    @app.command("train")
    def train(
        ctx: typer.Context,
        work_dir: Path = typer.Argument(..., help="WORK_DIR written by `medseg3d plan` (plans.json + preprocessed/)."),
        config: str = typer.Option("3d_fullres", "--config", "-c", help="Plan configuration: 2d, 3d_fullres, ..."),
        fold: str = typer.Option("0", "--fold", "-f", help="Fold 0-4 of splits.json, or 'all' (every case trains)."),
        arch: str | None = typer.Option(None, "--arch", help="Architecture (default: the plan's, unet); "
                                        "`medseg3d plan --arch NAME` sizes patch and batch for it."),
        arch_option: list[str] = typer.Option([], "--arch-option",
                                              help="key=value option of the architecture, repeatable (e.g. "
                                                   "output_stride=8); docs/networks.md lists each one's options."),
        aux_loss: str | None = typer.Option(None, "--aux-loss",
                                            help="Auxiliary loss on the features before the head: hfd (HDNet's "
                                                 "feature-distance loss) or none. Default: the architecture's "
                                                 "(hdnet: hfd, the others none)."),
        aux_weight: float | None = typer.Option(None, "--aux-weight", help="Weight of --aux-loss (default 0.1)."),
        epochs: int = typer.Option(1000, "--epochs", help="Number of epochs."),
        iterations: int = typer.Option(250, "--iterations-per-epoch", help="Training iterations per epoch."),
        val_iterations: int = typer.Option(50, "--val-iterations", help="Validation patches batches per epoch."),
        batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (default: the plan's)."),
        patch_size: str | None = typer.Option(None, "--patch-size", help="Patch override, e.g. 40,56,40."),
        features: str | None = typer.Option(None, "--features", help="Features per stage override, e.g. 16,32,64,128."),
        lr: float = typer.Option(0.01, "--lr", help="Initial learning rate (poly decay, exponent 0.9)."),
        optimizer: str = typer.Option("sgd", "--optimizer",
                                      help="sgd (nnU-Net's Nesterov SGD) or adamw (converges in fewer iterations; "
                                           "use with --lr 1e-3 or so)."),
        momentum: float = typer.Option(0.99, "--momentum", help="SGD Nesterov momentum (not used by adamw)."),
        weight_decay: float = typer.Option(3e-5, "--weight-decay", help="Weight decay: L2 for sgd, decoupled for adamw."),
        grad_clip: float = typer.Option(12.0, "--grad-clip", help="Gradient norm clipping."),
        oversample_fg: float = typer.Option(0.33, "--oversample-fg", help="Fraction of each batch centred on foreground."),
        augment: bool = typer.Option(True, "--augment/--no-augment", help="Data augmentation."),
        device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
        amp: bool | None = typer.Option(None, "--amp/--no-amp",
                                        help="Mixed precision: bf16 (fp16 + GradScaler on older GPUs). "
                                             "Default: on for CUDA and on CPUs with native bf16."),
        compile_: bool | None = typer.Option(None, "--compile/--no-compile",
                                             help="torch.compile the network (needs a C++ compiler on the CPU). "
                                                  "Default: on for 3D fp32 CPU runs of 500+ iterations."),
        channels_last: bool | None = typer.Option(None, "--channels-last/--no-channels-last",
                                                  help="Channels-last memory for the network and batches. "
                                                       "Default: on for 3D fp32 on the CPU."),
        num_workers: int | None = typer.Option(None, "--num-workers",
                                               help="Augmentation worker processes per training process. Default: 1 "
                                                    "on the CPU; on CUDA min(12, CPU cores per GPU - 1)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from checkpoint_latest.pt."),
        seed: int = typer.Option(12345, "--seed", help="Random seed (per rank: seed + 1000 * rank)."),
        early_stopping: int | None = typer.Option(None, "--early-stopping",
                                                  help="Stop after this many epochs without a new best EMA pseudo-Dice."),
        time_budget: str | None = typer.Option(None, "--time-budget",
                                               help="Wall-clock time for this run (900 = seconds, 900s, 60m, 1.5h): "
                                                    "the epoch count (and the lr schedule) is fitted after the first "
                                                    "epoch; --epochs caps it. On a plan made with `plan --time-budget` "
                                                    "(whose budget is the default) the plan's network and schedule are "
                                                    "used and the final validation fits inside it too."),
        save_every: int = typer.Option(1, "--save-every", help="Write checkpoint_latest.pt every N epochs."),
        final_validation: bool = typer.Option(True, "--final-validation/--no-final-validation",
                                              help="Sliding-window validation of the fold's cases at the end."),
        val_tta: bool = typer.Option(True, "--val-tta/--no-val-tta", help="Mirror TTA in the final validation."),
        save_probabilities: bool = typer.Option(False, "--save-probabilities",
                                                help="Final validation also writes validation/CASE.npz ((K, X, Y, Z) "
                                                     "float32), which find-best's ensembles need (large on big data)."),
        validation_only: bool = typer.Option(False, "--validation-only",
                                             help="Only rerun the final validation of the trained fold "
                                                  "(checkpoint_final.pt), e.g. with --save-probabilities."),
    ) -> None:
        """Train one fold with nnU-Net's recipe; writes WORK_DIR/results/CONFIG/ARCH/fold_K/."""
        from medseg3d.networks.registry import parse_option_args
        from medseg3d.training import TrainConfig, train_fold
        from medseg3d.training.validation import validate_trained_fold

        if validation_only:
            out = validate_trained_fold(work_dir, config, _fold(fold), arch=arch, device=device, mirroring=val_tta,
                                        save_probabilities=save_probabilities)
            typer.echo(f"validated -> {out / 'validation'}")
            return

        patch = _ints(patch_size, "--patch-size")
        budget = _plan_budget(ctx, work_dir, config, arch, time_budget, final_validation and _fold(fold) != "all",
                              device, _ints(features, "--features"), batch_size)
        tc = TrainConfig(
            architecture=arch, arch_options=parse_option_args(arch_option), epochs=epochs, iterations_per_epoch=iterations, val_iterations=val_iterations,
            batch_size=batch_size, patch_size=tuple(patch) if patch else None,
            features=_ints(features, "--features"), lr=lr, optimizer=optimizer, momentum=momentum,
            weight_decay=weight_decay,
            grad_clip=grad_clip, oversample_fg=oversample_fg, augment=augment, device=device, amp=amp,
            compile=compile_, channels_last=channels_last, num_workers=num_workers, seed=seed, resume=resume,
            early_stopping=early_stopping, aux_loss=aux_loss, aux_weight=aux_weight,
            time_budget_s=budget.pop("time_budget_s"), save_every=save_every, final_validation=final_validation, val_mirroring=val_tta,
            save_probabilities=save_probabilities,
        )
        if budget:  # the plan's time budget decided the flags not given (medseg3d.training.budget)
            tc = dataclasses.replace(tc, **budget)
        out = train_fold(work_dir, config, _fold(fold), tc)
        typer.echo(f"trained -> {out}")
