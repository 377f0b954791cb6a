"""`deeplabv3` and `deeplabv3plus`: DeepLab v3 / v3+ (Chen et al. 2017, 2018) on the plan's stages.

Encoder: the plan's stages (two conv-norm-LeakyReLU each) with the last strides replaced by
dilation so that the feature map is `output_stride` (16 or 8) times smaller than the patch per
axis (`encoders.dilated_topology`; an axis the plan pools less keeps its strides). ASPP: a 1x1
conv, three 3x3 atrous convs and image-level pooling (global average, 1x1 conv, broadcast back),
concatenated and fused by a 1x1 conv. v3 then classifies and upsamples to the input; v3+ adds the
decoder: low-level features of an early stage (the paper's stride-4 features) reduced by a 1x1 conv
to 48 channels, joined with the upsampled ASPP output, two 3x3 convs, a 1x1 classifier, upsampling
to the input. One output.

Atrous rates on 3D patches (`rates=auto`, the default): the paper's 6/12/18 at output stride 16 on
a 513-pixel crop sample a 33-voxel map at 0.18 / 0.36 / 0.55 of its extent; here each rate is that
same fraction of the feature map's extent **per axis** (`atrous_rates`), at least 1, at most
extent - 1 (a larger rate samples only padding), and increasing where the extent allows. A 40x56x40
hippocampus patch at output stride 8 gives a 5x7x5 map: rates (1,1,1), (2,3,2), (3,4,3) instead of
18 voxels of padding. The per-axis extent already carries the anisotropy: the planner makes patches
about isotropic in mm, so a coarse axis has fewer voxels and gets smaller rates. `rates=paper`
keeps 6/12/18 (12/24/36 at output stride 8) on every axis; `rates=a,b,c` sets them.
The image-pooling branch has no normalisation (instance norm of a 1-voxel map is 0; the paper's
batch norm is available as `norm=batch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg3d.errors import ConfigError
from medseg3d.networks.blocks import ConvNormAct, activation, conv, norm_layer, upsample_to
from medseg3d.networks.encoders import dilated_topology, feature_map_size, plain_encoder
from medseg3d.networks.registry import ArchOption, register_architecture

PAPER_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
PAPER_MAP = {16: 33, 8: 65}  # the feature map of the paper's 513 crop at each output stride
LOW_LEVEL_CHANNELS = 48
MAX_ASPP_CHANNELS = 256


def atrous_rates(map_size: Sequence[int], output_stride: int, rates: str | Sequence[int]) -> list[list[int]]:
    """Per ASPP branch, the dilation per axis (see the module docstring for the `auto` rule)."""
    dims = len(map_size)
    if rates == "paper":
        return [[r] * dims for r in PAPER_RATES[output_stride]]
    if rates != "auto":
        return [[int(r)] * dims for r in rates]
    fractions = [r / PAPER_MAP[output_stride] for r in PAPER_RATES[output_stride]]
    out = [[1] * dims for _ in fractions]
    for a, extent in enumerate(map_size):
        top = max(1, int(extent) - 1)
        prev = 0
        for k, f in enumerate(fractions):
            r = min(top, max(1, round(f * extent), prev + 1))
            out[k][a] = r
            prev = r
    return out


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: `(B, cin, *m) -> (B, cout, *m)`."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: Sequence[int], rates: Sequence[Sequence[int]],
                 norm: str) -> None:
        super().__init__()
        self.branches = nn.ModuleList([ConvNormAct(dims, cin, cout, 1, norm=norm)])
        for r in rates:
            self.branches.append(ConvNormAct(dims, cin, cout, kernel, dilation=r, norm=norm))
        pool_norm = norm if norm == "batch" else "none"
        self.image_pool = nn.Sequential(conv(dims, cin, cout, 1), norm_layer(pool_norm, dims, cout),
                                        activation("lrelu", cout))
        self.project = ConvNormAct(dims, cout * (len(rates) + 2), cout, 1, norm=norm)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        pooled = self.image_pool(x.mean(dim=tuple(range(2, 2 + self.dims)), keepdim=True))
        outs.append(pooled.expand(-1, -1, *x.shape[2:]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3(nn.Module):
    """forward `(B, C, *patch)` -> `(B, K, *patch)`; `output_weights` = [1.0]."""

    def __init__(self, dims: int, in_channels: int, num_classes: int, features: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]],
                 patch_size: Sequence[int], output_stride: int, rates: str | Sequence[int],
                 aspp_channels: int, decoder: bool, low_level_stage: int | None, norm: str) -> None:
        super().__init__()
        new_strides, dilations = dilated_topology(strides, output_stride)
        self.encoder = plain_encoder(dims, in_channels, features, new_strides, kernel_sizes, dilations, norm=norm)
        self.map_size = feature_map_size(patch_size, new_strides)
        self.rates = atrous_rates(self.map_size, output_stride, rates)
        c = aspp_channels or min(MAX_ASPP_CHANNELS, max(features))
        self.aspp = ASPP(dims, features[-1], c, kernel_sizes[-1], self.rates, norm)
        self.decoder = decoder
        if decoder:
            self.low_stage = low_level_stage if low_level_stage is not None else default_low_level_stage(new_strides)
            low_c = min(LOW_LEVEL_CHANNELS, features[self.low_stage])
            k = kernel_sizes[self.low_stage]
            self.reduce = ConvNormAct(dims, features[self.low_stage], low_c, 1, norm=norm)
            self.fuse = nn.Sequential(ConvNormAct(dims, c + low_c, c, k, norm=norm), ConvNormAct(dims, c, c, k, norm=norm))
        else:
            self.head = ConvNormAct(dims, c, c, kernel_sizes[-1], norm=norm)
        self.classifier = conv(dims, c, num_classes, 1)
        self.output_weights = [1.0]
        self.classifier_path = "classifier"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        y = self.aspp(x)
        if self.decoder:
            low = self.reduce(feats[self.low_stage])
            y = self.fuse(torch.cat((upsample_to(y, low.shape[2:]), low), dim=1))
        else:
            y = self.head(y)
        return upsample_to(self.classifier(y), size)


def default_low_level_stage(strides: Sequence[Sequence[int]]) -> int:
    """The first stage whose largest cumulative stride reaches 4 (the paper's low-level features), never the last."""
    cum = [1] * len(strides[0])
    for s, st in enumerate(strides[:-1]):
        cum = [c * v for c, v in zip(cum, st)]
        if max(cum) >= 4:
            return s
    return max(0, len(strides) - 2)


_COMMON = (
    ArchOption("output_stride", 16, "patch / feature map per axis: the plan's last strides become dilation",
               kind="int", choices=(8, 16)),
    ArchOption("rates", "auto", "ASPP atrous rates: auto (scaled per axis to the feature map), paper "
               "(6,12,18 at output stride 16), or a list", kind="ints", special=("auto", "paper")),
    ArchOption("aspp_channels", 0, "ASPP width (0: min(256, widest stage))", kind="int", minimum=0),
    ArchOption("norm", "instance", "normalisation after each conv", choices=("instance", "batch", "none")),
)


def _build(decoder: bool, in_channels: int, num_classes: int, dims: int, strides, kernel_sizes, features,
           patch_size, output_stride: int, rates, aspp_channels: int, norm: str, low_level_stage: int = -1,
           name: str = "deeplabv3") -> nn.Module:
    if patch_size is None:
        raise ConfigError(f"{name} scales its atrous rates to the feature map: it needs the plan's patch_size")
    if isinstance(rates, list) and len(rates) != 3:
        raise ConfigError(f"{name}: rates takes three values (one per atrous branch), got {rates}")
    low = None if low_level_stage < 0 else int(low_level_stage)
    if low is not None and low >= len(features) - 1:
        raise ConfigError(f"{name}: low_level_stage {low} must name a stage above the last (0..{len(features) - 2})")
    return DeepLabV3(dims, in_channels, num_classes, features, strides, kernel_sizes, patch_size, output_stride,
                     rates, aspp_channels, decoder, low, norm)


@register_architecture("deeplabv3", summary="DeepLab v3: dilated encoder (output stride 16/8) + ASPP",
                       options=_COMMON)
def build_deeplabv3(*, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
                    kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
                    patch_size: Sequence[int] | None = None, deep_supervision: bool = True, output_stride: int = 16,
                    rates: str | list[int] = "auto", aspp_channels: int = 0, norm: str = "instance") -> nn.Module:
    """DeepLab v3; arguments as `medseg3d.networks.build_network`."""
    return _build(False, in_channels, num_classes, dims, strides, kernel_sizes, features, patch_size, output_stride,
                  rates, aspp_channels, norm, name="deeplabv3")


@register_architecture("deeplabv3plus", summary="DeepLab v3+: v3 + decoder joining 48-channel low-level features",
                       options=(*_COMMON, ArchOption("low_level_stage", -1, "stage whose features join the decoder "
                                                     "(-1: the first at cumulative stride 4)", kind="int", minimum=-1)))
def build_deeplabv3plus(*, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
                        kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
                        patch_size: Sequence[int] | None = None, deep_supervision: bool = True,
                        output_stride: int = 16, rates: str | list[int] = "auto", aspp_channels: int = 0,
                        norm: str = "instance", low_level_stage: int = -1) -> nn.Module:
    """DeepLab v3+; arguments as `medseg3d.networks.build_network`."""
    return _build(True, in_channels, num_classes, dims, strides, kernel_sizes, features, patch_size, output_stride,
                  rates, aspp_channels, norm, low_level_stage, name="deeplabv3plus")
