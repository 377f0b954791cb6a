"""`segnet`: SegNet (Badrinarayanan, Kendall & Cipolla 2017) on the plan's stages.

Encoder stage s: `convs` conv-norm-LeakyReLU at the stage's resolution; between stages a max
pooling whose per-axis kernel (= stride) is the plan's stride of the next stage and which returns
its indices, so an anisotropic axis is pooled only where the plan pools it. Decoder, mirrored:
convolutions at each resolution reduce the channels to the stage above, then max-unpooling puts
each value back where the encoder's maximum was (the pooling indices, no learned upsampling), then
the next convolutions densify the sparse map; a 1x1 classifier. One output (no deep supervision).
The paper's VGG-16 encoder and batch norm become the plan's stages and instance norm (an option).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg3d.networks.blocks import StackedConv, conv
from medseg3d.networks.registry import ArchOption, register_architecture

_POOL = {2: F.max_pool2d, 3: F.max_pool3d}
_UNPOOL = {2: F.max_unpool2d, 3: F.max_unpool3d}


class SegNet(nn.Module):
    """forward `(B, C, *patch)` -> `(B, K, *patch)`; `output_weights` = [1.0]."""

    def __init__(self, dims: int, in_channels: int, num_classes: int, features: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]], convs: int, norm: str) -> None:
        super().__init__()
        n = len(features)
        self.dims = dims
        self.pools = [tuple(int(v) for v in strides[s]) for s in range(1, n)]  # before stage s (s >= 1)
        self.encoder = nn.ModuleList()
        cin = in_channels
        for s in range(n):
            self.encoder.append(StackedConv(dims, convs, cin, features[s], kernel_sizes[s], 1, norm=norm))
            cin = features[s]
        self.decoder = nn.ModuleList()  # decoder[i] works at stage n-1-i and ends with the channels of the stage above
        for s in range(n - 1, 0, -1):
            self.decoder.append(nn.Sequential(
                StackedConv(dims, convs - 1, features[s], features[s], kernel_sizes[s], 1, norm=norm)
                if convs > 1 else nn.Identity(),
                StackedConv(dims, 1, features[s], features[s - 1], kernel_sizes[s], 1, norm=norm)))
        self.top = StackedConv(dims, convs, features[0], features[0], kernel_sizes[0], 1, norm=norm)
        self.classifier = conv(dims, features[0], num_classes, 1)
        self.output_weights = [1.0]
        self.classifier_path = "classifier"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, sizes = [], []
        for s, stage in enumerate(self.encoder):
            if s > 0:
                k = self.pools[s - 1]
                sizes.append(x.shape[2:])
                if any(v > 1 for v in k):
                    x, idx = _POOL[self.dims](x, k, k, return_indices=True)
                else:
                    idx = None
                indices.append(idx)
            x = stage(x)
        for i, dec in enumerate(self.decoder):
            x = dec(x)
            s = len(self.encoder) - 1 - i  # the stage x is at
            idx, k = indices[s - 1], self.pools[s - 1]
            if idx is not None:
                x = _UNPOOL[self.dims](x, idx, k, k, output_size=sizes[s - 1])
        return self.classifier(self.top(x))


@register_architecture("segnet", summary="SegNet: max-pooling indices drive the decoder's unpooling", options=(
    ArchOption("convs", 2, "conv-norm-act blocks per stage (the paper's VGG-16: 2 in the first stages, 3 later)",
               kind="int", choices=(1, 2, 3)),
    ArchOption("norm", "instance", "normalisation after each conv", choices=("instance", "batch", "none")),
))
def build_segnet(*, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
                 patch_size: Sequence[int] | None = None, deep_supervision: bool = True, convs: int = 2,
                 norm: str = "instance") -> nn.Module:
    """SegNet; arguments as `medseg3d.networks.build_network`."""
    return SegNet(dims, in_channels, num_classes, features, strides, kernel_sizes, convs, norm)
