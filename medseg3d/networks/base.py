"""Encoder-decoder base class holding the output contract shared by every architecture."""

from __future__ import annotations

import torch
from torch import nn

from medseg3d.losses import deep_supervision_weights


class EncoderDecoder(nn.Module):
    """`encoder` (ModuleList, one module per stage) + a decoder called as `decoder(skips, all_outputs)`.

    forward `(B, C, *patch)` -> in train mode with deep supervision a list of logits, highest
    resolution first: `(B, K, *patch)`, then `(B, K, *patch / prod(strides[:s+1]))` for every
    decoder stage down to the one just above the bottleneck (len(features) - 1 outputs, as
    nnU-Net v2); in eval mode or with deep_supervision=False one tensor `(B, K, *patch)`.
    The deep-supervision heads always exist, so one state_dict loads with or without them.
    `output_weights`: nnU-Net's deep-supervision loss weights (`losses.deep_supervision_weights`).
    """

    def __init__(self, encoder: nn.ModuleList, decoder: nn.Module, deep_supervision: bool, num_stages: int,
                 context: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.context = context  # optional module on the bottleneck's output (the `context` option)
        self.deep_supervision = deep_supervision
        self.output_weights = deep_supervision_weights(num_stages - 1) if deep_supervision else [1.0]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        if self.context is not None:
            skips[-1] = self.context(skips[-1])
        all_outputs = self.deep_supervision and self.training
        outs = self.decoder(skips, all_outputs)
        return outs if all_outputs else outs[0]
