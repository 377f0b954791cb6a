"""`pspnet`: Pyramid Scene Parsing Network (Zhao et al. 2017) on the plan's stages.

Encoder: the plan's stages with the last strides replaced by dilation to output stride 8 (as
DeepLab, `encoders.dilated_topology`). Pyramid pooling: average pooling into `bins` (1, 2, 3, 6)
cells per axis, each bin clamped per axis to the feature map (a 5x7x5 map pools into at most 5x6x5
cells; an anisotropic axis with a short map gets fewer cells), a 1x1 conv reducing to
C / len(bins) channels, upsampling back, concatenation with the map, a 3x3 conv, dropout 0.1, a 1x1
classifier and upsampling to the input. Auxiliary head (the paper's res4 branch) on the stage
before the last: 3x3 conv, dropout, 1x1 classifier, upsampled to the input; in training it is the
second output with loss weight `aux_weight` (0.4 as in the paper). The pooled branches have no
instance norm (a map of one cell normalises to 0); `norm=batch` gives the paper's batch norm there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg3d.networks.blocks import ConvNormAct, activation, conv, norm_layer, upsample_to
from medseg3d.networks.encoders import dilated_topology, feature_map_size, plain_encoder
from medseg3d.networks.registry import ArchOption, register_architecture

_ADAPTIVE = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}
DROPOUT = 0.1


def clamp_bins(bins: Sequence[int], map_size: Sequence[int]) -> list[list[int]]:
    """Per bin, the pooled grid per axis: `min(bin, map extent)`."""
    return [[max(1, min(int(b), int(m))) for m in map_size] for b in bins]


class PyramidPooling(nn.Module):
    """`(B, cin, *m) -> (B, cin + len(bins) * (cin // len(bins)), *m)`."""

    def __init__(self, dims: int, cin: int, grids: Sequence[Sequence[int]], norm: str) -> None:
        super().__init__()
        self.grids = [tuple(g) for g in grids]
        red = max(1, cin // len(grids))
        branch_norm = norm if norm == "batch" else "none"
        self.branches = nn.ModuleList(
            nn.Sequential(conv(dims, cin, red, 1), norm_layer(branch_norm, dims, red), activation("lrelu", red))
            for _ in grids)
        self.out_channels = cin + red * len(grids)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        outs = [x]
        for grid, branch in zip(self.grids, self.branches):
            outs.append(upsample_to(branch(_ADAPTIVE[self.dims](x, grid)), size))
        return torch.cat(outs, dim=1)


class PSPNet(nn.Module):
    """forward `(B, C, *patch)` -> train mode with `aux`: `[main (B, K, *patch), aux (B, K, *patch)]`, else main."""

    def __init__(self, dims: int, in_channels: int, num_classes: int, features: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]], patch_size: Sequence[int],
                 output_stride: int, bins: Sequence[int], aux: bool, aux_weight: float, norm: str,
                 deep_supervision: bool) -> None:
        super().__init__()
        new_strides, dilations = dilated_topology(strides, output_stride)
        self.encoder = plain_encoder(dims, in_channels, features, new_strides, kernel_sizes, dilations, norm=norm)
        self.map_size = feature_map_size(patch_size, new_strides)
        self.grids = clamp_bins(bins, self.map_size)
        self.ppm = PyramidPooling(dims, features[-1], self.grids, norm)
        c = features[-1]
        self.head = nn.Sequential(ConvNormAct(dims, self.ppm.out_channels, c, kernel_sizes[-1], norm=norm),
                                  _DROPOUT[dims](DROPOUT), conv(dims, c, num_classes, 1))
        self.aux = aux and len(features) >= 2
        if self.aux:
            ca = features[-2]
            self.aux_head = nn.Sequential(ConvNormAct(dims, ca, ca, kernel_sizes[-2], norm=norm),
                                          _DROPOUT[dims](DROPOUT), conv(dims, ca, num_classes, 1))
        self.deep_supervision = deep_supervision
        self.output_weights = [1.0, float(aux_weight)] if (self.aux and deep_supervision) else [1.0]
        self.classifier_path = "head.2"

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        size = x.shape[2:]
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        main = upsample_to(self.head(self.ppm(x)), size)
        if self.aux and self.deep_supervision and self.training:
            return [main, upsample_to(self.aux_head(feats[-2]), size)]
        return main


@register_architecture("pspnet", summary="PSPNet: dilated encoder (output stride 8), pyramid pooling 1/2/3/6, "
                       "auxiliary head at 0.4", options=(
    ArchOption("output_stride", 8, "patch / feature map per axis (the plan's last strides become dilation)",
               kind="int", choices=(8, 16)),
    ArchOption("bins", [1, 2, 3, 6], "pyramid bins per axis (each clamped to the feature map)", kind="ints"),
    ArchOption("aux", True, "auxiliary head on the stage before the last", kind="bool"),
    ArchOption("aux_weight", 0.4, "loss weight of the auxiliary head", kind="float", minimum=0.0),
    ArchOption("norm", "instance", "normalisation after each conv", choices=("instance", "batch", "none")),
))
def build_pspnet(*, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
                 patch_size: Sequence[int] | None = None, deep_supervision: bool = True, output_stride: int = 8,
                 bins: Sequence[int] = (1, 2, 3, 6), aux: bool = True, aux_weight: float = 0.4,
                 norm: str = "instance") -> nn.Module:
    """PSPNet; arguments as `medseg3d.networks.build_network`."""
    from medseg3d.errors import ConfigError

    if patch_size is None:
        raise ConfigError("pspnet clamps its pyramid bins to the feature map: it needs the plan's patch_size")
    return PSPNet(dims, in_channels, num_classes, features, strides, kernel_sizes, patch_size, output_stride,
                  list(bins), aux, aux_weight, norm, deep_supervision)
