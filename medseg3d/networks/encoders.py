"""Encoders on the plan's stages for the non-U-Net families, and the output-stride rule.

Every per-axis list follows the patch's axis order; `strides[s]` is the downsampling stride of stage
`s` (stage 0 all 1), as the plan writes them, so anisotropic plans (an axis with stride 1 at some
stages) keep their shape: an axis the plan does not pool is neither pooled nor dilated here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from medseg3d.networks.blocks import StackedConv

CONVS_PER_STAGE = 2


def dilated_topology(strides: Sequence[Sequence[int]], output_stride: int) -> tuple[list[list[int]], list[list[int]]]:
    """DeepLab's atrous encoder on the plan's strides: `(strides', dilations)` per stage and axis.

    Per axis, a stage's stride is kept while the cumulative downsampling stays <= `output_stride`;
    beyond, the stride becomes 1 and that stage and every later one dilate by the strides removed
    (so the receptive field grows as before, at a higher resolution). Axes pooled less than
    `output_stride` by the plan (coarse anisotropic axes) keep the plan's strides and dilation 1.
    """
    dims = len(strides[0])
    new_strides = [[1] * dims for _ in strides]
    dilations = [[1] * dims for _ in strides]
    for a in range(dims):
        cum, dil = 1, 1
        for s, st in enumerate(strides):
            if cum * st[a] <= output_stride:
                cum *= st[a]
                new_strides[s][a] = st[a]
            else:
                dil *= st[a]
            dilations[s][a] = dil
    return new_strides, dilations


def feature_map_size(patch_size: Sequence[int], strides: Sequence[Sequence[int]], upto: int | None = None) -> list[int]:
    """Spatial size after stages `0..upto` (default: all) of a strided encoder: patch // prod(strides)."""
    stages = strides if upto is None else strides[: upto + 1]
    return [max(1, int(p) // math.prod(int(s[a]) for s in stages)) for a, p in enumerate(patch_size)]


def plain_encoder(dims: int, in_channels: int, features: Sequence[int], strides: Sequence[Sequence[int]],
                  kernel_sizes: Sequence[Sequence[int]], dilations: Sequence[Sequence[int]] | None = None,
                  n_conv: int = CONVS_PER_STAGE, norm: str = "instance") -> nn.ModuleList:
    """One `StackedConv` per stage (conv-norm-LeakyReLU x `n_conv`, the first carrying the stride),
    the same encoder as the plain U-Net's; `dilations` per stage and axis for atrous encoders."""
    enc = nn.ModuleList()
    cin = in_channels
    for s, (f, st, k) in enumerate(zip(features, strides, kernel_sizes)):
        d = dilations[s] if dilations is not None else 1
        enc.append(StackedConv(dims, n_conv, cin, f, k, st, dilation=d, norm=norm))
        cin = f
    return enc
