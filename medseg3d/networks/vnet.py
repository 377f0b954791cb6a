"""`vnet`: V-Net (Milletari et al. 2016) on the plan's topology, instance norm instead of batch norm.

Every stage is residual: its input (after the down/up convolution) is added to the output of its
convolutions. Convolutions are 5x5x5 (an axis whose plan kernel is 1, i.e. a coarse axis, keeps 1),
PReLU activations; down = strided conv with kernel = stride, up = transposed conv with kernel =
stride; the decoder concatenates the skip like the paper's right half. Stage s has
min(s + 1, 3) convolutions (the paper's 1, 2, 3, 3, ...). Deep-supervision heads and output
contract as every architecture (see `medseg3d.networks.base`); 2D and 3D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg3d.networks.base import EncoderDecoder
from medseg3d.networks.blocks import ConvNormAct, InstanceNorm, activation, conv, transposed_conv
from medseg3d.networks.context import CONTEXT_OPTION, bottleneck_context
from medseg3d.networks.registry import register_architecture

VNET_KERNEL = 5
ACT = "prelu"


def _vnet_kernel(kernel: Sequence[int]) -> list[int]:
    return [VNET_KERNEL if k > 1 else k for k in kernel]


def _convs(stage: int) -> int:
    return min(stage + 1, 3)


class ResidualConvs(nn.Module):
    """`n` convs (`cin` -> `cout`, then `cout` -> `cout`), the last activation after adding `residual`."""

    def __init__(self, dims: int, n: int, cin: int, cout: int, kernel: Sequence[int]) -> None:
        super().__init__()
        layers = [ConvNormAct(dims, cin if i == 0 else cout, cout, kernel, 1, act=ACT if i < n - 1 else None)
                  for i in range(n)]
        self.convs = nn.Sequential(*layers)
        self.act = activation(ACT, cout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.act(self.convs(x) + residual)


class EncoderStage(nn.Module):
    """Down (or entry) conv, then residual convs: `(B, cin, *s) -> (B, cout, *s // stride)`."""

    def __init__(self, dims: int, stage: int, cin: int, cout: int, stride: Sequence[int], kernel: Sequence[int]) -> None:
        super().__init__()
        k = _vnet_kernel(kernel)
        down_kernel = k if stage == 0 else stride
        self.down = ConvNormAct(dims, cin, cout, down_kernel, stride, act=ACT)
        self.body = ResidualConvs(dims, _convs(stage), cout, cout, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return self.body(x, x)


class VNetDecoder(nn.Module):
    """Per stage: transposed conv up (+norm, PReLU), concatenation with the skip, residual convs, 1x1 head."""

    def __init__(self, dims: int, num_classes: int, features: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        n = len(features)
        self.up = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(n - 1, 0, -1):
            f = features[s - 1]
            self.up.append(nn.Sequential(transposed_conv(dims, features[s], f, strides[s]),
                                         InstanceNorm(f), activation(ACT, f)))
            self.stages.append(ResidualConvs(dims, _convs(s - 1), 2 * f, f, _vnet_kernel(kernel_sizes[s - 1])))
            self.heads.append(conv(dims, f, num_classes, 1, 1, bias=True))

    def forward(self, skips: Sequence[torch.Tensor], all_outputs: bool) -> list[torch.Tensor]:
        x = skips[-1]
        outs = []
        last = len(self.stages) - 1
        for i, (up, stage, head) in enumerate(zip(self.up, self.stages, self.heads)):
            u = up(x)
            x = stage(torch.cat((u, skips[-(i + 2)]), dim=1), u)
            if all_outputs or i == last:
                outs.append(head(x))
        return outs[::-1]


@register_architecture("vnet", options=(CONTEXT_OPTION,))
def build_vnet(*, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
               kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
               patch_size: Sequence[int] | None = None, deep_supervision: bool = True,
               context: str = "none") -> nn.Module:
    """V-Net; arguments as `medseg3d.networks.build_network`."""
    encoder = nn.ModuleList()
    cin = in_channels
    for s, (f, st, k) in enumerate(zip(features, strides, kernel_sizes)):
        encoder.append(EncoderStage(dims, s, cin, f, st, k))
        cin = f
    return EncoderDecoder(encoder, VNetDecoder(dims, num_classes, features, strides, kernel_sizes), deep_supervision,
                          len(features), bottleneck_context(dims, features, strides, kernel_sizes, patch_size, context))
