"""Auxiliary feature losses of a training run (`medseg3d train --aux-loss hfd`, HDNet's default).

The loss watches the input of the architecture's classifier (`classifier_path`, part of the network
contract) through a forward pre-hook, so any registered architecture gets it without a change to its
forward: the hook keeps the features of the latest training-mode forward, and the training step adds
`weight * HFDLoss(features, labels)` to the segmentation loss. Not active in validation or inference.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from medseg3d.errors import ConfigError
from medseg3d.losses import HFDLoss
from medseg3d.networks.base import classifier_of
from medseg3d.training.config import AUX_LOSSES

log = logging.getLogger(__name__)

DEFAULT_WEIGHT = 0.1


def resolve_aux_loss(name: str | None, weight: float | None, net: nn.Module) -> tuple[str, float] | None:
    """(loss, weight) of this run: `--aux-loss` / `--aux-weight`, else the architecture's `default_aux_loss`."""
    default = getattr(net, "default_aux_loss", None)
    if name is None:
        if default is None:
            if weight is not None:
                raise ConfigError(f"--aux-weight {weight} needs an auxiliary loss: add --aux-loss hfd")
            return None
        name, default_weight = default
    else:
        name = name.lower()
        if name not in AUX_LOSSES:
            raise ConfigError(f"--aux-loss {name!r} is not one of {', '.join(AUX_LOSSES)}")
        default_weight = default[1] if default is not None and default[0] == name else DEFAULT_WEIGHT
    if name == "none":
        return None
    w = float(default_weight if weight is None else weight)
    return (name, w) if w > 0 else None


class FeatureLoss:
    """`weight * HFDLoss` on the features entering `net`'s classifier; `__call__(labels)` after a forward."""

    def __init__(self, net: nn.Module, name: str, weight: float, num_classes: int, device: torch.device) -> None:
        head = classifier_of(net)
        channels = getattr(head, "in_channels", None)
        if not isinstance(channels, int):
            raise RuntimeError(f"{type(net).__name__}'s classifier {type(head).__name__} has no in_channels")
        self.name, self.weight = name, float(weight)
        self.loss = HFDLoss(num_classes, channels).to(device)
        self._features: torch.Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training:
            self._features = args[0]

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        feats, self._features = self._features, None
        if feats is None:
            raise RuntimeError("the auxiliary loss saw no training forward pass of the classifier")
        return self.weight * self.loss(feats, labels)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.loss.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if state:
            self.loss.load_state_dict(state)

    def close(self) -> None:
        self._handle.remove()
