"""`fcn`: Fully Convolutional Network (Long, Shelhamer & Darrell 2015), variants 32s / 16s / 8s, on the plan's stages.

Adaptation to plan-driven 2D/3D patches: the VGG encoder becomes the plan's stages (two
conv-norm-LeakyReLU per stage, the first strided, as medseg3d's U-Net encoder); "32s" scores the
deepest stage only, "16s" adds the stage above it, "8s" the one above that (the paper's pool5,
pool4, pool3: the last 1, 2 or 3 resolutions of whatever depth the plan has). Each score head is a
1x1 convolution to the K classes; coarser scores are upsampled to the next resolution by a
transposed convolution initialised to bi/trilinear interpolation (per-axis factor = the plan's
stride, so an axis the plan does not pool is not upsampled) and fused by addition; the skip heads
start at zero as in the paper, so training begins from the coarse prediction. The fused score is
upsampled to the input by the remaining per-axis factor. One output (no deep supervision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medseg3d.networks.blocks import BilinearUpsample, conv
from medseg3d.networks.encoders import plain_encoder
from medseg3d.networks.registry import ArchOption, register_architecture

VARIANTS = {"32s": 1, "16s": 2, "8s": 3}


class FCN(nn.Module):
    """Encoder stages, 1x1 score heads on the last `levels` stages, skip fusion by addition.

    forward `(B, C, *patch)` -> `(B, K, *patch)` (train and eval; `output_weights` = [1.0]).
    """

    def __init__(self, dims: int, in_channels: int, num_classes: int, features: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]], levels: int,
                 norm: str) -> None:
        super().__init__()
        n = len(features)
        self.levels = max(1, min(levels, n))
        self.encoder = plain_encoder(dims, in_channels, features, strides, kernel_sizes, norm=norm)
        self.used = list(range(n - 1, n - 1 - self.levels, -1))  # deepest first
        self.scores = nn.ModuleList(conv(dims, features[s], num_classes, 1) for s in self.used)
        for head in self.scores[1:]:  # skip heads start at zero (the paper's score_pool4 / score_pool3)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.ups = nn.ModuleList(BilinearUpsample(dims, num_classes, strides[s + 1]) for s in self.used[1:])
        shallowest = self.used[-1]
        factor = [math.prod(st[a] for st in strides[: shallowest + 1]) for a in range(dims)]
        self.final_up = BilinearUpsample(dims, num_classes, factor)
        self.output_weights = [1.0]
        self.classifier_path = "scores.0"  # the head on the deepest features (the paper's score_fr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        score = self.scores[0](feats[self.used[0]])
        for head, up, s in zip(self.scores[1:], self.ups, self.used[1:]):
            score = up(score) + head(feats[s])
        return self.final_up(score)


@register_architecture("fcn", summary="FCN-32s/16s/8s: score heads on the last stages, bilinear-initialised "
                       "transposed-conv upsampling, skips fused by addition", options=(
    ArchOption("variant", "8s", "skip variant: 32s (deepest stage only), 16s (+ the stage above), 8s (+ two above)",
               choices=tuple(VARIANTS)),
    ArchOption("norm", "instance", "normalisation after each conv", choices=("instance", "batch", "none")),
))
def build_fcn(*, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
              kernel_sizes: Sequence[Sequence[int]], features: Sequence[int], patch_size: Sequence[int] | None = None,
              deep_supervision: bool = True, variant: str = "8s", norm: str = "instance") -> nn.Module:
    """FCN; arguments as `medseg3d.networks.build_network`."""
    return FCN(dims, in_channels, num_classes, features, strides, kernel_sizes, VARIANTS[variant], norm)
