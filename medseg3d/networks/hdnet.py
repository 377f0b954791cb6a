"""`hdnet`: HDNet's location-aware attention (LAA) on the plain U-Net, adapted to anisotropic 3D patches.

Li et al., "HDNet: Hybrid Distance Network for semantic segmentation" (Neurocomputing 2021). The
LAA module on a feature map x `(B, C, *m)`:
- theta: 1x1 conv-norm-LeakyReLU to C' = max(8, C / reduction) channels, t = theta(x);
- hybrid distance relations, per range k and aggregation A in (average, max): A_k pools t with a
  window of k voxels at stride 1 (same-size output, average pooling without counting the padding),
  and R_k = cosine(t, A_k(t)) over the channels: one relation map `(B, 1, *m)` in [-1, 1] per
  (k, A), 2 x len(ranges) maps in all (the position distance is the window, the feature distance the
  cosine);
- interaction: u = omega([R_k1, ..., R_kn]), a per-position fusion (1x1 conv-norm-LeakyReLU to C',
  1x1 conv to C, sigmoid);
- excitation v = u * x; output y = x + phi(v), phi a 1x1 conv C -> C (default initialisation: a zero
  phi would start the module as the identity but leave theta and omega without a gradient until phi
  moves; the paper does not ask for it).

Adaptation to anisotropic 3D: the windows are per axis. Along an axis whose plan kernel is 1 at that
stage (a coarse axis the plan does not convolve there) the window is 1; elsewhere it is capped at
2 m - 1 (from any position that window already covers the whole axis); equal windows after the
caps are merged. The module sits on the encoder stage at the paper's output stride 8 (the deepest
stage whose cumulative stride is <= `output_stride` on every axis), and both the next stage and the
skip connection see its output. The HFD loss of the paper is the trainer's auxiliary loss
(`medseg3d.losses.HFDLoss`): on by default for `hdnet` (weight 0.1), available to every architecture
with `medseg3d train --aux-loss hfd`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg3d.errors import ConfigError
from medseg3d.networks.base import EncoderDecoder
from medseg3d.networks.blocks import ConvNormAct, StackedConv, UNetDecoder, conv
from medseg3d.networks.encoders import feature_map_size
from medseg3d.networks.registry import ArchOption, register_architecture

CONVS_PER_STAGE = 2
MIN_REDUCED = 8
#: The auxiliary loss HDNet trains with unless `--aux-loss` says otherwise: (name, weight).
DEFAULT_AUX_LOSS = ("hfd", 0.1)

_AVG = {2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {2: F.max_pool2d, 3: F.max_pool3d}


def relation_windows(ranges: Sequence[int], map_size: Sequence[int], kernel: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-axis pooling windows for ranges `k`: odd (k rounded up to odd), 1 where the plan kernel is 1,
    at most 2 m - 1 along an axis of m voxels; duplicates after the caps dropped, order kept."""
    out: list[tuple[int, ...]] = []
    for k in ranges:
        odd = int(k) + (1 - int(k) % 2)
        w = tuple(1 if kk == 1 else max(1, min(odd, 2 * int(m) - 1)) for m, kk in zip(map_size, kernel))
        if w not in out:
            out.append(w)
    return out


class LocationAwareAttention(nn.Module):
    """`(B, C, *m) -> (B, C, *m)`: y = x + phi(omega(relations(x)) * x)."""

    def __init__(self, dims: int, channels: int, windows: Sequence[Sequence[int]], reduction: int,
                 norm: str = "instance") -> None:
        super().__init__()
        if not windows:
            raise ConfigError("hdnet: the location-aware attention needs at least one range (option ranges)")
        reduced = min(channels, max(MIN_REDUCED, channels // max(1, reduction)))
        self.dims = dims
        self.windows = [tuple(int(v) for v in w) for w in windows]
        self.theta = ConvNormAct(dims, channels, reduced, 1, norm=norm)
        self.omega = nn.Sequential(ConvNormAct(dims, 2 * len(self.windows), reduced, 1, norm=norm),
                                   conv(dims, reduced, channels, 1), nn.Sigmoid())
        self.phi = conv(dims, channels, channels, 1)

    def relations(self, x: torch.Tensor) -> torch.Tensor:
        """The hybrid distance relations `(B, 2 * len(windows), *m)`: cosine(t, avg_k(t)), cosine(t, max_k(t))."""
        t = self.theta(x)
        ones = torch.ones((1, 1, *t.shape[2:]), dtype=t.dtype, device=t.device)
        maps = []
        for w in self.windows:
            # explicit padding: torch's pooling refuses windows wider than the unpadded map
            pad = [p for v in reversed(w) for p in (v // 2, v // 2)]
            avg = _AVG[self.dims](F.pad(t, pad), w, 1) / _AVG[self.dims](F.pad(ones, pad), w, 1)  # padding not counted
            mx = _MAX[self.dims](F.pad(t, pad, value=float("-inf")), w, 1)
            maps += [F.cosine_similarity(t, avg, dim=1, eps=1e-6), F.cosine_similarity(t, mx, dim=1, eps=1e-6)]
        return torch.stack(maps, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.omega(self.relations(x))
        return x + self.phi(u * x)


def attention_stage(strides: Sequence[Sequence[int]], output_stride: int) -> int:
    """The deepest stage whose cumulative stride is <= `output_stride` on every axis (at least stage 0)."""
    stage = 0
    for s in range(len(strides)):
        cum = [math.prod(int(st[a]) for st in strides[: s + 1]) for a in range(len(strides[0]))]
        if max(cum) <= output_stride:
            stage = s
    return stage


@register_architecture("hdnet", summary="HDNet: location-aware attention (hybrid distance relations by avg/max "
                       "pooling, cosine, per-position fusion) at output stride 8 on the U-Net, + the HFD loss",
                       options=(
    ArchOption("ranges", [3, 5, 7], "pooling windows k of the hybrid distance relations (voxels, per axis, "
               "capped by the feature map)", kind="ints"),
    ArchOption("output_stride", 8, "the attention sits on the deepest encoder stage at or below this stride",
               kind="int", choices=(2, 4, 8, 16, 32)),
    ArchOption("reduction", 4, "theta's channel reduction C -> max(8, C / reduction)", kind="int", minimum=1),
))
def build_hdnet(*, in_channels: int, num_classes: int, dims: int, strides: Sequence[Sequence[int]],
                kernel_sizes: Sequence[Sequence[int]], features: Sequence[int],
                patch_size: Sequence[int] | None = None, deep_supervision: bool = True,
                ranges: Sequence[int] = (3, 5, 7), output_stride: int = 8, reduction: int = 4) -> nn.Module:
    """U-Net + location-aware attention; arguments as `medseg3d.networks.build_network`."""
    if patch_size is None:
        raise ConfigError("hdnet caps its pooling windows by the feature map: it needs the plan's patch_size")
    encoder = nn.ModuleList()
    cin = in_channels
    for f, s, k in zip(features, strides, kernel_sizes):
        encoder.append(StackedConv(dims, CONVS_PER_STAGE, cin, f, k, s))
        cin = f
    decoder = UNetDecoder(dims, num_classes, features, strides, kernel_sizes, CONVS_PER_STAGE)
    stage = attention_stage(strides, output_stride)
    windows = relation_windows(ranges, feature_map_size(patch_size, strides, upto=stage), kernel_sizes[stage])
    laa = LocationAwareAttention(dims, features[stage], windows, reduction)
    net = EncoderDecoder(encoder, decoder, deep_supervision, len(features), laa, context_stage=stage)
    net.default_aux_loss = DEFAULT_AUX_LOSS
    return net
