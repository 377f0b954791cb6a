"""Registry of architectures: name -> builder(plain plan arguments + its own options) -> `nn.Module`.

The contract every family fits (docs/networks.md, "The architecture contract"):
- a builder takes `in_channels, num_classes, dims, strides, kernel_sizes, features, patch_size,
  deep_supervision` (the plan's configuration as plain values, never the plan object) and its own
  options as keyword arguments, already validated against the `ArchOption`s it declared;
- the module it returns honours the output contract of `medseg3d.networks.base`: in train mode
  with `deep_supervision` a list of logits (the full-resolution output first, then the training
  outputs the architecture declares: U-Net deep supervision, PSPNet's auxiliary head), else one
  `(B, K, *patch)` tensor; and it carries `output_weights`, the loss weight of each training output,
  which the trainer's loss follows; and `classifier_path`, the submodule producing the main logits,
  whose input is the feature map an auxiliary feature loss (`--aux-loss hfd`) supervises.
Options come from the plan (`architecture_options`, defaults per architecture) and from
`medseg3d train --arch-option key=value`; checkpoints store them in `network_kwargs["options"]`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from medseg3d.errors import ConfigError

Builder = Callable[..., nn.Module]

_KINDS = ("str", "int", "float", "bool", "ints")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class ArchOption:
    """One option of an architecture: `kind` str|int|float|bool|ints (a list of ints, `6,12,18`).

    `choices`: the valid values (for str/int options); `special`: string values accepted besides the
    kind's values (e.g. `rates=auto` for an `ints` option); `minimum`: lower bound of numbers.
    """

    name: str
    default: Any
    help: str
    kind: str = "str"
    choices: tuple[Any, ...] | None = None
    special: tuple[str, ...] = ()
    minimum: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"option kind {self.kind!r} is not one of {_KINDS}")

    def valid_values(self) -> str:
        """Human-readable description of what this option accepts."""
        if self.choices is not None:
            text = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in self.choices)
        elif self.kind == "bool":
            text = "true, false"
        elif self.kind == "ints":
            text = "a comma-separated list of positive integers"
        else:
            text = f"a number{'' if self.minimum is None else f' >= {self.minimum:g}'}" if self.kind != "str" else "text"
        if self.special:
            text += f" (or {', '.join(self.special)})"
        return text

    def parse(self, value: Any, arch: str) -> Any:
        """`value` (a CLI string or a JSON value from the plan/checkpoint) as this option's kind.

        ConfigError naming the architecture, the option and its valid values when it does not fit.
        """
        def bad(why: str = "") -> ConfigError:
            return ConfigError(f"architecture {arch!r}: option {self.name}={self.format(value)} is not valid{why}; "
                               f"valid: {self.valid_values()} (default {self.format(self.default)})")

        if isinstance(value, str) and value.strip().lower() in self.special:
            return value.strip().lower()
        try:
            if self.kind == "bool":
                if isinstance(value, bool):
                    out: Any = value
                elif str(value).strip().lower() in _TRUE:
                    out = True
                elif str(value).strip().lower() in _FALSE:
                    out = False
                else:
                    raise bad()
            elif self.kind == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise bad()
                out = int(str(value).strip()) if isinstance(value, str) else int(value)
            elif self.kind == "float":
                out = float(value)
            elif self.kind == "ints":
                items = value.split(",") if isinstance(value, str) else list(value)
                out = [int(str(v).strip()) for v in items if str(v).strip()]
                if not out or any(v < 1 for v in out):
                    raise bad()
            else:
                out = str(value).strip().lower()
        except (TypeError, ValueError) as exc:
            raise bad() from exc
        if self.choices is not None and out not in self.choices:
            raise bad()
        if self.minimum is not None and self.kind in ("int", "float") and out < self.minimum:
            raise bad()
        return out

    @staticmethod
    def format(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)


@dataclass(frozen=True)
class Architecture:
    """A registered family: its builder, the options it takes and a one-line summary."""

    name: str
    builder: Builder
    options: tuple[ArchOption, ...] = field(default_factory=tuple)
    summary: str = ""

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def resolve_options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated by `given` (plan, checkpoint or CLI values), each parsed and validated.

        ConfigError listing the valid option names for an unknown key.
        """
        by_name = {o.name: o for o in self.options}
        out = self.defaults()
        for key, value in dict(given or {}).items():
            k = str(key).strip().lower().replace("-", "_")
            if k not in by_name:
                valid = ", ".join(f"{o.name} ({o.valid_values()})" for o in self.options) or "none"
                close = difflib.get_close_matches(k, list(by_name), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"architecture {self.name!r} has no option {key!r}.{hint} Valid options: {valid}")
            out[k] = by_name[k].parse(value, self.name)
        return out


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(name: str, *, options: Sequence[ArchOption] = (), summary: str = ""
                          ) -> Callable[[Builder], Builder]:
    """Decorator adding `builder` under `name` (lower case) with the options it accepts."""

    def add(builder: Builder) -> Builder:
        _REGISTRY[name.lower()] = Architecture(name.lower(), builder, tuple(options), summary)
        return builder

    return add


def list_architectures() -> list[str]:
    """Names accepted by `build_network`, sorted."""
    return sorted(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    """The registered `Architecture`; ConfigError with the valid names (and a close match) otherwise."""
    key = str(name).lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown architecture {name!r}.{hint} Valid names: {', '.join(list_architectures())}.")
    return _REGISTRY[key]


def parse_option_args(items: Sequence[str]) -> dict[str, str]:
    """`["key=value", ...]` (the repeated `--arch-option` flag) -> `{key: value}`; ConfigError on a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--arch-option {item!r} is not key=value (e.g. --arch-option output_stride=8)")
        out[key.strip()] = value.strip()
    return out


def build_network(name: str, *, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
                  kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
                  patch_size: Sequence[int] | None = None, deep_supervision: bool = True,
                  options: Mapping[str, Any] | None = None) -> nn.Module:
    """Build architecture `name` for a plan configuration.

    in_channels: image channels C; num_classes: K output logits (background included); dims: 2 or 3;
    strides / kernel_sizes: one list of `dims` ints per stage (first stride all 1); features: one int
    per stage; patch_size: the training / sliding-window patch (`dims` ints; architectures that scale
    to the feature map need it); options: the architecture's own options (defaults filled in).
    Input `(B, C, *patch)`; output in train mode with deep supervision a list of logits, the
    full-resolution `(B, K, *patch)` first, else one `(B, K, *patch)` tensor. The module carries
    `output_weights` (loss weight per training output) and `arch_options` (the resolved options).
    Raises ConfigError for an unknown name, option or inconsistent arguments.
    """
    arch = get_architecture(name)
    check_arguments(in_channels, num_classes, dims, strides, kernel_sizes, features)
    patch = None if patch_size is None else [int(p) for p in patch_size]
    if patch is not None and (len(patch) != dims or any(p < 1 for p in patch)):
        raise ConfigError(f"patch_size {patch} must hold {dims} positive ints")
    resolved = arch.resolve_options(options)
    net = arch.builder(in_channels=int(in_channels), num_classes=int(num_classes), dims=int(dims),
                       strides=[[int(v) for v in s] for s in strides],
                       kernel_sizes=[[int(v) for v in k] for k in kernel_sizes],
                       features=[int(f) for f in features], patch_size=patch,
                       deep_supervision=bool(deep_supervision), **resolved)
    weights = getattr(net, "output_weights", None)
    if not weights or any(float(w) < 0 for w in weights):
        raise RuntimeError(f"architecture {arch.name!r} must declare non-negative output_weights")  # a bug, not input
    from medseg3d.networks.base import classifier_of

    classifier_of(net)  # a bug, not input: every architecture names its head (`classifier_path`)
    net.arch_options = resolved
    return net


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
