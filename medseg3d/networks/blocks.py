"""Building blocks shared by every architecture, for 2D and 3D alike (`dims` picks the ops).

Tensors are `(B, C, X, Y[, Z])`; per-axis lists (kernel sizes, strides) follow the patch's axis
order. Instance norm is affine with eps 1e-5 as in nnU-Net; it is computed as a `GroupNorm` with
one group per channel: the same function and parameters as `InstanceNormNd(affine=True)`, and
faster on the CPU (torch's instance norm reshapes to a batch norm of B*C channels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TCONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_AVGPOOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}
NORM_EPS = 1e-5
LEAKY_SLOPE = 1e-2


def conv(dims: int, cin: int, cout: int, kernel: Sequence[int] | int, stride: Sequence[int] | int = 1,
         bias: bool = True) -> nn.Module:
    """`dims`-D convolution padded by `(kernel - 1) // 2` per axis (same size for odd kernels; kernel == stride tiles)."""
    k = _tuple(kernel, dims)
    return _CONV[dims](cin, cout, k, _tuple(stride, dims), padding=tuple((i - 1) // 2 for i in k), bias=bias)


def transposed_conv(dims: int, cin: int, cout: int, stride: Sequence[int], bias: bool = True) -> nn.Module:
    """Transposed convolution with kernel == stride: upsamples each axis by its stride."""
    s = _tuple(stride, dims)
    return _TCONV[dims](cin, cout, s, s, bias=bias)


def avg_pool(dims: int, stride: Sequence[int]) -> nn.Module:
    s = _tuple(stride, dims)
    return _AVGPOOL[dims](s, s)


class InstanceNorm(nn.GroupNorm):
    """Affine instance norm over the spatial axes of `(B, C, *spatial)` (GroupNorm with C groups).

    On the CPU it runs torch's group-norm kernel on contiguous memory (faster than instance norm;
    on channels_last_3d memory the kernel ran 3-5x slower, see docs/networks.md); elsewhere it
    runs `F.instance_norm`, nnU-Net's op, which keeps fp16 under CUDA autocast.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, eps=NORM_EPS, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # CUDA: nnU-Net's kernel (group_norm would run in fp32 under autocast)
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        return F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)


def activation(kind: str, channels: int) -> nn.Module:
    """'lrelu' (slope 0.01, nnU-Net) or 'prelu' (one slope per channel, V-Net)."""
    if kind == "lrelu":
        return nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
    if kind == "prelu":
        return nn.PReLU(channels)
    raise ValueError(f"unknown activation {kind!r}")


class ConvNormAct(nn.Sequential):
    """conv -> instance norm -> activation (`act=None` leaves the activation out)."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: Sequence[int] | int,
                 stride: Sequence[int] | int = 1, act: str | None = "lrelu", bias: bool = True) -> None:
        layers: list[nn.Module] = [conv(dims, cin, cout, kernel, stride, bias=bias), InstanceNorm(cout)]
        if act is not None:
            layers.append(activation(act, cout))
        super().__init__(*layers)


class StackedConv(nn.Sequential):
    """`n` ConvNormAct blocks; the first maps cin -> cout with `stride`, the rest cout -> cout."""

    def __init__(self, dims: int, n: int, cin: int, cout: int, kernel: Sequence[int],
                 stride: Sequence[int] | int = 1, act: str = "lrelu") -> None:
        blocks = [ConvNormAct(dims, cin, cout, kernel, stride, act)]
        blocks += [ConvNormAct(dims, cout, cout, kernel, 1, act) for _ in range(n - 1)]
        super().__init__(*blocks)


class ResidualBlock(nn.Module):
    """ResNet-D basic block (as nnU-Net's residual encoder): two convs, avg-pool + 1x1 projection skip.

    `(B, cin, *s) -> (B, cout, *s // stride)`; the stride applies to the first conv and the skip.
    """

    def __init__(self, dims: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] | int = 1,
                 act: str = "lrelu") -> None:
        super().__init__()
        stride_t = _tuple(stride, dims)
        self.conv1 = ConvNormAct(dims, cin, cout, kernel, stride_t, act)
        self.conv2 = ConvNormAct(dims, cout, cout, kernel, 1, act=None)
        self.act = activation(act, cout)
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride_t):
            skip.append(avg_pool(dims, stride_t))
        if cin != cout:
            skip.append(ConvNormAct(dims, cin, cout, 1, 1, act=None, bias=False))
        self.skip = nn.Sequential(*skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class UNetDecoder(nn.Module):
    """Plain U-Net decoder: per stage transposed conv up, concatenation with the skip, `n_conv` convs.

    `encoder_features[s]` / `strides[s]` / `kernel_sizes[s]` describe encoder stage `s` (0 = full
    resolution). Forward takes the encoder outputs (highest resolution first, bottleneck last) and
    returns the segmentation logits of every decoder resolution, highest resolution first
    (`(B, K, *patch)` first), or only the first when `all_outputs` is False.
    """

    def __init__(self, dims: int, num_classes: int, encoder_features: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], n_conv: int | Sequence[int] = 2, act: str = "lrelu") -> None:
        super().__init__()
        n = len(encoder_features)
        n_convs = [n_conv] * (n - 1) if isinstance(n_conv, int) else list(n_conv)
        self.up = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleList()
        for i, s in enumerate(range(n - 1, 0, -1)):  # from the bottleneck up
            f_below, f_skip = encoder_features[s], encoder_features[s - 1]
            self.up.append(transposed_conv(dims, f_below, f_skip, strides[s]))
            self.stages.append(StackedConv(dims, n_convs[i], 2 * f_skip, f_skip, kernel_sizes[s - 1], 1, act))
            self.heads.append(conv(dims, f_skip, num_classes, 1, 1, bias=True))

    def forward(self, skips: Sequence[torch.Tensor], all_outputs: bool) -> list[torch.Tensor]:
        x = skips[-1]
        outs = []
        last = len(self.stages) - 1
        for i, (up, stage, head) in enumerate(zip(self.up, self.stages, self.heads)):
            x = stage(torch.cat((up(x), skips[-(i + 2)]), dim=1))
            if all_outputs or i == last:
                outs.append(head(x))
        return outs[::-1]


def _tuple(v: Sequence[int] | int, dims: int) -> tuple[int, ...]:
    return (int(v),) * dims if isinstance(v, int) else tuple(int(i) for i in v)
