"""`fcdensenet`: FC-DenseNet, "The One Hundred Layers Tiramisu" (Jégou et al. 2017), on the plan's stages.

A 3x3 stem conv (48 channels, as the paper), then per downsampling stage a dense block (layers of
norm-LeakyReLU-conv3x3-dropout, each adding `growth` channels concatenated to its input) and a
transition down (norm-act-conv1x1-dropout, max pooling with the plan's per-axis stride); a
bottleneck dense block; per upsampling stage a transition up (transposed conv with kernel = the
plan's stride, applied only to the features the previous dense block added, as the paper does to
keep the channel count bounded), concatenation with the skip and a dense block; a 1x1 classifier.

Presets (`preset`) give the layers per block and the growth rate of the paper's 56 / 67 / 103
networks, scaled to the plan's number of stages: 56 = 4 layers per block, k = 12; 67 = 5 layers,
k = 16; 103 = 4, 5, 7, 10, 12 down (the first stages of that list), 15 in the bottleneck, the
mirror up, k = 16. `checkpoint=true` recomputes every dense layer in the backward pass
(`torch.utils.checkpoint`, random state preserved, so gradients equal those without it): the
concatenated inputs of the layers, the memory that makes dense blocks expensive in 3D, are then
not kept. `checkpoint=auto` (default) lets `medseg3d plan --arch fcdensenet` turn it on when that
lets the U-Net's patch fit the budget. Instance norm instead of the paper's batch norm (an option).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as run_checkpointed

from medseg3d.networks.blocks import activation, conv, norm_layer, transposed_conv
from medseg3d.networks.registry import ArchOption, register_architecture

STEM = 48
PRESETS = {"56": ([4], 4, 12), "67": ([5], 5, 16), "103": ([4, 5, 7, 10, 12], 15, 16)}
_POOL = {2: F.max_pool2d, 3: F.max_pool3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}


def preset_layers(preset: str, n_down: int) -> tuple[list[int], int, int]:
    """(layers per down block, bottleneck layers, growth) of `preset` for `n_down` downsampling stages."""
    down, bottleneck, growth = PRESETS[preset]
    layers = [down[min(i, len(down) - 1)] for i in range(n_down)]
    return layers, bottleneck, growth


class DenseLayer(nn.Module):
    """norm -> LeakyReLU -> conv (growth channels) -> dropout; `(B, cin, *s) -> (B, growth, *s)`."""

    def __init__(self, dims: int, cin: int, growth: int, kernel: Sequence[int], dropout: float, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(norm_layer(norm, dims, cin), activation("lrelu", cin), conv(dims, cin, growth, kernel),
                                  _DROPOUT[dims](dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DenseBlock(nn.Module):
    """`n` dense layers; returns `(input ++ new features, new features)` (channels `cin + n * growth`, `n * growth`)."""

    def __init__(self, dims: int, cin: int, n: int, growth: int, kernel: Sequence[int], dropout: float, norm: str,
                 checkpointed: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(dims, cin + i * growth, growth, kernel, dropout, norm) for i in range(n))
        self.checkpointed = checkpointed
        self.out_channels = cin + n * growth

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = []
        for layer in self.layers:
            if self.checkpointed and self.training and torch.is_grad_enabled():
                y = run_checkpointed(layer, x, use_reentrant=False)
            else:
                y = layer(x)
            new.append(y)
            x = torch.cat((x, y), dim=1)
        return x, torch.cat(new, dim=1)


class FCDenseNet(nn.Module):
    """forward `(B, C, *patch)` -> `(B, K, *patch)`; `output_weights` = [1.0]."""

    def __init__(self, dims: int, in_channels: int, num_classes: int, strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], preset: str, dropout: float, norm: str,
                 checkpointed: bool) -> None:
        super().__init__()
        n_down = len(strides) - 1
        down_layers, bottleneck, growth = preset_layers(preset, n_down)
        self.dims = dims
        self.pools = [tuple(int(v) for v in strides[s + 1]) for s in range(n_down)]
        self.stem = conv(dims, in_channels, STEM, kernel_sizes[0])
        self.down = nn.ModuleList()
        self.transitions = nn.ModuleList()
        c = STEM
        skips = []
        for s in range(n_down):
            block = DenseBlock(dims, c, down_layers[s], growth, kernel_sizes[s], dropout, norm, checkpointed)
            self.down.append(block)
            c = block.out_channels
            skips.append(c)
            self.transitions.append(nn.Sequential(norm_layer(norm, dims, c), activation("lrelu", c),
                                                  conv(dims, c, c, 1), _DROPOUT[dims](dropout)))
        self.bottleneck = DenseBlock(dims, c, bottleneck, growth, kernel_sizes[-1], dropout, norm, checkpointed)
        new = bottleneck * growth
        self.ups = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for s in range(n_down - 1, -1, -1):
            self.ups.append(transposed_conv(dims, new, new, strides[s + 1]))
            block = DenseBlock(dims, new + skips[s], down_layers[s], growth, kernel_sizes[s], dropout, norm,
                               checkpointed)
            self.up_blocks.append(block)
            new = down_layers[s] * growth
            last = block.out_channels
        self.classifier = conv(dims, last, num_classes, 1)
        self.output_weights = [1.0]
        self.classifier_path = "classifier"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for block, trans, k in zip(self.down, self.transitions, self.pools):
            x, _ = block(x)
            skips.append(x)
            x = trans(x)
            if any(v > 1 for v in k):
                x = _POOL[self.dims](x, k, k)
        _, new = self.bottleneck(x)
        full = x
        for up, block, skip in zip(self.ups, self.up_blocks, reversed(skips)):
            full, new = block(torch.cat((up(new), skip), dim=1))
        return self.classifier(full)


@register_architecture("fcdensenet", summary="FC-DenseNet (Tiramisu) 56/67/103: dense blocks, transitions on the "
                       "plan's strides, optional gradient checkpointing", options=(
    ArchOption("preset", "67", "the paper's network: 56 (4 layers/block, k=12), 67 (5, k=16), 103 (4-5-7-10-12, "
               "bottleneck 15, k=16), cut to the plan's stages", choices=tuple(PRESETS)),
    ArchOption("dropout", 0.2, "dropout after every dense layer and transition", kind="float", minimum=0.0),
    ArchOption("checkpoint", "auto", "recompute dense layers in backward (memory for time); auto: the planner "
               "decides", choices=("auto", "true", "false")),
    ArchOption("norm", "instance", "normalisation before each conv", choices=("instance", "batch", "none")),
))
def build_fcdensenet(*, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
                     kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
                     patch_size: Sequence[int] | None = None, deep_supervision: bool = True, preset: str = "67",
                     dropout: float = 0.2, checkpoint: str = "auto", norm: str = "instance") -> nn.Module:
    """FC-DenseNet; arguments as `medseg3d.networks.build_network` (`features` unused: the growth rate sets widths).

    `checkpoint=auto` outside the planner means off.
    """
    return FCDenseNet(dims, in_channels, num_classes, strides, kernel_sizes, preset, dropout, norm,
                      checkpoint == "true")
