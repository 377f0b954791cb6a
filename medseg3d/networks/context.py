"""The multi-scale context module of Yu & Koltun (2016) and the `dilated` architecture built on it.

Basic module: seven 3x3 convolutions with dilations 1, 1, 2, 4, 8, 16, 1, each followed by a
LeakyReLU, then a 1x1 convolution, C channels throughout. Large module: the same with the channels
growing 2C, 2C, 4C, 8C, 16C, 32C, 32C, then the 1x1 back to C. Both are initialised to the identity
(the paper's scheme: each 3x3 filter passes channel a to channel a through its centre tap, every
other weight 0), so the module starts as a no-op on non-negative input (a ReLU map) and training
only adds context. No normalisation inside (it would break that start; the paper has none).

On 3D patches the dilations are capped per axis by the feature map (at most extent - 1: beyond,
a dilated tap samples only padding), and along an axis whose plan kernel is 1 (a coarse axis the
plan does not convolve at that stage) the kernel stays 1 and is not dilated at all.

`dilated` architecture (the paper's "front end + context"): the plan's stages with the last strides
replaced by dilation to output stride 8 (as DeepLab), a 1x1 conv to the K class scores, the context
module on those K maps, upsampling to the input. The module also plugs into the U-Net family at the
bottleneck: `--arch-option context=basic|large` for `unet`, `resenc_unet` and `vnet`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg3d.errors import ConfigError
from medseg3d.networks.blocks import activation, conv, upsample_to
from medseg3d.networks.encoders import dilated_topology, feature_map_size, plain_encoder
from medseg3d.networks.registry import ArchOption, register_architecture

DILATIONS = (1, 1, 2, 4, 8, 16, 1)
LARGE_WIDTHS = (2, 2, 4, 8, 16, 32, 32)
KINDS = ("basic", "large")


def capped_dilation(d: int, map_size: Sequence[int], kernel: Sequence[int]) -> list[int]:
    """Dilation `d` per axis, at most extent - 1 of the feature map, 1 where the kernel is 1."""
    return [1 if k == 1 else max(1, min(int(d), int(m) - 1)) for m, k in zip(map_size, kernel)]


def _identity_init(layer: nn.Module) -> None:
    """Channel a -> channel a through the centre tap (a < min(cin, cout)); everything else 0."""
    w = layer.weight
    with torch.no_grad():
        w.zero_()
        centre = tuple(s // 2 for s in w.shape[2:])
        for a in range(min(w.shape[0], w.shape[1])):
            w[(a, a, *centre)] = 1.0
        if layer.bias is not None:
            layer.bias.zero_()


class ContextModule(nn.Module):
    """`(B, C, *m) -> (B, C, *m)`: the identity at initialisation on non-negative input."""

    def __init__(self, dims: int, channels: int, kind: str, map_size: Sequence[int], kernel: Sequence[int]) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"context module {kind!r} is not one of {', '.join(KINDS)}")
        widths = [channels] * len(DILATIONS) if kind == "basic" else [channels * w for w in LARGE_WIDTHS]
        k3 = [3 if k > 1 else 1 for k in kernel]
        layers: list[nn.Module] = []
        cin = channels
        self.dilations = []
        for d, cout in zip(DILATIONS, widths):
            dil = capped_dilation(d, map_size, k3)
            self.dilations.append(dil)
            c = conv(dims, cin, cout, k3, dilation=dil)
            _identity_init(c)
            layers += [c, activation("lrelu", cout)]
            cin = cout
        final = conv(dims, cin, channels, 1)
        _identity_init(final)
        layers.append(final)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DilatedNet(nn.Module):
    """Front end (output stride 8), class scores, context module, upsampling; `output_weights` = [1.0]."""

    def __init__(self, dims: int, in_channels: int, num_classes: int, features: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]], patch_size: Sequence[int],
                 output_stride: int, module: str, norm: str) -> None:
        super().__init__()
        new_strides, dilations = dilated_topology(strides, output_stride)
        self.encoder = plain_encoder(dims, in_channels, features, new_strides, kernel_sizes, dilations, norm=norm)
        self.scores = conv(dims, features[-1], num_classes, 1)
        self.map_size = feature_map_size(patch_size, new_strides)
        self.context = ContextModule(dims, num_classes, module, self.map_size, kernel_sizes[-1])
        self.output_weights = [1.0]
        self.classifier_path = "scores"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        for stage in self.encoder:
            x = stage(x)
        return upsample_to(self.context(self.scores(x)), size)


@register_architecture("dilated", summary="Yu & Koltun: dilated front end (output stride 8) + multi-scale context "
                       "module on the class scores", options=(
    ArchOption("module", "basic", "context module: basic (C channels) or large (channels growing to 32C)",
               choices=KINDS),
    ArchOption("output_stride", 8, "patch / feature map per axis (the plan's last strides become dilation)",
               kind="int", choices=(8, 16)),
    ArchOption("norm", "instance", "normalisation in the front end", choices=("instance", "batch", "none")),
))
def build_dilated(*, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
                  kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
                  patch_size: Sequence[int] | None = None, deep_supervision: bool = True, module: str = "basic",
                  output_stride: int = 8, norm: str = "instance") -> nn.Module:
    """Front end + context module; arguments as `medseg3d.networks.build_network`."""
    if patch_size is None:
        raise ConfigError("dilated caps its dilations by the feature map: it needs the plan's patch_size")
    return DilatedNet(dims, in_channels, num_classes, features, strides, kernel_sizes, patch_size, output_stride,
                      module, norm)


def bottleneck_context(dims: int, features: Sequence[int], strides: Sequence[Sequence[int]],
                       kernel_sizes: Sequence[Sequence[int]], patch_size: Sequence[int] | None,
                       kind: str) -> nn.Module | None:
    """The context module for a U-Net bottleneck (`context` option of the U-Net family), or None for `none`."""
    if kind == "none":
        return None
    if patch_size is None:
        raise ConfigError("the context plug-in caps its dilations by the bottleneck's map: it needs the patch_size")
    return ContextModule(dims, features[-1], kind, feature_map_size(patch_size, strides), kernel_sizes[-1])


CONTEXT_OPTION = ArchOption("context", "none", "Yu & Koltun's context module at the bottleneck: none, basic, large",
                            choices=("none", *KINDS))
