"""What the user chose for a training run (never mixed with what the plan decided).

`TrainConfig` holds nnU-Net v2's training defaults (docs/training.md, "Recipe"); every field has a
`medseg3d train` flag. Plan overrides (`patch_size`, `batch_size`, `features`) are for tests and benchmarks: they
change the run, not `plans.json`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from medseg3d.errors import ConfigError

DEVICES = ("auto", "cuda", "cpu")
OPTIMIZERS = ("sgd", "adamw")
AUX_LOSSES = ("none", "hfd")  # --aux-loss: "none" turns off an architecture's default (medseg3d.training.aux)


@dataclass
class TrainConfig:
    """Training choices; defaults are nnU-Net v2's (docs/training.md, "Recipe")."""

    architecture: str | None = None          # None: the plan's `architecture`
    arch_options: dict[str, Any] = field(default_factory=dict)  # over the plan's options (--arch-option k=v)
    epochs: int = 1000
    max_epochs: int | None = None            # a budget run may grow `epochs` up to this (None: `epochs` caps it);
    #   set when the epochs came from the plan's time budget, an estimate the run's own epoch times correct
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    batch_size: int | None = None            # None: the plan's
    patch_size: tuple[int, ...] | None = None  # None: the plan's
    features: list[int] | None = None        # None: the plan's (tests shrink the network)
    optimizer: str = "sgd"                   # "sgd" (nnU-Net: Nesterov) or "adamw" (faster start, short runs)
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    oversample_fg: float = 0.33
    augment: bool = True
    device: str = "auto"
    amp: bool | None = None                  # None: CUDA bf16 (or fp16 + GradScaler); CPU bf16 where native
    compile: bool | None = None              # None: on for 3D fp32 CPU runs of >= 500 iterations
    channels_last: bool | None = None        # None: on for 3D fp32 on the CPU (network and batches)
    num_workers: int | None = None           # None: 1 on CPU; on CUDA min(12, cpus per GPU - 1)
    seed: int = 12345
    resume: bool = False
    early_stopping: int | None = None        # epochs without a new best EMA pseudo-Dice before stopping
    ema_alpha: float = 0.9                   # EMA pseudo-Dice = alpha * old + (1 - alpha) * new
    time_budget_s: float | None = None       # wall-clock budget of this invocation: epochs sized after the first
    time_reserve_s: float | None = None      # None: the budget covers the epochs (clock from the first iteration);
    #   seconds: it covers the whole run from set-up on, these held back for the final validation (plan --time-budget)
    save_every: int = 1                      # checkpoint_latest.pt every N epochs
    aux_loss: str | None = None              # None: the architecture's default (hdnet: hfd); "none" or "hfd"
    aux_weight: float | None = None          # None: the architecture's (0.1)
    final_validation: bool = True
    val_step: float = 0.5
    val_mirroring: bool = True
    save_probabilities: bool = False         # final validation also writes CASE.npz (find-best's ensembles)
    n_folds: int = 5
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """ConfigError naming the bad value and its valid range."""
        positive = {"epochs": self.epochs, "iterations_per_epoch": self.iterations_per_epoch, "save_every": self.save_every}
        for name, v in positive.items():
            if int(v) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {v})")
        if self.max_epochs is not None and self.max_epochs < self.epochs:
            raise ConfigError(f"max_epochs ({self.max_epochs}) must be at least epochs ({self.epochs})")
        if self.val_iterations < 0:
            raise ConfigError(f"--val-iterations must be >= 0 (got {self.val_iterations})")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive (got {self.lr})")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        if not 0 <= self.oversample_fg <= 1:
            raise ConfigError(f"--oversample-fg must be in [0, 1] (got {self.oversample_fg})")
        if self.early_stopping is not None and self.early_stopping < 1:
            raise ConfigError(f"--early-stopping must be at least 1 epoch (got {self.early_stopping})")
        if self.early_stopping is not None and self.val_iterations == 0:
            raise ConfigError(f"--early-stopping {self.early_stopping} needs a validation signal, but "
                              "--val-iterations 0 measures no pseudo-Dice, so no epoch could ever be a new best; "
                              "give --val-iterations 1 or more, or drop --early-stopping")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"--time-budget must be positive seconds (got {self.time_budget_s})")
        if self.time_reserve_s is not None and (self.time_reserve_s < 0 or self.time_budget_s is None):
            raise ConfigError(f"time_reserve_s must be >= 0 seconds and needs a time budget (got {self.time_reserve_s} "
                              f"with time_budget_s {self.time_budget_s})")
        if self.aux_loss is not None and self.aux_loss.lower() not in AUX_LOSSES:
            raise ConfigError(f"--aux-loss must be one of {', '.join(AUX_LOSSES)} (got {self.aux_loss!r})")
        if self.aux_weight is not None and self.aux_weight < 0:
            raise ConfigError(f"--aux-weight must be >= 0 (got {self.aux_weight})")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0 (got {self.num_workers})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def network_request(cfg: Any, arch: str, tc: TrainConfig, config_name: str) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The network arguments and patch (voxels) a run of `arch` on configuration `cfg` asks for, checked.

    The plan's `network_kwargs()` with the architecture's options resolved over `tc.arch_options`,
    `tc.features` (one per stage) and `tc.patch_size` (one per axis, divisible by the strides) in
    place of the plan's; `kwargs["patch_size"]` is the patch. ConfigError names what does not fit.
    """
    from medseg3d.networks import get_architecture

    kwargs = cfg.network_kwargs()
    kwargs["options"] = get_architecture(arch).resolve_options({**kwargs["options"], **tc.arch_options})
    if tc.features is not None:
        if len(tc.features) != len(kwargs["features"]):
            raise ConfigError(f"--features needs {len(kwargs['features'])} values for {config_name} (one per stage), "
                              f"got {len(tc.features)}")
        kwargs["features"] = [int(f) for f in tc.features]
    patch = tuple(int(p) for p in (tc.patch_size or cfg.patch_size))
    if len(patch) != cfg.dims:
        raise ConfigError(f"--patch-size {','.join(map(str, patch))} has {len(patch)} values; configuration "
                          f"{config_name} is {cfg.dims}D")
    check_patch_size(patch, kwargs["strides"], config_name)
    kwargs["patch_size"] = list(patch)
    return kwargs, patch


def check_patch_size(patch: Sequence[int], strides: Sequence[Sequence[int]], config_name: str) -> None:
    """ConfigError unless every axis of `patch` (voxels) is a multiple of the network's total stride there.

    The encoder halves an axis once per stride of 2 along it (`strides`: one per stage), and the
    decoder's skip connections need the halvings to be exact, so axis a must be divisible by
    prod(s[a] for s in strides). The message names each bad axis and the two nearest sizes that work.
    """
    sizes = [int(p) for p in patch]
    divisor = [math.prod(int(s[a]) for s in strides) for a in range(len(sizes))]
    bad = [(a, p, d) for a, (p, d) in enumerate(zip(sizes, divisor)) if p % d]
    if not bad:
        return
    axes = "; ".join(f"axis {a} is {p}, not a multiple of {d} (use {_multiples_around(p, d)})" for a, p, d in bad)
    # the nearest multiple on each axis (ties upwards), at least one
    good = ",".join(str(max(d, (p + d // 2) // d * d)) for p, d in zip(sizes, divisor))
    raise ConfigError(f"--patch-size {','.join(map(str, sizes))} does not fit the {config_name} network: "
                      f"its strides divide each axis by {'x'.join(map(str, divisor))}, and {axes}. "
                      f"Try --patch-size {good}")


def _multiples_around(p: int, d: int) -> str:
    """The multiples of `d` just below and above `p` ("16 or 24"; only the upper one when the lower is 0)."""
    lower, upper = (p // d) * d, (p // d + 1) * d
    return f"{lower} or {upper}" if lower > 0 else f"{upper}"
