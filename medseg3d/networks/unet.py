"""`unet`: nnU-Net's plain U-Net (PlainConvUNet), driven by the plan's per-stage lists.

Per stage two conv-InstanceNorm(affine)-LeakyReLU(0.01) blocks with the stage's kernel; the first
conv of each stage carries the stage's stride (strided convolution down); decoder: transposed conv
(kernel = stride) up, concatenation with the skip, two conv blocks, a 1x1 head per decoder stage.
Same modules and parameter count as `dynamic_network_architectures` PlainConvUNet; 2D and 3D.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from medseg3d.networks.base import EncoderDecoder
from medseg3d.networks.blocks import StackedConv, UNetDecoder
from medseg3d.networks.context import CONTEXT_OPTION, bottleneck_context
from medseg3d.networks.registry import register_architecture

CONVS_PER_STAGE = 2


@register_architecture("unet", options=(CONTEXT_OPTION,))
def build_unet(*, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
               kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
               patch_size: Sequence[int] | None = None, deep_supervision: bool = True,
               context: str = "none") -> nn.Module:
    """Plain U-Net; arguments as `medseg3d.networks.build_network`."""
    encoder = nn.ModuleList()
    cin = in_channels
    for f, s, k in zip(features, strides, kernel_sizes):
        encoder.append(StackedConv(dims, CONVS_PER_STAGE, cin, f, k, s))
        cin = f
    decoder = UNetDecoder(dims, num_classes, features, strides, kernel_sizes, CONVS_PER_STAGE)
    return EncoderDecoder(encoder, decoder, deep_supervision, len(features),
                          bottleneck_context(dims, features, strides, kernel_sizes, patch_size, context))
