"""Building blocks shared by every architecture, for 2D and 3D alike (`dims` picks the ops).

Tensors are `(B, C, X, Y[, Z])`; per-axis lists (kernel sizes, strides) follow the patch's axis
order. Instance norm is affine with eps 1e-5 as in nnU-Net; it is computed as a `GroupNorm` with
one group per channel: the same function and parameters as `InstanceNormNd(affine=True)`, and
faster on the CPU (torch's instance norm reshapes to a batch norm of B*C channels). On
channels_last_3d fp32 tensors (CPU training, see `medseg3d.training`) it runs its own kernel,
`ChannelsLastInstanceNorm`, so that the whole network stays channels-last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TCONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_AVGPOOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}
_BATCHNORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
#: Normalisations an architecture's `norm` option may name.
NORMS = ("instance", "batch", "none")
NORM_EPS = 1e-5
LEAKY_SLOPE = 1e-2


def conv(dims: int, cin: int, cout: int, kernel: Sequence[int] | int, stride: Sequence[int] | int = 1,
         bias: bool = True, dilation: Sequence[int] | int = 1) -> nn.Module:
    """`dims`-D convolution padded by `dilation * (kernel - 1) // 2` per axis (same size for odd
    kernels; kernel == stride tiles). An axis with kernel 1 ignores its dilation."""
    k = _tuple(kernel, dims)
    d = tuple(di if ki > 1 else 1 for di, ki in zip(_tuple(dilation, dims), k))
    pad = tuple(di * (ki - 1) // 2 for di, ki in zip(d, k))
    return _CONV[dims](cin, cout, k, _tuple(stride, dims), padding=pad, dilation=d, bias=bias)


def transposed_conv(dims: int, cin: int, cout: int, stride: Sequence[int], bias: bool = True) -> nn.Module:
    """Transposed convolution with kernel == stride: upsamples each axis by its stride."""
    s = _tuple(stride, dims)
    return _TCONV[dims](cin, cout, s, s, bias=bias)


def avg_pool(dims: int, stride: Sequence[int]) -> nn.Module:
    s = _tuple(stride, dims)
    return _AVGPOOL[dims](s, s)


class ChannelsLastInstanceNorm(torch.autograd.Function):
    """Affine instance norm of a channels_last_3d `(B, C, X, Y, Z)` tensor, memory format kept.

    torch's group-norm kernel on channels-last memory ran 3-5x slower than on contiguous memory
    (docs/networks.md), and converting around it costs two copies per layer. Here the statistics
    are reduced over the spatial rows of the `(B, X*Y*Z, C)` view (vectorised along C) and the
    output and input gradient are one fused multiply-add each: `y = x * scale + shift`,
    `dx = dy * a + x * b + c` with per-(B, C) coefficients. fp32 in, fp32 statistics.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        b, c = x.shape[:2]
        rows = x.permute(0, 2, 3, 4, 1).reshape(b, -1, c)  # a view on channels_last_3d memory
        var, mean = torch.var_mean(rows, dim=1, correction=0)  # (B, C)
        rstd = torch.rsqrt(var + eps)
        scale = rstd * weight
        shift = bias - mean * scale
        ctx.save_for_backward(x, mean, rstd, weight)
        return torch.addcmul(shift[..., None, None, None], x, scale[..., None, None, None])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mean, rstd, weight = ctx.saved_tensors
        b, c = x.shape[:2]
        n = x[0, 0].numel()
        dy_rows = dy.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
        x_rows = x.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
        sum_dy = dy_rows.sum(1)  # (B, C)
        sum_dy_xhat = rstd * ((dy_rows * x_rows).sum(1) - mean * sum_dy)  # sum of dy * (x - mean) * rstd
        # dx = rstd * w * (dy - sum_dy / n - xhat * sum_dy_xhat / n), written as dy * a + x * k + m
        a = rstd * weight
        k = -a * rstd * sum_dy_xhat / n
        m = -a * sum_dy / n - k * mean
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.addcmul(torch.addcmul(m[..., None, None, None], x, k[..., None, None, None]),
                               dy, a[..., None, None, None])
        return dx, sum_dy_xhat.sum(0), sum_dy.sum(0), None


class InstanceNorm(nn.GroupNorm):
    """Affine instance norm over the spatial axes of `(B, C, *spatial)` (GroupNorm with C groups).

    On the CPU it runs torch's group-norm kernel on contiguous memory (faster than instance norm),
    or `ChannelsLastInstanceNorm` on channels_last_3d fp32 memory, or plain `F.group_norm` inside
    `torch.compile` (inductor fuses it with the activation in any layout); elsewhere it runs
    `F.instance_norm`, nnU-Net's op, which keeps fp16 under CUDA autocast.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, eps=NORM_EPS, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # CUDA: nnU-Net's kernel (group_norm would run in fp32 under autocast)
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        if torch.compiler.is_compiling():
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if (x.dim() == 5 and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)):
            return ChannelsLastInstanceNorm.apply(x, self.weight, self.bias, self.eps)
        return F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)


def activation(kind: str, channels: int) -> nn.Module:
    """'lrelu' (slope 0.01, nnU-Net) or 'prelu' (one slope per channel, V-Net)."""
    if kind == "lrelu":
        return nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
    if kind == "prelu":
        return nn.PReLU(channels)
    raise ValueError(f"unknown activation {kind!r}")


def norm_layer(kind: str, dims: int, channels: int) -> nn.Module:
    """`instance` (medseg3d's default, affine), `batch` (the papers' BatchNorm) or `none` (identity)."""
    if kind == "instance":
        return InstanceNorm(channels)
    if kind == "batch":
        return _BATCHNORM[dims](channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")


class ConvNormAct(nn.Sequential):
    """conv -> norm (instance by default) -> activation (`act=None` leaves the activation out)."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: Sequence[int] | int,
                 stride: Sequence[int] | int = 1, act: str | None = "lrelu", bias: bool = True,
                 dilation: Sequence[int] | int = 1, norm: str = "instance") -> None:
        layers: list[nn.Module] = [conv(dims, cin, cout, kernel, stride, bias=bias, dilation=dilation),
                                   norm_layer(norm, dims, cout)]
        if act is not None:
            layers.append(activation(act, cout))
        super().__init__(*layers)


class StackedConv(nn.Sequential):
    """`n` ConvNormAct blocks; the first maps cin -> cout with `stride`, the rest cout -> cout."""

    def __init__(self, dims: int, n: int, cin: int, cout: int, kernel: Sequence[int],
                 stride: Sequence[int] | int = 1, act: str = "lrelu", dilation: Sequence[int] | int = 1,
                 norm: str = "instance") -> None:
        blocks = [ConvNormAct(dims, cin, cout, kernel, stride, act, dilation=dilation, norm=norm)]
        blocks += [ConvNormAct(dims, cout, cout, kernel, 1, act, dilation=dilation, norm=norm) for _ in range(n - 1)]
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


_INTERP = {2: "bilinear", 3: "trilinear"}


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """`(B, C, *s)` resized to spatial `size` (bi/trilinear, align_corners=False); unchanged when equal."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=_INTERP[x.dim() - 2], align_corners=False)


def bilinear_kernel_1d(factor: int) -> torch.Tensor:
    """The 1D linear-interpolation filter of a transposed conv upsampling by `factor` (length 2f - f % 2)."""
    size = 2 * factor - factor % 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    x = torch.arange(size, dtype=torch.float64)
    return (1 - (x - centre).abs() / factor).clamp_min(0).float()


class BilinearUpsample(nn.Module):
    """FCN's learnable upsampling: depthwise transposed conv per axis factor, initialised to bi/trilinear.

    `(B, C, *s) -> (B, C, *s * factor)` exactly (kernel 2f - f % 2, padding (kernel - f) // 2 per
    axis); an axis with factor 1 is left alone (kernel 1, weight 1). No bias.
    """

    def __init__(self, dims: int, channels: int, factor: Sequence[int], learnable: bool = True) -> None:
        super().__init__()
        f = _tuple(factor, dims)
        k = tuple(2 * i - i % 2 for i in f)
        self.up = _TCONV[dims](channels, channels, k, f, padding=tuple((ki - fi) // 2 for ki, fi in zip(k, f)),
                               groups=channels, bias=False)
        w = torch.ones(())
        for axis, fi in enumerate(f):
            shape = [1] * dims
            shape[axis] = k[axis]
            w = w * bilinear_kernel_1d(fi).reshape(shape)
        with torch.no_grad():
            self.up.weight.copy_(w.expand_as(self.up.weight))
        self.up.weight.requires_grad_(learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)
