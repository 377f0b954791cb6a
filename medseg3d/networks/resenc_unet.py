"""`resenc_unet`: the residual-encoder U-Net nnU-Net recommends (ResEnc "M" layout).

Encoder: a stem conv block, then per stage `BLOCKS_PER_STAGE[s]` ResNet-D residual blocks (more
blocks in deeper stages; the first block of a stage carries its stride). Decoder: plain, one
conv block per stage after transposed conv up and skip concatenation. Same module layout and
parameter count as `dynamic_network_architectures` ResidualEncoderUNet with
n_blocks_per_stage (1, 3, 4, 6, 6, 6, ...) and n_conv_per_stage_decoder 1; 2D and 3D.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from medseg3d.networks.base import EncoderDecoder
from medseg3d.networks.blocks import ConvNormAct, ResidualBlock, UNetDecoder
from medseg3d.networks.context import CONTEXT_OPTION, bottleneck_context
from medseg3d.networks.registry import register_architecture

BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6)
DECODER_CONVS = 1


def blocks_per_stage(n_stages: int) -> list[int]:
    """Residual blocks per encoder stage: (1, 3, 4, 6, 6, ...) cut to n_stages."""
    return [BLOCKS_PER_STAGE[min(s, len(BLOCKS_PER_STAGE) - 1)] for s in range(n_stages)]


@register_architecture("resenc_unet", options=(CONTEXT_OPTION,))
def build_resenc_unet(*, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
                      kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
                      patch_size: Sequence[int] | None = None, deep_supervision: bool = True,
               context: str = "none") -> nn.Module:
    """Residual-encoder U-Net; arguments as `medseg3d.networks.build_network`."""
    encoder = nn.ModuleList()
    cin = features[0]
    for s, (f, st, k, n) in enumerate(zip(features, strides, kernel_sizes, blocks_per_stage(len(features)))):
        blocks = [ResidualBlock(dims, cin, f, k, st)] + [ResidualBlock(dims, f, f, k, 1) for _ in range(n - 1)]
        if s == 0:
            blocks.insert(0, ConvNormAct(dims, in_channels, features[0], k))  # stem
        encoder.append(nn.Sequential(*blocks))
        cin = f
    decoder = UNetDecoder(dims, num_classes, features, strides, kernel_sizes, DECODER_CONVS)
    return EncoderDecoder(encoder, decoder, deep_supervision, len(features),
                          bottleneck_context(dims, features, strides, kernel_sizes, patch_size, context))
