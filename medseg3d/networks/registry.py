"""Registry of architectures: name -> builder(plain plan arguments) -> `nn.Module`.

Every builder takes `in_channels, num_classes, dims, strides, kernel_sizes, features,
deep_supervision` (the plan's configuration as plain values, never the plan object) and returns a
module honouring the output contract of docs/architecture.md (see `medseg3d.networks.base`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

from torch import nn

from medseg3d.errors import ConfigError

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_architecture(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding `builder` under `name` (lower case)."""

    def add(builder: Builder) -> Builder:
        _REGISTRY[name.lower()] = builder
        return builder

    return add


def list_architectures() -> list[str]:
    """Names accepted by `build_network`, sorted."""
    return sorted(_REGISTRY)


def build_network(name: str, *, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
                  kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
                  deep_supervision: bool = True) -> nn.Module:
    """Build architecture `name` for a plan configuration.

    in_channels: image channels C; num_classes: K output logits (background included); dims: 2 or 3;
    strides / kernel_sizes: one list of `dims` ints per stage (first stride all 1); features: one int
    per stage. Input `(B, C, *patch)`; output in train mode with deep supervision a list of logits,
    highest resolution first (`(B, K, *patch)`, then each lower decoder resolution), else one
    `(B, K, *patch)` tensor. Raises ConfigError for an unknown name or inconsistent arguments.
    """
    key = str(name).lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown architecture {name!r}.{hint} Valid names: {', '.join(list_architectures())}.")
    check_arguments(in_channels, num_classes, dims, strides, kernel_sizes, features)
    return _REGISTRY[key](in_channels=int(in_channels), num_classes=int(num_classes), dims=int(dims),
                          strides=[[int(v) for v in s] for s in strides],
                          kernel_sizes=[[int(v) for v in k] for k in kernel_sizes],
                          features=[int(f) for f in features], deep_supervision=bool(deep_supervision))


def check_arguments(in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
                    kernel_sizes: Sequence[Sequence[int]], features: Sequence[int]) -> None:
    """Raise ConfigError naming the first inconsistent network argument and how to fix it."""
    fix = "Re-run `medseg3d plan` or correct the configuration in plans.json."
    if dims not in (2, 3):
        raise ConfigError(f"dims must be 2 or 3, got {dims!r}. {fix}")
    if in_channels < 1 or num_classes < 2:
        raise ConfigError(f"Need in_channels >= 1 and num_classes >= 2, got {in_channels} and {num_classes}. {fix}")
    n = len(features)
    if n < 2 or len(strides) != n or len(kernel_sizes) != n:
        raise ConfigError(f"strides ({len(strides)}), kernel_sizes ({len(kernel_sizes)}) and features ({n}) need "
                          f"one entry per stage and at least 2 stages. {fix}")
    for what, lists in (("strides", strides), ("kernel_sizes", kernel_sizes)):
        for s, v in enumerate(lists):
            if len(v) != dims or any(int(i) < 1 for i in v):
                raise ConfigError(f"{what}[{s}] = {list(v)} must hold {dims} positive ints. {fix}")
    if any(int(f) < 1 for f in features):
        raise ConfigError(f"features must be positive, got {list(features)}. {fix}")
