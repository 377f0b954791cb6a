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
    `context` (optional): a shape-preserving module on the output of encoder stage `context_stage`
    (default the bottleneck): Yu & Koltun's context module, HDNet's location-aware attention; the
    next stage and the skip connection both see its output.
    `classifier_path`: the full-resolution head (its input is "the features before the head").
    """

    def __init__(self, encoder: nn.ModuleList, decoder: nn.Module, deep_supervision: bool, num_stages: int,
                 context: nn.Module | None = None, context_stage: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.context = context
        self.context_stage = num_stages - 1 if context_stage is None else int(context_stage)
        self.deep_supervision = deep_supervision
        self.output_weights = deep_supervision_weights(num_stages - 1) if deep_supervision else [1.0]
        self.classifier_path = f"decoder.heads.{num_stages - 2}"

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for s, stage in enumerate(self.encoder):
            x = stage(x)
            if self.context is not None and s == self.context_stage:
                x = self.context(x)
            skips.append(x)
        all_outputs = self.deep_supervision and self.training
        outs = self.decoder(skips, all_outputs)
        return outs if all_outputs else outs[0]


def classifier_of(net: nn.Module) -> nn.Module:
    """The module producing an architecture's main logits (named by its `classifier_path`); its input is
    the feature map auxiliary feature losses (HFD) supervise. RuntimeError when the path is missing (a bug)."""
    path = getattr(net, "classifier_path", None)
    if not isinstance(path, str):
        raise RuntimeError(f"{type(net).__name__} declares no classifier_path (the architecture contract)")
    try:
        return net.get_submodule(path)
    except AttributeError as exc:
        raise RuntimeError(f"{type(net).__name__}.classifier_path {path!r} names no submodule") from exc
